"""Fused LSTM backward over the whole sequence, the mirror of ``lstm_forward.py`` (reference:
``normrnn/reference/lstm.py``).

Program p owns the same hidden units as in the forward. Step t (from T-1 down to 0):

1. dL/dh_t of its units: for rows active at t+1, ``dwh_{t+1} W_hh[:, units]`` (dwh_{t+1} of all
   4H columns was written by every program at the previous step: the one cross-program read);
   for rows that had ended, the value carried from step t+1.
2. With the forward's saved wh (z itself without a norm), states and statistics, everything else
   is local to the program's columns: the gates' backward, the batch-norm backward of c_t, of
   wh_t and of wx_t (which couple rows of the active batch only), and the cell-state gradient
   carried to step t-1.

Outputs: dwx (T, B, 4H) and dwh (T, B, 4H), one tensor without a norm (the weight gradients are
matmuls of these after the loop), dh_0 is dwh_0 W_hh, dc_0 the carried cell gradient, and
per-step partial sums of the bias and norm-parameter gradients (summed over steps by the caller,
so no float atomics are needed).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .batch_norm import batch_norm_backward, batch_norm_backward_from_sums, chunk_rows, chunked_pair_backward
from .buffers import new_buffer
from .layout import NORM_BATCH, dot_precision, low_precision_gradient, step_layout
from .sequence_launch import launch_sequence
from .tiles import grid_barrier, load_step_statistics, program_tile, recurrent_gradient, row_activity, step_offset, tanh


@triton.jit
def _gate_forward(gate, t, rows, units, row_mask, unit_mask, wx_ptr, wh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr,
                  ih_stats_ptr, hh_stats_ptr, B, H: tl.constexpr, NORM: tl.constexpr):
    """One gate's pre-activation z and, under batch norm, the normalized projections, recomputed
    from wx and wh there; without a norm the forward saved z itself in wh's place."""
    columns = gate * H + units
    tile_mask = row_mask[:, None] & unit_mask[None, :]
    step_start = step_offset(t, B * 4 * H)
    offsets = rows[:, None] * (4 * H) + columns[None, :]
    wh = tl.load(wh_ptr + step_start + offsets, mask=tile_mask, other=0.0)
    if NORM == 2:
        wx = tl.load(wx_ptr + step_start + offsets, mask=tile_mask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + columns, mask=unit_mask, other=0.0)
        ih_mean, ih_rstd = load_step_statistics(ih_stats_ptr, t, columns, unit_mask, 4 * H)
        hh_mean, hh_rstd = load_step_statistics(hh_stats_ptr, t, columns, unit_mask, 4 * H)
        wx_hat = (wx - ih_mean[None, :]) * ih_rstd[None, :]
        wh_hat = (wh - hh_mean[None, :]) * hh_rstd[None, :]
        ih_weight = tl.load(ih_weight_ptr + columns, mask=unit_mask, other=0.0)
        hh_weight = tl.load(hh_weight_ptr + columns, mask=unit_mask, other=0.0)
        z = wx_hat * ih_weight[None, :] + wh_hat * hh_weight[None, :] + bias[None, :]
    else:  # no normalized projections: z stands in for them, unread
        z = wh
        wx_hat = z
        wh_hat = z
        ih_rstd = tl.zeros_like(units).to(tl.float32)
        hh_rstd = ih_rstd
    return z, wx_hat, wh_hat, ih_rstd, hh_rstd


@triton.jit
def _store_gradients(offsets, tile_mask, grad_wx, grad_wh, dwx_ptr, dwh_ptr, dwh_low_ptr, NORM: tl.constexpr,
                     LOW_GRAD: tl.constexpr):
    """dwx and dwh of one gate's tile; with ``LOW_GRAD`` dwh also rounded to the weights' dtype.
    Without a norm both are dL/dz, and dwh is dwx's buffer (``lstm_backward``): stored once."""
    tl.store(dwx_ptr + offsets, grad_wx, mask=tile_mask)
    if NORM == 2:
        tl.store(dwh_ptr + offsets, grad_wh, mask=tile_mask)
    if LOW_GRAD:
        tl.store(dwh_low_ptr + offsets, grad_wh.to(dwh_low_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _store_gate_partials(partial, grad_z, wx_hat, wh_hat, unit_mask, H: tl.constexpr, NORM: tl.constexpr):
    """One gate's column sums of dL/dz and, under batch norm, of dL/dz wx_hat and dL/dz wh_hat:
    its bias, ih gain and hh gain gradients over some rows, at ``partial`` (its columns in row 0
    of the (3, 4H) partials of those rows)."""
    tl.store(partial, tl.sum(grad_z, axis=0), mask=unit_mask)
    if NORM == 2:
        tl.store(partial + 4 * H, tl.sum(grad_z * wx_hat, axis=0), mask=unit_mask)
        tl.store(partial + 8 * H, tl.sum(grad_z * wh_hat, axis=0), mask=unit_mask)


@triton.jit
def _gate_backward(gate, t, grad_z, wx_hat, wh_hat, ih_rstd, hh_rstd, rows, units, row_mask, unit_mask, active_f,
                   count, use_batch, ih_weight_ptr, hh_weight_ptr, dwx_ptr, dwh_ptr, dwh_low_ptr, partial_ptr, B,
                   H: tl.constexpr, NORM: tl.constexpr, LOW_GRAD: tl.constexpr):
    """From dL/dz of one gate: dwx, dwh (through the batch norms; with ``LOW_GRAD`` also rounded
    to the weights' dtype into dwh_low, see ``lstm_backward``), and this step's partial sums of the
    bias and gain gradients, stored at partial_ptr[t] as rows (bias, ih gain, hh gain)."""
    columns = gate * H + units
    tile_mask = row_mask[:, None] & unit_mask[None, :]
    step_start = step_offset(t, B * 4 * H)
    offsets = rows[:, None] * (4 * H) + columns[None, :]
    # (T, batch tiles, 3, 4H)
    partial = partial_ptr + step_offset(t, tl.num_programs(1) * 12 * H) + tl.program_id(1) * 12 * H
    _store_gate_partials(partial + columns, grad_z, wx_hat, wh_hat, unit_mask, H, NORM)
    if NORM == 2:
        ih_weight = tl.load(ih_weight_ptr + columns, mask=unit_mask, other=0.0)
        hh_weight = tl.load(hh_weight_ptr + columns, mask=unit_mask, other=0.0)
        grad_wx = batch_norm_backward(grad_z * ih_weight[None, :], wx_hat, ih_rstd, active_f, count, use_batch)
        grad_wh = batch_norm_backward(grad_z * hh_weight[None, :], wh_hat, hh_rstd, active_f, count, use_batch)
    else:
        grad_wx = grad_z
        grad_wh = grad_z
    _store_gradients(offsets, tile_mask, grad_wx, grad_wh, dwx_ptr + step_start, dwh_ptr + step_start,
                     dwh_low_ptr + step_start, NORM, LOW_GRAD)


@triton.jit
def _hidden_gradient(t, steps, rows, units, row_mask, unit_mask, active_next, active_f, grad_out_ptr, dh_carry_ptr,
                     dwh_low_ptr, w_hh_ptr, B, H: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """dL/dh_t of the rows, zero where they do not run at t: the output's gradient plus, through
    step t+1's recurrent projection for rows still running there (a read of every program's
    dwh_{t+1}, past L1), else the gradient carried past the sequence's end; the latter part is
    stored as the new carry."""
    tile_mask = row_mask[:, None] & unit_mask[None, :]
    state_offsets = rows[:, None] * H + units[None, :]
    carried = tl.load(dh_carry_ptr + state_offsets, mask=tile_mask, other=0.0)
    recurrent = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if t + 1 < steps:
        # dwh_low is what the product reads: the rounded copy with LOW_GRAD, dwh itself without
        recurrent = recurrent_gradient(dwh_low_ptr, w_hh_ptr, t + 1, rows, units, row_mask, unit_mask, B, H, 4,
                                       DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K)
    dh_next = tl.where(active_next[:, None], recurrent, carried)
    tl.store(dh_carry_ptr + state_offsets, dh_next, mask=tile_mask)
    return (tl.load(grad_out_ptr + step_offset(t, B * H) + state_offsets, mask=tile_mask, other=0.0).to(tl.float32)
            + dh_next) * active_f


@triton.jit
def _lstm_backward_step(t, steps, pid, wx_ptr, wh_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr,
                        cell_weight_ptr, cell_bias_ptr, c_ptr, ih_stats_ptr, hh_stats_ptr, cell_stats_ptr,
                        grad_out_ptr, dh_carry_ptr, dc_carry_ptr, dwx_ptr, dwh_ptr, dwh_low_ptr, partial_ptr,
                        cell_partial_ptr, lengths_ptr, B, H: tl.constexpr, NORM: tl.constexpr, TRAINING: tl.constexpr,
                        HAS_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, LOW_GRAD: tl.constexpr):
    rows, units, row_mask, unit_mask = program_tile(pid, B, H, BLOCK_B, BLOCK_H)  # axis 1 tiles the batch
    tile_mask = row_mask[:, None] & unit_mask[None, :]
    state_offsets = rows[:, None] * H + units[None, :]
    active, active_next = row_activity(t, steps, rows, row_mask, lengths_ptr, HAS_LENGTHS)
    active_f = active.to(tl.float32)[:, None]
    count = tl.sum(active.to(tl.float32), axis=0)
    use_batch = TRAINING & (count >= 2.0)

    grad_h = _hidden_gradient(t, steps, rows, units, row_mask, unit_mask, active_next, active_f, grad_out_ptr,
                              dh_carry_ptr, dwh_low_ptr, w_hh_ptr, B, H, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K)

    z_i, wx_hat_i, wh_hat_i, ih_rstd_i, hh_rstd_i = _gate_forward(0, t, rows, units, row_mask, unit_mask, wx_ptr, wh_ptr,
                                                                  bias_ptr, ih_weight_ptr, hh_weight_ptr, ih_stats_ptr,
                                                                  hh_stats_ptr, B, H, NORM)
    z_f, wx_hat_f, wh_hat_f, ih_rstd_f, hh_rstd_f = _gate_forward(1, t, rows, units, row_mask, unit_mask, wx_ptr, wh_ptr,
                                                                  bias_ptr, ih_weight_ptr, hh_weight_ptr, ih_stats_ptr,
                                                                  hh_stats_ptr, B, H, NORM)
    z_g, wx_hat_g, wh_hat_g, ih_rstd_g, hh_rstd_g = _gate_forward(2, t, rows, units, row_mask, unit_mask, wx_ptr, wh_ptr,
                                                                  bias_ptr, ih_weight_ptr, hh_weight_ptr, ih_stats_ptr,
                                                                  hh_stats_ptr, B, H, NORM)
    z_o, wx_hat_o, wh_hat_o, ih_rstd_o, hh_rstd_o = _gate_forward(3, t, rows, units, row_mask, unit_mask, wx_ptr, wh_ptr,
                                                                  bias_ptr, ih_weight_ptr, hh_weight_ptr, ih_stats_ptr,
                                                                  hh_stats_ptr, B, H, NORM)
    gate_i = tl.sigmoid(z_i)
    gate_f = tl.sigmoid(z_f)
    gate_g = tanh(z_g)
    gate_o = tl.sigmoid(z_o)
    c_prev = tl.load(c_ptr + step_offset(t, B * H) + state_offsets, mask=tile_mask, other=0.0)
    c_new = gate_f * c_prev + gate_i * gate_g

    if NORM == 2:
        cell_mean, cell_rstd = load_step_statistics(cell_stats_ptr, t, units, unit_mask, H)
        cell_weight = tl.load(cell_weight_ptr + units, mask=unit_mask, other=0.0)
        cell_bias = tl.load(cell_bias_ptr + units, mask=unit_mask, other=0.0)
        c_hat = (c_new - cell_mean[None, :]) * cell_rstd[None, :]
        tanh_c = tanh(c_hat * cell_weight[None, :] + cell_bias[None, :])
    else:
        tanh_c = tanh(c_new)
    grad_o = grad_h * tanh_c
    grad_c_normalized = grad_h * gate_o * (1.0 - tanh_c * tanh_c)
    if NORM == 2:
        cell_partial = cell_partial_ptr + step_offset(t, tl.num_programs(1) * 2 * H) + tl.program_id(1) * 2 * H
        tl.store(cell_partial + units, tl.sum(grad_c_normalized * c_hat, axis=0), mask=unit_mask)
        tl.store(cell_partial + H + units, tl.sum(grad_c_normalized, axis=0), mask=unit_mask)
        grad_c_from_h = batch_norm_backward(grad_c_normalized * cell_weight[None, :], c_hat, cell_rstd, active_f,
                                            count, use_batch)
    else:
        grad_c_from_h = grad_c_normalized
    dc_next = tl.load(dc_carry_ptr + state_offsets, mask=tile_mask, other=0.0)
    grad_c = (dc_next + grad_c_from_h) * active_f
    tl.store(dc_carry_ptr + state_offsets, tl.where(active[:, None], grad_c * gate_f, dc_next), mask=tile_mask)

    grad_z_i = grad_c * gate_g * gate_i * (1.0 - gate_i)
    grad_z_f = grad_c * c_prev * gate_f * (1.0 - gate_f)
    grad_z_g = grad_c * gate_i * (1.0 - gate_g * gate_g)
    grad_z_o = grad_o * gate_o * (1.0 - gate_o)
    _gate_backward(0, t, grad_z_i, wx_hat_i, wh_hat_i, ih_rstd_i, hh_rstd_i, rows, units, row_mask, unit_mask,
                   active_f, count, use_batch, ih_weight_ptr, hh_weight_ptr, dwx_ptr, dwh_ptr, dwh_low_ptr, partial_ptr,
                   B, H, NORM, LOW_GRAD)
    _gate_backward(1, t, grad_z_f, wx_hat_f, wh_hat_f, ih_rstd_f, hh_rstd_f, rows, units, row_mask, unit_mask,
                   active_f, count, use_batch, ih_weight_ptr, hh_weight_ptr, dwx_ptr, dwh_ptr, dwh_low_ptr, partial_ptr,
                   B, H, NORM, LOW_GRAD)
    _gate_backward(2, t, grad_z_g, wx_hat_g, wh_hat_g, ih_rstd_g, hh_rstd_g, rows, units, row_mask, unit_mask,
                   active_f, count, use_batch, ih_weight_ptr, hh_weight_ptr, dwx_ptr, dwh_ptr, dwh_low_ptr, partial_ptr,
                   B, H, NORM, LOW_GRAD)
    _gate_backward(3, t, grad_z_o, wx_hat_o, wh_hat_o, ih_rstd_o, hh_rstd_o, rows, units, row_mask, unit_mask,
                   active_f, count, use_batch, ih_weight_ptr, hh_weight_ptr, dwx_ptr, dwh_ptr, dwh_low_ptr, partial_ptr,
                   B, H, NORM, LOW_GRAD)


@triton.jit
def _cell_output(t, rows, units, row_mask, unit_mask, wx_ptr, wh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr,
                 cell_weight_ptr, cell_bias_ptr, c_ptr, ih_stats_ptr, hh_stats_ptr, cell_mean, cell_rstd, B,
                 H: tl.constexpr):
    """Recomputes, under batch norm, the gates of step t for some rows, c_{t-1}, c_t normalized
    (c_hat) and tanh(gamma_c c_hat + beta_c)."""
    z_i, _, _, _, _ = _gate_forward(0, t, rows, units, row_mask, unit_mask, wx_ptr, wh_ptr, bias_ptr, ih_weight_ptr,
                                    hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, B, H, 2)
    z_f, _, _, _, _ = _gate_forward(1, t, rows, units, row_mask, unit_mask, wx_ptr, wh_ptr, bias_ptr, ih_weight_ptr,
                                    hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, B, H, 2)
    z_g, _, _, _, _ = _gate_forward(2, t, rows, units, row_mask, unit_mask, wx_ptr, wh_ptr, bias_ptr, ih_weight_ptr,
                                    hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, B, H, 2)
    z_o, _, _, _, _ = _gate_forward(3, t, rows, units, row_mask, unit_mask, wx_ptr, wh_ptr, bias_ptr, ih_weight_ptr,
                                    hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, B, H, 2)
    gate_i = tl.sigmoid(z_i)
    gate_f = tl.sigmoid(z_f)
    gate_g = tanh(z_g)
    gate_o = tl.sigmoid(z_o)
    state_offsets = rows[:, None] * H + units[None, :]
    c_prev = tl.load(c_ptr + step_offset(t, B * H) + state_offsets, mask=row_mask[:, None] & unit_mask[None, :],
                     other=0.0)
    c_hat = (gate_f * c_prev + gate_i * gate_g - cell_mean[None, :]) * cell_rstd[None, :]
    cell_weight = tl.load(cell_weight_ptr + units, mask=unit_mask, other=0.0)
    cell_bias = tl.load(cell_bias_ptr + units, mask=unit_mask, other=0.0)
    tanh_c = tanh(c_hat * cell_weight[None, :] + cell_bias[None, :])
    return gate_i, gate_f, gate_g, gate_o, c_prev, c_hat, tanh_c


@triton.jit
def _chunk_gate_partials(gate, t, tile, tiles, grad_z, rows, units, row_mask, unit_mask, wx_ptr, wh_ptr, bias_ptr,
                         ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, partial_ptr, dwx_ptr, B,
                         H: tl.constexpr):
    """Second pass, one gate of chunk ``tile`` of ``tiles``: stores dL/dz in dwx and its partial
    sums in the chunk's row of the partials (T, chunks, 3, 4H), for ``chunked_pair_backward``."""
    _, wx_hat, wh_hat, _, _ = _gate_forward(gate, t, rows, units, row_mask, unit_mask, wx_ptr, wh_ptr, bias_ptr,
                                            ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, B, H, 2)
    columns = gate * H + units
    offsets = rows[:, None] * (4 * H) + columns[None, :]
    tl.store(dwx_ptr + step_offset(t, B * 4 * H) + offsets, grad_z, mask=row_mask[:, None] & unit_mask[None, :])
    _store_gate_partials(partial_ptr + step_offset(t, tiles * 12 * H) + tile * 12 * H + columns, grad_z, wx_hat,
                         wh_hat, unit_mask, H, 2)


@triton.jit
def _lstm_backward_step_chunked(t, steps, pid, wx_ptr, wh_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr,
                                cell_weight_ptr, cell_bias_ptr, c_ptr, ih_stats_ptr, hh_stats_ptr, cell_stats_ptr,
                                grad_out_ptr, dh_carry_ptr, dc_carry_ptr, dwx_ptr, dwh_ptr, dwh_low_ptr, partial_ptr,
                                cell_partial_ptr, lengths_ptr, B, H: tl.constexpr, TRAINING: tl.constexpr,
                                HAS_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                                BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, LOW_GRAD: tl.constexpr):
    """Step t of the backward under batch norm in training for a batch of more than one tile,
    walked in chunks of BLOCK_B rows three times (see ``batch_norm.py``). 1: dL/dh_t of each chunk
    (stored as the carry) and the column sums of the cell norm's backward; 2: dL/dc_t, the carried
    cell gradient and dL/dz of each chunk (stored in dwx) with its partial sums; 3: dwx and dwh
    through the batch norms of the gates (``chunked_pair_backward``)."""
    units = pid * BLOCK_H + tl.arange(0, BLOCK_H)
    unit_mask = units < H
    cell_mean, cell_rstd = load_step_statistics(cell_stats_ptr, t, units, unit_mask, H)
    zero = tl.zeros((BLOCK_H,), dtype=tl.float32)
    count = tl.sum(zero, axis=0)
    cell_shift_sum = zero  # column sums of dL/d(normalized c) and of it times c_hat
    cell_gain_sum = zero
    for first_row in range(0, B, BLOCK_B):
        rows = first_row + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        active, active_next = row_activity(t, steps, rows, row_mask, lengths_ptr, HAS_LENGTHS)
        active_f = active.to(tl.float32)[:, None]
        count += tl.sum(active.to(tl.float32), axis=0)
        grad_h = _hidden_gradient(t, steps, rows, units, row_mask, unit_mask, active_next, active_f, grad_out_ptr,
                                  dh_carry_ptr, dwh_low_ptr, w_hh_ptr, B, H, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K)
        _, _, _, gate_o, _, c_hat, tanh_c = _cell_output(t, rows, units, row_mask, unit_mask, wx_ptr, wh_ptr, bias_ptr,
                                                         ih_weight_ptr, hh_weight_ptr, cell_weight_ptr, cell_bias_ptr,
                                                         c_ptr, ih_stats_ptr, hh_stats_ptr, cell_mean, cell_rstd, B, H)
        grad_c_normalized = grad_h * gate_o * (1.0 - tanh_c * tanh_c)
        cell_shift_sum += tl.sum(grad_c_normalized, axis=0)
        cell_gain_sum += tl.sum(grad_c_normalized * c_hat, axis=0)
    use_batch = TRAINING & (count >= 2.0)
    cell_partial = cell_partial_ptr + step_offset(t, 2 * H)
    tl.store(cell_partial + units, cell_gain_sum, mask=unit_mask)
    tl.store(cell_partial + H + units, cell_shift_sum, mask=unit_mask)
    cell_weight = tl.load(cell_weight_ptr + units, mask=unit_mask, other=0.0)
    tl.debug_barrier()  # pass 2 reads back the dL/dh_t that other threads of this program stored

    tiles = tl.cdiv(B, BLOCK_B)
    grad_out_step = grad_out_ptr + step_offset(t, B * H)
    for tile in range(tiles):
        rows, row_mask, active, active_f, _ = chunk_rows(tile * BLOCK_B, t, lengths_ptr, B, HAS_LENGTHS, BLOCK_B)
        tile_mask = row_mask[:, None] & unit_mask[None, :]
        state_offsets = rows[:, None] * H + units[None, :]
        grad_h = (tl.load(grad_out_step + state_offsets, mask=tile_mask, other=0.0).to(tl.float32)
                  + tl.load(dh_carry_ptr + state_offsets, mask=tile_mask, other=0.0)) * active_f
        gate_i, gate_f, gate_g, gate_o, c_prev, c_hat, tanh_c = _cell_output(t, rows, units, row_mask, unit_mask,
                                                                             wx_ptr, wh_ptr, bias_ptr, ih_weight_ptr,
                                                                             hh_weight_ptr, cell_weight_ptr,
                                                                             cell_bias_ptr, c_ptr, ih_stats_ptr,
                                                                             hh_stats_ptr, cell_mean, cell_rstd, B, H)
        grad_o = grad_h * tanh_c
        grad_c_normalized = grad_h * gate_o * (1.0 - tanh_c * tanh_c)
        grad_c_from_h = batch_norm_backward_from_sums(grad_c_normalized * cell_weight[None, :], c_hat, cell_rstd,
                                                      cell_weight * cell_shift_sum, cell_weight * cell_gain_sum, count,
                                                      active_f, use_batch)
        dc_next = tl.load(dc_carry_ptr + state_offsets, mask=tile_mask, other=0.0)
        grad_c = (dc_next + grad_c_from_h) * active_f
        tl.store(dc_carry_ptr + state_offsets, tl.where(active[:, None], grad_c * gate_f, dc_next), mask=tile_mask)
        _chunk_gate_partials(0, t, tile, tiles, grad_c * gate_g * gate_i * (1.0 - gate_i), rows, units, row_mask,
                             unit_mask, wx_ptr, wh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, ih_stats_ptr,
                             hh_stats_ptr, partial_ptr, dwx_ptr, B, H)
        _chunk_gate_partials(1, t, tile, tiles, grad_c * c_prev * gate_f * (1.0 - gate_f), rows, units, row_mask,
                             unit_mask, wx_ptr, wh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, ih_stats_ptr,
                             hh_stats_ptr, partial_ptr, dwx_ptr, B, H)
        _chunk_gate_partials(2, t, tile, tiles, grad_c * gate_i * (1.0 - gate_g * gate_g), rows, units, row_mask,
                             unit_mask, wx_ptr, wh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, ih_stats_ptr,
                             hh_stats_ptr, partial_ptr, dwx_ptr, B, H)
        _chunk_gate_partials(3, t, tile, tiles, grad_o * gate_o * (1.0 - gate_o), rows, units, row_mask, unit_mask,
                             wx_ptr, wh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr,
                             partial_ptr, dwx_ptr, B, H)
    tl.debug_barrier()  # pass 3 reads back the dL/dz that other threads of this program stored
    # dz is both the input and the recurrent projection's gradient (a = u = z): partials (bias, ih gain, hh gain)
    chunked_pair_backward(t, pid, wx_ptr, wh_ptr, ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, dwx_ptr,
                          dwx_ptr, dwh_ptr, dwh_low_ptr, partial_ptr, lengths_ptr, B, H, 4, 3, 0, 1, 2, TRAINING,
                          HAS_LENGTHS, BLOCK_B, BLOCK_H, LOW_GRAD)


# t unspecialized: one compiled kernel serves every step (Triton compiles t == 1 and t % 16 == 0 apart)
@triton.jit(do_not_specialize=["t", "steps"])
def lstm_backward_step_kernel(t, steps, wx_ptr, wh_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr,
                              cell_weight_ptr, cell_bias_ptr, c_ptr, ih_stats_ptr, hh_stats_ptr, cell_stats_ptr,
                              grad_out_ptr, dh_carry_ptr, dc_carry_ptr, dwx_ptr, dwh_ptr, dwh_low_ptr, partial_ptr,
                              cell_partial_ptr, lengths_ptr, B, H: tl.constexpr, NORM: tl.constexpr,
                              TRAINING: tl.constexpr, HAS_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                              LOW_GRAD: tl.constexpr, CHUNKED: tl.constexpr):
    """One timestep of the backward; the launch boundary orders it after step t + 1. ``CHUNKED``:
    the batch norm's batch walked in chunks (``batch_norm.py``)."""
    if CHUNKED:
        _lstm_backward_step_chunked(t, steps, tl.program_id(0), wx_ptr, wh_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr,
                                    hh_weight_ptr, cell_weight_ptr, cell_bias_ptr, c_ptr, ih_stats_ptr, hh_stats_ptr,
                                    cell_stats_ptr, grad_out_ptr, dh_carry_ptr, dc_carry_ptr, dwx_ptr, dwh_ptr,
                                    dwh_low_ptr, partial_ptr, cell_partial_ptr, lengths_ptr, B, H, TRAINING,
                                    HAS_LENGTHS, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, LOW_GRAD)
    else:
        _lstm_backward_step(t, steps, tl.program_id(0), wx_ptr, wh_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr,
                            hh_weight_ptr, cell_weight_ptr, cell_bias_ptr, c_ptr, ih_stats_ptr, hh_stats_ptr,
                            cell_stats_ptr, grad_out_ptr, dh_carry_ptr, dc_carry_ptr, dwx_ptr, dwh_ptr, dwh_low_ptr,
                            partial_ptr, cell_partial_ptr, lengths_ptr, B, H, NORM, TRAINING, HAS_LENGTHS,
                            DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, LOW_GRAD)


# steps unspecialized: one compiled kernel serves every sequence length
@triton.jit(do_not_specialize=["steps"])
def lstm_backward_persistent_kernel(steps, barrier_ptr, wx_ptr, wh_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr,
                                    hh_weight_ptr, cell_weight_ptr, cell_bias_ptr, c_ptr, ih_stats_ptr, hh_stats_ptr,
                                    cell_stats_ptr, grad_out_ptr, dh_carry_ptr, dc_carry_ptr, dwx_ptr, dwh_ptr,
                                    dwh_low_ptr, partial_ptr, cell_partial_ptr, lengths_ptr, B, H: tl.constexpr,
                                    NORM: tl.constexpr, TRAINING: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                                    DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                                    BLOCK_K: tl.constexpr, LOW_GRAD: tl.constexpr, CHUNKED: tl.constexpr):
    """All timesteps, T-1 down to 0, with the forward kernel's grid barrier publishing dwh_t."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0) * tl.num_programs(1)
    for step in range(steps):
        t = steps - 1 - step
        if CHUNKED:
            _lstm_backward_step_chunked(t, steps, pid, wx_ptr, wh_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr,
                                        hh_weight_ptr, cell_weight_ptr, cell_bias_ptr, c_ptr, ih_stats_ptr,
                                        hh_stats_ptr, cell_stats_ptr, grad_out_ptr, dh_carry_ptr, dc_carry_ptr, dwx_ptr,
                                        dwh_ptr, dwh_low_ptr, partial_ptr, cell_partial_ptr, lengths_ptr, B, H,
                                        TRAINING, HAS_LENGTHS, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, LOW_GRAD)
        else:
            _lstm_backward_step(t, steps, pid, wx_ptr, wh_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr,
                                cell_weight_ptr, cell_bias_ptr, c_ptr, ih_stats_ptr, hh_stats_ptr, cell_stats_ptr,
                                grad_out_ptr, dh_carry_ptr, dc_carry_ptr, dwx_ptr, dwh_ptr, dwh_low_ptr, partial_ptr,
                                cell_partial_ptr, lengths_ptr, B, H, NORM, TRAINING, HAS_LENGTHS, DOT_PRECISION,
                                BLOCK_B, BLOCK_H, BLOCK_K, LOW_GRAD)
        grid_barrier(barrier_ptr, (step + 1) * programs)


def lstm_backward(saved, grad_output, grad_h_n, grad_c_n, wx, w_hh, bias, ih_weight, hh_weight, cell_weight, cell_bias,
                  lengths, norm: int, training: bool):
    """Launches the backward over all steps. ``saved`` is the dict of ``lstm_forward(save=True)``;
    ``wx`` is read under batch norm only (without a norm ``saved["wh"]`` holds z), and may be None
    otherwise.

    Returns dwx (T, B, 4H, float32), dwh (T, B, 4H, float32: without a norm the same tensor as
    dwx, both being dL/dz), dh_0, dc_0 (B, H, float32) and the per-step partial sums:
    ``partials`` (T, 3, 4H) = (bias, ih gain, hh gain) and ``cell_partials`` (T, 2, H) =
    (cell gain, cell shift)."""
    steps, batch, gates = saved["wh"].shape
    hidden = gates // 4
    device = saved["wh"].device
    layout = step_layout(batch, hidden, norm, training)
    dh_carry = grad_h_n.to(torch.float32).contiguous().clone()
    dc_carry = grad_c_n.to(torch.float32).contiguous().clone()
    dwx = new_buffer((steps, batch, gates), torch.float32, device)
    dwh = new_buffer((steps, batch, gates), torch.float32, device) if norm == NORM_BATCH else dwx
    low_grad = low_precision_gradient(w_hh.dtype, norm)
    dwh_low = new_buffer((steps, batch, gates), w_hh.dtype, device) if low_grad else dwh
    partials = new_buffer((steps, layout.row_tiles, 3, gates), torch.float32, device)
    cell_partials = new_buffer((steps, layout.grid[1], 2, hidden), torch.float32, device)
    if norm != NORM_BATCH:
        partials[:, :, 1:].zero_()
        cell_partials.zero_()
    lengths_arg = lengths if lengths is not None else dh_carry
    unread = saved["wh"]  # stands in for wx where the kernels do not read it
    arguments = (wx if norm == NORM_BATCH else unread, saved["wh"], w_hh, bias, ih_weight, hh_weight, cell_weight,
                 cell_bias, saved["c"], saved["ih_stats"], saved["hh_stats"], saved["cell_stats"],
                 grad_output.contiguous(), dh_carry, dc_carry, dwx, dwh, dwh_low, partials, cell_partials, lengths_arg,
                 batch)
    constants = dict(**layout.tile_constants(),
                     H=hidden, NORM=norm, TRAINING=training, HAS_LENGTHS=lengths is not None,
                     DOT_PRECISION=dot_precision(w_hh.dtype, norm), LOW_GRAD=low_grad, CHUNKED=layout.chunked)
    launch_sequence(lstm_backward_step_kernel, lstm_backward_persistent_kernel, layout, steps, arguments, constants,
                    device, backward=True)
    # Every sequence is active at step 0 (lengths >= 1), so dL/dh_0 comes through W_hh alone.
    grad_h0 = torch.matmul(dwh[0].to(w_hh.dtype), w_hh).float()
    return {"dwx": dwx, "dwh": dwh, "dh0": grad_h0, "dc0": dc_carry, "partials": partials.sum(1),
            "cell_partials": cell_partials.sum(1)}
