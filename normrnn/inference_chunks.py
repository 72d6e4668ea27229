"""A forward that no backward follows, run a chunk of steps at a time.

The fused layers project the input of every step before the loop: x W_ih^T is (T, B, G), four
times the LSTM's output, and in float32 wherever a norm needs it. Where nothing will be
differentiated (evaluation, ``torch.no_grad``, inputs and weights that require no gradient) the
Triton backend projects and runs one chunk of steps at a time instead, the state carried from
chunk to chunk, so that inference over a long sequence needs memory for its output and one
chunk's projection. For each chunk the steps are those of the whole sequence:

    chunk [s, e):  x_{s..e-1},  state_{s-1} -> output_{s..e-1}, state_{e-1}

per-timestep batch norm takes (or, in training under no_grad, updates) the running statistics of
slot min(s + t, S - 1) at chunk step t, and a sequence of length L is active at chunk step t
while s + t < L. Sequence-wise batch norm in training cannot be chunked: its statistics span
the whole projection.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .dispatch import warn_once
from .first_derivatives import needs_gradient
from .params import DirectionParams, Padding

# What a chunk's input projection may take. A chunk then holds many steps at every shape (B=256,
# H=2048: 128 steps of a float32 LSTM projection), so its launches, a few microseconds, cost
# well under a percent of the chunk's steps; a sequence that fits runs whole, as before.
INFERENCE_CHUNK_BYTES = 1 << 30

_RUNNING_STATISTICS = ("ih_running_mean", "ih_running_var", "hh_running_mean", "hh_running_var",
                       "cell_running_mean", "cell_running_var")


def chunk_bounds(steps: int, batch: int, gates: int, budget: Optional[int] = None) -> List[Tuple[int, int]]:
    """[start, stop) of each chunk whose float32 projection (steps x batch x gates) fits in
    ``budget`` bytes (default INFERENCE_CHUNK_BYTES); at least one step a chunk."""
    budget = INFERENCE_CHUNK_BYTES if budget is None else budget
    chunk = max(1, budget // max(1, batch * gates * 4))
    return [(start, min(steps, start + chunk)) for start in range(0, steps, chunk)]


def chunk_padding(padding: Padding, start: int, stop: int) -> Padding:
    """The padding of steps [start, stop): lengths counted from ``start`` (0 for a sequence that
    has ended: it keeps its state and emits zeros)."""
    if not padding.padded:
        return Padding(stop - start, padding.batch)
    counts = padding.active_counts[start:stop] if padding.active_counts is not None else None
    return Padding(stop - start, padding.batch, (padding.lengths - start).clamp(0, stop - start),
                   padding.mask[start:stop], counts)


def params_from_step(params: DirectionParams, norm: Optional[str], start: int) -> DirectionParams:
    """``params`` whose per-timestep running statistics begin at step ``start``'s slot (views: an
    update in training writes the layer's buffers). Every backend takes slot min(t, rows - 1) of
    what it is given, so slot min(start + t, S - 1) of the whole."""
    if norm != "batch":  # sequence-wise statistics are one row for every step
        return params
    views = {}
    for name in _RUNNING_STATISTICS:
        statistics = getattr(params, name)
        if statistics is not None:
            views[name] = statistics[min(start, statistics.shape[0] - 1):]
    return dataclasses.replace(params, **views)


def differentiable(x: Tensor, state: Tuple[Tensor, ...], params: DirectionParams) -> bool:
    """Whether a backward may follow: gradients are enabled and the input, a state or a weight
    requires one."""
    weights = (getattr(params, field.name) for field in dataclasses.fields(params)
               if field.name not in _RUNNING_STATISTICS)
    return needs_gradient(x, *state, *weights)


RunDirection = Callable[[Tensor, Tuple[Tensor, ...], DirectionParams, Padding], Tuple[Tensor, Tuple[Tensor, ...]]]


def run_in_chunks(run: RunDirection, norm: Optional[str], x: Tensor, state: Tuple[Tensor, ...],
                  params: DirectionParams, padding: Padding, training: bool) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """``run(x, state, params, padding)`` (one layer and direction) over the whole sequence, or,
    where no backward can follow and the projection would not fit in INFERENCE_CHUNK_BYTES, chunk
    by chunk (``chunk_bounds``) with the state carried: the same output and final state."""
    steps, batch, gates = x.shape[0], x.shape[1], params.weight_hh.shape[0]
    if differentiable(x, state, params) or (norm == "seqbatch" and training):
        return run(x, state, params, padding)
    projection_bytes = steps * batch * gates * 4
    if statically_known_true(projection_bytes <= INFERENCE_CHUNK_BYTES):
        return run(x, state, params, padding)
    if torch.compiler.is_exporting() and not statically_known_true(projection_bytes > INFERENCE_CHUNK_BYTES):
        # a program exported for any length or batch can neither guard on the size nor loop over a
        # number of chunks it does not know: the whole sequence, as in training
        if not torch.compiler.is_dynamo_compiling():  # Dynamo (strict export) cannot trace a warning
            warn_once("normrnn: a program exported with a dynamic sequence length or batch runs each layer's "
                      "whole sequence at once in inference (no chunks of steps): its input projection must fit "
                      "in memory")
        return run(x, state, params, padding)
    # under torch.compile with dynamic shapes a guard on the size, not on the length: one graph
    # serves every length and batch that fits, and one specialized to its length runs chunks
    if projection_bytes <= INFERENCE_CHUNK_BYTES:
        return run(x, state, params, padding)
    bounds = chunk_bounds(steps, batch, gates)
    output = None
    for start, stop in bounds:
        piece, final = run(x[start:stop], state, params_from_step(params, norm, start),
                           chunk_padding(padding, start, stop))
        if padding.padded:
            # a sequence that ended before the chunk keeps its state: the projecting LSTM's
            # kernels recur on r, from r = 0 with the given h entering at its first active step,
            # so a sequence with none would come out of the chunk with r = 0, h = 0
            ended = (padding.lengths <= start).unsqueeze(-1)
            final = tuple(torch.where(ended, before, after) for before, after in zip(state, final))
        state = final
        if output is None:  # the kernels' output dtype and width (the LSTM's proj_size)
            output = piece.new_empty((steps,) + tuple(piece.shape[1:]))
        output[start:stop] = piece
    return output, state
