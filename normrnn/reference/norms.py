"""Reference normalizations used inside the recurrent cells.

Every function here is plain PyTorch, differentiable by autograd, valid on any device and in
float64. They define the mathematics that the fused kernels must reproduce.

Padding: ``active`` is a boolean ``(B,)`` mask of the sequences that still run at this step.
Inactive rows never enter a statistic; their normalized values are computed (from zeros, since
padded inputs are zeroed on entry) but discarded by the cell.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, biased_var: Tensor,
                         count: Union[int, Tensor], momentum: float) -> None:
    """``running <- (1 - momentum) * running + momentum * batch``, as ``nn.BatchNorm1d`` does.

    The running variance takes the unbiased estimate ``biased_var * n / (n - 1)``.
    """
    with torch.no_grad():
        unbiased = biased_var.detach() * (count / (count - 1))
        running_mean.mul_(1.0 - momentum).add_(mean.detach().to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def batch_norm_step(value: Tensor, active: Optional[Tensor], n_active: Union[int, Tensor], weight: Tensor,
                    bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor, slot: int,
                    training: bool, momentum: float, eps: float) -> Tensor:
    """Batch norm of one timestep (Cooijmans et al. 2016), statistics over the active batch rows.

    ``y = weight * (value - mu_t) / sqrt(sigma2_t + eps) + bias``

    In training, ``mu_t`` and ``sigma2_t`` (biased) are the statistics of this step's active rows,
    and row ``slot`` of the running statistics is updated with ``momentum``. In evaluation, and
    at a training step where fewer than two sequences are active (batch statistics do not exist
    there), the running statistics of ``slot`` are used and nothing is updated.

    ``n_active`` is an int, or a 0-d tensor in a graph that ``torch.compile`` traces (where the
    lengths are data): the choice between batch and running statistics is then made in the graph.
    """
    if isinstance(n_active, Tensor):
        mean, var = _step_statistics_in_graph(value, active, n_active, running_mean, running_var, slot, training,
                                              momentum)
    elif training and n_active >= 2:
        rows = value if active is None else value[active]
        mean = rows.mean(0)
        var = rows.var(0, unbiased=False)
        update_running_stats(running_mean[slot], running_var[slot], mean, var, n_active, momentum)
    else:
        mean = running_mean[slot].to(value.dtype)
        var = running_var[slot].to(value.dtype)
    out = (value - mean) * torch.rsqrt(var + eps) * weight
    return out if bias is None else out + bias


def masked_moments(values: Tensor, active: Tensor, count: Union[int, Tensor], dims):
    """Mean and biased variance over ``dims`` of the ``values`` where ``active`` (broadcast to
    them) holds, ``count`` of them: sums with ``torch.where``, not products with the mask, so that
    garbage in the padding (even NaN) stays out."""
    mean = torch.where(active, values, 0.0).sum(dims) / count
    var = torch.where(active, values - mean, 0.0).square().sum(dims) / count
    return mean, var


def _step_statistics_in_graph(value: Tensor, active: Tensor, n_active: Tensor, running_mean: Tensor,
                              running_var: Tensor, slot: int, training: bool, momentum: float):
    """``batch_norm_step``'s statistics where the number of active rows is a tensor: in training the
    batch statistics of the active rows where there are at least two (and the running statistics
    updated with them), the running statistics of ``slot`` elsewhere, chosen without a branch."""
    running = running_mean[slot].to(value.dtype), running_var[slot].to(value.dtype)
    if not training:
        return running
    # a step of fewer than two rows takes the running statistics below: any divisor will do there
    count = n_active.clamp_min(2)
    mean, var = masked_moments(value, active.unsqueeze(-1), count, 0)
    enough = n_active >= 2
    with torch.no_grad():
        updated_mean, updated_var = running_mean[slot].clone(), running_var[slot].clone()
        update_running_stats(updated_mean, updated_var, mean, var, count, momentum)
        running_mean[slot].copy_(torch.where(enough, updated_mean, running_mean[slot]))
        running_var[slot].copy_(torch.where(enough, updated_var, running_var[slot]))
    return torch.where(enough, mean, running[0]), torch.where(enough, var, running[1])


def sequence_batch_norm(values: Tensor, mask: Optional[Tensor], n_active: Union[int, Tensor], weight: Tensor,
                        running_mean: Tensor, running_var: Tensor, training: bool, momentum: float,
                        eps: float, bias: Optional[Tensor] = None) -> Tensor:
    """Sequence-wise batch norm (Laurent et al. 2016, Deep Speech 2) of ``values`` ``(T, B, G)``.

    ``y = weight * (value - mu) / sqrt(sigma2 + eps) (+ bias)`` with ``mu``, ``sigma2`` taken over
    every active (timestep, sequence) position in training, the running statistics in evaluation.
    ``mask`` is the ``(T, B)`` activity mask, or None when every position is active, and
    ``n_active`` the number of active positions (an int, or a tensor where only the traced
    graph knows it). ``bias``, where given, is added in the same pass (the C++ backend folds the
    layer's input bias in here).
    """
    if training:
        if mask is None:
            rows = values.reshape(-1, values.shape[-1])
            mean = rows.mean(0)
            var = rows.var(0, unbiased=False)
        else:
            # not values[mask], whose shape would depend on the data (torch.compile could not trace it)
            mean, var = masked_moments(values, mask.unsqueeze(-1), n_active, (0, 1))
        update_running_stats(running_mean, running_var, mean, var, n_active, momentum)
    else:
        mean = running_mean.to(values.dtype)
        var = running_var.to(values.dtype)
    # weight / sqrt(var + eps) is one number a feature: one pass over (T, B, G) scales by it, where
    # two multiplications would make (and, in training, save for backward) a second (T, B, G) tensor
    scale = torch.rsqrt(var + eps) * weight
    centered = values - mean
    return centered * scale if bias is None else torch.addcmul(bias, centered, scale)


def layer_norm(value: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float) -> Tensor:
    """Layer norm (Ba et al. 2016) over the last dimension: ``weight * (v - mean) / sqrt(var + eps) + bias``."""
    mean = value.mean(-1, keepdim=True)
    var = value.var(-1, unbiased=False, keepdim=True)
    out = (value - mean) * torch.rsqrt(var + eps) * weight
    return out if bias is None else out + bias
