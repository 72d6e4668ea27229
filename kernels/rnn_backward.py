"""Fused vanilla RNN backward over the whole sequence, the mirror of ``rnn_forward.py``
(reference: ``normrnn/reference/rnn.py``).

Program p owns the same hidden units (and batch tile) as in the forward. Step t, T-1 down to 0:

1. dL/dh_t of its units: ``du_{t+1} W_hh[:, units]`` for rows still running at t+1 (du_{t+1} of
   all H columns was written by every program: the one cross-program read), the carried
   gradient for rows that had ended; dL/dpre_t = dL/dh_t * act'(pre_t).
2. act'(pre_t) comes from h_t as the forward saved it (float32), not from a rebuilt pre_t. Under
   no norm or batch norm everything else is local: dwx_t and du_t through the batch norms
   (which couple the active rows of the program's columns). Under layer norm, du_t needs two row
   sums over all H units (see ``lstm_layer_norm_backward.py``): phase 0 stores
   g = gamma_hh * dL/dpre and publishes its partial row sums, phase 1 finishes du_t in place.

Per-step partial sums of the bias and gain gradients are written per batch tile, (T, tiles, 3, H),
and summed by the caller: no float atomics. In bf16 and fp16 without batch norm du_t is also
stored rounded to the weights' dtype, which the recurrent product rounds it to anyway
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
from .tiles import grid_barrier, load_step_statistics, program_tile, recurrent_gradient, row_activity, step_offset


@triton.jit
def _rnn_backward_local(t, steps, pid, first_row, tile, tiles, wx_ptr, u_ptr, w_hh_ptr, h_ptr, ih_weight_ptr,
                        hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, grad_out_ptr, dh_carry_ptr, dwx_ptr, du_ptr,
                        du_low_ptr, partial_ptr, row_partial_ptr, lengths_ptr, B, H: tl.constexpr, NORM: tl.constexpr,
                        ACTIVATION: tl.constexpr, TRAINING: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                        BLOCK_K: tl.constexpr, LOW_GRAD: tl.constexpr, CHUNKED: tl.constexpr):
    """Phase 0: dL/dh_t, dL/dpre_t, dwx_t, the parameter partials, and du_t (norm None, batch) or
    gamma_hh * dL/dpre_t with its partial row sums (layer); under batch norm with ``CHUNKED``,
    dL/dpre_t in dwx for ``chunked_pair_backward`` to finish. Its rows: grid axis 1
    tiles the batch, or, where a program walks the batch in chunks, the chunk from ``first_row``;
    ``tile`` of ``tiles``: where its parameter partials go."""
    rows, units, row_mask, unit_mask = program_tile(pid, B, H, BLOCK_B, BLOCK_H)
    rows += first_row
    row_mask = rows < B
    tile_mask = row_mask[:, None] & unit_mask[None, :]
    state_offsets = rows[:, None] * H + units[None, :]
    active, active_next = row_activity(t, steps, rows, row_mask, lengths_ptr, HAS_LENGTHS)
    active_f = active.to(tl.float32)[:, None]
    count = tl.sum(active.to(tl.float32), axis=0)
    use_batch = TRAINING & (count >= 2.0)

    carried = tl.load(dh_carry_ptr + state_offsets, mask=tile_mask, other=0.0)
    recurrent = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if t + 1 < steps:
        # du_low is what the product reads: the rounded copy with LOW_GRAD, du itself without
        recurrent = recurrent_gradient(du_low_ptr, w_hh_ptr, t + 1, rows, units, row_mask, unit_mask, B, H, 1,
                                       DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K)
    grad_h_next = tl.where(active_next[:, None], recurrent, carried)
    tl.store(dh_carry_ptr + state_offsets, grad_h_next, mask=tile_mask)
    step_start = step_offset(t, B * H)
    grad_h = (tl.load(grad_out_ptr + step_start + state_offsets, mask=tile_mask, other=0.0).to(tl.float32)
              + grad_h_next) * active_f

    # act'(pre_t) from h_t = act(pre_t) itself, as the forward stored it in float32 (rows that ran
    # at t; grad_h is 0 for the others): the pre-activation need not be rebuilt, so the backward
    # reads wx only under batch norm and u only under a norm
    activated = tl.load(h_ptr + step_offset(t + 1, B * H) + state_offsets, mask=tile_mask, other=0.0)
    if ACTIVATION == 0:
        grad_pre = grad_h * (1.0 - activated * activated)
    elif ACTIVATION == 1:
        grad_pre = tl.where(activated > 0.0, grad_h, 0.0)
    else:
        grad_pre = grad_h
    hh_weight = tl.load(hh_weight_ptr + units, mask=unit_mask, other=0.0)
    if NORM == 2:
        ih_mean, ih_rstd = load_step_statistics(ih_stats_ptr, t, units, unit_mask, H)
        hh_mean, hh_rstd = load_step_statistics(hh_stats_ptr, t, units, unit_mask, H)
        ih_weight = tl.load(ih_weight_ptr + units, mask=unit_mask, other=0.0)
        wx = tl.load(wx_ptr + step_start + state_offsets, mask=tile_mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + step_start + state_offsets, mask=tile_mask, other=0.0)
        wx_hat = (wx - ih_mean[None, :]) * ih_rstd[None, :]
        u_hat = (u - hh_mean[None, :]) * hh_rstd[None, :]
    elif NORM == 1:
        row_mean, row_rstd = load_step_statistics(hh_stats_ptr, t, rows, row_mask, B)
        u = tl.load(u_ptr + step_start + state_offsets, mask=tile_mask, other=0.0)
        u_hat = (u - row_mean[:, None]) * row_rstd[:, None]

    partial = partial_ptr + step_offset(t, tiles * 3 * H) + tile * 3 * H  # (T, batch tiles, 3, H)
    tl.store(partial + units, tl.sum(grad_pre, axis=0), mask=unit_mask)
    if NORM == 2:
        tl.store(partial + H + units, tl.sum(grad_pre * wx_hat, axis=0), mask=unit_mask)
        tl.store(partial + 2 * H + units, tl.sum(grad_pre * u_hat, axis=0), mask=unit_mask)
        if CHUNKED:
            tl.store(dwx_ptr + step_start + state_offsets, grad_pre, mask=tile_mask)
        else:
            grad_wx = batch_norm_backward(grad_pre * ih_weight[None, :], wx_hat, ih_rstd, active_f, count, use_batch)
            grad_u = batch_norm_backward(grad_pre * hh_weight[None, :], u_hat, hh_rstd, active_f, count, use_batch)
            tl.store(dwx_ptr + step_start + state_offsets, grad_wx, mask=tile_mask)
            # float32 operands under batch norm: no rounded copy
            tl.store(du_ptr + step_start + state_offsets, grad_u, mask=tile_mask)
    elif NORM == 1:
        tl.store(partial + 2 * H + units, tl.sum(grad_pre * u_hat, axis=0), mask=unit_mask)
        grad_u_hat = grad_pre * hh_weight[None, :]
        tl.store(dwx_ptr + step_start + state_offsets, grad_pre, mask=tile_mask)
        tl.store(du_ptr + step_start + state_offsets, grad_u_hat, mask=tile_mask)  # finished by phase 1
        store_row_partials(row_partial_ptr, pid, rows, row_mask, B, tl.sum(grad_u_hat, axis=1),
                           tl.sum(grad_u_hat * u_hat, axis=1))
    else:  # dL/dwx = dL/du = dL/dpre: du is dwx's buffer here (``rnn_backward``)
        tl.store(dwx_ptr + step_start + state_offsets, grad_pre, mask=tile_mask)
        if LOW_GRAD:
            tl.store(du_low_ptr + step_start + state_offsets, grad_pre.to(du_low_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _rnn_backward_layer_norm(t, pid, programs, u_ptr, hh_stats_ptr, du_ptr, du_low_ptr, row_partial_ptr, B,
                             H: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
                             LOW_GRAD: tl.constexpr):
    """Phase 1 (layer norm): du_t = rstd * (g - mean(g) - u_hat * mean(g * u_hat)), in place over g."""
    rows, units, row_mask, unit_mask = program_tile(pid, B, H, BLOCK_B, BLOCK_H)  # axis 1 tiles the batch
    tile_mask = row_mask[:, None] & unit_mask[None, :]
    step_start = step_offset(t, B * H)
    offsets = rows[:, None] * H + units[None, :]
    sum_grad, sum_grad_hat = sum_row_partials(row_partial_ptr, rows, row_mask, B, programs, BLOCK_P)
    row_mean, row_rstd = load_step_statistics(hh_stats_ptr, t, rows, row_mask, B)
    u_hat = (tl.load(u_ptr + step_start + offsets, mask=tile_mask, other=0.0) - row_mean[:, None]) * row_rstd[:, None]
    grad_u_hat = tl.load(du_ptr + step_start + offsets, mask=tile_mask, other=0.0)
    grad_u = row_rstd[:, None] * (grad_u_hat - (sum_grad / H)[:, None] - u_hat * (sum_grad_hat / H)[:, None])
    tl.store(du_ptr + step_start + offsets, grad_u, mask=tile_mask)
    if LOW_GRAD:
        tl.store(du_low_ptr + step_start + offsets, grad_u.to(du_low_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _rnn_backward_chunked(t, steps, pid, wx_ptr, u_ptr, w_hh_ptr, h_ptr, ih_weight_ptr, hh_weight_ptr,
                          ih_stats_ptr, hh_stats_ptr, grad_out_ptr, dh_carry_ptr, dwx_ptr, du_ptr, du_low_ptr,
                          partial_ptr, row_partial_ptr, lengths_ptr, B, H: tl.constexpr, ACTIVATION: tl.constexpr,
                          TRAINING: tl.constexpr, HAS_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                          LOW_GRAD: tl.constexpr):
    """Backward step t under batch norm in training for a batch of more than one tile: the local
    backward of each chunk of BLOCK_B rows, then the batch norms' backward over all of them."""
    tiles = tl.cdiv(B, BLOCK_B)
    for tile in range(tiles):
        _rnn_backward_local(t, steps, pid, tile * BLOCK_B, tile, tiles, wx_ptr, u_ptr, w_hh_ptr, h_ptr,
                            ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, grad_out_ptr, dh_carry_ptr,
                            dwx_ptr, du_ptr, du_low_ptr, partial_ptr, row_partial_ptr, lengths_ptr, B, H, 2,
                            ACTIVATION, TRAINING, HAS_LENGTHS, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, LOW_GRAD,
                            True)
    tl.debug_barrier()  # the second pass reads back what other threads of this program stored
    # partials per chunk: (bias, ih gain, hh gain) = (sum dpre, sum dpre wx_hat, sum dpre u_hat); dpre is both
    # da and du; float32 operands under batch norm: no rounded copy of du
    chunked_pair_backward(t, pid, wx_ptr, u_ptr, ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, dwx_ptr,
                          dwx_ptr, du_ptr, du_ptr, partial_ptr, lengths_ptr, B, H, 1, 3, 0, 1, 2, TRAINING,
                          HAS_LENGTHS, BLOCK_B, BLOCK_H, False)


# t unspecialized: one compiled kernel serves every step (Triton compiles t == 1 and t % 16 == 0 apart)
@triton.jit(do_not_specialize=["t", "steps"])
def rnn_backward_step_kernel(t, steps, wx_ptr, u_ptr, w_hh_ptr, h_ptr, ih_weight_ptr, hh_weight_ptr, ih_stats_ptr,
                             hh_stats_ptr, grad_out_ptr, dh_carry_ptr, dwx_ptr, du_ptr, du_low_ptr, partial_ptr,
                             row_partial_ptr, lengths_ptr, B, H: tl.constexpr, NORM: tl.constexpr,
                             ACTIVATION: tl.constexpr, TRAINING: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                             DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, LOW_GRAD: tl.constexpr,
                             CHUNKED: tl.constexpr, PHASE: tl.constexpr):
    """Backward step ``t`` (norm None, batch) or one of its two phases (layer). ``CHUNKED``: the
    batch norm's batch walked in chunks (``batch_norm.py``)."""
    pid = tl.program_id(0)
    if CHUNKED:
        _rnn_backward_chunked(t, steps, pid, wx_ptr, u_ptr, w_hh_ptr, h_ptr, ih_weight_ptr, hh_weight_ptr,
                              ih_stats_ptr, hh_stats_ptr, grad_out_ptr, dh_carry_ptr, dwx_ptr, du_ptr, du_low_ptr,
                              partial_ptr, row_partial_ptr, lengths_ptr, B, H, ACTIVATION, TRAINING, HAS_LENGTHS,
                              DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, LOW_GRAD)
    elif PHASE == 0:
        _rnn_backward_local(t, steps, pid, 0, tl.program_id(1), tl.num_programs(1), wx_ptr, u_ptr, w_hh_ptr, h_ptr,
                            ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, grad_out_ptr, dh_carry_ptr,
                            dwx_ptr, du_ptr, du_low_ptr, partial_ptr, row_partial_ptr, lengths_ptr, B, H, NORM,
                            ACTIVATION, TRAINING, HAS_LENGTHS, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, LOW_GRAD,
                            False)
    else:
        _rnn_backward_layer_norm(t, pid, tl.num_programs(0), u_ptr, hh_stats_ptr, du_ptr, du_low_ptr, row_partial_ptr,
                                 B, H, BLOCK_B, BLOCK_H, BLOCK_P, LOW_GRAD)


# steps unspecialized: one compiled kernel serves every sequence length
@triton.jit(do_not_specialize=["steps"])
def rnn_backward_persistent_kernel(steps, barrier_ptr, wx_ptr, u_ptr, w_hh_ptr, h_ptr, ih_weight_ptr, hh_weight_ptr,
                                   ih_stats_ptr, hh_stats_ptr, grad_out_ptr, dh_carry_ptr, dwx_ptr, du_ptr, du_low_ptr,
                                   partial_ptr, row_partial_ptr, lengths_ptr, B, H: tl.constexpr, NORM: tl.constexpr,
                                   ACTIVATION: tl.constexpr, TRAINING: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                                   DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                                   BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, LOW_GRAD: tl.constexpr,
                                   CHUNKED: tl.constexpr):
    """All timesteps, T-1 down to 0: one grid barrier a step (two under layer norm)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    grid_programs = programs * tl.num_programs(1)
    for step in range(steps):
        t = steps - 1 - step
        if CHUNKED:
            _rnn_backward_chunked(t, steps, pid, wx_ptr, u_ptr, w_hh_ptr, h_ptr, ih_weight_ptr, hh_weight_ptr,
                                  ih_stats_ptr, hh_stats_ptr, grad_out_ptr, dh_carry_ptr, dwx_ptr, du_ptr, du_low_ptr,
                                  partial_ptr, row_partial_ptr, lengths_ptr, B, H, ACTIVATION, TRAINING, HAS_LENGTHS,
                                  DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, LOW_GRAD)
        else:
            _rnn_backward_local(t, steps, pid, 0, tl.program_id(1), tl.num_programs(1), wx_ptr, u_ptr, w_hh_ptr,
                                h_ptr, ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr, grad_out_ptr,
                                dh_carry_ptr, dwx_ptr, du_ptr, du_low_ptr, partial_ptr, row_partial_ptr, lengths_ptr, B,
                                H, NORM, ACTIVATION, TRAINING, HAS_LENGTHS, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K,
                                LOW_GRAD, False)
        if NORM == 1:
            grid_barrier(barrier_ptr, (2 * step + 1) * grid_programs)
            _rnn_backward_layer_norm(t, pid, programs, u_ptr, hh_stats_ptr, du_ptr, du_low_ptr, row_partial_ptr, B, H,
                                     BLOCK_B, BLOCK_H, BLOCK_P, LOW_GRAD)
            grid_barrier(barrier_ptr, (2 * step + 2) * grid_programs)
        else:
            grid_barrier(barrier_ptr, (step + 1) * grid_programs)


def rnn_backward(saved, grad_output, grad_h_n, wx, w_hh, ih_weight, hh_weight, lengths, norm: int, activation: int,
                 training: bool):
    """Launches the backward over all steps; ``saved`` is the dict of ``rnn_forward(save=True)``.
    ``wx`` is read under batch norm only (elsewhere the activation's derivative comes from the
    saved h), and may be None otherwise.

    Returns dwx and du (T, B, H, float32; without a norm one tensor, both being dL/dpre), dh_0
    (B, H, float32) and the per-step partial sums ``partials`` (T, 3, H) = (bias, ih gain, hh
    gain)."""
    steps, batch, hidden = saved["h"].shape
    steps -= 1
    device = saved["h"].device
    layout = step_layout(batch, hidden, norm, training)
    dh_carry = grad_h_n.to(torch.float32).contiguous().clone()
    dwx = new_buffer((steps, batch, hidden), torch.float32, device)
    du = new_buffer((steps, batch, hidden), torch.float32, device) if norm != NORM_NONE else dwx
    low_grad = low_precision_gradient(w_hh.dtype, norm)
    du_low = new_buffer((steps, batch, hidden), w_hh.dtype, device) if low_grad else du
    partials = new_buffer((steps, layout.row_tiles, 3, hidden), torch.float32, device)
    if norm != NORM_BATCH:
        partials[:, :, 1:].zero_()
    row_partial = new_buffer((layout.unit_programs, 2, batch), torch.float32, device)
    lengths_arg = lengths if lengths is not None else dh_carry
    unread = saved["h"]  # stands in for wx where the kernels do not read it
    arguments = (wx if norm == NORM_BATCH else unread, saved["u"], w_hh, saved["h"], ih_weight, hh_weight,
                 saved["ih_stats"], saved["hh_stats"], grad_output.contiguous(), dh_carry, dwx, du, du_low, partials,
                 row_partial, lengths_arg, batch)
    constants = dict(**layout.tile_constants(),
                     H=hidden, NORM=norm, ACTIVATION=activation, TRAINING=training, HAS_LENGTHS=lengths is not None,
                     DOT_PRECISION=dot_precision(w_hh.dtype, norm), BLOCK_P=layout.block_p, LOW_GRAD=low_grad,
                     CHUNKED=layout.chunked)
    launch_sequence(rnn_backward_step_kernel, rnn_backward_persistent_kernel, layout, steps, arguments, constants,
                    device, backward=True, phases=2 if norm == NORM_LAYER else 1)
    # Every sequence is active at step 0 (lengths >= 1), so dL/dh_0 comes through W_hh alone.
    grad_h0 = torch.matmul(du[0], w_hh.float())
    return {"dwx": dwx, "du": du, "dh0": grad_h0, "partials": partials.sum(1)}
