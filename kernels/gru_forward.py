"""Fused GRU forward over the whole sequence (reference: ``normrnn/reference/gru.py``), gate order
and bias placement as in ``torch.nn.GRU``:

    a_t = N_ih(wx_t) + b_ih,   u_t = N_hh(h_{t-1} W_hh^T) + b_hh
    r = sigmoid(a_r + u_r),  z = sigmoid(a_z + u_z),  n = tanh(a_n + r * u_n)
    h_t = (1 - z) * n + z * h_{t-1}

norm None: N is the identity; "batch": per-timestep batch norms with gain over the active rows,
running statistics updated in the kernel; "layer": N_hh is a layer norm over the 3H recurrent
pre-activations of a sample (N_ih, which needs no recurrence, is applied to ``wx`` before the
loop, as is sequence-wise batch norm).

Program p owns hidden units [p * BLOCK_H, (p + 1) * BLOCK_H) of the three gates; under batch
norm in training for the whole batch (one phase a step; a batch of more than one 64-row tile
walked in chunks: ``batch_norm.py``), otherwise for a tile of up to 64 rows (grid axis 1).
Layer norm exchanges per-program (mean, M2) of the recurrent projection between two phases
(see ``lstm_layer_norm_forward.py``); phases are launches, or separated by a grid barrier in the
persistent kernel, and the second reads the projection back from memory, as do the passes over a
batch walked in chunks. Otherwise the gates take it from registers, and it is stored only for the
backward of batch norm.

Saved for the backward (``SAVE``): h (T+1, B, H) in float32 (the only state of a GRU: rounding
it to bfloat16 at every step compounds); under a norm the raw recurrent projection ``wh``
(T, B, 3H) in float32 and the statistics: per column (T, 2, 3H) for the batch norms, per row
(T, 2, B) for the layer norm. Without a norm the backward needs neither projection, only the gates
(r, z, n) and u_n = h_{t-1} W_hn^T + b_hn: the finishing phase overwrites step t of ``wh`` with
(r, z, u_n) and stores n in ``candidate`` (T, B, H): 4H float32 a row and step, where the
projections took 3H of them and 3H in the input's dtype, and autograd no longer keeps x W_ih^T.
In bf16 and fp16 without batch norm h is also kept rounded to the weights' dtype
(``operand_buffer``), which the recurrent product reads: half the bytes of the float32 state.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .batch_norm import chunk_moments, pair_statistics, stored_pair_statistics
from .buffers import new_buffer, stand_in
from .layer_norm import combine_row_statistics, store_row_partials
from .layout import NORM_BATCH, NORM_LAYER, NORM_NONE, dot_precision, operand_buffer, resident_tiles, step_layout
from .sequence_launch import launch_sequence
from .tiles import (grid_barrier, load_step_statistics, program_tile, recurrent_product, row_active, state_columns,
                    step_offset, store_hidden_state, store_step_statistics, tanh, weight_rows)


@triton.jit
def _load_gru_weights(pid, w_hh_ptr, B, H: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_K: tl.constexpr, RESIDENT: tl.constexpr):
    """With ``RESIDENT``: program ``pid``'s rows of W_hh for r, z and n, all of K in one tile each,
    loaded before the persistent kernel's step loop. Without: placeholders (W_hh is streamed)."""
    if RESIDENT:
        _, units, _, unit_mask = program_tile(pid, B, H, BLOCK_B, BLOCK_H)
        w_r = weight_rows(w_hh_ptr, 0, units, unit_mask, H, BLOCK_K)
        w_z = weight_rows(w_hh_ptr, 1, units, unit_mask, H, BLOCK_K)
        w_n = weight_rows(w_hh_ptr, 2, units, unit_mask, H, BLOCK_K)
    else:
        w_r, w_z, w_n = 0, 0, 0
    return w_r, w_z, w_n


@triton.jit
def _gru_projection(t, pid, first_row, w_hh_ptr, h_operand_ptr, wh_ptr, partial_ptr, B, H: tl.constexpr,
                    NORM: tl.constexpr, SAVE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, w_r, w_z, w_n, RESIDENT: tl.constexpr,
                    CHUNKED: tl.constexpr):
    """The program's 3 x BLOCK_H columns of h_{t-1} W_hh^T, returned, and stored where they are read
    again: by the finishing phase under layer norm and, with ``CHUNKED``, batch norm (a barrier
    apart); by the backward under batch norm when ``SAVE``. Under layer norm also their per-row mean
    and M2. With ``RESIDENT`` from
    the weight tiles ``w_*`` the persistent kernel loaded once (all of K in one tile), otherwise
    with W_hh streamed from memory in K tiles. h_{t-1} was written by other programs: it is read
    past L1, which is not coherent across SMs. ``first_row``: where a program walks the batch in
    chunks, the first row of this one (grid axis 1 tiles the batch otherwise)."""
    rows, units, row_mask, unit_mask = program_tile(pid, B, H, BLOCK_B, BLOCK_H)
    rows += first_row
    row_mask = rows < B
    if RESIDENT:
        h_tile = state_columns(h_operand_ptr, t, rows, row_mask, B, H, 0, BLOCK_K)
        acc_r = recurrent_product(h_tile, w_r, DOT_PRECISION)
        acc_z = recurrent_product(h_tile, w_z, DOT_PRECISION)
        acc_n = recurrent_product(h_tile, w_n, DOT_PRECISION)
    else:
        acc_r = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        acc_z = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        acc_n = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < H
            h_tile = state_columns(h_operand_ptr, t, rows, row_mask, B, H, k0, BLOCK_K)
            # one set of offsets for all gates, not tiles.weight_rows per gate: see lstm_projection.py
            w_offsets = units[:, None] * H + ks[None, :]
            w_mask = unit_mask[:, None] & k_mask[None, :]
            w_r_tile = tl.load(w_hh_ptr + w_offsets, mask=w_mask, other=0.0)
            w_z_tile = tl.load(w_hh_ptr + H * H + w_offsets, mask=w_mask, other=0.0)
            w_n_tile = tl.load(w_hh_ptr + 2 * H * H + w_offsets, mask=w_mask, other=0.0)
            acc_r += recurrent_product(h_tile, w_r_tile, DOT_PRECISION)
            acc_z += recurrent_product(h_tile, w_z_tile, DOT_PRECISION)
            acc_n += recurrent_product(h_tile, w_n_tile, DOT_PRECISION)
    if (NORM == 1) or CHUNKED or ((NORM == 2) and SAVE):
        step = t if SAVE else 0
        tile_mask = row_mask[:, None] & unit_mask[None, :]
        step_start = step_offset(step, B * 3 * H)
        offsets = rows[:, None] * (3 * H) + units[None, :]
        tl.store(wh_ptr + step_start + offsets, acc_r, mask=tile_mask)
        tl.store(wh_ptr + step_start + offsets + H, acc_z, mask=tile_mask)
        tl.store(wh_ptr + step_start + offsets + 2 * H, acc_n, mask=tile_mask)
    if NORM == 1:
        valid_f = unit_mask.to(tl.float32)[None, :]
        owned = (tl.minimum(H - pid * BLOCK_H, BLOCK_H) * 3).to(tl.float32)
        mean = (tl.sum(acc_r * valid_f, axis=1) + tl.sum(acc_z * valid_f, axis=1)
                + tl.sum(acc_n * valid_f, axis=1)) / owned
        d_r = (acc_r - mean[:, None]) * valid_f
        d_z = (acc_z - mean[:, None]) * valid_f
        d_n = (acc_n - mean[:, None]) * valid_f
        m2 = tl.sum(d_r * d_r, axis=1) + tl.sum(d_z * d_z, axis=1) + tl.sum(d_n * d_n, axis=1)
        store_row_partials(partial_ptr, pid, rows, row_mask, B, mean, m2)
    return acc_r, acc_z, acc_n


@triton.jit
def _gru_gate_inputs(gate, t, step, pid, rows, units, row_mask, unit_mask, tile_mask, active_f, count, use_batch, slot,
                     row_mean, row_rstd, acc, wx_ptr, wh_ptr, bias_ih_ptr, bias_hh_ptr, ih_weight_ptr, hh_weight_ptr,
                     ih_stats_ptr, hh_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, B, momentum, eps,
                     H: tl.constexpr, NORM: tl.constexpr, TRAINING: tl.constexpr, SAVE: tl.constexpr,
                     CHUNKED: tl.constexpr):
    """a and u of one gate for the program's columns gate * H + units, from its recurrent projection
    ``acc`` as ``_gru_projection`` returned it, or under layer norm and with ``CHUNKED`` as it stored
    it. Under batch norm with ``CHUNKED`` the statistics are those ``stored_pair_statistics`` stored
    at ``step``; otherwise the rows are the whole batch, and the statistics are computed here."""
    columns = gate * H + units
    wx = tl.load(wx_ptr + step_offset(t, B * 3 * H) + rows[:, None] * (3 * H) + columns[None, :], mask=tile_mask,
                 other=0.0).to(tl.float32)
    if (NORM == 1) or CHUNKED:
        wh = tl.load(wh_ptr + step_offset(step, B * 3 * H) + rows[:, None] * (3 * H) + columns[None, :],
                     mask=tile_mask, other=0.0)
    else:
        wh = acc
    bias_ih = tl.load(bias_ih_ptr + columns, mask=unit_mask, other=0.0)
    bias_hh = tl.load(bias_hh_ptr + columns, mask=unit_mask, other=0.0)
    hh_weight = tl.load(hh_weight_ptr + columns, mask=unit_mask, other=0.0)
    if NORM == 2:
        if CHUNKED:
            ih_mean, ih_rstd = load_step_statistics(ih_stats_ptr, step, columns, unit_mask, 3 * H)
            hh_mean, hh_rstd = load_step_statistics(hh_stats_ptr, step, columns, unit_mask, 3 * H)
        else:
            ih_mean, ih_m2 = chunk_moments(wx, active_f, count)
            hh_mean, hh_m2 = chunk_moments(wh, active_f, count)
            ih_mean, ih_rstd, hh_mean, hh_rstd = pair_statistics(ih_mean, ih_m2, hh_mean, hh_m2, count, use_batch,
                                                                 slot, t, columns, unit_mask, ih_stats_ptr,
                                                                 hh_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr,
                                                                 hh_var_ptr, momentum, eps, 3 * H, TRAINING, SAVE)
        ih_weight = tl.load(ih_weight_ptr + columns, mask=unit_mask, other=0.0)
        a = (wx - ih_mean[None, :]) * (ih_rstd * ih_weight)[None, :] + bias_ih[None, :]
        u = (wh - hh_mean[None, :]) * (hh_rstd * hh_weight)[None, :] + bias_hh[None, :]
    elif NORM == 1:
        a = wx + bias_ih[None, :]
        u = (wh - row_mean[:, None]) * row_rstd[:, None] * hh_weight[None, :] + bias_hh[None, :]
    else:
        a = wx + bias_ih[None, :]
        u = wh + bias_hh[None, :]
    return a, u


@triton.jit
def _gru_finish(t, pid, first_row, programs, acc_r, acc_z, acc_n, wx_ptr, wh_ptr, bias_ih_ptr, bias_hh_ptr,
                ih_weight_ptr, hh_weight_ptr, h_ptr, h_operand_ptr, out_ptr, candidate_ptr, partial_ptr, ih_stats_ptr,
                hh_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, lengths_ptr, B, max_steps, momentum,
                eps, H: tl.constexpr, NORM: tl.constexpr, TRAINING: tl.constexpr, SAVE: tl.constexpr,
                HAS_LENGTHS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
                OPERAND_COPY: tl.constexpr, CHUNKED: tl.constexpr):
    """The normalizations, the gates and h_t of the program's units (``first_row``: see
    ``_gru_projection``; ``acc_*``: what it returned, where the finish does not read the projection
    back from memory); without a norm, when ``SAVE``, the gates for the backward."""
    rows, units, row_mask, unit_mask = program_tile(pid, B, H, BLOCK_B, BLOCK_H)
    rows += first_row
    row_mask = rows < B
    tile_mask = row_mask[:, None] & unit_mask[None, :]
    active = row_active(t, rows, row_mask, lengths_ptr, HAS_LENGTHS)
    active_f = active.to(tl.float32)[:, None]
    count = tl.sum(active.to(tl.float32), axis=0)
    use_batch = TRAINING & (count >= 2.0)
    slot = tl.minimum(t, max_steps - 1)
    step = t if SAVE else 0
    if NORM == 1:
        row_mean, row_rstd = combine_row_statistics(partial_ptr, rows, row_mask, B, programs, eps, H, 3, BLOCK_H,
                                                     BLOCK_P)
        if SAVE:
            if pid == 0:
                store_step_statistics(hh_stats_ptr, t, rows, row_mean, row_rstd, row_mask, B)
    else:
        row_mean = tl.zeros((BLOCK_B,), dtype=tl.float32)
        row_rstd = row_mean
    a_r, u_r = _gru_gate_inputs(0, t, step, pid, rows, units, row_mask, unit_mask, tile_mask, active_f, count,
                                use_batch, slot, row_mean, row_rstd, acc_r, wx_ptr, wh_ptr, bias_ih_ptr, bias_hh_ptr,
                                ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, ih_mean_ptr, ih_var_ptr,
                                hh_mean_ptr, hh_var_ptr, B, momentum, eps, H, NORM, TRAINING, SAVE, CHUNKED)
    a_z, u_z = _gru_gate_inputs(1, t, step, pid, rows, units, row_mask, unit_mask, tile_mask, active_f, count,
                                use_batch, slot, row_mean, row_rstd, acc_z, wx_ptr, wh_ptr, bias_ih_ptr, bias_hh_ptr,
                                ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, ih_mean_ptr, ih_var_ptr,
                                hh_mean_ptr, hh_var_ptr, B, momentum, eps, H, NORM, TRAINING, SAVE, CHUNKED)
    a_n, u_n = _gru_gate_inputs(2, t, step, pid, rows, units, row_mask, unit_mask, tile_mask, active_f, count,
                                use_batch, slot, row_mean, row_rstd, acc_n, wx_ptr, wh_ptr, bias_ih_ptr, bias_hh_ptr,
                                ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, ih_mean_ptr, ih_var_ptr,
                                hh_mean_ptr, hh_var_ptr, B, momentum, eps, H, NORM, TRAINING, SAVE, CHUNKED)
    gate_r = tl.sigmoid(a_r + u_r)
    gate_z = tl.sigmoid(a_z + u_z)
    candidate = tanh(a_n + gate_r * u_n)
    state_offsets = rows[:, None] * H + units[None, :]
    h_prev = tl.load(h_ptr + step_offset(t, B * H) + state_offsets, mask=tile_mask, other=0.0).to(tl.float32)
    h_new = (1.0 - gate_z) * candidate + gate_z * h_prev
    if (NORM == 0) and SAVE:
        # in the projection's buffer, which without a norm holds nothing else
        step_start = step_offset(t, B * 3 * H)
        offsets = rows[:, None] * (3 * H) + units[None, :]
        tl.store(wh_ptr + step_start + offsets, gate_r, mask=tile_mask)
        tl.store(wh_ptr + step_start + offsets + H, gate_z, mask=tile_mask)
        tl.store(wh_ptr + step_start + offsets + 2 * H, u_n, mask=tile_mask)
        tl.store(candidate_ptr + step_offset(t, B * H) + state_offsets, candidate, mask=tile_mask)
    store_hidden_state(h_ptr, h_operand_ptr, out_ptr, t, B, H, state_offsets, tile_mask, active, h_new, h_prev,
                       OPERAND_COPY)


@triton.jit
def _gru_forward_chunked(t, pid, programs, wx_ptr, w_hh_ptr, bias_ih_ptr, bias_hh_ptr, ih_weight_ptr, hh_weight_ptr,
                         h_ptr, h_operand_ptr, out_ptr, candidate_ptr, wh_ptr, partial_ptr, ih_stats_ptr, hh_stats_ptr,
                         ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, lengths_ptr, B, max_steps, momentum, eps,
                         H: tl.constexpr, TRAINING: tl.constexpr, SAVE: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, OPERAND_COPY: tl.constexpr, w_r, w_z, w_n,
                         RESIDENT: tl.constexpr):
    """Timestep ``t`` under batch norm in training for a batch of more than one tile, walked in
    chunks of BLOCK_B rows three times (see ``batch_norm.py``): the recurrent projection of each
    chunk, stored; the statistics of the whole batch; the gates and h_t of each chunk."""
    for first_row in range(0, B, BLOCK_B):
        _gru_projection(t, pid, first_row, w_hh_ptr, h_operand_ptr, wh_ptr, partial_ptr, B, H, 2, SAVE, DOT_PRECISION,
                        BLOCK_B, BLOCK_H, BLOCK_K, w_r, w_z, w_n, RESIDENT, True)
    tl.debug_barrier()  # this program's wh stores are read back by its other threads
    stored_pair_statistics(t, t if SAVE else 0, pid, wx_ptr, wh_ptr, ih_stats_ptr, hh_stats_ptr, ih_mean_ptr,
                           ih_var_ptr, hh_mean_ptr, hh_var_ptr, lengths_ptr, B, max_steps, momentum, eps, H, 3,
                           TRAINING, HAS_LENGTHS, BLOCK_B, BLOCK_H)
    tl.debug_barrier()  # and so are the statistics
    for first_row in range(0, B, BLOCK_B):
        _gru_finish(t, pid, first_row, programs, 0, 0, 0, wx_ptr, wh_ptr, bias_ih_ptr, bias_hh_ptr, ih_weight_ptr,
                    hh_weight_ptr, h_ptr, h_operand_ptr, out_ptr, candidate_ptr, partial_ptr, ih_stats_ptr,
                    hh_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, lengths_ptr, B, max_steps, momentum,
                    eps, H, 2, TRAINING, SAVE, HAS_LENGTHS, BLOCK_B, BLOCK_H, BLOCK_P, OPERAND_COPY, True)


# t unspecialized: one compiled kernel serves every step (Triton compiles t == 1 and t % 16 == 0 apart)
@triton.jit(do_not_specialize=["t"])
def gru_forward_step_kernel(t, wx_ptr, w_hh_ptr, bias_ih_ptr, bias_hh_ptr, ih_weight_ptr, hh_weight_ptr, h_ptr,
                            h_operand_ptr, out_ptr, candidate_ptr, wh_ptr, partial_ptr, ih_stats_ptr, hh_stats_ptr,
                            ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, lengths_ptr, B, max_steps, momentum, eps,
                            H: tl.constexpr, NORM: tl.constexpr, TRAINING: tl.constexpr, SAVE: tl.constexpr,
                            HAS_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                            BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                            OPERAND_COPY: tl.constexpr, CHUNKED: tl.constexpr, PHASE: tl.constexpr):
    """Timestep ``t`` (norm None, batch: phase 0 does it all) or one of its two phases (layer).
    ``CHUNKED``: the batch norm's batch walked in chunks (``batch_norm.py``)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    if CHUNKED:
        _gru_forward_chunked(t, pid, programs, wx_ptr, w_hh_ptr, bias_ih_ptr, bias_hh_ptr, ih_weight_ptr, hh_weight_ptr,
                             h_ptr, h_operand_ptr, out_ptr, candidate_ptr, wh_ptr, partial_ptr, ih_stats_ptr,
                             hh_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, lengths_ptr, B, max_steps,
                             momentum, eps, H, TRAINING, SAVE, HAS_LENGTHS, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K,
                             BLOCK_P, OPERAND_COPY, 0, 0, 0, False)
    else:
        acc_r, acc_z, acc_n = 0, 0, 0  # phase 1 of layer norm reads the projection back from memory
        if PHASE == 0:
            acc_r, acc_z, acc_n = _gru_projection(t, pid, 0, w_hh_ptr, h_operand_ptr, wh_ptr, partial_ptr, B, H, NORM,
                                                  SAVE, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, 0, 0, 0, False, False)
        if (PHASE == 1) or (NORM != 1):
            _gru_finish(t, pid, 0, programs, acc_r, acc_z, acc_n, wx_ptr, wh_ptr, bias_ih_ptr, bias_hh_ptr,
                        ih_weight_ptr, hh_weight_ptr, h_ptr, h_operand_ptr, out_ptr, candidate_ptr, partial_ptr,
                        ih_stats_ptr, hh_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, lengths_ptr, B,
                        max_steps, momentum, eps, H, NORM, TRAINING, SAVE, HAS_LENGTHS, BLOCK_B, BLOCK_H, BLOCK_P,
                        OPERAND_COPY, False)


# steps unspecialized: one compiled kernel serves every sequence length
@triton.jit(do_not_specialize=["steps"])
def gru_forward_persistent_kernel(steps, barrier_ptr, wx_ptr, w_hh_ptr, bias_ih_ptr, bias_hh_ptr, ih_weight_ptr,
                                  hh_weight_ptr, h_ptr, h_operand_ptr, out_ptr, candidate_ptr, wh_ptr, partial_ptr,
                                  ih_stats_ptr, hh_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr,
                                  lengths_ptr, B, max_steps, momentum, eps, H: tl.constexpr, NORM: tl.constexpr,
                                  TRAINING: tl.constexpr, SAVE: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                                  DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                                  BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, OPERAND_COPY: tl.constexpr,
                                  CHUNKED: tl.constexpr, RESIDENT: tl.constexpr):
    """All timesteps in one launch: one grid barrier a step (two under layer norm). With
    ``RESIDENT`` (``resident_weights``) the program's rows of W_hh are loaded once, before the loop,
    and stay on chip."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    grid_programs = programs * tl.num_programs(1)
    w_r, w_z, w_n = _load_gru_weights(pid, w_hh_ptr, B, H, BLOCK_B, BLOCK_H, BLOCK_K, RESIDENT)
    for t in range(steps):
        if CHUNKED:
            _gru_forward_chunked(t, pid, programs, wx_ptr, w_hh_ptr, bias_ih_ptr, bias_hh_ptr, ih_weight_ptr,
                                 hh_weight_ptr, h_ptr, h_operand_ptr, out_ptr, candidate_ptr, wh_ptr, partial_ptr,
                                 ih_stats_ptr, hh_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr,
                                 lengths_ptr, B, max_steps, momentum, eps, H, TRAINING, SAVE, HAS_LENGTHS,
                                 DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, BLOCK_P, OPERAND_COPY, w_r, w_z, w_n,
                                 RESIDENT)
        else:
            acc_r, acc_z, acc_n = _gru_projection(t, pid, 0, w_hh_ptr, h_operand_ptr, wh_ptr, partial_ptr, B, H, NORM,
                                                  SAVE, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, w_r, w_z, w_n,
                                                  RESIDENT, False)
            if NORM == 1:
                grid_barrier(barrier_ptr, (2 * t + 1) * grid_programs)
                acc_r, acc_z, acc_n = 0, 0, 0  # past the exchange the finish reads the stored projection
            _gru_finish(t, pid, 0, programs, acc_r, acc_z, acc_n, wx_ptr, wh_ptr, bias_ih_ptr, bias_hh_ptr,
                        ih_weight_ptr, hh_weight_ptr, h_ptr, h_operand_ptr, out_ptr, candidate_ptr, partial_ptr,
                        ih_stats_ptr, hh_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, lengths_ptr, B,
                        max_steps, momentum, eps, H, NORM, TRAINING, SAVE, HAS_LENGTHS, BLOCK_B, BLOCK_H, BLOCK_P,
                        OPERAND_COPY, False)
        if NORM == 1:
            grid_barrier(barrier_ptr, (2 * t + 2) * grid_programs)
        else:
            grid_barrier(barrier_ptr, (t + 1) * grid_programs)


def gru_forward(wx, h0, w_hh, bias_ih, bias_hh, ih_weight, hh_weight, running, lengths, norm: int, training: bool,
                save: bool, momentum: float, eps: float):
    """Launches the forward over all T steps of ``wx`` (T, B, 3H) (already normalized when the
    norm is "layer"). Biases and gains are float32 (3H,); ``running`` holds the four running
    statistics (max_steps, 3H), updated in place in training (norm "batch"). Returns a dict with
    ``output`` (T, B, H) and ``h`` (T+1, B, H), and when ``save`` ``wh`` (T, B, 3H, float32: the
    raw h_{t-1} W_hh^T, or without a norm (r, z, u_n)), ``ih_stats``, ``hh_stats`` (per column
    (T, 2, 3H), or per row (T, 2, B) under layer norm; a zeroed (1, 2, 3H) stand-in for a statistic
    the norm does not have) and, without a norm, ``candidate`` n
    (T, B, H, float32)."""
    steps, batch, gates = wx.shape
    hidden = gates // 3
    device = wx.device
    layout = step_layout(batch, hidden, norm, training)
    # h is the GRU's only state: kept in float32
    h = new_buffer((steps + 1, batch, hidden), torch.float32, device)
    h[0].copy_(h0)
    h_operand = operand_buffer(h, w_hh.dtype, norm)  # h as the recurrent product reads it
    output = new_buffer((steps, batch, hidden), w_hh.dtype, device)
    saved_steps = steps if save else 1
    wh = new_buffer((saved_steps, batch, gates), torch.float32, device)
    # n for the backward, which without a norm reads the gates and not the projections
    candidate = new_buffer((steps, batch, hidden), torch.float32, device) if save and norm == NORM_NONE else None
    # per column under batch norm, per row of h W_hh^T under layer norm (x W_ih^T's was normalized
    # before the loop); one zeroed step stands in for what the norm lacks
    ih_stats = (new_buffer((saved_steps, 2, gates), torch.float32, device) if norm == NORM_BATCH
                else stand_in((1, 2, gates), device))
    hh_stats = (new_buffer((saved_steps, 2, batch if norm == NORM_LAYER else gates), torch.float32, device)
                if norm != NORM_NONE else stand_in((1, 2, gates), device))
    partial = new_buffer((layout.unit_programs, 2, batch), torch.float32, device)
    lengths_arg = lengths if lengths is not None else h0
    max_steps = running[0].shape[0]
    unwritten = h  # stands in for candidate where the kernels do not store it
    arguments = (wx, w_hh, bias_ih, bias_hh, ih_weight, hh_weight, h, h_operand, output,
                 unwritten if candidate is None else candidate, wh, partial, ih_stats, hh_stats, *running, lengths_arg,
                 batch, max_steps, momentum, eps)
    constants = dict(**layout.tile_constants(),
                     H=hidden, NORM=norm, TRAINING=training, SAVE=save, HAS_LENGTHS=lengths is not None,
                     DOT_PRECISION=dot_precision(w_hh.dtype, norm), BLOCK_P=layout.block_p,
                     OPERAND_COPY=h_operand is not h, CHUNKED=layout.chunked)
    launch_sequence(gru_forward_step_kernel, gru_forward_persistent_kernel, layout, steps, arguments, constants, device,
                    phases=2 if norm == NORM_LAYER else 1,
                    persistent_constants=lambda: resident_tiles(layout, 3, hidden, w_hh.dtype, norm))
    result = {"output": output, "h": h}
    if save:
        result.update(wh=wh, ih_stats=ih_stats, hh_stats=hh_stats)
        if candidate is not None:
            result["candidate"] = candidate
    return result
