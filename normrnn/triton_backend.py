"""The Triton backend: the fused LSTM kernels of ``normrnn.kernels`` behind custom ops.

``normrnn::lstm_forward`` and ``normrnn::lstm_backward`` are ``torch.library`` custom ops with a
fake (meta) implementation and a registered autograd formula, so ``torch.compile(fullgraph=True)``
traces a model that uses them. Around the ops, plain PyTorch does the big matmuls: x W_ih^T for
all timesteps before the loop, and (inside the backward op) dW_hh = sum_t dwh_t^T h_{t-1}.

Covered: LSTM (and, in ``triton_gru.py`` and ``triton_rnn.py``, the GRU and the vanilla RNN) with norm
None, "layer", "seqbatch" and "batch", in float32, bfloat16 and float16 (CUDA autocast's dtype);
statistics, cell state and accumulation in float32; on CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``. The normalizations that need no recurrence (layer norm of x W_ih^T,
sequence-wise batch norm) run on the whole input projection before the loop, in PyTorch.
"""
from __future__ import annotations

import functools
import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .kernels.lstm_backward import lstm_backward
from .kernels.layout import NORM_BATCH, NORM_LAYER, NORM_NONE, state_dtype
from .kernels.lstm_forward import lstm_forward
from .kernels.lstm_layer_norm_backward import layer_norm_lstm_backward
from .kernels.lstm_layer_norm_forward import layer_norm_lstm_forward
from .first_derivatives import message
from .params import DirectionParams, Padding
from .reference.common import zero_padding
from .reference.norms import sequence_batch_norm

# "seqbatch" normalizes only the input projection, over batch and time: that happens before the
# loop, which then runs the unnormalized kernels.
_NORM_CODES = {None: NORM_NONE, "seqbatch": NORM_NONE, "layer": NORM_LAYER, "batch": NORM_BATCH}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unsupported_reason(cell: str, norm: Optional[str], x: Tensor, nonlinearity) -> Optional[str]:
    """Why the fused kernels cannot run this case, or None."""
    if norm not in _NORM_CODES:
        return f"unknown norm={norm!r}"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} is not supported (float32, bfloat16 and float16 are)"
    if not (x.is_cuda or (x.device.type == "cpu" and _interpreting())):
        return "the kernels need a CUDA tensor (or TRITON_INTERPRET=1 for the CPU interpreter)"
    return None


def describe_availability(probe: Tensor) -> str:
    """Whether the kernels can run here, and what they cover (``python -m normrnn`` prints it)."""
    if torch.cuda.is_available():
        return (f"usable on {torch.cuda.get_device_name()} (LSTM, GRU, RNN: norm None, 'layer', 'seqbatch', 'batch'; "
                "float32, bfloat16, float16)")
    if _interpreting():
        return "usable through the Triton interpreter on CPU (TRITON_INTERPRET=1; slow, for tests)"
    return "not usable here: no CUDA device (TRITON_INTERPRET=1 runs the kernels on the CPU interpreter)"


def on_the_tensors_device(op):
    """``op`` run with the current CUDA device set to its first tensor's: Triton launches on the
    current device, so a layer on cuda:1 while cuda:0 is current would launch its kernels on the
    wrong GPU (torch's own CUDA ops guard their device the same way). Every custom op of the
    fused layers is wrapped (``GUARDED_OPS``)."""
    @functools.wraps(op)
    def guarded(*args, **kwargs):
        tensor = next(argument for argument in args if isinstance(argument, Tensor))
        if not tensor.is_cuda:
            return op(*args, **kwargs)
        with torch.cuda.device(tensor.device):
            return op(*args, **kwargs)

    GUARDED_OPS.add(op.__name__)
    return guarded


GUARDED_OPS: set = set()


def _empty(like: Tensor, shape, dtype=None) -> Tensor:
    return like.new_empty(shape, dtype=dtype or like.dtype)


def _nothing_saved(like: Tensor) -> List[Tensor]:
    # distinct tensors: a custom op's outputs may not alias each other
    return [_empty(like, (0,), torch.float32) for _ in range(6)]


@torch.library.custom_op("normrnn::lstm_forward", mutates_args=())
@on_the_tensors_device
def lstm_forward_op(wx: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, bias: Tensor, ih_weight: Tensor,
                    hh_weight: Tensor, cell_weight: Tensor, cell_bias: Tensor, running: List[Tensor],
                    lengths: Optional[Tensor], norm: int, training: bool, save: bool, momentum: float,
                    eps: float) -> Tuple[Tensor, Tensor, Tensor, List[Tensor], Tensor, Tensor, Tensor, Tensor, Tensor,
                                         Tensor]:
    """Fused LSTM forward (see ``normrnn.kernels.lstm_forward``). Returns output, h_n, c_n, the
    updated running statistics (a functional op: the caller copies them into its buffers) and,
    when ``save``, the tensors the backward needs (empty otherwise)."""
    updated = [statistic.clone() for statistic in running]
    if norm == NORM_LAYER:
        result = layer_norm_lstm_forward(wx, h0, c0, w_hh, bias, hh_weight, cell_weight, cell_bias, lengths, save, eps)
        result["ih_stats"] = _empty(wx, (0,), torch.float32)
    else:
        result = lstm_forward(wx, h0, c0, w_hh, bias, ih_weight, hh_weight, cell_weight, cell_bias, updated, lengths,
                              norm, training, save, momentum, eps)
    h, c = result["h"], result["c"]
    if not save:
        return (result["output"], h[-1].to(h0.dtype, copy=True), c[-1].to(h0.dtype, copy=True), updated, *_nothing_saved(wx))
    return (result["output"], h[-1].to(h0.dtype, copy=True), c[-1].to(h0.dtype, copy=True), updated, h, c, result["wh"], result["ih_stats"],
            result["hh_stats"], result["cell_stats"])


@lstm_forward_op.register_fake
def _(wx, h0, c0, w_hh, bias, ih_weight, hh_weight, cell_weight, cell_bias, running, lengths, norm, training, save,
      momentum, eps):
    steps, batch, gates = wx.shape
    hidden = gates // 4
    output = _empty(wx, (steps, batch, hidden), w_hh.dtype)
    h_n, c_n = _empty(h0, h0.shape), _empty(c0, c0.shape)
    updated = [_empty(statistic, statistic.shape) for statistic in running]
    if not save:
        return (output, h_n, c_n, updated, *_nothing_saved(wx))
    states = (_empty(wx, (steps + 1, batch, hidden), state_dtype(w_hh.dtype, norm)), _empty(wx, (steps + 1, batch, hidden), torch.float32),
              _empty(wx, (steps, batch, gates), torch.float32))
    if norm == NORM_LAYER:  # per-row statistics of both layer norms
        return (output, h_n, c_n, updated, *states, _empty(wx, (0,), torch.float32),
                _empty(wx, (steps, 2, batch), torch.float32), _empty(wx, (steps, 2, batch), torch.float32))
    stats_steps = steps if norm == NORM_BATCH else 1
    return (output, h_n, c_n, updated, *states, _empty(wx, (stats_steps, 2, gates), torch.float32),
            _empty(wx, (stats_steps, 2, gates), torch.float32), _empty(wx, (stats_steps, 2, hidden), torch.float32))


@torch.library.custom_op("normrnn::lstm_backward", mutates_args=())
@on_the_tensors_device
def lstm_backward_op(grad_output: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, wx: Tensor, w_hh: Tensor, bias: Tensor,
                     ih_weight: Tensor, hh_weight: Tensor, cell_weight: Tensor, cell_bias: Tensor, h: Tensor,
                     c: Tensor, wh: Tensor, ih_stats: Tensor, hh_stats: Tensor, cell_stats: Tensor,
                     lengths: Optional[Tensor], norm: int, training: bool
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused LSTM backward (see ``normrnn.kernels.lstm_backward``). Returns the gradients of wx,
    h0, c0, W_hh, the summed bias, the ih / hh gains and the cell gain and shift."""
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
    return (result["dwx"].to(wx.dtype), result["dh0"].to(w_hh.dtype), result["dc0"].to(w_hh.dtype),
            grad_w_hh.to(w_hh.dtype), partials[0].clone(), partials[1].clone(), partials[2].clone(),
            cell_partials[0].clone(), cell_partials[1].clone())


@lstm_backward_op.register_fake
def _(grad_output, grad_h_n, grad_c_n, wx, w_hh, bias, ih_weight, hh_weight, cell_weight, cell_bias, h, c, wh,
      ih_stats, hh_stats, cell_stats, lengths, norm, training):
    steps, batch, gates = wx.shape
    hidden = gates // 4
    f32 = torch.float32
    return (_empty(wx, wx.shape), _empty(w_hh, (batch, hidden)), _empty(w_hh, (batch, hidden)), _empty(w_hh, w_hh.shape),
            _empty(wx, (gates,), f32), _empty(wx, (gates,), f32), _empty(wx, (gates,), f32),
            _empty(wx, (hidden,), f32), _empty(wx, (hidden,), f32))


def _setup_context(ctx, inputs, output):
    (wx, h0, c0, w_hh, bias, ih_weight, hh_weight, cell_weight, cell_bias, running, lengths, norm, training, save,
     momentum, eps) = inputs
    ctx.norm, ctx.training, ctx.statistics = norm, training, len(running)
    ctx.save_for_backward(wx, w_hh, bias, ih_weight, hh_weight, cell_weight, cell_bias, lengths, *output[4:])


def _backward(ctx, grad_output, grad_h_n, grad_c_n, *unused_grads_of_statistics_and_saved):
    (wx, w_hh, bias, ih_weight, hh_weight, cell_weight, cell_bias, lengths, h, c, wh, ih_stats, hh_stats,
     cell_stats) = ctx.saved_tensors
    if h.numel() == 0:
        raise RuntimeError("normrnn: this LSTM forward ran without saving for backward (save=False); "
                           "run it with gradients enabled to differentiate it")
    grads = torch.ops.normrnn.lstm_backward(
        grad_output if grad_output is not None else torch.zeros_like(h[1:], dtype=w_hh.dtype),
        grad_h_n if grad_h_n is not None else torch.zeros_like(h[0], dtype=w_hh.dtype),
        grad_c_n if grad_c_n is not None else torch.zeros_like(h[0], dtype=w_hh.dtype),
        wx, w_hh, bias, ih_weight, hh_weight, cell_weight, cell_bias, h, c, wh, ih_stats, hh_stats, cell_stats,
        lengths, ctx.norm, ctx.training)
    grad_wx, grad_h0, grad_c0, grad_w_hh, grad_bias, grad_ih, grad_hh, grad_cell_weight, grad_cell_bias = grads
    return (grad_wx, grad_h0, grad_c0, grad_w_hh, grad_bias, grad_ih, grad_hh, grad_cell_weight, grad_cell_bias,
            [None] * ctx.statistics, None, None, None, None, None, None)


lstm_forward_op.register_autograd(_backward, setup_context=_setup_context)


def no_second_derivative(ctx, *grads):
    """The autograd formula of every fused backward op: differentiating it is a second derivative."""
    raise RuntimeError(message("triton"))


# differentiating the backward op is a second derivative of the layer
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


def pair_norm_tensors(params: DirectionParams, norm: Optional[str], like: Tensor
                      ) -> Tuple[Tensor, Tensor, List[Tensor]]:
    """The float32 gains of N_ih and N_hh and the four running statistics (ih mean, var, hh mean,
    var) that the GRU's and the RNN's kernels take: the layer's under batch norm; elsewhere ones
    and a one-step placeholder for what the norm lacks or what is normalized before the loop (the
    input projection's layer norm)."""
    features = params.weight_hh.shape[0]
    if norm == "batch":
        running = [params.ih_running_mean, params.ih_running_var, params.hh_running_mean, params.hh_running_var]
        return params.ih_norm_weight.float(), params.hh_norm_weight.float(), running
    ones = like.new_ones(features, dtype=torch.float32)
    hh_weight = params.hh_norm_weight.float() if norm == "layer" else ones
    running = [fill((1, features), dtype=torch.float32) for _ in range(2) for fill in (like.new_zeros, like.new_ones)]
    return ones, hh_weight, running


def store_running_statistics(norm: Optional[str], training: bool, running: List[Tensor], updated) -> None:
    """Copies the running statistics that a forward op returned (the ops are functional) into the
    layer's buffers, after a training step under batch norm."""
    if norm == "batch" and training:
        with torch.no_grad():
            for buffer, value in zip(running, updated):
                buffer.copy_(value)


def project_inputs(x: Tensor, params: DirectionParams, norm: Optional[str], padding: Padding, training: bool,
                   momentum: float, eps: float) -> Tensor:
    """x W_ih^T for all timesteps before the loop, with the normalizations that need no recurrence
    (layer norm of the projection, sequence-wise batch norm); padded positions are zeroed first.

    Normalized projections are computed and kept in float32 whatever the layer's dtype: per-
    timestep batch statistics of a bfloat16-rounded projection missed the 2e-2 bar in the gain
    gradients (4.8e-2 at B=16), and a layer norm's backward subtracts row means."""
    x = zero_padding(x, padding)
    if norm == "batch" and x.dtype != torch.float32:
        wx = torch.matmul(x.float(), params.weight_ih.float().t())
    else:
        wx = torch.matmul(x, params.weight_ih.t())
    if norm == "layer":
        wx = torch.nn.functional.layer_norm(wx.float(), (wx.shape[-1],), params.ih_norm_weight.float(), None, eps)
    elif norm == "seqbatch":
        wx = sequence_batch_norm(wx.float(), padding.mask, padding.total, params.ih_norm_weight.float(),
                                 params.ih_running_mean, params.ih_running_var, training, momentum, eps)
    return wx.contiguous()


def recurrent_weight_gradient(grad_projection: Tensor, h: Tensor) -> Tensor:
    """dL/dW_hh = sum over t and b of g_t^T h_{t-1}, for ``grad_projection`` g (T, B, G), the
    gradient of h_{t-1} W_hh^T, and the states ``h`` (T+1, B, H): one float32 matmul over all
    timesteps."""
    gates, hidden = grad_projection.shape[-1], h.shape[-1]
    return torch.matmul(grad_projection.reshape(-1, gates).t().float(), h[:-1].reshape(-1, hidden).float())


def run_direction(cell, norm, x, state, params: DirectionParams, padding: Padding, training, momentum, eps,
                  nonlinearity) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """One layer and direction through the fused kernels (the interface of ``normrnn.dispatch``)."""
    if cell == "rnn":
        from .triton_rnn import run_rnn
        return run_rnn(norm, x, state, params, padding, training, momentum, eps, nonlinearity)
    if cell == "gru":
        from .triton_gru import run_gru
        return run_gru(norm, x, state, params, padding, training, momentum, eps)
    wx = project_inputs(x, params, norm, padding, training, momentum, eps)
    # the two biases are added in float32: their sum rounded to bfloat16 shifts every gate
    biases = [b.float() for b in (params.bias_ih, params.bias_hh) if b is not None]
    bias = sum(biases) if biases else x.new_zeros(params.weight_hh.shape[0], dtype=torch.float32)
    weights, running = _norm_tensors(params, norm, x)
    lengths = padding.lengths.to(x.device, torch.int32) if padding.padded else None
    h0, c0 = state
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (wx, h0, c0, params.weight_hh, bias, *weights))
    output, h_n, c_n, updated, *_ = torch.ops.normrnn.lstm_forward(
        wx, h0.contiguous(), c0.contiguous(), params.weight_hh.contiguous(), bias, *weights, running, lengths,
        _NORM_CODES[norm], bool(training), bool(needs_grad), float(momentum), float(eps))
    store_running_statistics(norm, training, running, updated)
    return output, (h_n, c_n)
