"""normrnn: normalized recurrent layers (LSTM, GRU, vanilla RNN with layer norm, per-timestep batch
norm or sequence-wise batch norm) with a pure PyTorch reference and fused kernels.

    >>> import normrnn, torch
    >>> layer = normrnn.LSTM(16, 32, norm="batch")
    >>> output, (h_n, c_n) = layer(torch.randn(10, 4, 16))
"""
import os as _os

# Installed, kernels/ and bench/ are the subpackages normrnn.kernels and normrnn.bench (setup.py
# maps them). Run from a source checkout without installing (PYTHONPATH=.), they sit beside this
# package: the checkout's root joins the places where its subpackages are looked for.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "setup.py")) and _os.path.isdir(_os.path.join(_checkout, "kernels")):
    __path__.append(_checkout)

from ._version import __version__  # noqa: E402
from .dispatch import available_backends  # noqa: E402
from .modules import BNGRU, BNLSTM, BNRNN, GRU, LNGRU, LNLSTM, LNRNN, LSTM, RNN  # noqa: E402

__all__ = ["LSTM", "GRU", "RNN", "BNLSTM", "LNLSTM", "BNGRU", "LNGRU", "BNRNN", "LNRNN",
           "available_backends", "__version__"]
