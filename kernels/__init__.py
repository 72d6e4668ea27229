"""Triton kernels of normrnn (installed as ``normrnn.kernels``): one file per kernel and its launcher."""
