"""gradcheck in float64 of every cell x norm through the reference (and the module plumbing:
layers, directions, padding)."""
import pytest
import torch
from torch.func import functional_call

from conftest import CELLS, NORMS, draw_running_statistics


def _gradcheck_module(module, x, lengths, with_state):
    names = [name for name, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in module.named_parameters()]
    directions = 2 if module.bidirectional else 1
    batch = x.shape[1]
    # h has proj_size features in an LSTM that projects its output, c hidden_size
    widths = (module.state_size, module.hidden_size)[:2 if module.cell == "lstm" else 1]
    states = []
    if with_state:
        states = [torch.randn((module.num_layers * directions, batch, width), dtype=torch.float64, requires_grad=True)
                  for width in widths]

    def run(x, *flat):
        hx_values = flat[:len(states)]
        parameters = dict(zip(names, flat[len(states):]))
        hx = None
        if hx_values:
            hx = tuple(hx_values) if module.cell == "lstm" else hx_values[0]
        out, final = functional_call(module, parameters, (x, hx), {"lengths": lengths})
        finals = final if isinstance(final, tuple) else (final,)
        return (out,) + tuple(finals)

    inputs = (x.detach().clone().requires_grad_(True), *states, *params)
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def gradcheck_two_layers_bidirectional_and_eval(module):
    """gradcheck of a 2-layer bidirectional ``module`` (input size 2, max_steps=2, float64) over a
    padded batch in training, then in evaluation with running statistics away from their init."""
    x = torch.randn(3, 3, 2, dtype=torch.float64)
    # at least two active rows a step: a step of one would normalize with running statistics that
    # an earlier step of the same call updates (max_steps=2 shares the last slot), which gradcheck's
    # repeated calls would see change
    _gradcheck_module(module, x, torch.tensor([3, 2, 3]), with_state=False)
    draw_running_statistics(module)
    module.eval()  # running statistics, the last slot beyond max_steps
    _gradcheck_module(module, x, torch.tensor([3, 3, 2]), with_state=True)


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("padded", [False, True])
def test_gradcheck_single_layer(cell, norm, padded):
    module = CELLS[cell](3, 2, norm=norm, backend="reference").double()
    for p in module.parameters():  # gains away from their init, so their gradients are generic
        p.data.uniform_(-1, 1)
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    lengths = torch.tensor([4, 2, 3]) if padded else None
    _gradcheck_module(module, x, lengths, with_state=True)


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck_two_layers_bidirectional_padded(cell, norm):
    module = CELLS[cell](2, 2, num_layers=2, bidirectional=True, norm=norm, backend="reference").double()
    for p in module.parameters():
        p.data.uniform_(-1, 1)
    x = torch.randn(3, 3, 2, dtype=torch.float64)
    _gradcheck_module(module, x, torch.tensor([3, 1, 2]), with_state=False)


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("norm", ["batch", "seqbatch"])
def test_gradcheck_eval_mode(cell, norm):
    module = CELLS[cell](3, 2, norm=norm, backend="reference").double()
    draw_running_statistics(module)
    module.eval()
    _gradcheck_module(module, torch.randn(4, 2, 3, dtype=torch.float64), torch.tensor([4, 3]), with_state=True)
