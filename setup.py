"""Installs the ``normrnn`` package; the Triton kernels in ``kernels/`` install as
``normrnn.kernels`` and the bench suite in ``bench/`` as ``normrnn.bench``.
"""
from setuptools import setup

setup(
    packages=["normrnn", "normrnn.reference", "normrnn.kernels", "normrnn.bench"],
    package_dir={"normrnn": "normrnn", "normrnn.kernels": "kernels", "normrnn.bench": "bench"},
)
