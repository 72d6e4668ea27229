"""Fused LSTM forward over the whole sequence: recurrent matmul, per-timestep batch norm (or
none), gates and state update in one kernel per step, or one persistent kernel for all steps.

The mathematics is ``normrnn/reference/lstm.py`` (``lstm_sequence``):

    z_t = N_hh(h_{t-1} W_hh^T) + N_ih(wx_t) + b,   c_t = f * c_{t-1} + i * g,   h_t = o * tanh(N_c(c_t))

``wx`` = x W_ih^T is computed for all timesteps before the loop. Program p owns hidden units
[p * BLOCK_H, (p + 1) * BLOCK_H) of all four gates: under batch norm in training for the whole
batch, so the batch statistics of its columns are local to it (a batch of more than one 64-row
tile walked in chunks, several passes a step: ``batch_norm.py``); otherwise for a tile of up to
64 rows (grid axis 1). h_{t-1} of all units is read from memory written by the previous
step (a new launch, or the grid barrier of the persistent kernel). The persistent kernel keeps the
program's rows of W_hh on chip for the whole sequence where they fit (``resident_weights``), and
otherwise streams them in K tiles every step, as the per-step kernel does.

Saved for the backward (``SAVE``): the raw recurrent projection ``wh`` (T, B, 4H), the states
h (T+1, B, H) and c (T+1, B, H), and the mean / rstd used at every step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .batch_norm import (ROWS_PER_TILE, batch_statistics, chunk_moments, chunk_rows, chunked, merge_moments,
                         merge_pair_moments, pair_statistics, statistics_from_moments)
from .buffers import PERSISTENT, interpreted, launch_mode, launch_options, new_buffer, persistent_launch_options
from .step_launch import launch_steps
from .tiles import (grid_barrier, program_tile, recurrent_product, row_active, state_columns, store_step_statistics,
                   weight_rows)

NORM_NONE = 0
NORM_LAYER = 1  # runs in lstm_layer_norm_forward.py
NORM_BATCH = 2


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _normalized_preactivation(gate, wx, wh, ih_mean, ih_rstd, hh_mean, hh_rstd, bias_ptr, ih_weight_ptr, hh_weight_ptr,
                              units, unit_mask, H: tl.constexpr):
    """z = gamma_ih (wx - mean_ih) rstd_ih + gamma_hh (wh - mean_hh) rstd_hh + b of one gate."""
    columns = gate * H + units
    bias = tl.load(bias_ptr + columns, mask=unit_mask, other=0.0)
    ih_weight = tl.load(ih_weight_ptr + columns, mask=unit_mask, other=0.0)
    hh_weight = tl.load(hh_weight_ptr + columns, mask=unit_mask, other=0.0)
    return ((wx - ih_mean[None, :]) * (ih_rstd * ih_weight)[None, :]
            + (wh - hh_mean[None, :]) * (hh_rstd * hh_weight)[None, :] + bias[None, :])


@triton.jit
def _gate_tile(ptr, gate, t, rows, units, row_mask, unit_mask, B, H: tl.constexpr):
    """Columns gate * H + units of step t of a (T, B, 4H) tensor, for the given rows, in float32."""
    offsets = t * B * 4 * H + rows[:, None] * (4 * H) + (gate * H + units)[None, :]
    return tl.load(ptr + offsets, mask=row_mask[:, None] & unit_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _gate_preactivation(gate, t, acc, wx_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, wh_ptr, ih_stats_ptr, hh_stats_ptr,
                        ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, slot, rows, units, row_mask, unit_mask,
                        active_f, count, use_batch, B, momentum, eps, H: tl.constexpr, NORM: tl.constexpr,
                        TRAINING: tl.constexpr, SAVE: tl.constexpr):
    """z of one gate: N_ih(wx) + N_hh(wh) + b for the program's columns gate * H + units, its rows
    the whole batch under batch norm."""
    columns = gate * H + units
    wx = _gate_tile(wx_ptr, gate, t, rows, units, row_mask, unit_mask, B, H)
    if SAVE:
        tl.store(wh_ptr + t * B * 4 * H + rows[:, None] * (4 * H) + columns[None, :], acc,
                 mask=row_mask[:, None] & unit_mask[None, :])
    if NORM == 2:
        ih_mean, ih_m2 = chunk_moments(wx, active_f, count)
        hh_mean, hh_m2 = chunk_moments(acc, active_f, count)
        ih_mean, ih_rstd, hh_mean, hh_rstd = pair_statistics(ih_mean, ih_m2, hh_mean, hh_m2, count, use_batch, slot, t,
                                                             columns, unit_mask, ih_stats_ptr, hh_stats_ptr,
                                                             ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr,
                                                             momentum, eps, 4 * H, TRAINING, SAVE)
        z = _normalized_preactivation(gate, wx, acc, ih_mean, ih_rstd, hh_mean, hh_rstd, bias_ptr, ih_weight_ptr,
                                      hh_weight_ptr, units, unit_mask, H)
    else:
        bias = tl.load(bias_ptr + columns, mask=unit_mask, other=0.0)
        z = wx + acc + bias[None, :]
    return z


@triton.jit
def _chunk_gate_moments(gate, t, acc, wx_ptr, wh_ptr, rows, units, row_mask, unit_mask, active_f, chunk_count, count,
                        ih_mean, ih_m2, hh_mean, hh_m2, B, H: tl.constexpr):
    """First pass over a chunk of rows, one gate: stores its recurrent projection ``acc`` (read
    again by the second pass) and merges the chunk's moments of wx and of it into those so far."""
    wx = _gate_tile(wx_ptr, gate, t, rows, units, row_mask, unit_mask, B, H)
    tl.store(wh_ptr + t * B * 4 * H + rows[:, None] * (4 * H) + (gate * H + units)[None, :], acc,
             mask=row_mask[:, None] & unit_mask[None, :])
    return merge_pair_moments(wx, acc, active_f, chunk_count, count, ih_mean, ih_m2, hh_mean, hh_m2)


@triton.jit
def load_recurrent_weights(pid, w_hh_ptr, B, H: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                           BLOCK_K: tl.constexpr, RESIDENT: tl.constexpr):
    """With ``RESIDENT``: the rows of W_hh of program ``pid``'s units, all of K in one
    (BLOCK_H, BLOCK_K) tile per gate (i, f, g, o), for a persistent kernel to load before its step
    loop. Without: four placeholders, as ``recurrent_projection`` then streams W_hh itself."""
    # one return after a constexpr branch: Triton types every return statement of a function,
    # also one in a branch it does not compile, and an early return of placeholders would clash
    if RESIDENT:
        _, units, _, unit_mask = program_tile(pid, B, H, BLOCK_B, BLOCK_H)
        w_i = weight_rows(w_hh_ptr, 0, units, unit_mask, H, BLOCK_K)
        w_f = weight_rows(w_hh_ptr, 1, units, unit_mask, H, BLOCK_K)
        w_g = weight_rows(w_hh_ptr, 2, units, unit_mask, H, BLOCK_K)
        w_o = weight_rows(w_hh_ptr, 3, units, unit_mask, H, BLOCK_K)
    else:
        w_i, w_f, w_g, w_o = 0, 0, 0, 0
    return w_i, w_f, w_g, w_o


@triton.jit
def _resident_projection(t, h_ptr, w_i, w_f, w_g, w_o, rows, row_mask, B, H: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """h_{t-1} W_hh^T with the weights of ``load_recurrent_weights``, all of K in one tile.
    Loaded before the persistent kernel's loop, they are loop-invariant: Triton 3.6 and 3.9 hoist
    their copy into shared memory out of the loop (see the compile report), so W_hh is read from
    global memory once per launch instead of once per step."""
    h_tile = state_columns(h_ptr, t, rows, row_mask, B, H, 0, BLOCK_K)
    acc_i = recurrent_product(h_tile, w_i, DOT_PRECISION)
    acc_f = recurrent_product(h_tile, w_f, DOT_PRECISION)
    acc_g = recurrent_product(h_tile, w_g, DOT_PRECISION)
    acc_o = recurrent_product(h_tile, w_o, DOT_PRECISION)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def recurrent_projection(t, h_ptr, w_hh_ptr, rows, units, row_mask, unit_mask, B, H: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_K: tl.constexpr, w_i, w_f, w_g, w_o, RESIDENT: tl.constexpr):
    """h_{t-1} W_hh^T for the four gates (i, f, g, o) of the program's units: with ``RESIDENT``,
    from the weight tiles ``w_*`` the persistent kernel loaded once; otherwise W_hh is streamed
    from memory in K tiles (the ``w_*`` are unused). h_{t-1} (row t of h) was written by other
    programs: it is read past L1, which is not coherent across SMs."""
    if RESIDENT:
        acc_i, acc_f, acc_g, acc_o = _resident_projection(t, h_ptr, w_i, w_f, w_g, w_o, rows, row_mask, B, H,
                                                          DOT_PRECISION, BLOCK_K)
    else:
        acc_i, acc_f, acc_g, acc_o = _streamed_projection(t, h_ptr, w_hh_ptr, rows, units, row_mask, unit_mask, B,
                                                          H, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _streamed_projection(t, h_ptr, w_hh_ptr, rows, units, row_mask, unit_mask, B, H: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """h_{t-1} W_hh^T with W_hh read from memory in K tiles."""
    acc_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        h_tile = state_columns(h_ptr, t, rows, row_mask, B, H, k0, BLOCK_K)
        w_offsets = units[:, None] * H + ks[None, :]
        w_mask = unit_mask[:, None] & k_mask[None, :]
        w_i = tl.load(w_hh_ptr + w_offsets, mask=w_mask, other=0.0)
        w_f = tl.load(w_hh_ptr + H * H + w_offsets, mask=w_mask, other=0.0)
        w_g = tl.load(w_hh_ptr + 2 * H * H + w_offsets, mask=w_mask, other=0.0)
        w_o = tl.load(w_hh_ptr + 3 * H * H + w_offsets, mask=w_mask, other=0.0)
        acc_i += recurrent_product(h_tile, w_i, DOT_PRECISION)
        acc_f += recurrent_product(h_tile, w_f, DOT_PRECISION)
        acc_g += recurrent_product(h_tile, w_g, DOT_PRECISION)
        acc_o += recurrent_product(h_tile, w_o, DOT_PRECISION)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _lstm_forward_step(t, pid, wx_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, cell_weight_ptr,
                       cell_bias_ptr, h_ptr, c_ptr, out_ptr, wh_ptr, ih_stats_ptr, hh_stats_ptr, cell_stats_ptr,
                       ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, cell_mean_ptr, cell_var_ptr, lengths_ptr,
                       B, max_steps, momentum, eps, H: tl.constexpr, NORM: tl.constexpr, TRAINING: tl.constexpr,
                       SAVE: tl.constexpr, HAS_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, w_i, w_f, w_g, w_o,
                       RESIDENT: tl.constexpr):
    """Timestep ``t`` for the program's hidden units: reads h_t-1 (row t of h), writes h_t and
    c_t (row t + 1), the output and what the backward needs. ``w_*``, ``RESIDENT``: see
    ``recurrent_projection``."""
    rows, units, row_mask, unit_mask = program_tile(pid, B, H, BLOCK_B, BLOCK_H)  # axis 1 tiles the batch
    active = row_active(t, rows, row_mask, lengths_ptr, HAS_LENGTHS)
    active_f = active.to(tl.float32)[:, None]
    count = tl.sum(active.to(tl.float32), axis=0)
    use_batch = TRAINING & (count >= 2.0)
    slot = tl.minimum(t, max_steps - 1)

    acc_i, acc_f, acc_g, acc_o = recurrent_projection(t, h_ptr, w_hh_ptr, rows, units, row_mask, unit_mask, B, H,
                                                      DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, w_i, w_f, w_g, w_o,
                                                      RESIDENT)

    z_i = _gate_preactivation(0, t, acc_i, wx_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, wh_ptr, ih_stats_ptr,
                              hh_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, slot, rows, units,
                              row_mask, unit_mask, active_f, count, use_batch, B, momentum, eps, H, NORM, TRAINING, SAVE)
    z_f = _gate_preactivation(1, t, acc_f, wx_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, wh_ptr, ih_stats_ptr,
                              hh_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, slot, rows, units,
                              row_mask, unit_mask, active_f, count, use_batch, B, momentum, eps, H, NORM, TRAINING, SAVE)
    z_g = _gate_preactivation(2, t, acc_g, wx_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, wh_ptr, ih_stats_ptr,
                              hh_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, slot, rows, units,
                              row_mask, unit_mask, active_f, count, use_batch, B, momentum, eps, H, NORM, TRAINING, SAVE)
    z_o = _gate_preactivation(3, t, acc_o, wx_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, wh_ptr, ih_stats_ptr,
                              hh_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, slot, rows, units,
                              row_mask, unit_mask, active_f, count, use_batch, B, momentum, eps, H, NORM, TRAINING, SAVE)

    tile_mask = row_mask[:, None] & unit_mask[None, :]
    state_offsets = rows[:, None] * H + units[None, :]
    c_prev = tl.load(c_ptr + t * B * H + state_offsets, mask=tile_mask, other=0.0)
    h_prev = tl.load(h_ptr + t * B * H + state_offsets, mask=tile_mask, other=0.0, cache_modifier=".cg")
    c_new = tl.sigmoid(z_f) * c_prev + tl.sigmoid(z_i) * _tanh(z_g)
    if NORM == 2:
        cell_mean, cell_rstd = batch_statistics(c_new, active_f, count, use_batch, cell_mean_ptr + slot * H,
                                                cell_var_ptr + slot * H, units, unit_mask, momentum, eps,
                                                 TRAINING)
        if SAVE:
            store_step_statistics(cell_stats_ptr, t, units, cell_mean, cell_rstd, unit_mask, H)
        cell_weight = tl.load(cell_weight_ptr + units, mask=unit_mask, other=0.0)
        cell_bias = tl.load(cell_bias_ptr + units, mask=unit_mask, other=0.0)
        c_normalized = (c_new - cell_mean[None, :]) * (cell_rstd * cell_weight)[None, :] + cell_bias[None, :]
    else:
        c_normalized = c_new
    h_new = tl.sigmoid(z_o) * _tanh(c_normalized)
    keep = active[:, None]
    tl.store(c_ptr + (t + 1) * B * H + state_offsets, tl.where(keep, c_new, c_prev), mask=tile_mask)
    tl.store(h_ptr + (t + 1) * B * H + state_offsets,
             tl.where(keep, h_new, h_prev.to(tl.float32)).to(h_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(out_ptr + t * B * H + state_offsets, tl.where(keep, h_new, 0.0).to(out_ptr.dtype.element_ty),
             mask=tile_mask)


@triton.jit
def _lstm_forward_step_chunked(t, pid, wx_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, cell_weight_ptr,
                               cell_bias_ptr, h_ptr, c_ptr, out_ptr, wh_ptr, ih_stats_ptr, hh_stats_ptr,
                               cell_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, cell_mean_ptr,
                               cell_var_ptr, lengths_ptr, B, max_steps, momentum, eps, H: tl.constexpr,
                               TRAINING: tl.constexpr, SAVE: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                               DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                               BLOCK_K: tl.constexpr, w_i, w_f, w_g, w_o, RESIDENT: tl.constexpr):
    """Timestep ``t`` under batch norm in training for a batch of more than one tile: the program
    walks it in chunks of BLOCK_B rows three times (see ``batch_norm.py``). 1: the recurrent
    projection of each chunk, stored raw in ``wh``, and the moments of wx and wh of the four gates;
    2: the gates and c_t of each chunk, stored, and the moments of c_t; 3: h_t of each chunk."""
    units = pid * BLOCK_H + tl.arange(0, BLOCK_H)
    unit_mask = units < H
    slot = tl.minimum(t, max_steps - 1)
    zero = tl.zeros((BLOCK_H,), dtype=tl.float32)
    count = tl.sum(zero, axis=0)
    ih_mean_i, ih_m2_i, hh_mean_i, hh_m2_i = zero, zero, zero, zero
    ih_mean_f, ih_m2_f, hh_mean_f, hh_m2_f = zero, zero, zero, zero
    ih_mean_g, ih_m2_g, hh_mean_g, hh_m2_g = zero, zero, zero, zero
    ih_mean_o, ih_m2_o, hh_mean_o, hh_m2_o = zero, zero, zero, zero
    for first_row in range(0, B, BLOCK_B):
        rows, row_mask, active, active_f, chunk_count = chunk_rows(first_row, t, lengths_ptr, B, HAS_LENGTHS,
                                                                   BLOCK_B)
        acc_i, acc_f, acc_g, acc_o = recurrent_projection(t, h_ptr, w_hh_ptr, rows, units, row_mask, unit_mask, B, H,
                                                          DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, w_i, w_f, w_g,
                                                          w_o, RESIDENT)
        ih_mean_i, ih_m2_i, hh_mean_i, hh_m2_i = _chunk_gate_moments(0, t, acc_i, wx_ptr, wh_ptr, rows, units,
                                                                     row_mask, unit_mask, active_f, chunk_count, count,
                                                                     ih_mean_i, ih_m2_i, hh_mean_i, hh_m2_i, B, H)
        ih_mean_f, ih_m2_f, hh_mean_f, hh_m2_f = _chunk_gate_moments(1, t, acc_f, wx_ptr, wh_ptr, rows, units,
                                                                     row_mask, unit_mask, active_f, chunk_count, count,
                                                                     ih_mean_f, ih_m2_f, hh_mean_f, hh_m2_f, B, H)
        ih_mean_g, ih_m2_g, hh_mean_g, hh_m2_g = _chunk_gate_moments(2, t, acc_g, wx_ptr, wh_ptr, rows, units,
                                                                     row_mask, unit_mask, active_f, chunk_count, count,
                                                                     ih_mean_g, ih_m2_g, hh_mean_g, hh_m2_g, B, H)
        ih_mean_o, ih_m2_o, hh_mean_o, hh_m2_o = _chunk_gate_moments(3, t, acc_o, wx_ptr, wh_ptr, rows, units,
                                                                     row_mask, unit_mask, active_f, chunk_count, count,
                                                                     ih_mean_o, ih_m2_o, hh_mean_o, hh_m2_o, B, H)
        count += chunk_count
    use_batch = TRAINING & (count >= 2.0)
    ih_mean_i, ih_rstd_i, hh_mean_i, hh_rstd_i = pair_statistics(ih_mean_i, ih_m2_i, hh_mean_i, hh_m2_i, count,
                                                                 use_batch, slot, t, units, unit_mask,
                                                                 ih_stats_ptr, hh_stats_ptr, ih_mean_ptr, ih_var_ptr,
                                                                 hh_mean_ptr, hh_var_ptr, momentum, eps, 4 * H,
                                                                 TRAINING, SAVE)
    ih_mean_f, ih_rstd_f, hh_mean_f, hh_rstd_f = pair_statistics(ih_mean_f, ih_m2_f, hh_mean_f, hh_m2_f, count,
                                                                 use_batch, slot, t, H + units, unit_mask,
                                                                 ih_stats_ptr, hh_stats_ptr, ih_mean_ptr, ih_var_ptr,
                                                                 hh_mean_ptr, hh_var_ptr, momentum, eps, 4 * H,
                                                                 TRAINING, SAVE)
    ih_mean_g, ih_rstd_g, hh_mean_g, hh_rstd_g = pair_statistics(ih_mean_g, ih_m2_g, hh_mean_g, hh_m2_g, count,
                                                                 use_batch, slot, t, 2 * H + units, unit_mask,
                                                                 ih_stats_ptr, hh_stats_ptr, ih_mean_ptr, ih_var_ptr,
                                                                 hh_mean_ptr, hh_var_ptr, momentum, eps, 4 * H,
                                                                 TRAINING, SAVE)
    ih_mean_o, ih_rstd_o, hh_mean_o, hh_rstd_o = pair_statistics(ih_mean_o, ih_m2_o, hh_mean_o, hh_m2_o, count,
                                                                 use_batch, slot, t, 3 * H + units, unit_mask,
                                                                 ih_stats_ptr, hh_stats_ptr, ih_mean_ptr, ih_var_ptr,
                                                                 hh_mean_ptr, hh_var_ptr, momentum, eps, 4 * H,
                                                                 TRAINING, SAVE)
    # pass 2 reads wh back in another layout than pass 1 stored it in: other threads of this program
    tl.debug_barrier()

    cell_mean = zero
    cell_m2 = zero
    seen = tl.sum(zero, axis=0)
    for first_row in range(0, B, BLOCK_B):
        rows, row_mask, active, active_f, chunk_count = chunk_rows(first_row, t, lengths_ptr, B, HAS_LENGTHS,
                                                                   BLOCK_B)
        z_i = _normalized_preactivation(0, _gate_tile(wx_ptr, 0, t, rows, units, row_mask, unit_mask, B, H),
                                        _gate_tile(wh_ptr, 0, t, rows, units, row_mask, unit_mask, B, H), ih_mean_i,
                                        ih_rstd_i, hh_mean_i, hh_rstd_i, bias_ptr, ih_weight_ptr, hh_weight_ptr, units,
                                        unit_mask, H)
        z_f = _normalized_preactivation(1, _gate_tile(wx_ptr, 1, t, rows, units, row_mask, unit_mask, B, H),
                                        _gate_tile(wh_ptr, 1, t, rows, units, row_mask, unit_mask, B, H), ih_mean_f,
                                        ih_rstd_f, hh_mean_f, hh_rstd_f, bias_ptr, ih_weight_ptr, hh_weight_ptr, units,
                                        unit_mask, H)
        z_g = _normalized_preactivation(2, _gate_tile(wx_ptr, 2, t, rows, units, row_mask, unit_mask, B, H),
                                        _gate_tile(wh_ptr, 2, t, rows, units, row_mask, unit_mask, B, H), ih_mean_g,
                                        ih_rstd_g, hh_mean_g, hh_rstd_g, bias_ptr, ih_weight_ptr, hh_weight_ptr, units,
                                        unit_mask, H)
        tile_mask = row_mask[:, None] & unit_mask[None, :]
        state_offsets = rows[:, None] * H + units[None, :]
        c_prev = tl.load(c_ptr + t * B * H + state_offsets, mask=tile_mask, other=0.0)
        c_new = tl.sigmoid(z_f) * c_prev + tl.sigmoid(z_i) * _tanh(z_g)
        tl.store(c_ptr + (t + 1) * B * H + state_offsets, tl.where(active[:, None], c_new, c_prev), mask=tile_mask)
        chunk_mean, chunk_m2 = chunk_moments(c_new, active_f, chunk_count)
        cell_mean, cell_m2 = merge_moments(seen, cell_mean, cell_m2, chunk_count, chunk_mean, chunk_m2)
        seen += chunk_count
    cell_mean, cell_rstd = statistics_from_moments(cell_mean, cell_m2, count, use_batch, cell_mean_ptr + slot * H,
                                                   cell_var_ptr + slot * H, units, unit_mask, momentum, eps, TRAINING)
    if SAVE:
        store_step_statistics(cell_stats_ptr, t, units, cell_mean, cell_rstd, unit_mask, H)
    cell_weight = tl.load(cell_weight_ptr + units, mask=unit_mask, other=0.0)
    cell_bias = tl.load(cell_bias_ptr + units, mask=unit_mask, other=0.0)
    tl.debug_barrier()  # pass 3 reads back c_t as pass 2 stored it

    for first_row in range(0, B, BLOCK_B):
        rows, row_mask, active, _, _ = chunk_rows(first_row, t, lengths_ptr, B, HAS_LENGTHS, BLOCK_B)
        tile_mask = row_mask[:, None] & unit_mask[None, :]
        state_offsets = rows[:, None] * H + units[None, :]
        z_o = _normalized_preactivation(3, _gate_tile(wx_ptr, 3, t, rows, units, row_mask, unit_mask, B, H),
                                        _gate_tile(wh_ptr, 3, t, rows, units, row_mask, unit_mask, B, H), ih_mean_o,
                                        ih_rstd_o, hh_mean_o, hh_rstd_o, bias_ptr, ih_weight_ptr, hh_weight_ptr, units,
                                        unit_mask, H)
        c_new = tl.load(c_ptr + (t + 1) * B * H + state_offsets, mask=tile_mask, other=0.0)
        c_normalized = (c_new - cell_mean[None, :]) * (cell_rstd * cell_weight)[None, :] + cell_bias[None, :]
        h_new = tl.sigmoid(z_o) * _tanh(c_normalized)
        h_prev = tl.load(h_ptr + t * B * H + state_offsets, mask=tile_mask, other=0.0, cache_modifier=".cg")
        keep = active[:, None]
        tl.store(h_ptr + (t + 1) * B * H + state_offsets,
                 tl.where(keep, h_new, h_prev.to(tl.float32)).to(h_ptr.dtype.element_ty), mask=tile_mask)
        tl.store(out_ptr + t * B * H + state_offsets, tl.where(keep, h_new, 0.0).to(out_ptr.dtype.element_ty),
                 mask=tile_mask)


# t unspecialized: one compiled kernel serves every step (Triton compiles t == 1 and t % 16 == 0 apart)
@triton.jit(do_not_specialize=["t"])
def lstm_forward_step_kernel(t, wx_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, cell_weight_ptr,
                             cell_bias_ptr, h_ptr, c_ptr, out_ptr, wh_ptr, ih_stats_ptr, hh_stats_ptr, cell_stats_ptr,
                             ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, cell_mean_ptr, cell_var_ptr,
                             lengths_ptr, B, max_steps, momentum, eps, H: tl.constexpr, NORM: tl.constexpr,
                             TRAINING: tl.constexpr, SAVE: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                             DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                             BLOCK_K: tl.constexpr, CHUNKED: tl.constexpr):
    """One timestep; the launch boundary is the synchronization between steps. ``DOT_PRECISION``:
    see ``dot_precision``; ``CHUNKED``: the batch norm's batch walked in chunks (``batch_norm.py``)."""
    if CHUNKED:
        _lstm_forward_step_chunked(t, tl.program_id(0), wx_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr,
                                   cell_weight_ptr, cell_bias_ptr, h_ptr, c_ptr, out_ptr, wh_ptr, ih_stats_ptr,
                                   hh_stats_ptr, cell_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr,
                                   cell_mean_ptr, cell_var_ptr, lengths_ptr, B, max_steps, momentum, eps, H, TRAINING,
                                   SAVE, HAS_LENGTHS, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, 0, 0, 0, 0, False)
    else:
        _lstm_forward_step(t, tl.program_id(0), wx_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr,
                           cell_weight_ptr, cell_bias_ptr, h_ptr, c_ptr, out_ptr, wh_ptr, ih_stats_ptr, hh_stats_ptr,
                           cell_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, cell_mean_ptr,
                           cell_var_ptr, lengths_ptr, B, max_steps, momentum, eps, H, NORM, TRAINING, SAVE,
                           HAS_LENGTHS, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, 0, 0, 0, 0, False)


# steps unspecialized: one compiled kernel serves every sequence length
@triton.jit(do_not_specialize=["steps"])
def lstm_forward_persistent_kernel(steps, barrier_ptr, wx_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr,
                                   cell_weight_ptr, cell_bias_ptr, h_ptr, c_ptr, out_ptr, wh_ptr, ih_stats_ptr,
                                   hh_stats_ptr, cell_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr,
                                   cell_mean_ptr, cell_var_ptr, lengths_ptr, B, max_steps, momentum, eps,
                                   H: tl.constexpr, NORM: tl.constexpr, TRAINING: tl.constexpr, SAVE: tl.constexpr,
                                   HAS_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                                   BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, CHUNKED: tl.constexpr,
                                   RESIDENT: tl.constexpr):
    """All timesteps in one launch; a grid barrier publishes h_t before step t + 1 reads it.
    With ``RESIDENT`` (all of K in one tile: ``resident_weights``) the program's rows of W_hh are
    loaded once, before the loop, and stay on chip.

    The barrier: every thread's stores finish, one release add on a step counter, then a spin of
    acquire reads until all programs have arrived (counter = (t + 1) * programs)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0) * tl.num_programs(1)
    w_i, w_f, w_g, w_o = load_recurrent_weights(pid, w_hh_ptr, B, H, BLOCK_B, BLOCK_H, BLOCK_K, RESIDENT)
    for t in range(steps):
        if CHUNKED:
            _lstm_forward_step_chunked(t, pid, wx_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, cell_weight_ptr,
                                       cell_bias_ptr, h_ptr, c_ptr, out_ptr, wh_ptr, ih_stats_ptr, hh_stats_ptr,
                                       cell_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, cell_mean_ptr,
                                       cell_var_ptr, lengths_ptr, B, max_steps, momentum, eps, H, TRAINING, SAVE,
                                       HAS_LENGTHS, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, w_i, w_f, w_g, w_o,
                                       RESIDENT)
        else:
            _lstm_forward_step(t, pid, wx_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, cell_weight_ptr,
                               cell_bias_ptr, h_ptr, c_ptr, out_ptr, wh_ptr, ih_stats_ptr, hh_stats_ptr, cell_stats_ptr,
                               ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, cell_mean_ptr, cell_var_ptr,
                               lengths_ptr, B, max_steps, momentum, eps, H, NORM, TRAINING, SAVE, HAS_LENGTHS,
                               DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, w_i, w_f, w_g, w_o, RESIDENT)
        grid_barrier(barrier_ptr, (t + 1) * programs)


def block_sizes(batch: int, hidden_size: int, batch_norm: bool):
    """(BLOCK_B, BLOCK_H, BLOCK_K): 16 hidden units per program, tiles of up to ``ROWS_PER_TILE``
    rows (64) and K tiles of up to 64, or 32 under ``batch_norm``; at least 16 everywhere: Triton
    3.6 needs K >= 16 in tl.dot, and the tensor cores would pad a smaller M or N anyway."""
    block_b = max(16, min(ROWS_PER_TILE, triton.next_power_of_2(batch)))
    block_h = 16
    # the h tile (BLOCK_B x BLOCK_K) is staged in shared memory; under batch norm K tiles of at
    # most 32, as products on float32 operands (tf32x3, split three ways) hold many registers: with
    # 64 the persistent LSTM and GRU at B=64, H=512 spilled 16 to 116 bytes a thread (sm_90, Triton
    # 3.6 and 3.9), with 32 none, and the per-step LSTM forward went from 238 to 132 registers
    widest = 32 if batch_norm else 64
    block_k = max(16, min(widest, triton.next_power_of_2(hidden_size)))
    return block_b, block_h, block_k


def batch_tiles(batch: int, block_b: int, column_statistics: bool) -> int:
    """Grid axis 1: the tiles of BLOCK_B rows the batch is cut into, or one program for all of
    it where a program needs the batch statistics of its columns (batch norm in training)."""
    return 1 if column_statistics else triton.cdiv(batch, block_b)


def grid_programs(batch: int, hidden_size: int, batch_norm: bool, training: bool) -> int:
    """How many programs a cell's kernels launch (the grid a persistent kernel needs resident)."""
    block_b, block_h, _ = block_sizes(batch, hidden_size, batch_norm)
    return triton.cdiv(hidden_size, block_h) * batch_tiles(batch, block_b, batch_norm and training)


# Shared memory the persistent kernels may give to the operands of a resident recurrent matmul (the
# program's W_hh rows and the h_{t-1} tile, both with all of K): B=64, H=512 in bfloat16 takes
# 128 KiB, 130 KiB in all with the rest (227 KiB per block on sm_90); also what the h tile costs in
# registers while it is loaded (64 a thread there with 8 warps).
RESIDENT_OPERAND_BYTES = 128 * 1024


def resident_k_tile(hidden_size: int) -> int:
    """BLOCK_K of a persistent kernel with resident weights: all of K in one tile."""
    return max(16, triton.next_power_of_2(hidden_size))


def resident_weights(block_b: int, block_h: int, gates: int, hidden_size: int, dtype: torch.dtype,
                     precision: str) -> bool:
    """Whether a persistent kernel keeps the program's ``gates`` x ``block_h`` rows of W_hh on chip
    for the whole sequence: where the product runs on Hopper's warpgroup tensor cores with operands
    in shared memory ("native" 16-bit operands, a tile of ``block_b`` = a multiple of 64 rows), and
    those operands with all of K in one tile, W_hh's rows and the (``block_b``, K) tile of h in
    ``dtype``, fit ``RESIDENT_OPERAND_BYTES``. There Triton hoists the weights' copy into shared
    memory out of the step loop (the compile check asserts it). Elsewhere it did not pay when
    compiled for sm_90: with 16 rows (Ampere-style MMA) the weights stay in registers and are copied
    to shared memory every step (226 to 255 registers at H=512), and float32 products ("ieee", FMA)
    spilled 5 to 13 KB a thread at H=256; there W_hh is streamed from L2 in K tiles every step."""
    if precision != "native" or block_b % 64 != 0:
        return False
    operand_bytes = (block_b + gates * block_h) * resident_k_tile(hidden_size) * (torch.finfo(dtype).bits // 8)
    return operand_bytes <= RESIDENT_OPERAND_BYTES


def state_dtype(dtype: torch.dtype, norm: int) -> torch.dtype:
    """The dtype h is kept in between steps: float32 under batch norm, which amplifies the
    rounding of h to bfloat16 (2.3e-2 relative error at B=16) into the statistics of every step;
    otherwise the weights' dtype, so that the recurrent matmul reads it as it is."""
    return torch.float32 if norm == NORM_BATCH else dtype


def operand_buffer(state: torch.Tensor, dtype: torch.dtype, norm: int) -> torch.Tensor:
    """For a float32 state (the GRU's and RNN's h, (T+1, B, H)) that the recurrent product reads
    rounded to the weights' 16-bit ``dtype`` (``state_dtype``: not under batch norm), a buffer of
    its shape in that dtype with step 0 copied in, which the forward kernels fill beside the state:
    every program reads all of h_{t-1} each step, and reads it in half the bytes. Elsewhere
    ``state`` itself (the kernels then write no copy)."""
    operand_dtype = state_dtype(dtype, norm)
    if operand_dtype == state.dtype:
        return state
    operand = new_buffer(state.shape, operand_dtype, state.device)
    operand[0].copy_(state[0])
    return operand


def dot_precision(dtype: torch.dtype, norm: int) -> str:
    """How the recurrent matmuls multiply: "ieee" float32 products for float32 weights (the
    accuracy bar is float32's with tf32 off) and under the interpreter (whose bfloat16 tl.dot is
    wrong); "tf32x3" (float32 accuracy on tensor cores) where h stays float32 beside bfloat16
    weights; "native" (operands in the weights' dtype) otherwise."""
    if dtype == torch.float32 or interpreted():
        return "ieee"
    if state_dtype(dtype, norm) == torch.float32:
        return "tf32x3"
    return "native"


def lstm_forward(wx, h0, c0, w_hh, bias, ih_weight, hh_weight, cell_weight, cell_bias, running, lengths,
                 norm: int, training: bool, save: bool, momentum: float, eps: float):
    """Launches the forward over all T steps of ``wx`` (T, B, 4H).

    ``bias`` is b_ih + b_hh in float32; the norm weights are float32 (4H,) / (H,) tensors (any
    values when norm is NORM_NONE); ``running`` holds the six running-statistics tensors
    (max_steps, features) in float32, updated in place in training. Returns a dict with ``output``
    (T, B, H), ``h`` (T+1, B, H) and ``c`` (T+1, B, H, float32) states, and when ``save``:
    ``wh`` (T, B, 4H) and the per-step statistics (T, 2, features) as ``ih_stats``, ``hh_stats``,
    ``cell_stats`` (row 0 the mean, row 1 the rstd)."""
    steps, batch, gates = wx.shape
    hidden = gates // 4
    device = wx.device
    block_b, block_h, block_k = block_sizes(batch, hidden, batch_norm=norm == NORM_BATCH)
    column_statistics = norm == NORM_BATCH and training
    programs = triton.cdiv(hidden, block_h)
    grid = (programs, batch_tiles(batch, block_b, column_statistics))
    chunks = chunked(batch, column_statistics)
    h = new_buffer((steps + 1, batch, hidden), state_dtype(w_hh.dtype, norm), device)
    c = new_buffer((steps + 1, batch, hidden), torch.float32, device)
    h[0].copy_(h0)
    c[0].copy_(c0)
    output = new_buffer((steps, batch, hidden), w_hh.dtype, device)
    # with chunks the kernel stores wh in any case: its second pass over the batch reads it back
    wh = new_buffer((steps, batch, gates), torch.float32, device) if save or chunks else output
    stats_steps = steps if (save and norm == NORM_BATCH) else 1
    ih_stats = new_buffer((stats_steps, 2, gates), torch.float32, device)
    hh_stats = new_buffer((stats_steps, 2, gates), torch.float32, device)
    cell_stats = new_buffer((stats_steps, 2, hidden), torch.float32, device)
    lengths_arg = lengths if lengths is not None else h0
    max_steps = running[0].shape[0]
    arguments = (wx, w_hh, bias, ih_weight, hh_weight, cell_weight, cell_bias, h, c, output, wh, ih_stats, hh_stats,
                 cell_stats, *running, lengths_arg, batch, max_steps, momentum, eps)
    constants = dict(**launch_options(block_b, block_h),
                     H=hidden, NORM=norm, TRAINING=training, SAVE=save, HAS_LENGTHS=lengths is not None,
                     DOT_PRECISION=dot_precision(w_hh.dtype, norm), BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k,
                     CHUNKED=chunks)
    if launch_mode(grid[0] * grid[1], device) == PERSISTENT:
        barrier = torch.zeros(1, dtype=torch.int32, device=device)
        resident = resident_weights(block_b, block_h, 4, hidden, state_dtype(w_hh.dtype, norm),
                                    constants["DOT_PRECISION"])
        if resident:
            constants["BLOCK_K"] = resident_k_tile(hidden)
        lstm_forward_persistent_kernel[grid](steps, barrier, *arguments, **constants, RESIDENT=resident,
            **persistent_launch_options(device.type))
    else:
        launch_steps(lstm_forward_step_kernel, grid, arguments, constants, steps)
    result = {"output": output, "h": h, "c": c}
    if save:
        result.update(wh=wh, ih_stats=ih_stats, hh_stats=hh_stats, cell_stats=cell_stats)
    return result

