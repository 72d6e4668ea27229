"""Fused vanilla RNN forward over the whole sequence (reference: ``normrnn/reference/rnn.py``):

    u_t = h_{t-1} W_hh^T,   h_t = act(N_ih(wx_t) + N_hh(u_t) + b),   act in {tanh, relu, identity}

norm None: N is the identity; "batch": per-timestep batch norms with gain (the bias shifts),
statistics over the active rows of the step, running statistics updated in the kernel;
"layer": N_hh is a layer norm over the H units of a sample (N_ih, which needs no recurrence, is
applied to ``wx`` before the loop, as is sequence-wise batch norm).

Program p owns hidden units [p * BLOCK_H, (p + 1) * BLOCK_H): under batch norm in training for
the whole batch (its column statistics stay local, one phase a step; a batch of more than one
64-row tile walked in chunks: ``batch_norm.py``); otherwise for a tile of up to 64 rows (grid
axis 1). Layer norm needs row statistics across programs: phase 0 computes u_t and
publishes per-program (mean, M2), phase 1 combines them in a fixed order and finishes the step
(see ``lstm_layer_norm_forward.py``). Phases are launches, or separated by a grid barrier in the
persistent kernel.

Saved for the backward (``SAVE``): h (T+1, B, H) in float32 (h is the only state: rounding it to
bfloat16 at every step would compound; the backward takes act'(pre_t) from h_t), under a norm u
(T, B, H) in float32, and the statistics: per column (T, 2, H) for the two batch norms, per row
(T, 2, B) for the layer norm. In bf16 and fp16 without batch norm h is also kept rounded to the
weights' dtype (``operand_buffer``), which the recurrent product reads: half the bytes of the
float32 state.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .batch_norm import chunk_moments, pair_statistics, stored_pair_statistics
from .buffers import new_buffer, stand_in
from .layer_norm import combine_row_statistics, publish_row_statistics
from .layout import NORM_BATCH, NORM_LAYER, NORM_NONE, dot_precision, operand_buffer, resident_tiles, step_layout
from .sequence_launch import launch_sequence
from .tiles import (grid_barrier, load_step_statistics, program_tile, recurrent_product, row_active, state_columns,
                    step_offset, store_hidden_state, store_step_statistics, tanh, weight_rows)

ACTIVATIONS = {"tanh": 0, "relu": 1, None: 2}


@triton.jit
def _activate(pre, ACTIVATION: tl.constexpr):
    if ACTIVATION == 0:
        return tanh(pre)
    elif ACTIVATION == 1:
        return tl.maximum(pre, 0.0)
    else:
        return pre


@triton.jit
def _rnn_projection(t, pid, first_row, w_hh_ptr, h_operand_ptr, u_ptr, partial_ptr, B, H: tl.constexpr,
                    NORM: tl.constexpr, SAVE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, w_rows, RESIDENT: tl.constexpr,
                    CHUNKED: tl.constexpr):
    """u_t for the program's units; under layer norm, and batch norm with ``CHUNKED``, also stored
    (with, under layer norm, its per-row (mean, M2)). With ``RESIDENT`` from the rows of W_hh
    ``w_rows`` the persistent kernel loaded once (all of K in one tile), otherwise with W_hh
    streamed from memory in K tiles. h_{t-1} was written by other programs: it is read past L1,
    which is not coherent across SMs. Its rows: grid axis 1 tiles the batch, or, where a program
    walks the batch in chunks, the chunk from ``first_row``."""
    rows, units, row_mask, unit_mask = program_tile(pid, B, H, BLOCK_B, BLOCK_H)
    rows += first_row
    row_mask = rows < B
    if RESIDENT:
        h_tile = state_columns(h_operand_ptr, t, rows, row_mask, B, H, 0, BLOCK_K)
        acc = recurrent_product(h_tile, w_rows, DOT_PRECISION)
    else:
        acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < H
            h_tile = state_columns(h_operand_ptr, t, rows, row_mask, B, H, k0, BLOCK_K)
            w_tile = tl.load(w_hh_ptr + units[:, None] * H + ks[None, :], mask=unit_mask[:, None] & k_mask[None, :],
                             other=0.0)
            acc += recurrent_product(h_tile, w_tile, DOT_PRECISION)
    if (NORM == 1) or CHUNKED:
        step = t if SAVE else 0
        tile_mask = row_mask[:, None] & unit_mask[None, :]
        tl.store(u_ptr + step_offset(step, B * H) + rows[:, None] * H + units[None, :], acc, mask=tile_mask)
    if NORM == 1:
        valid_f = unit_mask.to(tl.float32)[None, :]
        owned = tl.minimum(H - pid * BLOCK_H, BLOCK_H).to(tl.float32)
        publish_row_statistics(acc, valid_f, partial_ptr, pid, rows, row_mask, B, owned)
    return acc


@triton.jit
def _rnn_finish(t, pid, first_row, programs, u, wx_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, h_ptr, h_operand_ptr,
                out_ptr, u_ptr, partial_ptr, ih_stats_ptr, hh_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr,
                hh_var_ptr, lengths_ptr, B, max_steps, momentum, eps, H: tl.constexpr, NORM: tl.constexpr,
                ACTIVATION: tl.constexpr, TRAINING: tl.constexpr, SAVE: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, OPERAND_COPY: tl.constexpr,
                CHUNKED: tl.constexpr):
    """The normalizations, the activation and the state update of the program's units. ``u`` is
    u_t from the same phase (norm None, batch); under layer norm it is reloaded (phase 1), and so
    it is under batch norm with ``CHUNKED``, with the statistics ``stored_pair_statistics`` stored
    (``first_row``: see ``_rnn_projection``)."""
    rows, units, row_mask, unit_mask = program_tile(pid, B, H, BLOCK_B, BLOCK_H)
    rows += first_row
    row_mask = rows < B
    tile_mask = row_mask[:, None] & unit_mask[None, :]
    state_offsets = rows[:, None] * H + units[None, :]
    active = row_active(t, rows, row_mask, lengths_ptr, HAS_LENGTHS)
    wx = tl.load(wx_ptr + step_offset(t, B * H) + state_offsets, mask=tile_mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + units, mask=unit_mask, other=0.0)
    if NORM == 2:
        if CHUNKED:
            step = t if SAVE else 0
            u = tl.load(u_ptr + step_offset(step, B * H) + state_offsets, mask=tile_mask, other=0.0)
            ih_mean, ih_rstd = load_step_statistics(ih_stats_ptr, step, units, unit_mask, H)
            hh_mean, hh_rstd = load_step_statistics(hh_stats_ptr, step, units, unit_mask, H)
        else:
            active_f = active.to(tl.float32)[:, None]
            count = tl.sum(active.to(tl.float32), axis=0)
            ih_mean, ih_m2 = chunk_moments(wx, active_f, count)
            hh_mean, hh_m2 = chunk_moments(u, active_f, count)
            ih_mean, ih_rstd, hh_mean, hh_rstd = pair_statistics(ih_mean, ih_m2, hh_mean, hh_m2, count,
                                                                 TRAINING & (count >= 2.0),
                                                                 tl.minimum(t, max_steps - 1), t, units, unit_mask,
                                                                 ih_stats_ptr, hh_stats_ptr, ih_mean_ptr, ih_var_ptr,
                                                                 hh_mean_ptr, hh_var_ptr, momentum, eps, H, TRAINING,
                                                                 SAVE)
            if SAVE:
                tl.store(u_ptr + step_offset(t, B * H) + state_offsets, u, mask=tile_mask)
        ih_weight = tl.load(ih_weight_ptr + units, mask=unit_mask, other=0.0)
        hh_weight = tl.load(hh_weight_ptr + units, mask=unit_mask, other=0.0)
        pre = ((wx - ih_mean[None, :]) * (ih_rstd * ih_weight)[None, :]
               + (u - hh_mean[None, :]) * (hh_rstd * hh_weight)[None, :] + bias[None, :])
    elif NORM == 1:
        mean, rstd = combine_row_statistics(partial_ptr, rows, row_mask, B, programs, eps, H, 1, BLOCK_H, BLOCK_P)
        step = t if SAVE else 0
        u_saved = tl.load(u_ptr + step_offset(step, B * H) + state_offsets, mask=tile_mask, other=0.0)
        if SAVE:
            if pid == 0:
                store_step_statistics(hh_stats_ptr, t, rows, mean, rstd, row_mask, B)
        hh_weight = tl.load(hh_weight_ptr + units, mask=unit_mask, other=0.0)
        pre = wx + (u_saved - mean[:, None]) * rstd[:, None] * hh_weight[None, :] + bias[None, :]
    else:  # nothing to save: the backward takes act'(pre) from h_t
        pre = wx + u + bias[None, :]
    h_new = _activate(pre, ACTIVATION)
    h_prev = tl.load(h_ptr + step_offset(t, B * H) + state_offsets, mask=tile_mask, other=0.0).to(tl.float32)
    store_hidden_state(h_ptr, h_operand_ptr, out_ptr, t, B, H, state_offsets, tile_mask, active, h_new, h_prev,
                       OPERAND_COPY)


@triton.jit
def _rnn_forward_chunked(t, pid, programs, wx_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, h_ptr,
                         h_operand_ptr, out_ptr, u_ptr, partial_ptr, ih_stats_ptr, hh_stats_ptr, ih_mean_ptr,
                         ih_var_ptr, hh_mean_ptr, hh_var_ptr, lengths_ptr, B, max_steps, momentum, eps,
                         H: tl.constexpr, ACTIVATION: tl.constexpr, TRAINING: tl.constexpr, SAVE: tl.constexpr,
                         HAS_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                         OPERAND_COPY: tl.constexpr, w_rows, RESIDENT: tl.constexpr):
    """Timestep ``t`` under batch norm in training for a batch of more than one tile, walked in
    chunks of BLOCK_B rows three times (see ``batch_norm.py``): u_t of each chunk, stored; the
    statistics of the whole batch; the activation and h_t of each chunk."""
    for first_row in range(0, B, BLOCK_B):
        _rnn_projection(t, pid, first_row, w_hh_ptr, h_operand_ptr, u_ptr, partial_ptr, B, H, 2, SAVE, DOT_PRECISION,
                        BLOCK_B, BLOCK_H, BLOCK_K, w_rows, RESIDENT, True)
    tl.debug_barrier()  # this program's u stores are read back by its other threads
    stored_pair_statistics(t, t if SAVE else 0, pid, wx_ptr, u_ptr, ih_stats_ptr, hh_stats_ptr, ih_mean_ptr,
                           ih_var_ptr, hh_mean_ptr, hh_var_ptr, lengths_ptr, B, max_steps, momentum, eps, H, 1,
                           TRAINING, HAS_LENGTHS, BLOCK_B, BLOCK_H)
    tl.debug_barrier()  # and so are the statistics
    for first_row in range(0, B, BLOCK_B):
        _rnn_finish(t, pid, first_row, programs, tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32), wx_ptr, bias_ptr,
                    ih_weight_ptr, hh_weight_ptr, h_ptr, h_operand_ptr, out_ptr, u_ptr, partial_ptr, ih_stats_ptr,
                    hh_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, lengths_ptr, B, max_steps, momentum,
                    eps, H, 2, ACTIVATION, TRAINING, SAVE, HAS_LENGTHS, BLOCK_B, BLOCK_H, BLOCK_P, OPERAND_COPY, True)


# t unspecialized: one compiled kernel serves every step (Triton compiles t == 1 and t % 16 == 0 apart)
@triton.jit(do_not_specialize=["t"])
def rnn_forward_step_kernel(t, wx_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, h_ptr, h_operand_ptr, out_ptr,
                            u_ptr, partial_ptr, ih_stats_ptr, hh_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr,
                            hh_var_ptr, lengths_ptr, B, max_steps, momentum, eps, H: tl.constexpr, NORM: tl.constexpr,
                            ACTIVATION: tl.constexpr, TRAINING: tl.constexpr, SAVE: tl.constexpr,
                            HAS_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                            BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                            OPERAND_COPY: tl.constexpr, CHUNKED: tl.constexpr, PHASE: tl.constexpr):
    """Timestep ``t`` (norm None, batch) or one of its two phases (layer); the launch boundary
    orders it after the previous one. ``CHUNKED``: the batch norm's batch walked in chunks
    (``batch_norm.py``)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    if CHUNKED:
        _rnn_forward_chunked(t, pid, programs, wx_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, h_ptr,
                             h_operand_ptr, out_ptr, u_ptr, partial_ptr, ih_stats_ptr, hh_stats_ptr, ih_mean_ptr,
                             ih_var_ptr, hh_mean_ptr, hh_var_ptr, lengths_ptr, B, max_steps, momentum, eps, H,
                             ACTIVATION, TRAINING, SAVE, HAS_LENGTHS, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K,
                             BLOCK_P, OPERAND_COPY, 0, False)
    elif PHASE == 0:
        u = _rnn_projection(t, pid, 0, w_hh_ptr, h_operand_ptr, u_ptr, partial_ptr, B, H, NORM, SAVE, DOT_PRECISION,
                            BLOCK_B, BLOCK_H, BLOCK_K, 0, False, False)
        if NORM != 1:
            _rnn_finish(t, pid, 0, programs, u, wx_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, h_ptr, h_operand_ptr,
                        out_ptr, u_ptr, partial_ptr, ih_stats_ptr, hh_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr,
                        hh_var_ptr, lengths_ptr, B, max_steps, momentum, eps, H, NORM, ACTIVATION, TRAINING, SAVE,
                        HAS_LENGTHS, BLOCK_B, BLOCK_H, BLOCK_P, OPERAND_COPY, False)
    else:
        _rnn_finish(t, pid, 0, programs, tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32), wx_ptr, bias_ptr,
                    ih_weight_ptr, hh_weight_ptr, h_ptr, h_operand_ptr, out_ptr, u_ptr, partial_ptr, ih_stats_ptr,
                    hh_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, lengths_ptr, B, max_steps, momentum,
                    eps, H, NORM, ACTIVATION, TRAINING, SAVE, HAS_LENGTHS, BLOCK_B, BLOCK_H, BLOCK_P, OPERAND_COPY,
                    False)


# steps unspecialized: one compiled kernel serves every sequence length
@triton.jit(do_not_specialize=["steps"])
def rnn_forward_persistent_kernel(steps, barrier_ptr, wx_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, h_ptr,
                                  h_operand_ptr, out_ptr, u_ptr, partial_ptr, ih_stats_ptr, hh_stats_ptr, ih_mean_ptr,
                                  ih_var_ptr, hh_mean_ptr, hh_var_ptr, lengths_ptr, B, max_steps, momentum, eps,
                                  H: tl.constexpr, NORM: tl.constexpr, ACTIVATION: tl.constexpr, TRAINING: tl.constexpr,
                                  SAVE: tl.constexpr, HAS_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                  BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                                  BLOCK_P: tl.constexpr, OPERAND_COPY: tl.constexpr, CHUNKED: tl.constexpr,
                                  RESIDENT: tl.constexpr):
    """All timesteps in one launch: one grid barrier a step (two under layer norm). With
    ``RESIDENT`` (``resident_weights``) the program's rows of W_hh are loaded once, before the loop,
    and stay on chip."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    grid_programs = programs * tl.num_programs(1)
    if RESIDENT:
        _, units, _, unit_mask = program_tile(pid, B, H, BLOCK_B, BLOCK_H)
        w_rows = weight_rows(w_hh_ptr, 0, units, unit_mask, H, BLOCK_K)
    else:
        w_rows = 0
    for t in range(steps):
        if CHUNKED:
            _rnn_forward_chunked(t, pid, programs, wx_ptr, w_hh_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, h_ptr,
                                 h_operand_ptr, out_ptr, u_ptr, partial_ptr, ih_stats_ptr, hh_stats_ptr, ih_mean_ptr,
                                 ih_var_ptr, hh_mean_ptr, hh_var_ptr, lengths_ptr, B, max_steps, momentum, eps, H,
                                 ACTIVATION, TRAINING, SAVE, HAS_LENGTHS, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K,
                                 BLOCK_P, OPERAND_COPY, w_rows, RESIDENT)
        else:
            u = _rnn_projection(t, pid, 0, w_hh_ptr, h_operand_ptr, u_ptr, partial_ptr, B, H, NORM, SAVE,
                                DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, w_rows, RESIDENT, False)
            if NORM == 1:
                grid_barrier(barrier_ptr, (2 * t + 1) * grid_programs)
            _rnn_finish(t, pid, 0, programs, u, wx_ptr, bias_ptr, ih_weight_ptr, hh_weight_ptr, h_ptr, h_operand_ptr,
                        out_ptr, u_ptr, partial_ptr, ih_stats_ptr, hh_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr,
                        hh_var_ptr, lengths_ptr, B, max_steps, momentum, eps, H, NORM, ACTIVATION, TRAINING, SAVE,
                        HAS_LENGTHS, BLOCK_B, BLOCK_H, BLOCK_P, OPERAND_COPY, False)
        if NORM == 1:
            grid_barrier(barrier_ptr, (2 * t + 2) * grid_programs)
        else:
            grid_barrier(barrier_ptr, (t + 1) * grid_programs)


def rnn_forward(wx, h0, w_hh, bias, ih_weight, hh_weight, running, lengths, norm: int, activation: int,
                training: bool, save: bool, momentum: float, eps: float):
    """Launches the forward over all T steps of ``wx`` (T, B, H) (already normalized when the
    norm is "layer"). ``bias`` (H,) and the gains are float32; ``running`` holds the four running
    statistics (max_steps, H), updated in place in training (norm "batch"). Returns a dict with
    ``output`` (T, B, H) and ``h`` (T+1, B, H), and when ``save`` ``u`` (T, B, H, float32; empty
    without a norm, whose backward does not read it) and
    ``ih_stats``, ``hh_stats`` (per column (T, 2, H), or per row (T, 2, B) under layer norm; a
    zeroed (1, 2, H) stand-in for a statistic the norm does not have)."""
    steps, batch, hidden = wx.shape
    device = wx.device
    layout = step_layout(batch, hidden, norm, training)
    # h is the RNN's only state: kept in float32, and where the recurrent product rounds it, also as
    # rounded (operand_buffer)
    h = new_buffer((steps + 1, batch, hidden), torch.float32, device)
    h[0].copy_(h0)
    h_operand = operand_buffer(h, w_hh.dtype, norm)
    output = new_buffer((steps, batch, hidden), w_hh.dtype, device)
    saved_steps = steps if save else 1
    # without a norm no step writes u (the backward takes act'(pre) from h), and none is allocated
    u = new_buffer((saved_steps, batch, hidden), torch.float32, device) if norm != NORM_NONE else None
    stats_width = batch if norm == NORM_LAYER else hidden
    # per unit under batch norm, per row of h W_hh^T under layer norm (x W_ih^T's was normalized
    # before the loop); one zeroed step stands in for what the norm lacks
    ih_stats = (new_buffer((saved_steps, 2, hidden), torch.float32, device) if norm == NORM_BATCH
                else stand_in((1, 2, hidden), device))
    hh_stats = (new_buffer((saved_steps, 2, stats_width), torch.float32, device) if norm != NORM_NONE
                else stand_in((1, 2, hidden), device))
    partial = new_buffer((layout.unit_programs, 2, batch), torch.float32, device)
    lengths_arg = lengths if lengths is not None else h0
    max_steps = running[0].shape[0]
    arguments = (wx, w_hh, bias, ih_weight, hh_weight, h, h_operand, output, h if u is None else u, partial, ih_stats,
                 hh_stats, *running, lengths_arg, batch, max_steps, momentum, eps)
    constants = dict(**layout.tile_constants(),
                     H=hidden, NORM=norm, ACTIVATION=activation, TRAINING=training, SAVE=save,
                     HAS_LENGTHS=lengths is not None, DOT_PRECISION=dot_precision(w_hh.dtype, norm),
                     BLOCK_P=layout.block_p, OPERAND_COPY=h_operand is not h, CHUNKED=layout.chunked)
    launch_sequence(rnn_forward_step_kernel, rnn_forward_persistent_kernel, layout, steps, arguments, constants, device,
                    phases=2 if norm == NORM_LAYER else 1,
                    persistent_constants=lambda: resident_tiles(layout, 1, hidden, w_hh.dtype, norm))
    result = {"output": output, "h": h}
    if save:
        result.update(u=h.new_empty((0,)) if u is None else u, ih_stats=ih_stats, hh_stats=hh_stats)
    return result
