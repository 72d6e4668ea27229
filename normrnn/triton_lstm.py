"""The fused LSTM of ``normrnn.kernels.lstm_*`` behind ``torch.library`` custom ops.

``normrnn::lstm_forward`` and ``normrnn::lstm_backward`` have fake (meta) implementations and a
registered autograd formula, so ``torch.compile(fullgraph=True)`` traces a model that uses them.
Around the ops, plain PyTorch does what needs no recurrence (``triton_ops.py``): x W_ih^T for all
timesteps (and its layer norm or sequence-wise batch norm) before the loop, and (inside the
backward op) dW_hh = sum_t dwh_t^T h_{t-1} after it. Layer norm runs its own kernels
(``lstm_layer_norm_*``); no norm and per-timestep batch norm share ``lstm_forward`` / ``lstm_backward``.

    z_t = N_hh(h_{t-1} W_hh^T) + N_ih(x_t W_ih^T) + b,   c_t = f * c_{t-1} + i * g,
    h_t = o * tanh(N_c(c_t))

With an output projection (``proj_size`` P, LSTMP) h_t = r_t W_hr^T for r_t = o * tanh(N_c(c_t)),
and h_{t-1} W_hh^T = r_{t-1} (W_hh W_hr)^T: the kernels run r as their state with the (4H, H)
product W_hh W_hr in place of W_hh, from r_{-1} = 0 with the given h_{-1} W_hh^T added at step 0
(``initial``), and h_t = r_t W_hr^T is one matmul over all timesteps after the loop. So a step
keeps the one exchange of the unprojected LSTM (a second in-loop product, h_t from every
program's r_t, would need a second grid barrier a step) at the price of a (4H, H) recurrent
product instead of (4H, P); autograd through the two products outside the ops gives dW_hh, dW_hr
and dh_0.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .kernels.layout import NORM_BATCH, NORM_LAYER, NORM_NONE, state_dtype
from .kernels.lstm_backward import lstm_backward
from .kernels.lstm_forward import lstm_forward
from .kernels.lstm_layer_norm_backward import layer_norm_lstm_backward
from .kernels.lstm_layer_norm_forward import layer_norm_lstm_forward
from .first_derivatives import needs_gradient
from .params import DirectionParams, Padding
from .triton_ops import (NORM_CODES, gradient_or_zeros, kernel_lengths, new_empty,
                         no_second_derivative, nothing_saved, on_the_tensors_device, pair_norm_tensors, project_inputs,
                         recurrent_weight_gradient, require_saved, store_running_statistics, summed_bias)


@torch.library.custom_op("normrnn::lstm_forward", mutates_args=())
@on_the_tensors_device
def lstm_forward_op(wx: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, bias: Tensor, ih_weight: Tensor,
                    hh_weight: Tensor, cell_weight: Tensor, cell_bias: Tensor, running: List[Tensor],
                    lengths: Optional[Tensor], initial: Optional[Tensor], norm: int, training: bool, save: bool,
                    momentum: float, eps: float) -> Tuple[Tensor, Tensor, Tensor, List[Tensor], Tensor, Tensor, Tensor, Tensor, Tensor,
                                         Tensor]:
    """Fused LSTM forward (see ``normrnn.kernels.lstm_forward``). Returns output, h_n, c_n, the
    updated running statistics (a functional op: the caller copies them into its buffers) and,
    when ``save``, the tensors the backward needs (empty otherwise). ``initial``: a float32
    (B, 4H) product that step 0 adds to h0 W_hh^T, or None."""
    updated = [statistic.clone() for statistic in running]
    if norm == NORM_LAYER:
        result = layer_norm_lstm_forward(wx, h0, c0, w_hh, bias, hh_weight, cell_weight, cell_bias, lengths, save, eps,
                                         initial)
        result["ih_stats"] = new_empty(wx, (0,), torch.float32)
    else:
        result = lstm_forward(wx, h0, c0, w_hh, bias, ih_weight, hh_weight, cell_weight, cell_bias, updated, lengths,
                              norm, training, save, momentum, eps, initial)
    h, c = result["h"], result["c"]
    # c_n in c0's dtype, as the fake says: the projecting LSTM's h0 (its r) is float32 under batch norm
    final = (result["output"], h[-1].to(h0.dtype, copy=True), c[-1].to(c0.dtype, copy=True), updated)
    if not save:
        return (*final, *nothing_saved(wx, 6))
    return (*final, h, c, result["wh"], result["ih_stats"], result["hh_stats"], result["cell_stats"])


@lstm_forward_op.register_fake
def _(wx, h0, c0, w_hh, bias, ih_weight, hh_weight, cell_weight, cell_bias, running, lengths, initial, norm, training,
      save, momentum, eps):
    steps, batch, gates = wx.shape
    hidden = gates // 4
    output = new_empty(wx, (steps, batch, hidden), w_hh.dtype)
    h_n, c_n = new_empty(h0, h0.shape), new_empty(c0, c0.shape)
    updated = [new_empty(statistic, statistic.shape) for statistic in running]
    if not save:
        return (output, h_n, c_n, updated, *nothing_saved(wx, 6))
    states = (new_empty(wx, (steps + 1, batch, hidden), state_dtype(w_hh.dtype, norm)),
              new_empty(wx, (steps + 1, batch, hidden), torch.float32),
              new_empty(wx, (steps, batch, gates), torch.float32))
    if norm == NORM_LAYER:  # per-row statistics of both layer norms
        return (output, h_n, c_n, updated, *states, new_empty(wx, (0,), torch.float32),
                new_empty(wx, (steps, 2, batch), torch.float32), new_empty(wx, (steps, 2, batch), torch.float32))
    stats_steps = steps if norm == NORM_BATCH else 1
    return (output, h_n, c_n, updated, *states, new_empty(wx, (stats_steps, 2, gates), torch.float32),
            new_empty(wx, (stats_steps, 2, gates), torch.float32),
            new_empty(wx, (stats_steps, 2, hidden), torch.float32))


@torch.library.custom_op("normrnn::lstm_backward", mutates_args=())
@on_the_tensors_device
def lstm_backward_op(grad_output: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, wx: Tensor, w_hh: Tensor, bias: Tensor,
                     ih_weight: Tensor, hh_weight: Tensor, cell_weight: Tensor, cell_bias: Tensor, h: Tensor,
                     c: Tensor, wh: Tensor, ih_stats: Tensor, hh_stats: Tensor, cell_stats: Tensor,
                     lengths: Optional[Tensor], initial_given: bool, norm: int, training: bool
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused LSTM backward (see ``normrnn.kernels.lstm_backward``). Returns the gradients of wx,
    h0, c0, W_hh, the summed bias, the ih / hh gains, the cell gain and shift, and (with
    ``initial_given``; empty otherwise) of the forward's ``initial``: that of step 0's product.
    ``wx``: x W_ih^T, or without a norm an empty tensor of its dtype (``wh`` holds z there)."""
    saved = {"h": h, "c": c, "wh": wh, "ih_stats": ih_stats, "hh_stats": hh_stats, "cell_stats": cell_stats}
    if norm == NORM_LAYER:
        result = layer_norm_lstm_backward(saved, grad_output, grad_h_n, grad_c_n, wx, w_hh, bias, hh_weight,
                                          cell_weight, cell_bias, lengths)
    else:
        result = lstm_backward(saved, grad_output, grad_h_n, grad_c_n, wx, w_hh, bias, ih_weight, hh_weight,
                               cell_weight, cell_bias, lengths, norm, training)
    grad_w_hh = recurrent_weight_gradient(result["dwh"], h)
    partials = result["partials"].sum(0)
    cell_partials = result["cell_partials"].sum(0)
    grad_initial = result["dwh"][0].clone() if initial_given else new_empty(wh, (0,), torch.float32)
    return (result["dwx"].to(wx.dtype), result["dh0"].to(w_hh.dtype), result["dc0"].to(w_hh.dtype),
            grad_w_hh.to(w_hh.dtype), partials[0].clone(), partials[1].clone(), partials[2].clone(),
            cell_partials[0].clone(), cell_partials[1].clone(), grad_initial)


@lstm_backward_op.register_fake
def _(grad_output, grad_h_n, grad_c_n, wx, w_hh, bias, ih_weight, hh_weight, cell_weight, cell_bias, h, c, wh,
      ih_stats, hh_stats, cell_stats, lengths, initial_given, norm, training):
    steps, batch, gates = wh.shape
    hidden = gates // 4
    f32 = torch.float32
    return (new_empty(wx, wh.shape), new_empty(w_hh, (batch, hidden)), new_empty(w_hh, (batch, hidden)),
            new_empty(w_hh, w_hh.shape), *[new_empty(wx, (gates,), f32) for _ in range(3)],
            *[new_empty(wx, (hidden,), f32) for _ in range(2)],
            new_empty(wx, (batch, gates) if initial_given else (0,), f32))


def _setup_context(ctx, inputs, output):
    (wx, h0, c0, w_hh, bias, ih_weight, hh_weight, cell_weight, cell_bias, running, lengths, initial, norm, training,
     save, momentum, eps) = inputs
    ctx.norm, ctx.training, ctx.statistics, ctx.initial_given = norm, training, len(running), initial is not None
    # without a norm the forward saved z, so wx (T, B, 4H) is not kept alive for the backward
    saved_input = wx if norm != NORM_NONE else new_empty(wx, (0,))
    ctx.save_for_backward(saved_input, w_hh, bias, ih_weight, hh_weight, cell_weight, cell_bias, lengths, *output[4:])


def _backward(ctx, grad_output, grad_h_n, grad_c_n, *unused_grads_of_statistics_and_saved):
    (wx, w_hh, bias, ih_weight, hh_weight, cell_weight, cell_bias, lengths, h, c, wh, ih_stats, hh_stats,
     cell_stats) = ctx.saved_tensors
    require_saved(h, "LSTM")
    grads = torch.ops.normrnn.lstm_backward(
        gradient_or_zeros(grad_output, h[1:], w_hh.dtype), gradient_or_zeros(grad_h_n, h[0], w_hh.dtype),
        gradient_or_zeros(grad_c_n, h[0], w_hh.dtype),
        wx, w_hh, bias, ih_weight, hh_weight, cell_weight, cell_bias, h, c, wh, ih_stats, hh_stats, cell_stats,
        lengths, ctx.initial_given, ctx.norm, ctx.training)
    grad_initial = grads[-1] if ctx.initial_given else None
    return (*grads[:-1], [None] * ctx.statistics, None, grad_initial, None, None, None, None, None)


lstm_forward_op.register_autograd(_backward, setup_context=_setup_context)
lstm_backward_op.register_autograd(no_second_derivative)


def _norm_tensors(params: DirectionParams, norm: Optional[str], like: Tensor):
    """The LSTM's float32 gains / shifts and running statistics for the kernels: those of N_ih and
    N_hh as the GRU and RNN take them (``pair_norm_tensors``), and the cell norm's gain, shift and
    running statistics; fixed placeholders where the norm has no cell norm."""
    ih_weight, hh_weight, running = pair_norm_tensors(params, norm, like)
    if norm == "batch":
        running += [params.cell_running_mean, params.cell_running_var]
    else:
        hidden = params.hidden_size
        running += [like.new_zeros((1, hidden), dtype=torch.float32), like.new_ones((1, hidden), dtype=torch.float32)]
    if norm in ("batch", "layer"):
        cell = (params.cell_norm_weight.float(), params.cell_norm_bias.float())
    else:
        ones_hidden = like.new_ones(params.hidden_size, dtype=torch.float32)
        cell = (ones_hidden, ones_hidden)
    return (ih_weight, hh_weight, *cell), running


def _recurrence(params: DirectionParams, norm: Optional[str], h0: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """What the kernels recur on: W_hh and h_0, or for the projecting LSTM (see the module's
    docstring) W_hh W_hr (4H, H), r_{-1} = 0 and the float32 product h_0 W_hh^T of step 0. Under
    batch norm the product W_hh W_hr stays float32 in every dtype, as the state does there
    (``layout.state_dtype``): batch statistics of few rows amplify its rounding to 16 bits (the
    gradients of a bfloat16 layer ten times further from float64's than without a projection)."""
    if params.weight_hr is None:
        return params.weight_hh.contiguous(), h0.contiguous(), None
    weight_hh, weight_hr = params.weight_hh, params.weight_hr
    if norm == "batch":
        weight_hh, weight_hr = weight_hh.float(), weight_hr.float()
    state_weight = torch.matmul(weight_hh, weight_hr)
    initial = torch.matmul(h0.float(), weight_hh.float().t())
    return state_weight, state_weight.new_zeros((h0.shape[0], params.hidden_size)), initial


def _projected(r: Tensor, weight_hr: Tensor) -> Tensor:
    """h = r W_hr^T in the layer's dtype, from r in the kernels' (float32 under batch norm)."""
    return torch.matmul(r, weight_hr.t().to(r.dtype)).to(weight_hr.dtype)


def run_lstm(norm: Optional[str], x: Tensor, state: Tuple[Tensor, Tensor], params: DirectionParams,
             padding: Padding, training: bool, momentum: float, eps: float) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """One LSTM layer and direction through the fused kernels (the interface of ``normrnn.dispatch``)."""
    wx = project_inputs(x, params, norm, padding, training, momentum, eps)
    bias = summed_bias(params, x)
    weights, running = _norm_tensors(params, norm, x)
    h0, c0 = state
    state_weight, state0, initial = _recurrence(params, norm, h0)
    output, h_n, c_n, updated, *_ = torch.ops.normrnn.lstm_forward(
        wx, state0, c0.contiguous(), state_weight, bias, *weights, running, kernel_lengths(padding, x), initial,
        NORM_CODES[norm], bool(training), needs_gradient(wx, state0, c0, state_weight, bias, initial, *weights),
        float(momentum), float(eps))
    store_running_statistics(norm, training, running, updated)
    if params.weight_hr is not None:  # r_t to h_t; padded steps stay 0, the final r_n gives h_n
        output, h_n = _projected(output, params.weight_hr), _projected(h_n, params.weight_hr)
    return output, (h_n, c_n)
