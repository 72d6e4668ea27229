"""Installs the ``normrnn`` package; the Triton kernels in ``kernels/`` install as
``normrnn.kernels``, the C++ sources in ``csrc/`` as ``normrnn.csrc`` and the bench suite as ``normrnn.bench``.

The C++ CPU backend in ``csrc/`` is compiled on first use by ``torch.utils.cpp_extension``
(see ``normrnn/cpp_backend.py``), so that installing never builds against a torch other than the
one already present.
"""
from setuptools import setup

setup(
    packages=["normrnn", "normrnn.reference", "normrnn.kernels", "normrnn.csrc", "normrnn.bench"],
    package_dir={"normrnn": "normrnn", "normrnn.kernels": "kernels", "normrnn.csrc": "csrc",
                 "normrnn.bench": "bench"},
    package_data={"normrnn.csrc": ["*.cpp", "*.h"], "normrnn.bench": ["results/*"]},
)
