"""Installs the ``normrnn`` package; the Triton kernels in ``kernels/`` install as
``normrnn.kernels``.
"""
from setuptools import setup

setup(
    packages=["normrnn", "normrnn.reference", "normrnn.kernels"],
    package_dir={"normrnn": "normrnn", "normrnn.kernels": "kernels"},
)
