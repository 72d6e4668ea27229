"""What the fused cells' custom ops share (``triton_lstm.py``, ``triton_gru.py``, ``triton_rnn.py``):
the device guard every op is wrapped in, the placeholders of a forward that saves nothing, and the
plain PyTorch around the kernels: x W_ih^T for all timesteps (with the normalizations that need no
recurrence) before the loop, dL/dW_hh = sum_t g_t^T h_{t-1} after it, the norms' float32 gains and
running statistics in the form the kernels take them.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .first_derivatives import message
from .kernels.layout import NORM_BATCH, NORM_LAYER, NORM_NONE
from .params import DirectionParams, Padding
from .reference.common import zero_padding
from .reference.norms import sequence_batch_norm

# The kernels' norm codes. "seqbatch" normalizes only the input projection, over batch and time:
# that happens before the loop, which then runs the unnormalized kernels.
NORM_CODES = {None: NORM_NONE, "seqbatch": NORM_NONE, "layer": NORM_LAYER, "batch": NORM_BATCH}

GUARDED_OPS: set = set()


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


def new_empty(like: Tensor, shape, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An uninitialized tensor of ``shape`` on ``like``'s device, in ``dtype`` or ``like``'s."""
    return like.new_empty(shape, dtype=dtype or like.dtype)


def nothing_saved(like: Tensor, count: int) -> List[Tensor]:
    """The ``count`` outputs of a forward op that saved nothing for backward: empty float32
    tensors, distinct because a custom op's outputs may not alias each other."""
    return [new_empty(like, (0,), torch.float32) for _ in range(count)]


def require_saved(h: Tensor, cell: str) -> None:
    """The backward of a forward that ran with ``save=False`` has nothing to start from."""
    if h.numel() == 0:
        raise RuntimeError(f"normrnn: this {cell} forward ran without saving for backward (save=False); "
                           "run it with gradients enabled to differentiate it")


def gradient_or_zeros(grad: Optional[Tensor], like: Tensor, dtype: torch.dtype) -> Tensor:
    """An output's incoming gradient, or zeros of ``like``'s shape where autograd passed None (the
    output did not reach the loss)."""
    return grad if grad is not None else torch.zeros_like(like, dtype=dtype)


def no_second_derivative(ctx, *grads):
    """The autograd formula of every fused backward op: differentiating it is a second derivative."""
    raise RuntimeError(message("triton"))


def summed_bias(params: DirectionParams, like: Tensor) -> Tensor:
    """b = b_ih + b_hh in float32 (zeros without biases): their sum rounded to bfloat16 shifts
    every gate."""
    biases = [bias.float() for bias in (params.bias_ih, params.bias_hh) if bias is not None]
    return sum(biases) if biases else like.new_zeros(params.weight_hh.shape[0], dtype=torch.float32)


def kernel_lengths(padding: Padding, like: Tensor) -> Optional[Tensor]:
    """The sequences' lengths as the kernels read them (int32, on ``like``'s device), or None when
    no sequence is padded."""
    return padding.lengths.to(like.device, torch.int32) if padding.padded else None


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
