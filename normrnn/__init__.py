"""normrnn: normalized recurrent layers (LSTM, GRU, vanilla RNN with layer norm, per-timestep batch
norm or sequence-wise batch norm) with a pure PyTorch reference and fused kernels.

    >>> import normrnn, torch
    >>> layer = normrnn.LSTM(16, 32, norm="batch")
    >>> output, (h_n, c_n) = layer(torch.randn(10, 4, 16))
"""
from ._version import __version__
from .dispatch import available_backends
from .modules import BNGRU, BNLSTM, BNRNN, GRU, LNGRU, LNLSTM, LNRNN, LSTM, RNN

__all__ = ["LSTM", "GRU", "RNN", "BNLSTM", "LNLSTM", "BNGRU", "LNGRU", "BNRNN", "LNRNN",
           "available_backends", "__version__"]
