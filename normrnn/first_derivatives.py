"""The fused backends compute first derivatives only, as cuDNN's RNNs do: a gradient of a
gradient through them (``torch.autograd.grad(..., create_graph=True)`` and then a backward
through that gradient, as a gradient penalty does) raises an error naming the backend and what to
use instead, rather than leaving their second-order terms silently out. The reference backend is
differentiable to any order.

The first backward itself runs under ``create_graph=True`` as usual: a model whose gradient
penalty does not pass through the recurrent layer is unaffected. Whether a fused forward keeps
anything for a backward at all is ``needs_gradient``'s answer.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor


def needs_gradient(*tensors: Optional[Tensor]) -> bool:
    """Whether a forward must save for backward: gradients are enabled and one input asks for one."""
    return torch.is_grad_enabled() and any(tensor is not None and tensor.requires_grad for tensor in tensors)


def message(backend: str) -> str:
    """The error a second derivative through ``backend`` raises."""
    return (f"normrnn: the {backend} backend computes first derivatives only (as cuDNN's RNNs do), so a "
            f"gradient of a gradient through it is not available; use backend='reference' for second "
            f"derivatives (create_graph=True, then backward through the gradient)")


def first_derivatives_only(backend: str):
    """Decorates a ``torch.autograd.Function.backward``: it runs without building a graph, and
    where the caller asked for one (grad mode on during backward) while the function's inputs
    require gradients, its gradients come out attached to a node that raises ``message(backend)``
    when differentiated. Unlike ``torch.autograd.function.once_differentiable``, which looks only
    at the incoming gradients, this looks at the forward's inputs (``ctx.needs_input_grad``): the
    gradient depends on the weights even where the incoming gradient is a constant, so its
    second-order terms exist and must not be dropped."""
    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            differentiable = any(ctx.needs_input_grad) or any(
                isinstance(grad, torch.Tensor) and grad.requires_grad for grad in grads)
            if not (torch.is_grad_enabled() and differentiable):
                return outputs
            raising = torch._C._functions.DelayedError(message(backend).encode(), len(outputs))

            def attached(output):
                if not isinstance(output, torch.Tensor):
                    return output
                output = output.detach()
                output.requires_grad = True
                return output

            return raising(*[attached(output) for output in outputs])

        return wrapper

    return decorate
