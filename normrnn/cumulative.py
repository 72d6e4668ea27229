"""``momentum=None``: running statistics as the cumulative average of every batch statistic that
updated them, slot by slot, as ``nn.BatchNorm1d(momentum=None)`` keeps them and as Cooijmans et
al. (2016) estimate population statistics (the average of the minibatch statistics over the
training data). An exponential average with momentum 0.1 remembers about the last ten updates:
a slot updated once per epoch (the first steps of a stream read in pieces, docs/findings.md
section 6) then keeps much of its initial value.

Every backend updates running statistics with a momentum. Given momentum 1 and, in place of a
direction's (S, F) statistics, a scratch copy with one row per step of the call (row t holding
the slot that step t uses, ``min(t, S - 1)``, as it stood), a backend leaves the batch statistics
of step t in row t, and row t as it was where step t had fewer than two active sequences (which
then normalizes with it). Afterwards each updated row is folded into its slot s, which has been
updated n_s times before and k_s times in this call:

    R_s <- (n_s R_s + sum_{t updated, slot(t) = s} Z_t) / (n_s + k_s),    n_s <- n_s + k_s

A step of fewer than two active sequences at or past ``max_steps`` therefore reads the last slot
as it stood when the call began, not as earlier steps of the same call left it. Sequence-wise
batch norm has one slot and one update per call. The scratch holds one row of F statistics per
step, (T, F) for each of the direction's means and variances: 1/B of what the forward saves for
the backward anyway.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Tuple

import torch
from torch import Tensor

from .params import DirectionParams, Padding

BATCH_STATISTICS = ("ih_running_mean", "ih_running_var", "hh_running_mean", "hh_running_var",
                    "cell_running_mean", "cell_running_var")
SEQUENCE_STATISTICS = ("ih_running_mean", "ih_running_var")


def with_scratch_statistics(params: DirectionParams, norm: str, counts: Tensor, padding: Padding
                            ) -> Tuple[DirectionParams, Callable[[], None]]:
    """``params`` with their running statistics replaced by scratch copies for a backend run at
    momentum 1, and the function that folds the scratch into the statistics and ``counts`` (the
    updates each slot has had: (S,) for norm "batch", () for "seqbatch") once the run is over."""
    if norm == "seqbatch":
        names = SEQUENCE_STATISTICS
        scratch = {name: getattr(params, name).clone() for name in names}

        def fold_sequence() -> None:
            with torch.no_grad():
                previous = counts.to(torch.float32)
                for name in names:
                    running = getattr(params, name)
                    running.copy_((previous * running + scratch[name]) / (previous + 1))
                counts.add_(1)
        return dataclasses.replace(params, **scratch), fold_sequence

    names = [name for name in BATCH_STATISTICS if getattr(params, name) is not None]
    slots_in_buffer = getattr(params, names[0]).shape[0]
    device = counts.device
    slots = torch.arange(padding.steps, device=device).clamp(max=slots_in_buffer - 1)
    scratch = {name: getattr(params, name).index_select(0, slots) for name in names}
    # 1 where a step updates its slot; a step of fewer than two active sequences updates nothing
    # (batch statistics do not exist)
    weights = (torch.ones(padding.steps, device=device) if padding.mask is None
               else (padding.mask.sum(1).to(device) >= 2).to(torch.float32))

    def fold_steps() -> None:
        with torch.no_grad():
            new = torch.zeros(slots_in_buffer, device=device).index_add_(0, slots, weights)
            previous = counts.to(torch.float32)
            for name in names:
                running = getattr(params, name)
                sums = torch.zeros_like(running).index_add_(0, slots, scratch[name] * weights.unsqueeze(1))
                averaged = (previous.unsqueeze(1) * running + sums) / (previous + new).clamp_min(1).unsqueeze(1)
                running.copy_(torch.where((new > 0).unsqueeze(1), averaged, running))
            counts.add_(new.to(counts.dtype))
    return dataclasses.replace(params, **scratch), fold_steps
