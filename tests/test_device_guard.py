"""The fused layers launch on their tensors' GPU, not on whichever is current: Triton launches on
the current CUDA device, so every custom op of the fused layers sets it to its first tensor's
(``triton_ops.on_the_tensors_device``)."""
import contextlib

import pytest
import torch

# first: on a CPU it turns the interpreter on, which Triton reads as it is imported (then it skips
# the module where Triton is missing); Triton imported before it ran the kernels of the next test
# file uninterpreted ("Cannot call @triton.jit'd outside of the scope of a kernel")
from fused_helpers import DEVICE  # noqa: E402

import normrnn  # noqa: E402
import normrnn.triton_backend  # noqa: E402,F401 - registers every cell's ops
from normrnn import triton_ops  # noqa: E402


def test_every_custom_op_of_the_fused_layers_is_guarded():
    ops = {f"{cell}_{direction}_op" for cell in ("lstm", "gru", "rnn") for direction in ("forward", "backward")}
    assert triton_ops.GUARDED_OPS == ops


class _OnSecondGPU(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_the_guard_makes_the_first_tensors_device_current(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def current_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", current_device)

    def op(flag, tensor, other):
        return entered[:]

    guarded = triton_ops.on_the_tensors_device(op)
    triton_ops.GUARDED_OPS.discard("op")
    on_second = torch.Tensor._make_subclass(_OnSecondGPU, torch.zeros(1))
    assert guarded(True, on_second, torch.zeros(1)) == [torch.device("cuda", 1)]
    entered.clear()
    assert guarded(True, torch.zeros(1), on_second) == []  # a CPU tensor first: nothing to guard


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_layer_on_the_second_gpu_while_the_first_is_current():
    torch.manual_seed(0)
    layer = normrnn.LSTM(8, 16, norm="layer", backend="triton")
    x = torch.randn(5, 3, 8)
    with torch.cuda.device(0):
        results = []
        for device in ("cuda:0", "cuda:1"):
            copy = layer.to(device)
            output, _ = copy(x.to(device))
            results.append(output.cpu())
    assert DEVICE == "cuda" and torch.equal(results[0], results[1])
