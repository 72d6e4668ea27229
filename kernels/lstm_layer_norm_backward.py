"""Fused layer-norm LSTM backward over the whole sequence, the mirror of
``lstm_layer_norm_forward.py`` (reference: ``normrnn/reference/lstm.py``, norm="layer").

Program p owns the same hidden units as in the forward. The backward of a layer norm
y = gamma * v_hat + beta over n features needs two row sums over all n of them:

    dL/dv = rstd * (g - mean(g) - v_hat * mean(g * v_hat)),   g = gamma * dL/dy,

so each step t (from T-1 down to 0) runs in three phases with an exchange of per-program
partial sums between them:

1. dL/dh_t of the program's units (``dwh_{t+1} W_hh[:, units]`` for rows still running at t+1,
   the carried gradient for rows that had ended), the gates' and the cell norm's backward up
   to g_c = gamma_c * dL/dy_c, and the partial row sums of g_c and g_c * c_hat;
2. dL/dc_t, the carried cell gradient, dL/dz of the program's 4 x BLOCK_H columns (which is
   also the gradient of the layer-normalized input projection), and the partial row sums of
   g_hh = gamma_hh * dL/dz and g_hh * wh_hat;
3. dwh_t = dL/d(h_{t-1} W_hh^T), which step t-1 reads from every program.

Phase 2 recomputes what phase 1 computed from the saved states rather than storing it: a few
elementwise operations cost less than a round trip through memory. The per-step partial sums of
the bias and gain gradients are summed over steps by the caller (no float atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .buffers import new_buffer
from .layer_norm import store_row_partials, sum_row_partials
from .layout import NORM_LAYER, dot_precision, low_precision_gradient, step_layout
from .lstm_layer_norm_forward import _gate
from .sequence_launch import launch_sequence
from .tiles import (grid_barrier, load_step_statistics, program_tile, recurrent_gradient, row_active, row_activity,
                    step_offset, tanh)


@triton.jit
def _recompute_cell(t, rows, units, row_mask, unit_mask, tile_mask, active_f, wx_ptr, wh_ptr, bias_ptr, hh_weight_ptr,
                    cell_weight_ptr, cell_bias_ptr, c_ptr, grad_out_ptr, grad_h_next, hh_stats_ptr, cell_stats_ptr,
                    B, H: tl.constexpr):
    """The forward of step t for the program's units, and the backward down to the cell norm
    (``grad_h_next`` is dL/dh_t through the later steps): returns the gates, c_{t-1}, c_hat,
    gamma_c * dL/dy_c, dL/dy_c and dL/dz_o."""
    hh_mean, hh_rstd = load_step_statistics(hh_stats_ptr, t, rows, row_mask, B)
    z_i = _gate(0, t, rows, units, tile_mask, unit_mask, wx_ptr, wh_ptr, bias_ptr, hh_weight_ptr, hh_mean, hh_rstd, t, B, H)
    z_f = _gate(1, t, rows, units, tile_mask, unit_mask, wx_ptr, wh_ptr, bias_ptr, hh_weight_ptr, hh_mean, hh_rstd, t, B, H)
    z_g = _gate(2, t, rows, units, tile_mask, unit_mask, wx_ptr, wh_ptr, bias_ptr, hh_weight_ptr, hh_mean, hh_rstd, t, B, H)
    z_o = _gate(3, t, rows, units, tile_mask, unit_mask, wx_ptr, wh_ptr, bias_ptr, hh_weight_ptr, hh_mean, hh_rstd, t, B, H)
    gate_i = tl.sigmoid(z_i)
    gate_f = tl.sigmoid(z_f)
    gate_g = tanh(z_g)
    gate_o = tl.sigmoid(z_o)
    state_offsets = rows[:, None] * H + units[None, :]
    c_prev = tl.load(c_ptr + step_offset(t, B * H) + state_offsets, mask=tile_mask, other=0.0)
    c_new = tl.load(c_ptr + step_offset(t + 1, B * H) + state_offsets, mask=tile_mask, other=0.0)
    cell_mean, cell_rstd = load_step_statistics(cell_stats_ptr, t, rows, row_mask, B)
    c_hat = (c_new - cell_mean[:, None]) * cell_rstd[:, None]
    cell_weight = tl.load(cell_weight_ptr + units, mask=unit_mask, other=0.0)
    cell_bias = tl.load(cell_bias_ptr + units, mask=unit_mask, other=0.0)
    tanh_c = tanh(c_hat * cell_weight[None, :] + cell_bias[None, :])
    grad_h = (tl.load(grad_out_ptr + step_offset(t, B * H) + state_offsets, mask=tile_mask, other=0.0).to(tl.float32)
              + grad_h_next) * active_f
    grad_y = grad_h * gate_o * (1.0 - tanh_c * tanh_c)
    grad_z_o = grad_h * tanh_c * gate_o * (1.0 - gate_o)
    return gate_i, gate_f, gate_g, c_prev, c_hat, cell_rstd, grad_y * cell_weight[None, :], grad_y, grad_z_o


@triton.jit
def _phase_hidden_gradient(t, steps, pid, wx_ptr, wh_ptr, w_hh_ptr, bias_ptr, hh_weight_ptr, cell_weight_ptr,
                           cell_bias_ptr, c_ptr, grad_out_ptr, dh_carry_ptr, dwh_ptr, dwh_low_ptr, hh_stats_ptr,
                           cell_stats_ptr, cell_partial_ptr, cell_param_partial_ptr, lengths_ptr, B, H: tl.constexpr,
                           HAS_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, LOW_GRAD: tl.constexpr):
    """Phase 1: dL/dh_t, then the cell norm's partial row sums and parameter partials."""
    rows, units, row_mask, unit_mask = program_tile(pid, B, H, BLOCK_B, BLOCK_H)  # axis 1 tiles the batch
    tile_mask = row_mask[:, None] & unit_mask[None, :]
    state_offsets = rows[:, None] * H + units[None, :]
    active, active_next = row_activity(t, steps, rows, row_mask, lengths_ptr, HAS_LENGTHS)
    carried = tl.load(dh_carry_ptr + state_offsets, mask=tile_mask, other=0.0)
    recurrent = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if t + 1 < steps:
        # dwh_low is what the product reads: the rounded copy with LOW_GRAD (low_precision_gradient in
        # lstm_backward.py), dwh itself without
        recurrent = recurrent_gradient(dwh_low_ptr, w_hh_ptr, t + 1, rows, units, row_mask, unit_mask, B, H, 4,
                                       DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K)
    grad_h_next = tl.where(active_next[:, None], recurrent, carried)
    tl.store(dh_carry_ptr + state_offsets, grad_h_next, mask=tile_mask)
    active_f = active.to(tl.float32)[:, None]
    (gate_i, gate_f, gate_g, c_prev, c_hat, cell_rstd, grad_c_hat, grad_y,
     grad_z_o) = _recompute_cell(t, rows, units, row_mask, unit_mask, tile_mask, active_f, wx_ptr, wh_ptr, bias_ptr,
                                 hh_weight_ptr, cell_weight_ptr, cell_bias_ptr, c_ptr, grad_out_ptr, grad_h_next,
                                 hh_stats_ptr, cell_stats_ptr, B, H)
    cell_param_partial = cell_param_partial_ptr + step_offset(t, tl.num_programs(1) * 2 * H) + tl.program_id(1) * 2 * H
    tl.store(cell_param_partial + units, tl.sum(grad_y * c_hat, axis=0), mask=unit_mask)
    tl.store(cell_param_partial + H + units, tl.sum(grad_y, axis=0), mask=unit_mask)
    store_row_partials(cell_partial_ptr, pid, rows, row_mask, B, tl.sum(grad_c_hat, axis=1),
                       tl.sum(grad_c_hat * c_hat, axis=1))


@triton.jit
def _gate_gradient(gate, t, grad_z, rows, units, row_mask, unit_mask, tile_mask, wh_ptr, hh_weight_ptr, hh_mean,
                   hh_rstd, dwx_ptr, dwh_ptr, partial_ptr, B, H: tl.constexpr):
    """Stores dL/dz of one gate as dwx and (scaled by gamma_hh, finished in phase 3) as dwh, and
    this step's bias and gain partials; returns this gate's share of the two row sums."""
    columns = gate * H + units
    step_start = step_offset(t, B * 4 * H)
    offsets = rows[:, None] * (4 * H) + columns[None, :]
    wh = tl.load(wh_ptr + step_start + offsets, mask=tile_mask, other=0.0)
    wh_hat = (wh - hh_mean[:, None]) * hh_rstd[:, None]
    weight = tl.load(hh_weight_ptr + columns, mask=unit_mask, other=0.0)
    grad_wh_hat = grad_z * weight[None, :]
    tl.store(dwx_ptr + step_start + offsets, grad_z, mask=tile_mask)
    tl.store(dwh_ptr + step_start + offsets, grad_wh_hat, mask=tile_mask)
    partial = partial_ptr + step_offset(t, tl.num_programs(1) * 12 * H) + tl.program_id(1) * 12 * H
    tl.store(partial + columns, tl.sum(grad_z, axis=0), mask=unit_mask)
    tl.store(partial + 8 * H + columns, tl.sum(grad_z * wh_hat, axis=0), mask=unit_mask)
    return tl.sum(grad_wh_hat, axis=1), tl.sum(grad_wh_hat * wh_hat, axis=1)


@triton.jit
def _phase_gate_gradient(t, pid, programs, wx_ptr, wh_ptr, bias_ptr, hh_weight_ptr, cell_weight_ptr, cell_bias_ptr,
                         c_ptr, grad_out_ptr, dh_carry_ptr, dc_carry_ptr, dwx_ptr, dwh_ptr, hh_stats_ptr,
                         cell_stats_ptr, cell_partial_ptr, hh_partial_ptr, partial_ptr, lengths_ptr, B,
                         H: tl.constexpr, HAS_LENGTHS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_P: tl.constexpr):
    """Phase 2: the cell norm's backward, dL/dc_t, dL/dz and the recurrent norm's partial row sums."""
    rows, units, row_mask, unit_mask = program_tile(pid, B, H, BLOCK_B, BLOCK_H)  # axis 1 tiles the batch
    tile_mask = row_mask[:, None] & unit_mask[None, :]
    state_offsets = rows[:, None] * H + units[None, :]
    active = row_active(t, rows, row_mask, lengths_ptr, HAS_LENGTHS)
    active_f = active.to(tl.float32)[:, None]
    grad_h_next = tl.load(dh_carry_ptr + state_offsets, mask=tile_mask, other=0.0)  # written by phase 1
    (gate_i, gate_f, gate_g, c_prev, c_hat, cell_rstd, grad_c_hat, grad_y,
     grad_z_o) = _recompute_cell(t, rows, units, row_mask, unit_mask, tile_mask, active_f, wx_ptr, wh_ptr, bias_ptr,
                                 hh_weight_ptr, cell_weight_ptr, cell_bias_ptr, c_ptr, grad_out_ptr, grad_h_next,
                                 hh_stats_ptr, cell_stats_ptr, B, H)
    sum_grad, sum_grad_hat = sum_row_partials(cell_partial_ptr, rows, row_mask, B, programs, BLOCK_P)
    grad_c_from_h = cell_rstd[:, None] * (grad_c_hat - sum_grad[:, None] / H - c_hat * (sum_grad_hat / H)[:, None])
    dc_next = tl.load(dc_carry_ptr + state_offsets, mask=tile_mask, other=0.0)
    grad_c = (dc_next + grad_c_from_h) * active_f
    tl.store(dc_carry_ptr + state_offsets, tl.where(active[:, None], grad_c * gate_f, dc_next), mask=tile_mask)
    hh_mean, hh_rstd = load_step_statistics(hh_stats_ptr, t, rows, row_mask, B)
    first_i, second_i = _gate_gradient(0, t, grad_c * gate_g * gate_i * (1.0 - gate_i), rows, units, row_mask,
                                       unit_mask, tile_mask, wh_ptr, hh_weight_ptr, hh_mean, hh_rstd, dwx_ptr, dwh_ptr,
                                       partial_ptr, B, H)
    first_f, second_f = _gate_gradient(1, t, grad_c * c_prev * gate_f * (1.0 - gate_f), rows, units, row_mask,
                                       unit_mask, tile_mask, wh_ptr, hh_weight_ptr, hh_mean, hh_rstd, dwx_ptr, dwh_ptr,
                                       partial_ptr, B, H)
    first_g, second_g = _gate_gradient(2, t, grad_c * gate_i * (1.0 - gate_g * gate_g), rows, units, row_mask,
                                       unit_mask, tile_mask, wh_ptr, hh_weight_ptr, hh_mean, hh_rstd, dwx_ptr, dwh_ptr,
                                       partial_ptr, B, H)
    first_o, second_o = _gate_gradient(3, t, grad_z_o, rows, units, row_mask, unit_mask, tile_mask, wh_ptr,
                                       hh_weight_ptr, hh_mean, hh_rstd, dwx_ptr, dwh_ptr, partial_ptr, B, H)
    store_row_partials(hh_partial_ptr, pid, rows, row_mask, B, first_i + first_f + first_g + first_o,
                       second_i + second_f + second_g + second_o)


@triton.jit
def _phase_recurrent_gradient(t, pid, programs, wh_ptr, dwh_ptr, dwh_low_ptr, hh_stats_ptr, hh_partial_ptr, B,
                              H: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
                              LOW_GRAD: tl.constexpr):
    """Phase 3: dwh_t through the recurrent layer norm, in place over gamma_hh * dL/dz (with
    ``LOW_GRAD`` also rounded to the weights' dtype into dwh_low)."""
    rows, units, row_mask, unit_mask = program_tile(pid, B, H, BLOCK_B, BLOCK_H)  # axis 1 tiles the batch
    tile_mask = row_mask[:, None] & unit_mask[None, :]
    sum_grad, sum_grad_hat = sum_row_partials(hh_partial_ptr, rows, row_mask, B, programs, BLOCK_P)
    mean_grad = sum_grad / (4 * H)
    mean_grad_hat = sum_grad_hat / (4 * H)
    hh_mean, hh_rstd = load_step_statistics(hh_stats_ptr, t, rows, row_mask, B)
    step_start = step_offset(t, B * 4 * H)
    for gate in range(4):
        offsets = rows[:, None] * (4 * H) + gate * H + units[None, :]
        wh_hat = ((tl.load(wh_ptr + step_start + offsets, mask=tile_mask, other=0.0) - hh_mean[:, None])
                  * hh_rstd[:, None])
        grad_wh_hat = tl.load(dwh_ptr + step_start + offsets, mask=tile_mask, other=0.0)
        grad_wh = hh_rstd[:, None] * (grad_wh_hat - mean_grad[:, None] - wh_hat * mean_grad_hat[:, None])
        tl.store(dwh_ptr + step_start + offsets, grad_wh, mask=tile_mask)
        if LOW_GRAD:
            tl.store(dwh_low_ptr + step_start + offsets, grad_wh.to(dwh_low_ptr.dtype.element_ty), mask=tile_mask)


# t unspecialized: one compiled kernel serves every step (Triton compiles t == 1 and t % 16 == 0 apart)
@triton.jit(do_not_specialize=["t", "steps"])
def layer_norm_lstm_backward_phase_kernel(t, steps, wx_ptr, wh_ptr, w_hh_ptr, bias_ptr, hh_weight_ptr, cell_weight_ptr,
                                          cell_bias_ptr, c_ptr, grad_out_ptr, dh_carry_ptr, dc_carry_ptr, dwx_ptr,
                                          dwh_ptr, dwh_low_ptr, hh_stats_ptr, cell_stats_ptr, cell_partial_ptr,
                                          hh_partial_ptr, partial_ptr, cell_param_partial_ptr, lengths_ptr, B,
                                          H: tl.constexpr, HAS_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                          BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                                          BLOCK_P: tl.constexpr, LOW_GRAD: tl.constexpr, PHASE: tl.constexpr):
    """One phase (0, 1, 2) of backward step ``t``; the launch boundary is the exchange."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    if PHASE == 0:
        _phase_hidden_gradient(t, steps, pid, wx_ptr, wh_ptr, w_hh_ptr, bias_ptr, hh_weight_ptr, cell_weight_ptr,
                               cell_bias_ptr, c_ptr, grad_out_ptr, dh_carry_ptr, dwh_ptr, dwh_low_ptr, hh_stats_ptr,
                               cell_stats_ptr, cell_partial_ptr, cell_param_partial_ptr, lengths_ptr, B, H, HAS_LENGTHS,
                               DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, LOW_GRAD)
    elif PHASE == 1:
        _phase_gate_gradient(t, pid, programs, wx_ptr, wh_ptr, bias_ptr, hh_weight_ptr, cell_weight_ptr, cell_bias_ptr,
                             c_ptr, grad_out_ptr, dh_carry_ptr, dc_carry_ptr, dwx_ptr, dwh_ptr, hh_stats_ptr,
                             cell_stats_ptr, cell_partial_ptr, hh_partial_ptr, partial_ptr, lengths_ptr, B, H,
                             HAS_LENGTHS, BLOCK_B, BLOCK_H, BLOCK_P)
    else:
        _phase_recurrent_gradient(t, pid, programs, wh_ptr, dwh_ptr, dwh_low_ptr, hh_stats_ptr, hh_partial_ptr, B, H,
                                  BLOCK_B, BLOCK_H, BLOCK_P, LOW_GRAD)


# steps unspecialized: one compiled kernel serves every sequence length
@triton.jit(do_not_specialize=["steps"])
def layer_norm_lstm_backward_persistent_kernel(steps, barrier_ptr, wx_ptr, wh_ptr, w_hh_ptr, bias_ptr, hh_weight_ptr,
                                               cell_weight_ptr, cell_bias_ptr, c_ptr, grad_out_ptr, dh_carry_ptr,
                                               dc_carry_ptr, dwx_ptr, dwh_ptr, dwh_low_ptr, hh_stats_ptr,
                                               cell_stats_ptr, cell_partial_ptr, hh_partial_ptr, partial_ptr,
                                               cell_param_partial_ptr, lengths_ptr, B, H: tl.constexpr,
                                               HAS_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                               BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                                               BLOCK_P: tl.constexpr, LOW_GRAD: tl.constexpr):
    """All timesteps, T-1 down to 0, a grid barrier after each of the three phases."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)  # hidden-unit blocks: the partial statistics to combine
    grid_programs = programs * tl.num_programs(1)
    for step in range(steps):
        t = steps - 1 - step
        _phase_hidden_gradient(t, steps, pid, wx_ptr, wh_ptr, w_hh_ptr, bias_ptr, hh_weight_ptr, cell_weight_ptr,
                               cell_bias_ptr, c_ptr, grad_out_ptr, dh_carry_ptr, dwh_ptr, dwh_low_ptr, hh_stats_ptr,
                               cell_stats_ptr, cell_partial_ptr, cell_param_partial_ptr, lengths_ptr, B, H, HAS_LENGTHS,
                               DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, LOW_GRAD)
        grid_barrier(barrier_ptr, (3 * step + 1) * grid_programs)
        _phase_gate_gradient(t, pid, programs, wx_ptr, wh_ptr, bias_ptr, hh_weight_ptr, cell_weight_ptr, cell_bias_ptr,
                             c_ptr, grad_out_ptr, dh_carry_ptr, dc_carry_ptr, dwx_ptr, dwh_ptr, hh_stats_ptr,
                             cell_stats_ptr, cell_partial_ptr, hh_partial_ptr, partial_ptr, lengths_ptr, B, H,
                             HAS_LENGTHS, BLOCK_B, BLOCK_H, BLOCK_P)
        grid_barrier(barrier_ptr, (3 * step + 2) * grid_programs)
        _phase_recurrent_gradient(t, pid, programs, wh_ptr, dwh_ptr, dwh_low_ptr, hh_stats_ptr, hh_partial_ptr, B, H,
                                  BLOCK_B, BLOCK_H, BLOCK_P, LOW_GRAD)
        grid_barrier(barrier_ptr, (3 * step + 3) * grid_programs)


def layer_norm_lstm_backward(saved, grad_output, grad_h_n, grad_c_n, wx, w_hh, bias, hh_weight, cell_weight,
                             cell_bias, lengths):
    """Launches the backward over all steps. ``saved`` is the dict of ``layer_norm_lstm_forward(save=True)``.

    Returns dwx (the gradient of the layer-normalized input projection) and dwh (T, B, 4H,
    float32), dh_0, dc_0 (B, H, float32) and the per-step partial sums ``partials`` (T, 3, 4H) =
    (bias, zeros, hh gain) and ``cell_partials`` (T, 2, H) = (cell gain, cell shift), laid out as
    ``lstm_backward`` returns them."""
    steps, batch, gates = wx.shape
    hidden = gates // 4
    device = wx.device
    layout = step_layout(batch, hidden, NORM_LAYER, training=False)
    dh_carry = grad_h_n.to(torch.float32).contiguous().clone()
    dc_carry = grad_c_n.to(torch.float32).contiguous().clone()
    dwx = new_buffer((steps, batch, gates), torch.float32, device)
    dwh = new_buffer((steps, batch, gates), torch.float32, device)
    low_grad = low_precision_gradient(w_hh.dtype, NORM_LAYER)
    dwh_low = new_buffer((steps, batch, gates), w_hh.dtype, device) if low_grad else dwh
    partials = new_buffer((steps, layout.grid[1], 3, gates), torch.float32, device)
    partials[:, :, 1].zero_()  # the input projection's norm is differentiated outside the kernel
    cell_partials = new_buffer((steps, layout.grid[1], 2, hidden), torch.float32, device)
    cell_partial = new_buffer((layout.unit_programs, 2, batch), torch.float32, device)
    hh_partial = new_buffer((layout.unit_programs, 2, batch), torch.float32, device)
    lengths_arg = lengths if lengths is not None else dh_carry
    arguments = (wx, saved["wh"], w_hh, bias, hh_weight, cell_weight, cell_bias, saved["c"],
                 grad_output.contiguous(), dh_carry, dc_carry, dwx, dwh, dwh_low, saved["hh_stats"],
                 saved["cell_stats"], cell_partial, hh_partial, partials, cell_partials, lengths_arg, batch)
    constants = dict(**layout.tile_constants(),
                     H=hidden, HAS_LENGTHS=lengths is not None, DOT_PRECISION=dot_precision(w_hh.dtype, NORM_LAYER),
                     BLOCK_P=layout.block_p, LOW_GRAD=low_grad)
    launch_sequence(layer_norm_lstm_backward_phase_kernel, layer_norm_lstm_backward_persistent_kernel, layout,
                    steps, arguments, constants, device, backward=True, phases=3)
    # Every sequence is active at step 0 (lengths >= 1), so dL/dh_0 comes through W_hh alone.
    grad_h0 = torch.matmul(dwh[0].to(w_hh.dtype), w_hh).float()
    return {"dwx": dwx, "dwh": dwh, "dh0": grad_h0, "dc0": dc_carry, "partials": partials.sum(1),
            "cell_partials": cell_partials.sum(1)}
