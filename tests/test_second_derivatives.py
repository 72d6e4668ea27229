"""Gradients of gradients: the reference is differentiable twice (gradgradcheck in float64); the
fused backends compute first derivatives only, as cuDNN does, and say so when a backward passes
through their gradient, instead of leaving its second-order terms silently out
(``normrnn/first_derivatives.py``)."""
import pytest
import torch
from torch.func import functional_call

from fused_helpers import DEVICE, INTERPRETER_OFF  # noqa: F401 - the interpreter on a CPU, before triton

import normrnn
from conftest import CELLS

FUSED_BACKENDS = []
if not INTERPRETER_OFF:
    FUSED_BACKENDS.append("triton")
if normrnn.dispatch.unavailable_reason("cpp", "lstm", None, torch.zeros(1)) is None:
    FUSED_BACKENDS.append("cpp")


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("norm", [None, "layer", "batch"])
def test_the_reference_is_differentiable_twice(cell, norm):
    torch.manual_seed(0)
    module = CELLS[cell](3, 4, norm=norm, backend="reference").double()
    for parameter in module.parameters():  # gains away from their init, so that every term is generic
        parameter.data.uniform_(-0.8, 0.8)
    names = ["weight_hh_l0", "weight_ih_l0"]

    def run(x, weight_hh, weight_ih):
        output, _ = functional_call(module, {names[0]: weight_hh, names[1]: weight_ih}, (x,))
        return output

    inputs = (torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True),
              *(getattr(module, name).detach().clone().requires_grad_(True) for name in names))
    assert torch.autograd.gradgradcheck(run, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def _layer_and_input(backend, cell, norm, dtype):
    torch.manual_seed(0)
    device = DEVICE if backend == "triton" else "cpu"
    layer = CELLS[cell](3, 5, norm=norm, backend=backend).to(device, dtype)
    return layer, torch.randn(4, 3, 3, device=device, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("norm, loss", [(None, "sum"), ("batch", "square")])
def test_fused_backends_refuse_a_second_derivative_by_name(backend, cell, norm, loss):
    """With create_graph=True the first derivative is what it is without; a backward through it
    raises, also where the incoming gradient is a constant (loss "sum"), whose gradient still
    depends on the weights."""
    layer, x = _layer_and_input(backend, cell, norm, torch.float32)

    def objective():
        output, _ = layer(x)
        return output.square().sum() if loss == "square" else output.sum()

    expected, = torch.autograd.grad(objective(), x)
    gradient, = torch.autograd.grad(objective(), x, create_graph=True)
    assert torch.equal(gradient.detach(), expected) and gradient.requires_grad
    with pytest.raises(RuntimeError, match=f"the {backend} backend computes first derivatives only.*"
                                           "backend='reference'"):
        gradient.square().sum().backward()
