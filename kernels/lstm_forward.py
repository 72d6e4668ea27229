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

Saved for the backward (``SAVE``): in ``wh`` (T, B, 4H) the raw recurrent projection under batch
norm, and without a norm the pre-activation z itself (the backward then reads neither wx nor
the bias); the states h (T+1, B, H) and c (T+1, B, H), and the mean / rstd used at every step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .batch_norm import (batch_statistics, chunk_moments, chunk_rows, merge_moments, merge_pair_moments,
                         pair_statistics, statistics_from_moments)
from .buffers import new_buffer, stand_in
from .layout import NORM_BATCH, dot_precision, resident_tiles, state_dtype, step_layout
from .lstm_projection import load_recurrent_weights, recurrent_projection
from .sequence_launch import launch_sequence
from .tiles import grid_barrier, program_tile, row_active, step_offset, store_step_statistics, tanh



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
    offsets = rows[:, None] * (4 * H) + (gate * H + units)[None, :]
    return tl.load(ptr + step_offset(t, B * 4 * H) + offsets, mask=row_mask[:, None] & unit_mask[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _gate_preactivation(gate, t, acc, wx_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, wh_ptr, ih_stats_ptr, hh_stats_ptr,
                        ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, slot, rows, units, row_mask, unit_mask,
                        active_f, count, use_batch, B, momentum, eps, H: tl.constexpr, NORM: tl.constexpr,
                        TRAINING: tl.constexpr, SAVE: tl.constexpr):
    """z of one gate: N_ih(wx) + N_hh(wh) + b for the program's columns gate * H + units, its rows
    the whole batch under batch norm."""
    columns = gate * H + units
    wx = _gate_tile(wx_ptr, gate, t, rows, units, row_mask, unit_mask, B, H)
    saved = wh_ptr + step_offset(t, B * 4 * H) + rows[:, None] * (4 * H) + columns[None, :]
    if NORM == 2:
        if SAVE:
            tl.store(saved, acc, mask=row_mask[:, None] & unit_mask[None, :])
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
        if SAVE:  # the backward of no norm needs z alone: saved in wh's place, so wx need not be kept for it
            tl.store(saved, z, mask=row_mask[:, None] & unit_mask[None, :])
    return z


@triton.jit
def _chunk_gate_moments(gate, t, acc, wx_ptr, wh_ptr, rows, units, row_mask, unit_mask, active_f, chunk_count, count,
                        ih_mean, ih_m2, hh_mean, hh_m2, B, H: tl.constexpr):
    """First pass over a chunk of rows, one gate: stores its recurrent projection ``acc`` (read
    again by the second pass) and merges the chunk's moments of wx and of it into those so far."""
    wx = _gate_tile(wx_ptr, gate, t, rows, units, row_mask, unit_mask, B, H)
    tl.store(wh_ptr + step_offset(t, B * 4 * H) + rows[:, None] * (4 * H) + (gate * H + units)[None, :], acc,
             mask=row_mask[:, None] & unit_mask[None, :])
    return merge_pair_moments(wx, acc, active_f, chunk_count, count, ih_mean, ih_m2, hh_mean, hh_m2)


@triton.jit
def _lstm_forward_step(t, pid, wx_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, cell_weight_ptr,
                       cell_bias_ptr, h_ptr, c_ptr, out_ptr, wh_ptr, ih_stats_ptr, hh_stats_ptr, cell_stats_ptr,
                       ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, cell_mean_ptr, cell_var_ptr, lengths_ptr,
                       B, max_steps, momentum, eps, H: tl.constexpr, NORM: tl.constexpr, TRAINING: tl.constexpr,
                       SAVE: tl.constexpr, HAS_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, w_i, w_f, w_g, w_o,
                       RESIDENT: tl.constexpr, initial_ptr, HAS_INITIAL: tl.constexpr):
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
                                                      RESIDENT, initial_ptr, HAS_INITIAL)

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
    c_prev = tl.load(c_ptr + step_offset(t, B * H) + state_offsets, mask=tile_mask, other=0.0)
    h_prev = tl.load(h_ptr + step_offset(t, B * H) + state_offsets, mask=tile_mask, other=0.0, cache_modifier=".cg")
    c_new = tl.sigmoid(z_f) * c_prev + tl.sigmoid(z_i) * tanh(z_g)
    if NORM == 2:
        cell_mean, cell_rstd = batch_statistics(c_new, active_f, count, use_batch, cell_mean_ptr + step_offset(slot, H),
                                                cell_var_ptr + step_offset(slot, H), units, unit_mask, momentum, eps,
                                                 TRAINING)
        if SAVE:
            store_step_statistics(cell_stats_ptr, t, units, cell_mean, cell_rstd, unit_mask, H)
        cell_weight = tl.load(cell_weight_ptr + units, mask=unit_mask, other=0.0)
        cell_bias = tl.load(cell_bias_ptr + units, mask=unit_mask, other=0.0)
        c_normalized = (c_new - cell_mean[None, :]) * (cell_rstd * cell_weight)[None, :] + cell_bias[None, :]
    else:
        c_normalized = c_new
    h_new = tl.sigmoid(z_o) * tanh(c_normalized)
    keep = active[:, None]
    tl.store(c_ptr + step_offset(t + 1, B * H) + state_offsets, tl.where(keep, c_new, c_prev), mask=tile_mask)
    tl.store(h_ptr + step_offset(t + 1, B * H) + state_offsets,
             tl.where(keep, h_new, h_prev.to(tl.float32)).to(h_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(out_ptr + step_offset(t, B * H) + state_offsets, tl.where(keep, h_new, 0.0).to(out_ptr.dtype.element_ty),
             mask=tile_mask)


@triton.jit
def _lstm_forward_step_chunked(t, pid, wx_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, cell_weight_ptr,
                               cell_bias_ptr, h_ptr, c_ptr, out_ptr, wh_ptr, ih_stats_ptr, hh_stats_ptr,
                               cell_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, cell_mean_ptr,
                               cell_var_ptr, lengths_ptr, B, max_steps, momentum, eps, H: tl.constexpr,
                               TRAINING: tl.constexpr, SAVE: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                               DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                               BLOCK_K: tl.constexpr, w_i, w_f, w_g, w_o, RESIDENT: tl.constexpr, initial_ptr,
                               HAS_INITIAL: tl.constexpr):
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
                                                          w_o, RESIDENT, initial_ptr, HAS_INITIAL)
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
    state_start = step_offset(t, B * H)  # row t of h and c; row t + 1 is B * H further
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
        c_prev = tl.load(c_ptr + state_start + state_offsets, mask=tile_mask, other=0.0)
        c_new = tl.sigmoid(z_f) * c_prev + tl.sigmoid(z_i) * tanh(z_g)
        tl.store(c_ptr + state_start + B * H + state_offsets, tl.where(active[:, None], c_new, c_prev), mask=tile_mask)
        chunk_mean, chunk_m2 = chunk_moments(c_new, active_f, chunk_count)
        cell_mean, cell_m2 = merge_moments(seen, cell_mean, cell_m2, chunk_count, chunk_mean, chunk_m2)
        seen += chunk_count
    slot_start = step_offset(slot, H)
    cell_mean, cell_rstd = statistics_from_moments(cell_mean, cell_m2, count, use_batch, cell_mean_ptr + slot_start,
                                                   cell_var_ptr + slot_start, units, unit_mask, momentum, eps, TRAINING)
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
        c_new = tl.load(c_ptr + state_start + B * H + state_offsets, mask=tile_mask, other=0.0)
        c_normalized = (c_new - cell_mean[None, :]) * (cell_rstd * cell_weight)[None, :] + cell_bias[None, :]
        h_new = tl.sigmoid(z_o) * tanh(c_normalized)
        h_prev = tl.load(h_ptr + state_start + state_offsets, mask=tile_mask, other=0.0, cache_modifier=".cg")
        keep = active[:, None]
        tl.store(h_ptr + state_start + B * H + state_offsets,
                 tl.where(keep, h_new, h_prev.to(tl.float32)).to(h_ptr.dtype.element_ty), mask=tile_mask)
        tl.store(out_ptr + state_start + state_offsets, tl.where(keep, h_new, 0.0).to(out_ptr.dtype.element_ty),
                 mask=tile_mask)


# t unspecialized: one compiled kernel serves every step (Triton compiles t == 1 and t % 16 == 0 apart)
@triton.jit(do_not_specialize=["t"])
def lstm_forward_step_kernel(t, wx_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, cell_weight_ptr,
                             cell_bias_ptr, h_ptr, c_ptr, out_ptr, wh_ptr, ih_stats_ptr, hh_stats_ptr, cell_stats_ptr,
                             ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, cell_mean_ptr, cell_var_ptr,
                             lengths_ptr, initial_ptr, B, max_steps, momentum, eps, H: tl.constexpr,
                             NORM: tl.constexpr, TRAINING: tl.constexpr, SAVE: tl.constexpr,
                             HAS_LENGTHS: tl.constexpr, HAS_INITIAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                             CHUNKED: tl.constexpr):
    """One timestep; the launch boundary is the synchronization between steps. ``DOT_PRECISION``:
    see ``dot_precision``; ``CHUNKED``: the batch norm's batch walked in chunks (``batch_norm.py``);
    ``HAS_INITIAL``: step 0 adds the product at ``initial_ptr`` (``recurrent_projection``)."""
    if CHUNKED:
        _lstm_forward_step_chunked(t, tl.program_id(0), wx_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr,
                                   cell_weight_ptr, cell_bias_ptr, h_ptr, c_ptr, out_ptr, wh_ptr, ih_stats_ptr,
                                   hh_stats_ptr, cell_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr,
                                   cell_mean_ptr, cell_var_ptr, lengths_ptr, B, max_steps, momentum, eps, H, TRAINING,
                                   SAVE, HAS_LENGTHS, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, 0, 0, 0, 0, False,
                                   initial_ptr, HAS_INITIAL)
    else:
        _lstm_forward_step(t, tl.program_id(0), wx_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr,
                           cell_weight_ptr, cell_bias_ptr, h_ptr, c_ptr, out_ptr, wh_ptr, ih_stats_ptr, hh_stats_ptr,
                           cell_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, cell_mean_ptr,
                           cell_var_ptr, lengths_ptr, B, max_steps, momentum, eps, H, NORM, TRAINING, SAVE,
                           HAS_LENGTHS, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, 0, 0, 0, 0, False, initial_ptr,
                           HAS_INITIAL)


# steps unspecialized: one compiled kernel serves every sequence length
@triton.jit(do_not_specialize=["steps"])
def lstm_forward_persistent_kernel(steps, barrier_ptr, wx_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr,
                                   cell_weight_ptr, cell_bias_ptr, h_ptr, c_ptr, out_ptr, wh_ptr, ih_stats_ptr,
                                   hh_stats_ptr, cell_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr,
                                   cell_mean_ptr, cell_var_ptr, lengths_ptr, initial_ptr, B, max_steps, momentum,
                                   eps, H: tl.constexpr, NORM: tl.constexpr, TRAINING: tl.constexpr,
                                   SAVE: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_INITIAL: tl.constexpr,
                                   DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
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
                                       RESIDENT, initial_ptr, HAS_INITIAL)
        else:
            _lstm_forward_step(t, pid, wx_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, cell_weight_ptr,
                               cell_bias_ptr, h_ptr, c_ptr, out_ptr, wh_ptr, ih_stats_ptr, hh_stats_ptr, cell_stats_ptr,
                               ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, cell_mean_ptr, cell_var_ptr,
                               lengths_ptr, B, max_steps, momentum, eps, H, NORM, TRAINING, SAVE, HAS_LENGTHS,
                               DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, w_i, w_f, w_g, w_o, RESIDENT, initial_ptr,
                               HAS_INITIAL)
        grid_barrier(barrier_ptr, (t + 1) * programs)


def lstm_forward(wx, h0, c0, w_hh, bias, ih_weight, hh_weight, cell_weight, cell_bias, running, lengths,
                 norm: int, training: bool, save: bool, momentum: float, eps: float, initial=None):
    """Launches the forward over all T steps of ``wx`` (T, B, 4H).

    ``bias`` is b_ih + b_hh in float32; the norm weights are float32 (4H,) / (H,) tensors (any
    values when norm is NORM_NONE); ``running`` holds the six running-statistics tensors
    (max_steps, features) in float32, updated in place in training. Returns a dict with ``output``
    (T, B, H), ``h`` (T+1, B, H) and ``c`` (T+1, B, H, float32) states, and when ``save``:
    ``wh`` (T, B, 4H: h W_hh^T under batch norm, z without a norm) and the per-step statistics
    (T, 2, features) as ``ih_stats``, ``hh_stats``, ``cell_stats`` (row 0 the mean, row 1 the
    rstd). ``initial``: a float32 (B, 4H) product that step 0 adds to h0 W_hh^T (see
    ``recurrent_projection``), or None."""
    steps, batch, gates = wx.shape
    hidden = gates // 4
    device = wx.device
    layout = step_layout(batch, hidden, norm, training)
    h = new_buffer((steps + 1, batch, hidden), state_dtype(w_hh.dtype, norm), device)
    c = new_buffer((steps + 1, batch, hidden), torch.float32, device)
    h[0].copy_(h0)
    c[0].copy_(c0)
    output = new_buffer((steps, batch, hidden), w_hh.dtype, device)
    # with chunks the kernel stores wh in any case: its second pass over the batch reads it back
    wh = new_buffer((steps, batch, gates), torch.float32, device) if save or layout.chunked else output
    stats_steps = steps if (save and norm == NORM_BATCH) else 1
    # batch norm's statistics; without it (norm None, or sequence-wise before the loop) zeroed stand-ins
    ih_stats, hh_stats, cell_stats = (
        new_buffer((stats_steps, 2, features), torch.float32, device) if norm == NORM_BATCH
        else stand_in((1, 2, features), device) for features in (gates, gates, hidden))
    lengths_arg = lengths if lengths is not None else h0
    max_steps = running[0].shape[0]
    arguments = (wx, w_hh, bias, ih_weight, hh_weight, cell_weight, cell_bias, h, c, output, wh, ih_stats, hh_stats,
                 cell_stats, *running, lengths_arg, initial if initial is not None else bias, batch, max_steps,
                 momentum, eps)
    constants = dict(**layout.tile_constants(),
                     H=hidden, NORM=norm, TRAINING=training, SAVE=save, HAS_LENGTHS=lengths is not None,
                     HAS_INITIAL=initial is not None, DOT_PRECISION=dot_precision(w_hh.dtype, norm),
                     CHUNKED=layout.chunked)
    launch_sequence(lstm_forward_step_kernel, lstm_forward_persistent_kernel, layout, steps, arguments, constants,
                    device, persistent_constants=lambda: resident_tiles(layout, 4, hidden, w_hh.dtype, norm))
    result = {"output": output, "h": h, "c": c}
    if save:
        result.update(wh=wh, ih_stats=ih_stats, hh_stats=hh_stats, cell_stats=cell_stats)
    return result

