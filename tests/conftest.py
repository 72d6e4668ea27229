"""Shared helpers for the tests: module factories, gradcheck wrappers, relative errors."""
import os
import zlib
from typing import Dict

import pytest
import torch

import normrnn

CELLS = {"lstm": normrnn.LSTM, "gru": normrnn.GRU, "rnn": normrnn.RNN}
NORMS = [None, "layer", "batch", "seqbatch"]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max(max |e|, tiny): one number per tensor, robust to small entries."""
    actual, expected = actual.detach(), expected.detach().double()
    scale = expected.abs().max().clamp_min(1e-12)
    return float((actual.double() - expected).abs().max() / scale)


def tensor_error(key: str, actual: torch.Tensor, expected: Dict[str, torch.Tensor],
                 smallest_scale: float = 1e-12) -> float:
    """The error of result ``key`` of ``outputs_and_grads`` (or a buffer) against ``expected[key]``:
    exact for an update count (0, or inf where they differ); a running mean's max |a - e| over the
    largest running standard deviation ``sqrt(expected[key's var])``; inf where ``actual`` is not
    finite; else max |a - e| / max(max |e|, smallest_scale)."""
    value = expected[key].detach()
    actual = actual.detach().cpu()
    if "num_batches_tracked" in key:
        return 0.0 if torch.equal(actual, value) else float("inf")
    if not torch.isfinite(actual).all():
        return float("inf")
    if value.numel() == 0:
        return 0.0
    difference = float((actual.double() - value.double()).abs().max())
    if "running_mean" in key:
        # on the scale of the spread: a mean that is zero in exact arithmetic (batch-normalized h
        # without bias) has no relative error
        return difference / max(float(expected[key.replace("mean", "var")].sqrt().max()), 1e-12)
    return difference / max(float(value.abs().max()), smallest_scale)


def to_dtype(value, dtype: torch.dtype, device=None):
    """``value`` (a tensor, a tuple of them such as an LSTM's (h_0, c_0), or None) in ``dtype``, on
    ``device`` (where given) or its own."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(to_dtype(item, dtype, device) for item in value)
    return value.to(device or value.device, dtype)


def outputs_and_grads(module, x, hx=None, lengths=None, seed=0, call=None):
    """Runs forward and backward with a fixed random projection of every output, and returns
    the outputs and the gradients of x, of the initial states ``hx`` where given ("grad_hx0",
    "grad_hx1" for an LSTM's h_0 and c_0) and of every parameter, in a flat dict. ``call(x, hx)``,
    where given, runs the forward in place of ``module(x, hx, lengths=lengths)`` and returns what
    the module returns, with a padded output."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    states = ()
    if hx is not None:
        states = tuple(h.detach().clone().requires_grad_(True) for h in (hx if isinstance(hx, tuple) else (hx,)))
        hx = states if isinstance(hx, tuple) else states[0]
    if call is not None:
        out, final = call(x, hx)
    else:
        out, final = module(x, hx) if lengths is None else module(x, hx, lengths=lengths)
    finals = final if isinstance(final, tuple) else (final,)
    generator = torch.Generator().manual_seed(seed)
    loss = 0
    results = {"output": out.detach()}
    for index, tensor in enumerate((out,) + tuple(finals)):
        # bfloat16-representable weights: the upstream gradient is then exact in every dtype
        # compared, and differences measure the module, not the rounding of the loss
        weight = torch.randn(tensor.shape, generator=generator, dtype=torch.float64).to(torch.bfloat16)
        weight = weight.to(tensor.device, tensor.dtype)
        loss = loss + (tensor * weight).sum()
        if index:
            results[f"final{index - 1}"] = tensor.detach()
    loss.backward()
    results["grad_input"] = x.grad.detach()
    for index, state in enumerate(states):
        results[f"grad_hx{index}"] = state.grad.detach() if state.grad is not None else torch.zeros_like(state)
    for name, parameter in module.named_parameters():
        results["grad_" + name] = parameter.grad.detach() if parameter.grad is not None else torch.zeros_like(parameter)
    for name, buffer in module.named_buffers():
        results[name] = buffer.detach().clone()
    return results


def draw_running_statistics(module):
    """Draws ``module``'s running statistics away from their init (means of order 1, variances in
    [0.5, 1.5]), in place, so that normalizing with them differs from normalizing with a batch's."""
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            buffer.uniform_(0.5, 1.5) if "var" in name else buffer.normal_()
    return module


def assert_float32_backend_equals_the_reference(layer_class, norm, backend, **config):
    """``layer_class`` on ``backend`` in float32 against the float64 reference with the same
    weights (norm gains away from their init), 2 layers, bidirectional, padded, max_steps=4:
    outputs, final states, every gradient and the running statistics within 1e-4, then in
    evaluation beyond max_steps (the last slot's population statistics). Returns the float32
    results (``outputs_and_grads``)."""
    config = dict(input_size=5, num_layers=2, bidirectional=True, max_steps=4, **config)
    reference = layer_class(norm=norm, backend="reference", **config)
    for name, parameter in reference.named_parameters():
        if "norm" in name:
            parameter.data.uniform_(0.5, 1.5)
    fused = layer_class(norm=norm, backend=backend, **config)
    fused.load_state_dict(reference.state_dict())
    reference = reference.double()
    x = torch.randn(6, 9, 5).double()
    lengths = torch.tensor([6, 3, 1, 6, 4, 6, 6, 6, 5])
    expected = outputs_and_grads(reference, x, None, lengths)
    got = outputs_and_grads(fused, x.float(), None, lengths)
    for key, value in expected.items():  # outputs, final states, every gradient, running statistics
        assert relative_error(got[key], value) < 1e-4, key
    reference.eval()
    fused.eval()
    with torch.no_grad():  # beyond max_steps: the population statistics of the last slot
        assert relative_error(fused(x.float())[0], reference(x)[0]) < 1e-4
    return got


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different seed per test, reproducible per test name (str hash() is salted per process).
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


interpreter = os.environ.get("TRITON_INTERPRET") == "1"
