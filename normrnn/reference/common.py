"""Pieces every reference cell shares: the input projection of all timesteps and the
normalization of the input and recurrent projections."""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import Tensor

from ..params import DirectionParams, Padding
from .norms import batch_norm_step, layer_norm, sequence_batch_norm


def project_inputs(x: Tensor, params: DirectionParams, norm: Optional[str], padding: Padding,
                   training: bool, momentum: float, eps: float) -> Tensor:
    """``W_ih x_t`` for every timestep as one matmul, with the normalizations that need no
    recurrence applied: sequence-wise batch norm and layer norm. Per-timestep batch norm of
    this projection happens inside the loop (``normalize_step``)."""
    projected = torch.matmul(x, params.weight_ih.t())
    if norm == "seqbatch":
        return sequence_batch_norm(projected, padding.mask, padding.total, params.ih_norm_weight,
                                   params.ih_running_mean, params.ih_running_var, training, momentum, eps)
    if norm == "layer":
        return layer_norm(projected, params.ih_norm_weight, None, eps)
    return projected


def normalize_step(value: Tensor, which: str, params: DirectionParams, norm: Optional[str], step: int,
                   padding: Padding, training: bool, momentum: float, eps: float,
                   bias: Optional[Tensor] = None) -> Tensor:
    """Per-timestep normalization of ``which`` in {"ih", "hh", "cell"} at ``step``.

    norm="batch": batch norm with the statistics of this step (running statistics of
    ``min(step, max_steps - 1)`` in evaluation); norm="layer": layer norm (``ih`` was already
    normalized by ``project_inputs``); otherwise the value itself (``ih`` under "seqbatch" too).
    """
    if norm == "batch":
        weight = getattr(params, f"{which}_norm_weight")
        running_mean = getattr(params, f"{which}_running_mean")
        running_var = getattr(params, f"{which}_running_var")
        slot = min(step, running_mean.shape[0] - 1)
        return batch_norm_step(value, padding.active(step), padding.count(step), weight, bias,
                               running_mean, running_var, slot, training, momentum, eps)
    if norm == "layer" and which != "ih":
        return layer_norm(value, getattr(params, f"{which}_norm_weight"), bias, eps)
    return value


def zero_padding(x: Tensor, padding: Padding, first_step: int = 0) -> Tensor:
    """Padded positions become exact zeros, so that garbage (even NaN) there cannot reach any
    value or gradient through the discarded rows. ``x`` holds the steps of the padded batch from
    ``first_step`` on (a chunk of them, or all)."""
    if not padding.padded:
        return x
    return x.masked_fill(~padding.mask[first_step:first_step + x.shape[0]].unsqueeze(-1), 0.0)


def keep_active(new: Tensor, old: Tensor, active: Optional[Tensor]) -> Tensor:
    """Sequences that have ended keep their state."""
    return new if active is None else torch.where(active.unsqueeze(-1), new, old)


def emit(h: Tensor, active: Optional[Tensor]) -> Tensor:
    """Outputs at padded positions are zero."""
    return h if active is None else h * active.unsqueeze(-1).to(h.dtype)


def sum_biases(params: DirectionParams) -> Optional[Tensor]:
    """b_ih + b_hh (either may be absent; None when both are)."""
    if params.bias_ih is None:
        return params.bias_hh
    if params.bias_hh is None:
        return params.bias_ih
    return params.bias_ih + params.bias_hh


# Functions that see (and may replace) the state h_t of every reference step, in order: how
# ``normrnn.diagnostics`` measures dL/dh_t (the total derivative, through all later steps) and the
# step Jacobian. Empty outside a diagnostics context, where ``observe_state`` returns h unchanged.
STATE_OBSERVERS: List[Callable[[int, Tensor], Tensor]] = []


def observe_state(step: int, h: Tensor) -> Tensor:
    """h_t as computed at step ``step`` (before padding keeps ended sequences), passed through
    the registered observers; the output and the next step both see what they return."""
    for observer in STATE_OBSERVERS:
        h = observer(step, h)
    return h
