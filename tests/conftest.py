"""Shared helpers for the tests: module factories, gradcheck wrappers, relative errors."""
import os
import zlib

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


def outputs_and_grads(module, x, hx=None, lengths=None, seed=0):
    """Runs forward and backward with a fixed random projection of every output, and returns
    the outputs and the gradients of x and every parameter, in a flat dict."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
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
    for name, parameter in module.named_parameters():
        results["grad_" + name] = parameter.grad.detach() if parameter.grad is not None else torch.zeros_like(parameter)
    for name, buffer in module.named_buffers():
        results[name] = buffer.detach().clone()
    return results


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different seed per test, reproducible per test name (str hash() is salted per process).
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


interpreter = os.environ.get("TRITON_INTERPRET") == "1"
