"""Fused layer-norm LSTM forward (Ba et al. 2016) over the whole sequence.

The mathematics is ``normrnn/reference/lstm.py`` with norm="layer":

    z_t = gamma_hh * LN(h_{t-1} W_hh^T) + LN_ih(wx_t) + b,   c_t = f * c_{t-1} + i * g,
    h_t = o * tanh(gamma_c * LN(c_t) + beta_c)

where LN(v) = (v - mean(v)) / sqrt(var(v) + eps) over all 4H gate columns (H cells) of one
sample. ``wx`` arrives already layer-normalized (that needs no recurrence and is done for all
timesteps before the loop). Program p owns hidden units [p * BLOCK_H, (p + 1) * BLOCK_H) of the
four gates for the whole batch, as in ``lstm_forward.py``; unlike batch statistics, the
statistics of a sample span every program, so each timestep runs in three phases that exchange
per-program partial statistics through memory:

1. the program's columns of h_{t-1} W_hh^T, and their per-row count, mean and M2 (sum of
   squared deviations);
2. every program combines all partials in the same fixed order (Chan's formula: deterministic
   and free of the cancellation of sum-of-squares), normalizes its columns, computes the gates
   and c_t, and publishes the partial statistics of its cells;
3. the statistics of c_t, then h_t.

Phases are separate launches (``*_phase_kernel``; the Triton interpreter's mode and the GPU
fallback) or separated by the grid barrier inside the persistent kernel: three barriers a step.

Saved for the backward (``SAVE``): the raw recurrent projection ``wh`` (T, B, 4H), the states h
(T+1, B, H) and c (T+1, B, H), and per-row mean / rstd of both layer norms (T, 2, B).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .buffers import new_buffer
from .layer_norm import combine_row_statistics, publish_row_statistics, store_row_partials
from .layout import NORM_LAYER, dot_precision, resident_tiles, step_layout
from .lstm_projection import load_recurrent_weights, recurrent_projection
from .sequence_launch import launch_sequence
from .tiles import grid_barrier, program_tile, row_active, step_offset, store_step_statistics, tanh


@triton.jit
def _phase_projection(t, pid, w_hh_ptr, h_ptr, wh_ptr, hh_partial_ptr, B, H: tl.constexpr, SAVE: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                      w_i, w_f, w_g, w_o, RESIDENT: tl.constexpr, initial_ptr, HAS_INITIAL: tl.constexpr):
    """Phase 1: the program's 4 x BLOCK_H columns of h_{t-1} W_hh^T and their row statistics.
    ``w_*``, ``RESIDENT``, ``initial_ptr``, ``HAS_INITIAL``: see ``recurrent_projection``."""
    rows, units, row_mask, unit_mask = program_tile(pid, B, H, BLOCK_B, BLOCK_H)  # axis 1 tiles the batch
    step = t if SAVE else 0
    tile_mask = row_mask[:, None] & unit_mask[None, :]
    valid_f = unit_mask.to(tl.float32)[None, :]
    owned = (tl.minimum(H - pid * BLOCK_H, BLOCK_H) * 4).to(tl.float32)
    # the four gates together: their row mean and M2 span 4 x BLOCK_H columns
    acc_i, acc_f, acc_g, acc_o = recurrent_projection(t, h_ptr, w_hh_ptr, rows, units, row_mask, unit_mask, B, H,
                                                      DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, w_i, w_f, w_g, w_o,
                                                      RESIDENT, initial_ptr, HAS_INITIAL)
    wh_step = wh_ptr + step_offset(step, B * 4 * H)
    offsets = rows[:, None] * (4 * H) + units[None, :]
    tl.store(wh_step + offsets, acc_i, mask=tile_mask)
    tl.store(wh_step + offsets + H, acc_f, mask=tile_mask)
    tl.store(wh_step + offsets + 2 * H, acc_g, mask=tile_mask)
    tl.store(wh_step + offsets + 3 * H, acc_o, mask=tile_mask)
    mean = (tl.sum(acc_i * valid_f, axis=1) + tl.sum(acc_f * valid_f, axis=1) + tl.sum(acc_g * valid_f, axis=1)
            + tl.sum(acc_o * valid_f, axis=1)) / owned
    d_i = (acc_i - mean[:, None]) * valid_f
    d_f = (acc_f - mean[:, None]) * valid_f
    d_g = (acc_g - mean[:, None]) * valid_f
    d_o = (acc_o - mean[:, None]) * valid_f
    m2 = tl.sum(d_i * d_i, axis=1) + tl.sum(d_f * d_f, axis=1) + tl.sum(d_g * d_g, axis=1) + tl.sum(d_o * d_o, axis=1)
    store_row_partials(hh_partial_ptr, pid, rows, row_mask, B, mean, m2)


@triton.jit
def _gate(gate, step, rows, units, tile_mask, unit_mask, wx_ptr, wh_ptr, bias_ptr, hh_weight_ptr, mean, rstd, t, B,
          H: tl.constexpr):
    columns = gate * H + units
    wx = tl.load(wx_ptr + step_offset(t, B * 4 * H) + rows[:, None] * (4 * H) + columns[None, :], mask=tile_mask,
                 other=0.0).to(tl.float32)
    wh = tl.load(wh_ptr + step_offset(step, B * 4 * H) + rows[:, None] * (4 * H) + columns[None, :], mask=tile_mask,
                 other=0.0)
    weight = tl.load(hh_weight_ptr + columns, mask=unit_mask, other=0.0)
    bias = tl.load(bias_ptr + columns, mask=unit_mask, other=0.0)
    return wx + (wh - mean[:, None]) * rstd[:, None] * weight[None, :] + bias[None, :]


@triton.jit
def _phase_cell(t, pid, programs, wx_ptr, wh_ptr, bias_ptr, hh_weight_ptr, c_ptr, gate_o_ptr, hh_partial_ptr,
                cell_partial_ptr, hh_stats_ptr, lengths_ptr, B, eps, H: tl.constexpr, SAVE: tl.constexpr,
                HAS_LENGTHS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """Phase 2: layer norm of the recurrent projection, the gates, c_t and its row statistics."""
    rows, units, row_mask, unit_mask = program_tile(pid, B, H, BLOCK_B, BLOCK_H)  # axis 1 tiles the batch
    tile_mask = row_mask[:, None] & unit_mask[None, :]
    step = t if SAVE else 0
    mean, rstd = combine_row_statistics(hh_partial_ptr, rows, row_mask, B, programs, eps, H, 4, BLOCK_H, BLOCK_P)
    if SAVE:
        if pid == 0:
            store_step_statistics(hh_stats_ptr, t, rows, mean, rstd, row_mask, B)
    z_i = _gate(0, step, rows, units, tile_mask, unit_mask, wx_ptr, wh_ptr, bias_ptr, hh_weight_ptr, mean, rstd, t, B, H)
    z_f = _gate(1, step, rows, units, tile_mask, unit_mask, wx_ptr, wh_ptr, bias_ptr, hh_weight_ptr, mean, rstd, t, B, H)
    z_g = _gate(2, step, rows, units, tile_mask, unit_mask, wx_ptr, wh_ptr, bias_ptr, hh_weight_ptr, mean, rstd, t, B, H)
    z_o = _gate(3, step, rows, units, tile_mask, unit_mask, wx_ptr, wh_ptr, bias_ptr, hh_weight_ptr, mean, rstd, t, B, H)
    state_offsets = rows[:, None] * H + units[None, :]
    c_prev = tl.load(c_ptr + step_offset(t, B * H) + state_offsets, mask=tile_mask, other=0.0)
    c_new = tl.sigmoid(z_f) * c_prev + tl.sigmoid(z_i) * tanh(z_g)
    active = row_active(t, rows, row_mask, lengths_ptr, HAS_LENGTHS)
    # a sequence that has ended keeps its state; its row statistics are computed and discarded
    c_kept = tl.where(active[:, None], c_new, c_prev)
    tl.store(c_ptr + step_offset(t + 1, B * H) + state_offsets, c_kept, mask=tile_mask)
    tl.store(gate_o_ptr + state_offsets, tl.sigmoid(z_o), mask=tile_mask)
    owned = tl.minimum(H - pid * BLOCK_H, BLOCK_H).to(tl.float32)
    publish_row_statistics(c_kept, unit_mask.to(tl.float32)[None, :], cell_partial_ptr, pid, rows, row_mask, B, owned)


@triton.jit
def _phase_output(t, pid, programs, h_ptr, c_ptr, out_ptr, gate_o_ptr, cell_weight_ptr, cell_bias_ptr,
                  cell_partial_ptr, cell_stats_ptr, lengths_ptr, B, eps, H: tl.constexpr, SAVE: tl.constexpr,
                  HAS_LENGTHS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """Phase 3: layer norm of c_t, h_t and the output."""
    rows, units, row_mask, unit_mask = program_tile(pid, B, H, BLOCK_B, BLOCK_H)  # axis 1 tiles the batch
    tile_mask = row_mask[:, None] & unit_mask[None, :]
    mean, rstd = combine_row_statistics(cell_partial_ptr, rows, row_mask, B, programs, eps, H, 1, BLOCK_H, BLOCK_P)
    if SAVE:
        if pid == 0:
            store_step_statistics(cell_stats_ptr, t, rows, mean, rstd, row_mask, B)
    state_offsets = rows[:, None] * H + units[None, :]
    c_new = tl.load(c_ptr + step_offset(t + 1, B * H) + state_offsets, mask=tile_mask, other=0.0)
    gate_o = tl.load(gate_o_ptr + state_offsets, mask=tile_mask, other=0.0)
    weight = tl.load(cell_weight_ptr + units, mask=unit_mask, other=0.0)
    bias = tl.load(cell_bias_ptr + units, mask=unit_mask, other=0.0)
    h_new = gate_o * tanh((c_new - mean[:, None]) * rstd[:, None] * weight[None, :] + bias[None, :])
    active = row_active(t, rows, row_mask, lengths_ptr, HAS_LENGTHS)
    keep = active[:, None]
    h_prev = tl.load(h_ptr + step_offset(t, B * H) + state_offsets, mask=tile_mask, other=0.0)
    tl.store(h_ptr + step_offset(t + 1, B * H) + state_offsets,
             tl.where(keep, h_new, h_prev.to(tl.float32)).to(h_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(out_ptr + step_offset(t, B * H) + state_offsets, tl.where(keep, h_new, 0.0).to(out_ptr.dtype.element_ty),
             mask=tile_mask)


# t unspecialized: one compiled kernel serves every step (Triton compiles t == 1 and t % 16 == 0 apart)
@triton.jit(do_not_specialize=["t"])
def layer_norm_lstm_forward_phase_kernel(t, wx_ptr, w_hh_ptr, bias_ptr, hh_weight_ptr, cell_weight_ptr,
                                         cell_bias_ptr, h_ptr, c_ptr, out_ptr, wh_ptr, gate_o_ptr, hh_partial_ptr,
                                         cell_partial_ptr, hh_stats_ptr, cell_stats_ptr, lengths_ptr, initial_ptr, B,
                                         eps, H: tl.constexpr, SAVE: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                                         HAS_INITIAL: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                                         BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                                         PHASE: tl.constexpr):
    """One phase (0, 1, 2) of timestep ``t``; the launch boundary is the exchange."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    if PHASE == 0:
        _phase_projection(t, pid, w_hh_ptr, h_ptr, wh_ptr, hh_partial_ptr, B, H, SAVE, DOT_PRECISION, BLOCK_B, BLOCK_H,
                          BLOCK_K, 0, 0, 0, 0, False, initial_ptr, HAS_INITIAL)
    elif PHASE == 1:
        _phase_cell(t, pid, programs, wx_ptr, wh_ptr, bias_ptr, hh_weight_ptr, c_ptr, gate_o_ptr, hh_partial_ptr,
                    cell_partial_ptr, hh_stats_ptr, lengths_ptr, B, eps, H, SAVE, HAS_LENGTHS, BLOCK_B, BLOCK_H,
                    BLOCK_P)
    else:
        _phase_output(t, pid, programs, h_ptr, c_ptr, out_ptr, gate_o_ptr, cell_weight_ptr, cell_bias_ptr,
                      cell_partial_ptr, cell_stats_ptr, lengths_ptr, B, eps, H, SAVE, HAS_LENGTHS, BLOCK_B, BLOCK_H,
                      BLOCK_P)


# steps unspecialized: one compiled kernel serves every sequence length
@triton.jit(do_not_specialize=["steps"])
def layer_norm_lstm_forward_persistent_kernel(steps, barrier_ptr, wx_ptr, w_hh_ptr, bias_ptr, hh_weight_ptr,
                                              cell_weight_ptr, cell_bias_ptr, h_ptr, c_ptr, out_ptr, wh_ptr,
                                              gate_o_ptr, hh_partial_ptr, cell_partial_ptr, hh_stats_ptr,
                                              cell_stats_ptr, lengths_ptr, initial_ptr, B, eps, H: tl.constexpr,
                                              SAVE: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_INITIAL: tl.constexpr,
                                              DOT_PRECISION: tl.constexpr,
                                              BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                                              BLOCK_P: tl.constexpr, RESIDENT: tl.constexpr):
    """All timesteps in one launch, a grid barrier after each of the three phases. With
    ``RESIDENT`` the program's rows of W_hh are loaded once, before the loop, and stay on chip."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)  # hidden-unit blocks: the partial statistics to combine
    grid_programs = programs * tl.num_programs(1)
    w_i, w_f, w_g, w_o = load_recurrent_weights(pid, w_hh_ptr, B, H, BLOCK_B, BLOCK_H, BLOCK_K, RESIDENT)
    for t in range(steps):
        _phase_projection(t, pid, w_hh_ptr, h_ptr, wh_ptr, hh_partial_ptr, B, H, SAVE, DOT_PRECISION, BLOCK_B, BLOCK_H,
                          BLOCK_K, w_i, w_f, w_g, w_o, RESIDENT, initial_ptr, HAS_INITIAL)
        grid_barrier(barrier_ptr, (3 * t + 1) * grid_programs)
        _phase_cell(t, pid, programs, wx_ptr, wh_ptr, bias_ptr, hh_weight_ptr, c_ptr, gate_o_ptr, hh_partial_ptr,
                    cell_partial_ptr, hh_stats_ptr, lengths_ptr, B, eps, H, SAVE, HAS_LENGTHS, BLOCK_B, BLOCK_H,
                    BLOCK_P)
        grid_barrier(barrier_ptr, (3 * t + 2) * grid_programs)
        _phase_output(t, pid, programs, h_ptr, c_ptr, out_ptr, gate_o_ptr, cell_weight_ptr, cell_bias_ptr,
                      cell_partial_ptr, cell_stats_ptr, lengths_ptr, B, eps, H, SAVE, HAS_LENGTHS, BLOCK_B, BLOCK_H,
                      BLOCK_P)
        grid_barrier(barrier_ptr, (3 * t + 3) * grid_programs)


def layer_norm_lstm_forward(wx, h0, c0, w_hh, bias, hh_weight, cell_weight, cell_bias, lengths, save: bool,
                            eps: float, initial=None):
    """Launches the forward over all T steps of ``wx`` (T, B, 4H), already layer-normalized.

    ``bias`` is b_ih + b_hh and the gains / shift are float32. Returns a dict with ``output``
    (T, B, H), ``h`` (T+1, B, H) and ``c`` (T+1, B, H, float32) states and, when ``save``,
    ``wh`` (T, B, 4H), ``hh_stats`` and ``cell_stats`` (T, 2, B) (row 0 the mean, row 1 the rstd).
    ``initial``: a float32 (B, 4H) product that step 0 adds to h0 W_hh^T (see
    ``recurrent_projection``), or None."""
    steps, batch, gates = wx.shape
    hidden = gates // 4
    device = wx.device
    layout = step_layout(batch, hidden, NORM_LAYER, training=False)
    h = new_buffer((steps + 1, batch, hidden), w_hh.dtype, device)
    c = new_buffer((steps + 1, batch, hidden), torch.float32, device)
    h[0].copy_(h0)
    c[0].copy_(c0)
    output = new_buffer((steps, batch, hidden), w_hh.dtype, device)
    saved_steps = steps if save else 1
    wh = new_buffer((saved_steps, batch, gates), torch.float32, device)
    hh_stats = new_buffer((saved_steps, 2, batch), torch.float32, device)
    cell_stats = new_buffer((saved_steps, 2, batch), torch.float32, device)
    gate_o = new_buffer((batch, hidden), torch.float32, device)
    hh_partial = new_buffer((layout.unit_programs, 2, batch), torch.float32, device)
    cell_partial = new_buffer((layout.unit_programs, 2, batch), torch.float32, device)
    lengths_arg = lengths if lengths is not None else h0
    arguments = (wx, w_hh, bias, hh_weight, cell_weight, cell_bias, h, c, output, wh, gate_o, hh_partial,
                 cell_partial, hh_stats, cell_stats, lengths_arg, initial if initial is not None else bias, batch,
                 eps)
    constants = dict(**layout.tile_constants(),
                     H=hidden, SAVE=save, HAS_LENGTHS=lengths is not None, HAS_INITIAL=initial is not None,
                     DOT_PRECISION=dot_precision(w_hh.dtype, NORM_LAYER), BLOCK_P=layout.block_p)
    launch_sequence(layer_norm_lstm_forward_phase_kernel, layer_norm_lstm_forward_persistent_kernel, layout, steps,
                    arguments, constants, device, phases=3,
                    persistent_constants=lambda: resident_tiles(layout, 4, hidden, w_hh.dtype, NORM_LAYER))
    result = {"output": output, "h": h, "c": c}
    if save:
        result.update(wh=wh, hh_stats=hh_stats, cell_stats=cell_stats)
    return result
