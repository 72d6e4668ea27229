"""Installs the ``normrnn`` package; the Triton kernels in ``kernels/`` install as
``normrnn.kernels``, the bench suite in ``bench/`` as ``normrnn.bench`` and the C++ sources of the
CPU backend in ``csrc/`` as data of ``normrnn.csrc``.
"""
from setuptools import setup

setup(
    packages=["normrnn", "normrnn.reference", "normrnn.kernels", "normrnn.bench", "normrnn.csrc"],
    package_dir={"normrnn": "normrnn", "normrnn.kernels": "kernels", "normrnn.bench": "bench",
                 "normrnn.csrc": "csrc"},
    # the C++ sources ship with the package: the CPU backend compiles them on first use
    package_data={"normrnn.csrc": ["*.h", "*.cpp"]},
)
