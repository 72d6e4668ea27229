"""The fused layers' ``torch.library`` custom ops keep the contracts PyTorch checks for custom ops.

``torch.library.opcheck`` runs each op as the layers call it (every cell and norm, training with a
backward to follow and evaluation, padded sequences, the LSTM's projection) and checks its schema
(no undeclared mutation or aliasing), its fake (meta) implementation against the real one (shapes,
dtypes, strides), its autograd registration, and, for the forward ops, that AOTAutograd's tracing
under dynamic shapes computes what eager does. The last needs an op to return the same values from
the same inputs, so no output may hold uninitialized memory: with outputs poisoned with NaN
(``NORMRNN_POISON``, which ``fused_helpers`` sets), every element of every output is written."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import normrnn
from fused_helpers import DEVICE, INTERPRETER_OFF

if INTERPRETER_OFF:
    pytest.skip("no CUDA device and the Triton interpreter is off", allow_module_level=True)

# test_aot_dispatch_dynamic differentiates the op, which by design raises for the backward ops (first
# derivatives only, as cuDNN's RNNs) and for a forward that saved nothing for a backward (evaluation)
UNDIFFERENTIABLE_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")
MODES = ["train", "train-no-grad", "eval"]


class _OpCalls(TorchDispatchMode):
    """Records every call of a ``normrnn::`` op with its arguments and results."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func.namespace == "normrnn":
            self.calls.append((func, args, kwargs, result))
        return result


def _op_calls(cell, norm, mode, proj_size=0):
    """The normrnn ops one step of ``mode`` makes: a forward, and in training the backward. In
    training the sequences are padded and the initial state given; in evaluation neither, so
    that the ops' optional arguments are seen both ways."""
    config = {"proj_size": proj_size} if proj_size else {}
    layer = getattr(normrnn, cell)(4, 8, norm=norm, backend="triton", **config).to(DEVICE)
    layer.train(mode != "eval")
    x = torch.randn(5, 3, 4, device=DEVICE, requires_grad=mode == "train")
    lengths, hx = None, None
    if mode != "eval":
        lengths = torch.tensor([5, 2, 4])
        h0 = torch.randn(1, 3, proj_size or 8, device=DEVICE)
        hx = (h0, torch.randn(1, 3, 8, device=DEVICE)) if cell == "LSTM" else h0
    recorder = _OpCalls()
    with recorder, torch.set_grad_enabled(mode == "train"):
        output, _ = layer(x, hx, lengths=lengths)
        if mode == "train":
            output.sum().backward()
    assert recorder.calls, "the layer called no normrnn op"
    return recorder.calls


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


CASES = [(cell, norm, 0) for cell in ("LSTM", "GRU", "RNN") for norm in (None, "layer", "batch", "seqbatch")]
CASES += [("LSTM", norm, 3) for norm in (None, "layer", "batch")]


@pytest.mark.parametrize("cell, norm, proj_size", CASES)
def test_opcheck(cell, norm, proj_size):
    """Every op a training step calls, and the forward of evaluation, pass opcheck."""
    for mode in ("train", "eval"):
        for func, args, kwargs, _ in _op_calls(cell, norm, mode, proj_size):
            differentiable = mode == "train" and not func.name().endswith("_backward")
            checks = {} if differentiable else {"test_utils": UNDIFFERENTIABLE_CHECKS}
            torch.library.opcheck(func, args, kwargs, **checks)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cell, norm, proj_size", CASES)
def test_every_output_is_written(cell, norm, proj_size, mode):
    """No output of any op keeps the NaN its buffer was poisoned with: a statistic the norm does
    not have is a zeroed stand-in, not an unwritten buffer (and it is one step, not T)."""
    for func, _, _, result in _op_calls(cell, norm, mode, proj_size):
        for index, tensor in enumerate(_tensors(result)):
            if tensor.is_floating_point():
                assert not tensor.isnan().any(), f"{func} output {index} {tuple(tensor.shape)}"


def test_the_poisoning_is_on():
    """The check above could not fail if new buffers were not poisoned."""
    from normrnn.kernels import buffers
    assert buffers.new_buffer((2,), torch.float32, DEVICE).isnan().all()
