"""The fused vanilla RNN of ``normrnn.kernels.rnn_*`` behind ``torch.library`` custom ops.

``normrnn::rnn_forward`` and ``normrnn::rnn_backward`` have fake (meta) implementations and a
registered autograd formula, so ``torch.compile(fullgraph=True)`` traces a model that uses them.
Around the ops, plain PyTorch does what needs no recurrence: x W_ih^T for all timesteps (and its
layer norm or sequence-wise batch norm) before the loop, dW_hh = sum_t du_t^T h_{t-1} after it.

    h_t = act(N_ih(W_ih x_t) + N_hh(W_hh h_{t-1}) + b_ih + b_hh),   act in {tanh, relu, identity}
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .kernels.layout import NORM_BATCH, NORM_LAYER, NORM_NONE
from .kernels.rnn_backward import rnn_backward
from .kernels.rnn_forward import ACTIVATIONS, rnn_forward
from .first_derivatives import needs_gradient
from .params import DirectionParams, Padding
from .triton_ops import (NORM_CODES, gradient_or_zeros, kernel_lengths, new_empty,
                         no_second_derivative, nothing_saved, on_the_tensors_device, pair_norm_tensors, project_inputs,
                         recurrent_weight_gradient, require_saved, store_running_statistics, summed_bias)


@torch.library.custom_op("normrnn::rnn_forward", mutates_args=())
@on_the_tensors_device
def rnn_forward_op(wx: Tensor, h0: Tensor, w_hh: Tensor, bias: Tensor, ih_weight: Tensor, hh_weight: Tensor,
                   running: List[Tensor], lengths: Optional[Tensor], norm: int, activation: int, training: bool,
                   save: bool, momentum: float, eps: float
                   ) -> Tuple[Tensor, Tensor, List[Tensor], Tensor, Tensor, Tensor, Tensor]:
    """Fused RNN forward. Returns output, h_n, the updated running statistics (a functional op:
    the caller copies them into its buffers) and, when ``save``, h, u, ih_stats, hh_stats."""
    updated = [statistic.clone() for statistic in running]
    result = rnn_forward(wx, h0, w_hh, bias, ih_weight, hh_weight, updated, lengths, norm, activation, training, save,
                         momentum, eps)
    h = result["h"]
    h_n = h[-1].to(h0.dtype, copy=True)
    if not save:
        return (result["output"], h_n, updated, *nothing_saved(wx, 4))
    return result["output"], h_n, updated, h, result["u"], result["ih_stats"], result["hh_stats"]


@rnn_forward_op.register_fake
def _(wx, h0, w_hh, bias, ih_weight, hh_weight, running, lengths, norm, activation, training, save, momentum, eps):
    steps, batch, hidden = wx.shape
    output = new_empty(wx, (steps, batch, hidden), w_hh.dtype)
    updated = [new_empty(statistic, statistic.shape) for statistic in running]
    if not save:
        return (output, new_empty(h0, h0.shape), updated, *nothing_saved(wx, 4))
    stats_width = batch if norm == NORM_LAYER else hidden
    return (output, new_empty(h0, h0.shape), updated,
            new_empty(wx, (steps + 1, batch, hidden), torch.float32),
            new_empty(wx, (steps, batch, hidden) if norm != NORM_NONE else (0,), torch.float32),
            new_empty(wx, (steps if norm == NORM_BATCH else 1, 2, hidden), torch.float32),
            new_empty(wx, (1, 2, hidden) if norm == NORM_NONE else (steps, 2, stats_width), torch.float32))


@torch.library.custom_op("normrnn::rnn_backward", mutates_args=())
@on_the_tensors_device
def rnn_backward_op(grad_output: Tensor, grad_h_n: Tensor, wx: Tensor, w_hh: Tensor, ih_weight: Tensor,
                    hh_weight: Tensor, h: Tensor, u: Tensor, ih_stats: Tensor, hh_stats: Tensor,
                    lengths: Optional[Tensor], norm: int, activation: int, training: bool
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused RNN backward: the gradients of wx, h0, W_hh, the summed bias and the two gains.
    ``wx``: x W_ih^T under batch norm, elsewhere an empty tensor of its dtype (the backward takes
    the activation's derivative from h and needs no pre-activation)."""
    saved = {"h": h, "u": u, "ih_stats": ih_stats, "hh_stats": hh_stats}
    result = rnn_backward(saved, grad_output, grad_h_n, wx, w_hh, ih_weight, hh_weight, lengths, norm, activation,
                          training)
    grad_w_hh = recurrent_weight_gradient(result["du"], h)
    partials = result["partials"].sum(0)
    return (result["dwx"].to(wx.dtype), result["dh0"].to(w_hh.dtype), grad_w_hh.to(w_hh.dtype), partials[0].clone(),
            partials[1].clone(), partials[2].clone())


@rnn_backward_op.register_fake
def _(grad_output, grad_h_n, wx, w_hh, ih_weight, hh_weight, h, u, ih_stats, hh_stats, lengths, norm, activation,
      training):
    steps, batch, hidden = h.shape[0] - 1, h.shape[1], h.shape[2]
    f32 = torch.float32
    return (new_empty(wx, (steps, batch, hidden)), new_empty(w_hh, (batch, hidden)), new_empty(w_hh, w_hh.shape),
            *[new_empty(wx, (hidden,), f32) for _ in range(3)])


def _setup_context(ctx, inputs, output):
    wx, h0, w_hh, bias, ih_weight, hh_weight, running, lengths, norm, activation, training, save, momentum, eps = inputs
    ctx.norm, ctx.activation, ctx.training, ctx.statistics = norm, activation, training, len(running)
    # only batch norm's backward reads x W_ih^T: elsewhere it is not kept alive for the backward
    saved_input = wx if norm == NORM_BATCH else new_empty(wx, (0,))
    ctx.save_for_backward(saved_input, w_hh, ih_weight, hh_weight, lengths, *output[3:])


def _backward(ctx, grad_output, grad_h_n, *unused_grads_of_statistics_and_saved):
    wx, w_hh, ih_weight, hh_weight, lengths, h, u, ih_stats, hh_stats = ctx.saved_tensors
    require_saved(h, "RNN")
    grads = torch.ops.normrnn.rnn_backward(
        gradient_or_zeros(grad_output, h[1:], w_hh.dtype), gradient_or_zeros(grad_h_n, h[0], w_hh.dtype),
        wx, w_hh, ih_weight, hh_weight, h, u, ih_stats, hh_stats, lengths, ctx.norm, ctx.activation,
        ctx.training)
    return (*grads, [None] * ctx.statistics, None, None, None, None, None, None, None)


rnn_forward_op.register_autograd(_backward, setup_context=_setup_context)
rnn_backward_op.register_autograd(no_second_derivative)


def run_rnn(norm: Optional[str], x: Tensor, state: Tuple[Tensor], params: DirectionParams, padding: Padding,
            training: bool, momentum: float, eps: float, nonlinearity: Optional[str]) -> Tuple[Tensor, Tuple[Tensor]]:
    """One RNN layer and direction through the fused kernels (the interface of ``normrnn.dispatch``)."""
    wx = project_inputs(x, params, norm, padding, training, momentum, eps)
    bias = summed_bias(params, x)
    ih_weight, hh_weight, running = pair_norm_tensors(params, norm, x)
    (h0,) = state
    output, h_n, updated, *_ = torch.ops.normrnn.rnn_forward(
        wx, h0.contiguous(), params.weight_hh.contiguous(), bias, ih_weight, hh_weight, running,
        kernel_lengths(padding, x), NORM_CODES[norm], ACTIVATIONS[nonlinearity], bool(training),
        needs_gradient(wx, h0, params.weight_hh, bias, ih_weight, hh_weight), float(momentum), float(eps))
    store_running_statistics(norm, training, running, updated)
    return output, (h_n,)
