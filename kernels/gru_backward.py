"""Fused GRU backward over the whole sequence, the mirror of ``gru_forward.py`` (reference:
``normrnn/reference/gru.py``).

Program p owns the same hidden units (and batch tile) as in the forward. h_{t-1} reaches h_t
through W_hh and directly (z * h_{t-1}), so dL/dh_{t-1} has two parts: ``dwh_t W_hh[:, units]``
(dwh_t of all 3H columns was written by every program: the one cross-program read; without a norm
its r and z columns are read from dwx_t, which equals it there, and only its candidate column
r * da_n has a buffer of its own) and
``z_t * dL/dh_t``, local to the program, carried in a buffer between steps together with the
gradient of sequences that have ended. With dL/dh_t known, step t computes

    dn = dh (1 - z),  dz = dh (h_{t-1} - n),  da_n = dn (1 - n^2),  du_n = da_n r,
    da_r = du_r = da_n u_n r (1 - r),  da_z = du_z = dz z (1 - z),

with r, z, n and u_n recomputed from the saved projections under a norm, and read as the forward
stored them without one (``gru_forward.py``); then dwx_t and dwh_t through the normalizations:
local under batch norm, and under layer norm a second phase after an exchange of per-program row
sums (see ``lstm_layer_norm_backward.py``).
Per-step partial sums of the bias and gain gradients, (T, tiles, 4, 3H) = (b_ih, b_hh, ih gain,
hh gain), are summed by the caller: no float atomics. In bf16 and fp16 without batch norm dwh_t is
also stored rounded to the weights' dtype, which the recurrent product rounds it to anyway
(``low_precision_gradient`` in ``layout.py``): half the bytes every program reads per step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .batch_norm import batch_norm_backward, chunked_pair_backward
from .buffers import new_buffer
from .layer_norm import store_row_partials, sum_row_partials
from .layout import NORM_BATCH, NORM_LAYER, NORM_NONE, dot_precision, low_precision_gradient, step_layout
from .sequence_launch import launch_sequence
from .tiles import (add_gate_gradient_product, grid_barrier, load_step_statistics, program_tile, recurrent_gradient,
                    row_activity, step_offset, tanh)


@triton.jit
def _gate_recompute(gate, t, rows, units, tile_mask, unit_mask, row_mean, row_rstd, wx_ptr, wh_ptr, bias_ih_ptr,
                    bias_hh_ptr, ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, B, H: tl.constexpr,
                    NORM: tl.constexpr):
    """a and u of one gate as the forward computed them, with the normalized projections (under a
    norm: without one the forward stored the gates, ``_saved_gates``)."""
    columns = gate * H + units
    step_start = step_offset(t, B * 3 * H)
    offsets = rows[:, None] * (3 * H) + columns[None, :]
    wx = tl.load(wx_ptr + step_start + offsets, mask=tile_mask, other=0.0).to(tl.float32)
    wh = tl.load(wh_ptr + step_start + offsets, mask=tile_mask, other=0.0)
    bias_ih = tl.load(bias_ih_ptr + columns, mask=unit_mask, other=0.0)
    bias_hh = tl.load(bias_hh_ptr + columns, mask=unit_mask, other=0.0)
    hh_weight = tl.load(hh_weight_ptr + columns, mask=unit_mask, other=0.0)
    ih_rstd = tl.zeros_like(bias_ih)
    hh_rstd = ih_rstd
    if NORM == 2:
        ih_mean, ih_rstd = load_step_statistics(ih_stats_ptr, t, columns, unit_mask, 3 * H)
        hh_mean, hh_rstd = load_step_statistics(hh_stats_ptr, t, columns, unit_mask, 3 * H)
        ih_weight = tl.load(ih_weight_ptr + columns, mask=unit_mask, other=0.0)
        wx_hat = (wx - ih_mean[None, :]) * ih_rstd[None, :]
        wh_hat = (wh - hh_mean[None, :]) * hh_rstd[None, :]
        a = wx_hat * ih_weight[None, :] + bias_ih[None, :]
    else:  # layer norm
        wx_hat = wx
        wh_hat = (wh - row_mean[:, None]) * row_rstd[:, None]
        a = wx + bias_ih[None, :]
    u = wh_hat * hh_weight[None, :] + bias_hh[None, :]
    return a, u, wx_hat, wh_hat, ih_rstd, hh_rstd


@triton.jit
def _saved_gates(t, rows, units, tile_mask, state_offsets, wh_ptr, candidate_ptr, B, H: tl.constexpr):
    """r, z, u_n and n of the program's tile at step t as the forward stored them without a norm."""
    step_start = step_offset(t, B * 3 * H)
    offsets = rows[:, None] * (3 * H) + units[None, :]
    gate_r = tl.load(wh_ptr + step_start + offsets, mask=tile_mask, other=0.0)
    gate_z = tl.load(wh_ptr + step_start + offsets + H, mask=tile_mask, other=0.0)
    u_n = tl.load(wh_ptr + step_start + offsets + 2 * H, mask=tile_mask, other=0.0)
    candidate = tl.load(candidate_ptr + step_offset(t, B * H) + state_offsets, mask=tile_mask, other=0.0)
    return gate_r, gate_z, u_n, candidate


@triton.jit
def _gate_gradient(gate, t, grad_a, grad_u, wx_hat, wh_hat, ih_rstd, hh_rstd, rows, units, tile_mask, unit_mask,
                   active_f, count, use_batch, ih_weight_ptr, hh_weight_ptr, dwx_ptr, dwh_ptr, dwh_low_ptr, partial,
                   B, H: tl.constexpr, NORM: tl.constexpr, LOW_GRAD: tl.constexpr, CHUNKED: tl.constexpr):
    """dwx and dwh of one gate (under layer norm, gamma_hh * du for phase 1 to finish; under batch
    norm with ``CHUNKED``, da and du for ``chunked_pair_backward`` to finish) and its parameter
    partials; returns its share of the layer norm's two row sums."""
    columns = gate * H + units
    step_start = step_offset(t, B * 3 * H)
    offsets = rows[:, None] * (3 * H) + columns[None, :]
    hh_weight = tl.load(hh_weight_ptr + columns, mask=unit_mask, other=0.0)
    tl.store(partial + columns, tl.sum(grad_a, axis=0), mask=unit_mask)
    tl.store(partial + 3 * H + columns, tl.sum(grad_u, axis=0), mask=unit_mask)
    first = tl.zeros_like(tl.sum(grad_u, axis=1))
    second = first
    if NORM == 2:
        ih_weight = tl.load(ih_weight_ptr + columns, mask=unit_mask, other=0.0)
        tl.store(partial + 6 * H + columns, tl.sum(grad_a * wx_hat, axis=0), mask=unit_mask)
        tl.store(partial + 9 * H + columns, tl.sum(grad_u * wh_hat, axis=0), mask=unit_mask)
        if CHUNKED:
            grad_wx = grad_a
            grad_wh = grad_u
        else:
            grad_wx = batch_norm_backward(grad_a * ih_weight[None, :], wx_hat, ih_rstd, active_f, count, use_batch)
            grad_wh = batch_norm_backward(grad_u * hh_weight[None, :], wh_hat, hh_rstd, active_f, count, use_batch)
    elif NORM == 1:
        tl.store(partial + 9 * H + columns, tl.sum(grad_u * wh_hat, axis=0), mask=unit_mask)
        grad_wx = grad_a
        grad_wh = grad_u * hh_weight[None, :]
        first = tl.sum(grad_wh, axis=1)
        second = tl.sum(grad_wh * wh_hat, axis=1)
    else:
        grad_wx = grad_a
        grad_wh = grad_u
    tl.store(dwx_ptr + step_start + offsets, grad_wx, mask=tile_mask)
    if NORM != 0:
        tl.store(dwh_ptr + step_start + offsets, grad_wh, mask=tile_mask)
    elif gate == 2:
        # without a norm dwh's r and z columns are dwx's: only the candidate's, r * da_n, is stored
        # apart, in a (T, B, H) buffer
        tl.store(dwh_ptr + step_offset(t, B * H) + rows[:, None] * H + units[None, :], grad_wh, mask=tile_mask)
    if LOW_GRAD:
        if (NORM == 0) or ((NORM == 2) and not CHUNKED):  # elsewhere the finishing pass rounds dwh
            tl.store(dwh_low_ptr + step_start + offsets, grad_wh.to(dwh_low_ptr.dtype.element_ty), mask=tile_mask)
    return first, second


@triton.jit
def _gru_backward_local(t, steps, pid, first_row, tile, tiles, wx_ptr, wh_ptr, h_ptr, candidate_ptr, w_hh_ptr,
                        bias_ih_ptr, bias_hh_ptr, ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr,
                        grad_out_ptr, dh_carry_ptr, dwx_ptr, dwh_ptr, dwh_low_ptr, partial_ptr, row_partial_ptr,
                        lengths_ptr, B, H: tl.constexpr, NORM: tl.constexpr, TRAINING: tl.constexpr,
                        HAS_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, LOW_GRAD: tl.constexpr, CHUNKED: tl.constexpr):
    """Phase 0: dL/dh_t, the gates' backward, dwx_t, dwh_t (finished here except under layer norm
    and, with ``CHUNKED``, batch norm). Its rows: grid axis 1 tiles the batch, or, where a program
    walks the batch in chunks, the chunk from ``first_row``; ``tile`` of ``tiles``: where its
    parameter partials go."""
    rows, units, row_mask, unit_mask = program_tile(pid, B, H, BLOCK_B, BLOCK_H)
    rows += first_row
    row_mask = rows < B
    tile_mask = row_mask[:, None] & unit_mask[None, :]
    state_offsets = rows[:, None] * H + units[None, :]
    active, active_next = row_activity(t, steps, rows, row_mask, lengths_ptr, HAS_LENGTHS)
    active_f = active.to(tl.float32)[:, None]
    count = tl.sum(active.to(tl.float32), axis=0)
    use_batch = TRAINING & (count >= 2.0)

    recurrent = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if t + 1 < steps:
        if (NORM == 0) and not LOW_GRAD:
            # dwh's r and z columns are dwx's, its candidate column the (T, B, H) dwh (_gate_gradient)
            dwx_next = dwx_ptr + step_offset(t + 1, B * 3 * H)
            for gate in range(2):
                recurrent = add_gate_gradient_product(recurrent, dwx_next, 3 * H, gate * H, w_hh_ptr, gate, rows, units,
                                                      row_mask, unit_mask, H, DOT_PRECISION, BLOCK_K)
            recurrent = add_gate_gradient_product(recurrent, dwh_ptr + step_offset(t + 1, B * H), H, 0, w_hh_ptr, 2,
                                                  rows, units, row_mask, unit_mask, H, DOT_PRECISION, BLOCK_K)
        else:
            # dwh_low is what the product reads: the rounded copy with LOW_GRAD (low_precision_gradient
            # in lstm_backward.py), dwh itself without
            recurrent = recurrent_gradient(dwh_low_ptr, w_hh_ptr, t + 1, rows, units, row_mask, unit_mask, B, H, 3,
                                           DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K)
    carried = tl.load(dh_carry_ptr + state_offsets, mask=tile_mask, other=0.0)
    grad_h_later = tl.where(active_next[:, None], recurrent, 0.0) + carried
    grad_h = (tl.load(grad_out_ptr + step_offset(t, B * H) + state_offsets, mask=tile_mask, other=0.0).to(tl.float32)
              + grad_h_later) * active_f

    if NORM == 0:
        # the forward stored (r, z, u_n) over the projections and n apart: nothing to recompute, and
        # no normalized projections for _gate_gradient to read
        gate_r, gate_z, u_n, candidate = _saved_gates(t, rows, units, tile_mask, state_offsets, wh_ptr, candidate_ptr,
                                                      B, H)
        wx_hat_r, wh_hat_r, ih_rstd_r, hh_rstd_r = 0, 0, 0, 0
        wx_hat_z, wh_hat_z, ih_rstd_z, hh_rstd_z = 0, 0, 0, 0
        wx_hat_n, wh_hat_n, ih_rstd_n, hh_rstd_n = 0, 0, 0, 0
    else:
        if NORM == 1:
            row_mean, row_rstd = load_step_statistics(hh_stats_ptr, t, rows, row_mask, B)
        else:
            row_mean = tl.zeros((BLOCK_B,), dtype=tl.float32)
            row_rstd = row_mean
        a_r, u_r, wx_hat_r, wh_hat_r, ih_rstd_r, hh_rstd_r = _gate_recompute(
            0, t, rows, units, tile_mask, unit_mask, row_mean, row_rstd, wx_ptr, wh_ptr, bias_ih_ptr, bias_hh_ptr,
            ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, B, H, NORM)
        a_z, u_z, wx_hat_z, wh_hat_z, ih_rstd_z, hh_rstd_z = _gate_recompute(
            1, t, rows, units, tile_mask, unit_mask, row_mean, row_rstd, wx_ptr, wh_ptr, bias_ih_ptr, bias_hh_ptr,
            ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, B, H, NORM)
        a_n, u_n, wx_hat_n, wh_hat_n, ih_rstd_n, hh_rstd_n = _gate_recompute(
            2, t, rows, units, tile_mask, unit_mask, row_mean, row_rstd, wx_ptr, wh_ptr, bias_ih_ptr, bias_hh_ptr,
            ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, B, H, NORM)
        gate_r = tl.sigmoid(a_r + u_r)
        gate_z = tl.sigmoid(a_z + u_z)
        candidate = tanh(a_n + gate_r * u_n)
    h_prev = tl.load(h_ptr + step_offset(t, B * H) + state_offsets, mask=tile_mask, other=0.0).to(tl.float32)
    # the direct path to h_{t-1}; a sequence that has ended passes its gradient through unchanged
    tl.store(dh_carry_ptr + state_offsets, tl.where(active[:, None], grad_h * gate_z, grad_h_later), mask=tile_mask)

    grad_n_pre = grad_h * (1.0 - gate_z) * (1.0 - candidate * candidate)
    grad_r_pre = grad_n_pre * u_n * gate_r * (1.0 - gate_r)
    grad_z_pre = grad_h * (h_prev - candidate) * gate_z * (1.0 - gate_z)
    partial = partial_ptr + step_offset(t, tiles * 12 * H) + tile * 12 * H  # (T, batch tiles, 4, 3H)
    first_r, second_r = _gate_gradient(0, t, grad_r_pre, grad_r_pre, wx_hat_r, wh_hat_r, ih_rstd_r, hh_rstd_r, rows,
                                       units, tile_mask, unit_mask, active_f, count, use_batch, ih_weight_ptr,
                                       hh_weight_ptr, dwx_ptr, dwh_ptr, dwh_low_ptr, partial, B, H, NORM, LOW_GRAD,
                                       CHUNKED)
    first_z, second_z = _gate_gradient(1, t, grad_z_pre, grad_z_pre, wx_hat_z, wh_hat_z, ih_rstd_z, hh_rstd_z, rows,
                                       units, tile_mask, unit_mask, active_f, count, use_batch, ih_weight_ptr,
                                       hh_weight_ptr, dwx_ptr, dwh_ptr, dwh_low_ptr, partial, B, H, NORM, LOW_GRAD,
                                       CHUNKED)
    first_n, second_n = _gate_gradient(2, t, grad_n_pre, grad_n_pre * gate_r, wx_hat_n, wh_hat_n, ih_rstd_n,
                                       hh_rstd_n, rows, units, tile_mask, unit_mask, active_f, count, use_batch,
                                       ih_weight_ptr, hh_weight_ptr, dwx_ptr, dwh_ptr, dwh_low_ptr, partial, B, H, NORM,
                                       LOW_GRAD, CHUNKED)
    if NORM == 1:
        store_row_partials(row_partial_ptr, pid, rows, row_mask, B, first_r + first_z + first_n,
                           second_r + second_z + second_n)


@triton.jit
def _gru_backward_layer_norm(t, pid, programs, wh_ptr, hh_stats_ptr, dwh_ptr, dwh_low_ptr, row_partial_ptr, B,
                             H: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
                             LOW_GRAD: tl.constexpr):
    """Phase 1 (layer norm): dwh_t = rstd * (g - mean(g) - wh_hat * mean(g * wh_hat)) over 3H, in place."""
    rows, units, row_mask, unit_mask = program_tile(pid, B, H, BLOCK_B, BLOCK_H)  # axis 1 tiles the batch
    tile_mask = row_mask[:, None] & unit_mask[None, :]
    sum_grad, sum_grad_hat = sum_row_partials(row_partial_ptr, rows, row_mask, B, programs, BLOCK_P)
    mean_grad = sum_grad / (3 * H)
    mean_grad_hat = sum_grad_hat / (3 * H)
    row_mean, row_rstd = load_step_statistics(hh_stats_ptr, t, rows, row_mask, B)
    for gate in range(3):
        step_start = step_offset(t, B * 3 * H)
        offsets = rows[:, None] * (3 * H) + gate * H + units[None, :]
        wh_hat = ((tl.load(wh_ptr + step_start + offsets, mask=tile_mask, other=0.0) - row_mean[:, None])
                  * row_rstd[:, None])
        grad = tl.load(dwh_ptr + step_start + offsets, mask=tile_mask, other=0.0)
        grad_wh = row_rstd[:, None] * (grad - mean_grad[:, None] - wh_hat * mean_grad_hat[:, None])
        tl.store(dwh_ptr + step_start + offsets, grad_wh, mask=tile_mask)
        if LOW_GRAD:
            tl.store(dwh_low_ptr + step_start + offsets, grad_wh.to(dwh_low_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _gru_backward_chunked(t, steps, pid, wx_ptr, wh_ptr, h_ptr, candidate_ptr, w_hh_ptr, bias_ih_ptr, bias_hh_ptr,
                          ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, grad_out_ptr, dh_carry_ptr, dwx_ptr,
                          dwh_ptr, dwh_low_ptr, partial_ptr, row_partial_ptr, lengths_ptr, B, H: tl.constexpr,
                          TRAINING: tl.constexpr, HAS_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, LOW_GRAD: tl.constexpr):
    """Backward step t under batch norm in training for a batch of more than one tile: the local
    backward of each chunk of BLOCK_B rows, then the batch norms' backward over all of them."""
    tiles = tl.cdiv(B, BLOCK_B)
    for tile in range(tiles):
        _gru_backward_local(t, steps, pid, tile * BLOCK_B, tile, tiles, wx_ptr, wh_ptr, h_ptr, candidate_ptr, w_hh_ptr,
                            bias_ih_ptr, bias_hh_ptr, ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr,
                            grad_out_ptr, dh_carry_ptr, dwx_ptr, dwh_ptr, dwh_low_ptr, partial_ptr, row_partial_ptr,
                            lengths_ptr, B, H, 2, TRAINING, HAS_LENGTHS, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K,
                            LOW_GRAD, True)
    tl.debug_barrier()  # the second pass reads back what other threads of this program stored
    # partials per chunk: (b_ih, b_hh, ih gain, hh gain) = (sum da, sum du, sum da wx_hat, sum du wh_hat)
    chunked_pair_backward(t, pid, wx_ptr, wh_ptr, ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, dwh_ptr,
                          dwx_ptr, dwh_ptr, dwh_low_ptr, partial_ptr, lengths_ptr, B, H, 3, 4, 1, 2, 3, TRAINING,
                          HAS_LENGTHS, BLOCK_B, BLOCK_H, LOW_GRAD)


# t unspecialized: one compiled kernel serves every step (Triton compiles t == 1 and t % 16 == 0 apart)
@triton.jit(do_not_specialize=["t", "steps"])
def gru_backward_step_kernel(t, steps, wx_ptr, wh_ptr, h_ptr, candidate_ptr, w_hh_ptr, bias_ih_ptr, bias_hh_ptr,
                             ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, grad_out_ptr, dh_carry_ptr,
                             dwx_ptr, dwh_ptr, dwh_low_ptr, partial_ptr, row_partial_ptr, lengths_ptr, B,
                             H: tl.constexpr, NORM: tl.constexpr, TRAINING: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                             DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, LOW_GRAD: tl.constexpr,
                             CHUNKED: tl.constexpr, PHASE: tl.constexpr):
    """Backward step ``t`` (norm None, batch) or one of its two phases (layer). ``CHUNKED``: the
    batch norm's batch walked in chunks (``batch_norm.py``)."""
    pid = tl.program_id(0)
    if CHUNKED:
        _gru_backward_chunked(t, steps, pid, wx_ptr, wh_ptr, h_ptr, candidate_ptr, w_hh_ptr, bias_ih_ptr, bias_hh_ptr,
                              ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, grad_out_ptr, dh_carry_ptr,
                              dwx_ptr, dwh_ptr, dwh_low_ptr, partial_ptr, row_partial_ptr, lengths_ptr, B, H, TRAINING,
                              HAS_LENGTHS, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, LOW_GRAD)
    elif PHASE == 0:
        _gru_backward_local(t, steps, pid, 0, tl.program_id(1), tl.num_programs(1), wx_ptr, wh_ptr, h_ptr,
                            candidate_ptr, w_hh_ptr, bias_ih_ptr, bias_hh_ptr, ih_weight_ptr, hh_weight_ptr,
                            ih_stats_ptr, hh_stats_ptr, grad_out_ptr, dh_carry_ptr, dwx_ptr, dwh_ptr, dwh_low_ptr,
                            partial_ptr, row_partial_ptr, lengths_ptr, B, H, NORM, TRAINING, HAS_LENGTHS, DOT_PRECISION,
                            BLOCK_B, BLOCK_H, BLOCK_K, LOW_GRAD, False)
    else:
        _gru_backward_layer_norm(t, pid, tl.num_programs(0), wh_ptr, hh_stats_ptr, dwh_ptr, dwh_low_ptr,
                                 row_partial_ptr, B, H, BLOCK_B, BLOCK_H, BLOCK_P, LOW_GRAD)


# steps unspecialized: one compiled kernel serves every sequence length
@triton.jit(do_not_specialize=["steps"])
def gru_backward_persistent_kernel(steps, barrier_ptr, wx_ptr, wh_ptr, h_ptr, candidate_ptr, w_hh_ptr, bias_ih_ptr,
                                   bias_hh_ptr, ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, grad_out_ptr,
                                   dh_carry_ptr, dwx_ptr, dwh_ptr, dwh_low_ptr, partial_ptr, row_partial_ptr,
                                   lengths_ptr, B, H: tl.constexpr, NORM: tl.constexpr, TRAINING: tl.constexpr,
                                   HAS_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                                   BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                                   LOW_GRAD: tl.constexpr, CHUNKED: tl.constexpr):
    """All timesteps, T-1 down to 0: one grid barrier a step (two under layer norm)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    grid_programs = programs * tl.num_programs(1)
    for step in range(steps):
        t = steps - 1 - step
        if CHUNKED:
            _gru_backward_chunked(t, steps, pid, wx_ptr, wh_ptr, h_ptr, candidate_ptr, w_hh_ptr, bias_ih_ptr,
                                  bias_hh_ptr, ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, grad_out_ptr,
                                  dh_carry_ptr, dwx_ptr, dwh_ptr, dwh_low_ptr, partial_ptr, row_partial_ptr,
                                  lengths_ptr, B, H, TRAINING, HAS_LENGTHS, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K,
                                  LOW_GRAD)
        else:
            _gru_backward_local(t, steps, pid, 0, tl.program_id(1), tl.num_programs(1), wx_ptr, wh_ptr, h_ptr,
                                candidate_ptr, w_hh_ptr, bias_ih_ptr, bias_hh_ptr, ih_weight_ptr, hh_weight_ptr,
                                ih_stats_ptr, hh_stats_ptr, grad_out_ptr, dh_carry_ptr, dwx_ptr, dwh_ptr, dwh_low_ptr,
                                partial_ptr, row_partial_ptr, lengths_ptr, B, H, NORM, TRAINING, HAS_LENGTHS,
                                DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, LOW_GRAD, False)
        if NORM == 1:
            grid_barrier(barrier_ptr, (2 * step + 1) * grid_programs)
            _gru_backward_layer_norm(t, pid, programs, wh_ptr, hh_stats_ptr, dwh_ptr, dwh_low_ptr, row_partial_ptr, B,
                                     H, BLOCK_B, BLOCK_H, BLOCK_P, LOW_GRAD)
            grid_barrier(barrier_ptr, (2 * step + 2) * grid_programs)
        else:
            grid_barrier(barrier_ptr, (step + 1) * grid_programs)


def gru_backward(saved, grad_output, grad_h_n, wx, w_hh, bias_ih, bias_hh, ih_weight, hh_weight, lengths, norm: int,
                 training: bool):
    """Launches the backward over all steps; ``saved`` is the dict of ``gru_forward(save=True)``,
    whose ``wh`` gives the shapes: ``wx`` (x W_ih^T) is read under a norm only, ``saved["candidate"]``
    without one only.

    Returns dwx (T, B, 3H, float32), the gradient of x W_ih^T; ``dwh_pieces``, float32 tensors
    whose concatenation along the last dimension is dwh (T, B, 3H), the gradient of h W_hh^T (dwh
    itself under a norm; without one dwx's r and z columns and the (T, B, H) candidate column
    r * da_n: the rest of dwh equals dwx, so it is not stored twice); dh_0 (B, H, float32) and the
    per-step partial sums ``partials`` (T, 4, 3H) = (b_ih, b_hh, ih gain, hh gain)."""
    steps, batch, gates = saved["wh"].shape
    hidden = gates // 3
    device = saved["wh"].device
    layout = step_layout(batch, hidden, norm, training)
    dh_carry = grad_h_n.to(torch.float32).contiguous().clone()
    dwx = new_buffer((steps, batch, gates), torch.float32, device)
    dwh = new_buffer((steps, batch, hidden if norm == NORM_NONE else gates), torch.float32, device)
    low_grad = low_precision_gradient(w_hh.dtype, norm)
    dwh_low = new_buffer((steps, batch, gates), w_hh.dtype, device) if low_grad else dwh
    partials = new_buffer((steps, layout.row_tiles, 4, gates), torch.float32, device)
    if norm != NORM_BATCH:
        partials[:, :, 2].zero_()
    if norm == NORM_NONE:
        partials[:, :, 3].zero_()
    row_partial = new_buffer((layout.unit_programs, 2, batch), torch.float32, device)
    lengths_arg = lengths if lengths is not None else dh_carry
    unread = saved["h"]  # stands in for wx, or for candidate, where the kernels do not read it
    arguments = (unread if norm == NORM_NONE else wx, saved["wh"], saved["h"],
                 saved["candidate"] if norm == NORM_NONE else unread, w_hh, bias_ih, bias_hh, ih_weight, hh_weight,
                 saved["ih_stats"], saved["hh_stats"], grad_output.contiguous(), dh_carry, dwx, dwh, dwh_low, partials,
                 row_partial, lengths_arg, batch)
    constants = dict(**layout.tile_constants(),
                     H=hidden, NORM=norm, TRAINING=training, HAS_LENGTHS=lengths is not None,
                     DOT_PRECISION=dot_precision(w_hh.dtype, norm), BLOCK_P=layout.block_p, LOW_GRAD=low_grad,
                     CHUNKED=layout.chunked)
    launch_sequence(gru_backward_step_kernel, gru_backward_persistent_kernel, layout, steps, arguments, constants,
                    device, backward=True, phases=2 if norm == NORM_LAYER else 1)
    dwh_pieces = [dwx[..., :2 * hidden], dwh] if norm == NORM_NONE else [dwh]
    # every sequence is active at step 0: dL/dh_0 = dwh_0 W_hh + the direct path z_0 * dL/dh_0
    grad_h0 = torch.matmul(torch.cat([piece[0] for piece in dwh_pieces], -1), w_hh.float()) + dh_carry
    return {"dwx": dwx, "dwh_pieces": dwh_pieces, "dh0": grad_h0, "partials": partials.sum(1)}
