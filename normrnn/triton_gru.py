"""The fused GRU of ``normrnn.kernels.gru_*`` behind ``torch.library`` custom ops.

``normrnn::gru_forward`` and ``normrnn::gru_backward`` have fake (meta) implementations and a
registered autograd formula, so ``torch.compile(fullgraph=True)`` traces a model that uses them.
Around the ops, plain PyTorch does what needs no recurrence: x W_ih^T for all timesteps (and its
layer norm or sequence-wise batch norm) before the loop, dW_hh = sum_t dwh_t^T h_{t-1} after it.

    a_t = N_ih(W_ih x_t) + b_ih,  u_t = N_hh(W_hh h_{t-1}) + b_hh,  r, z = sigmoid(a + u),
    n = tanh(a_n + r * u_n),  h_t = (1 - z) * n + z * h_{t-1}
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .kernels.gru_backward import gru_backward
from .kernels.gru_forward import gru_forward
from .kernels.layout import NORM_BATCH, NORM_LAYER, NORM_NONE
from .first_derivatives import needs_gradient
from .params import DirectionParams, Padding
from .triton_ops import (NORM_CODES, gradient_or_zeros, kernel_lengths, new_empty,
                         no_second_derivative, nothing_saved, on_the_tensors_device, pair_norm_tensors, project_inputs,
                         recurrent_weight_gradient, require_saved, store_running_statistics)


@torch.library.custom_op("normrnn::gru_forward", mutates_args=())
@on_the_tensors_device
def gru_forward_op(wx: Tensor, h0: Tensor, w_hh: Tensor, bias_ih: Tensor, bias_hh: Tensor, ih_weight: Tensor,
                   hh_weight: Tensor, running: List[Tensor], lengths: Optional[Tensor], norm: int, training: bool,
                   save: bool, momentum: float, eps: float
                   ) -> Tuple[Tensor, Tensor, List[Tensor], Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused GRU forward. Returns output, h_n, the updated running statistics (a functional op:
    the caller copies them into its buffers) and, when ``save``, h, wh, ih_stats, hh_stats and
    candidate (n, without a norm; empty under one): see ``normrnn.kernels.gru_forward``."""
    updated = [statistic.clone() for statistic in running]
    result = gru_forward(wx, h0, w_hh, bias_ih, bias_hh, ih_weight, hh_weight, updated, lengths, norm, training, save,
                         momentum, eps)
    h = result["h"]
    h_n = h[-1].to(h0.dtype, copy=True)
    if not save:
        return (result["output"], h_n, updated, *nothing_saved(wx, 5))
    candidate = result.get("candidate", new_empty(wx, (0,), torch.float32))
    return result["output"], h_n, updated, h, result["wh"], result["ih_stats"], result["hh_stats"], candidate


@gru_forward_op.register_fake
def _(wx, h0, w_hh, bias_ih, bias_hh, ih_weight, hh_weight, running, lengths, norm, training, save, momentum, eps):
    steps, batch, gates = wx.shape
    hidden = gates // 3
    output = new_empty(wx, (steps, batch, hidden), w_hh.dtype)
    updated = [new_empty(statistic, statistic.shape) for statistic in running]
    if not save:
        return (output, new_empty(h0, h0.shape), updated, *nothing_saved(wx, 5))
    return (output, new_empty(h0, h0.shape), updated,
            new_empty(wx, (steps + 1, batch, hidden), torch.float32),
            new_empty(wx, (steps, batch, gates), torch.float32),
            new_empty(wx, (steps if norm == NORM_BATCH else 1, 2, gates), torch.float32),
            new_empty(wx, (1, 2, gates) if norm == NORM_NONE else (steps, 2, batch if norm == NORM_LAYER else gates),
                      torch.float32),
            new_empty(wx, (steps, batch, hidden) if norm == NORM_NONE else (0,), torch.float32))


@torch.library.custom_op("normrnn::gru_backward", mutates_args=())
@on_the_tensors_device
def gru_backward_op(grad_output: Tensor, grad_h_n: Tensor, wx: Tensor, w_hh: Tensor, bias_ih: Tensor,
                    bias_hh: Tensor, ih_weight: Tensor, hh_weight: Tensor, h: Tensor, wh: Tensor, ih_stats: Tensor,
                    hh_stats: Tensor, candidate: Tensor, lengths: Optional[Tensor], norm: int, training: bool
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused GRU backward: the gradients of wx, h0, W_hh, the two biases and the two gains.
    ``wx``: x W_ih^T, or without a norm an empty tensor of its dtype (``wh`` and ``candidate``
    hold the gates there)."""
    saved = {"h": h, "wh": wh, "ih_stats": ih_stats, "hh_stats": hh_stats, "candidate": candidate}
    result = gru_backward(saved, grad_output, grad_h_n, wx, w_hh, bias_ih, bias_hh, ih_weight, hh_weight, lengths,
                          norm, training)
    grad_w_hh = torch.cat([recurrent_weight_gradient(piece, h) for piece in result["dwh_pieces"]])
    partials = result["partials"].sum(0)
    return (result["dwx"].to(wx.dtype), result["dh0"].to(w_hh.dtype), grad_w_hh.to(w_hh.dtype), partials[0].clone(),
            partials[1].clone(), partials[2].clone(), partials[3].clone())


@gru_backward_op.register_fake
def _(grad_output, grad_h_n, wx, w_hh, bias_ih, bias_hh, ih_weight, hh_weight, h, wh, ih_stats, hh_stats, candidate,
      lengths, norm, training):
    batch, gates = wh.shape[1], wh.shape[2]
    f32 = torch.float32
    return (new_empty(wx, wh.shape), new_empty(w_hh, (batch, gates // 3)), new_empty(w_hh, w_hh.shape),
            *[new_empty(wx, (gates,), f32) for _ in range(4)])


def _setup_context(ctx, inputs, output):
    (wx, h0, w_hh, bias_ih, bias_hh, ih_weight, hh_weight, running, lengths, norm, training, save, momentum,
     eps) = inputs
    ctx.norm, ctx.training, ctx.statistics = norm, training, len(running)
    # without a norm the forward saved the gates, so wx (T, B, 3H) is not kept alive for the backward
    saved_input = wx if norm != NORM_NONE else new_empty(wx, (0,))
    ctx.save_for_backward(saved_input, w_hh, bias_ih, bias_hh, ih_weight, hh_weight, lengths, *output[3:])


def _backward(ctx, grad_output, grad_h_n, *unused_grads_of_statistics_and_saved):
    wx, w_hh, bias_ih, bias_hh, ih_weight, hh_weight, lengths, h, wh, ih_stats, hh_stats, candidate = ctx.saved_tensors
    require_saved(h, "GRU")
    grads = torch.ops.normrnn.gru_backward(
        gradient_or_zeros(grad_output, h[1:], w_hh.dtype), gradient_or_zeros(grad_h_n, h[0], w_hh.dtype),
        wx, w_hh, bias_ih, bias_hh, ih_weight, hh_weight, h, wh, ih_stats, hh_stats, candidate, lengths, ctx.norm,
        ctx.training)
    return (*grads, [None] * ctx.statistics, None, None, None, None, None, None)


gru_forward_op.register_autograd(_backward, setup_context=_setup_context)
gru_backward_op.register_autograd(no_second_derivative)


def run_gru(norm: Optional[str], x: Tensor, state: Tuple[Tensor], params: DirectionParams, padding: Padding,
            training: bool, momentum: float, eps: float) -> Tuple[Tensor, Tuple[Tensor]]:
    """One GRU layer and direction through the fused kernels (the interface of ``normrnn.dispatch``)."""
    wx = project_inputs(x, params, norm, padding, training, momentum, eps)
    # apart, not summed: b_hn sits inside r * (h W_hn^T + b_hn)
    zeros = x.new_zeros(params.weight_hh.shape[0], dtype=torch.float32)
    bias_ih = params.bias_ih.float() if params.bias_ih is not None else zeros
    bias_hh = params.bias_hh.float() if params.bias_hh is not None else zeros
    ih_weight, hh_weight, running = pair_norm_tensors(params, norm, x)
    (h0,) = state
    output, h_n, updated, *_ = torch.ops.normrnn.gru_forward(
        wx, h0.contiguous(), params.weight_hh.contiguous(), bias_ih, bias_hh, ih_weight, hh_weight, running,
        kernel_lengths(padding, x), NORM_CODES[norm], bool(training),
        needs_gradient(wx, h0, params.weight_hh, bias_ih, bias_hh, ih_weight, hh_weight), float(momentum), float(eps))
    store_running_statistics(norm, training, running, updated)
    return output, (h_n,)
