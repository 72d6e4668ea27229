"""The Triton backend: the fused kernels of ``normrnn.kernels`` as ``normrnn.dispatch`` runs them.

Each cell's kernels sit behind ``torch.library`` custom ops in a file of their own
(``triton_lstm.py``, ``triton_gru.py``, ``triton_rnn.py``; what they share is ``triton_ops.py``),
with fake (meta) implementations and registered autograd formulas, so ``torch.compile(fullgraph=True)``
traces a model that uses them. All three are imported with this module, so that no import is left
for the first call of a compiled model (``dispatch.preload``).

Covered: LSTM (with or without an output projection, ``proj_size``), GRU and the vanilla RNN
with norm None, "layer", "seqbatch" and "batch", in float32, bfloat16 and float16 (CUDA
autocast's dtype); statistics, cell state and accumulation in float32; on CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1``. The normalizations that
need no recurrence (layer norm of x W_ih^T, sequence-wise batch norm) run on the whole input
projection before the loop, in PyTorch; a forward that no backward follows does so a chunk of
steps at a time where that projection would be large (``inference_chunks.py``).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .inference_chunks import run_in_chunks
from .params import DirectionParams, Padding
from .triton_gru import run_gru
from .triton_lstm import run_lstm
from .triton_ops import NORM_CODES
from .triton_rnn import run_rnn

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unsupported_reason(cell: str, norm: Optional[str], x: Tensor, nonlinearity) -> Optional[str]:
    """Why the fused kernels cannot run this case, or None."""
    if norm not in NORM_CODES:
        return f"unknown norm={norm!r}"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} is not supported (float32, bfloat16 and float16 are)"
    if not (x.is_cuda or (x.device.type == "cpu" and _interpreting())):
        return "the kernels need a CUDA tensor (or TRITON_INTERPRET=1 for the CPU interpreter)"
    return None


def describe_availability(probe: Tensor) -> str:
    """Whether the kernels can run here, and what they cover (``python -m normrnn`` prints it)."""
    if torch.cuda.is_available():
        return (f"usable on {torch.cuda.get_device_name()} (LSTM, GRU, RNN: norm None, 'layer', 'seqbatch', 'batch'; "
                "float32, bfloat16, float16; the LSTM's proj_size too)")
    if _interpreting():
        return "usable through the Triton interpreter on CPU (TRITON_INTERPRET=1; slow, for tests)"
    return "not usable here: no CUDA device (TRITON_INTERPRET=1 runs the kernels on the CPU interpreter)"


def run_direction(cell, norm, x, state, params: DirectionParams, padding: Padding, training, momentum, eps,
                  nonlinearity) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """One layer and direction through the fused kernels (the interface of ``normrnn.dispatch``);
    a forward that no backward follows runs a chunk of steps at a time where the input projection
    of the whole sequence would take more than ``inference_chunks.INFERENCE_CHUNK_BYTES``."""
    def run(x: Tensor, state: Tuple[Tensor, ...], params: DirectionParams, padding: Padding):
        if cell == "rnn":
            return run_rnn(norm, x, state, params, padding, training, momentum, eps, nonlinearity)
        if cell == "gru":
            return run_gru(norm, x, state, params, padding, training, momentum, eps)
        return run_lstm(norm, x, state, params, padding, training, momentum, eps)
    return run_in_chunks(run, norm, x, state, params, padding, training)
