"""The real Triton GRU kernels, forward and backward, against the float64 reference.

On a CPU they run under the Triton interpreter (``TRITON_INTERPRET=1``, set before triton is
imported), on a GPU compiled; outputs are poisoned with NaN before the kernels write them."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["NORMRNN_POISON"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

import normrnn  # noqa: E402
from normrnn.kernels import buffers  # noqa: E402
from conftest import outputs_and_grads, relative_error  # noqa: E402

buffers.POISON = True
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and the Triton interpreter is off", allow_module_level=True)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _pair(norm, dtype, **config):
    reference = normrnn.GRU(norm=norm, backend="reference", **config).double()
    for name, parameter in reference.named_parameters():
        if "norm" in name:
            parameter.data.uniform_(0.5, 1.5)
    fused = normrnn.GRU(norm=norm, backend="triton", **config).to(DEVICE, dtype)
    fused.load_state_dict(reference.state_dict())
    reference.load_state_dict({k: v.to(dtype).double() if v.is_floating_point() else v
                               for k, v in fused.state_dict().items()})
    return reference, fused


def _compare(reference, fused, x, hx, lengths, dtype):
    x = x.to(dtype).double()  # the reference sees the inputs the fused layer sees
    hx = None if hx is None else hx.to(dtype).double()
    expected = outputs_and_grads(reference, x, hx, lengths)
    got = outputs_and_grads(fused, x.to(DEVICE, dtype), None if hx is None else hx.to(DEVICE, dtype), lengths)
    for key, value in expected.items():
        assert torch.isfinite(got[key]).all(), key
        error = relative_error(got[key].cpu(), value)
        if "running_mean" in key:
            # measured on the scale of the spread (sqrt of the running variance): a mean that is
            # zero in exact arithmetic (batch-normalized h without bias) has no relative error
            spread = expected[key.replace("mean", "var")].sqrt().max()
            error = float((got[key].cpu().double() - value).abs().max() / spread)
        assert error < TOLERANCE[dtype], f"{key}: relative error {error:.2e}"


@pytest.mark.parametrize("norm", [None, "batch", "layer", "seqbatch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_layer_with_state_and_lengths(norm, dtype):
    reference, fused = _pair(norm, dtype, input_size=5, hidden_size=19)
    x = torch.randn(6, 9, 5, dtype=torch.float64)  # odd sizes, at least five active rows a step
    _compare(reference, fused, x, torch.randn(1, 9, 19, dtype=torch.float64), torch.tensor([6, 3, 1, 6, 4, 6, 6, 6, 5]),
             dtype)


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_without_bias(norm):
    reference, fused = _pair(norm, torch.float32, input_size=4, hidden_size=17, bias=False)
    _compare(reference, fused, torch.randn(5, 8, 4, dtype=torch.float64), None, None, torch.float32)


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_two_layers_bidirectional_and_eval(norm):
    reference, fused = _pair(norm, torch.float32, input_size=3, hidden_size=7, num_layers=2, bidirectional=True,
                             max_steps=3)
    x = torch.randn(5, 8, 3, dtype=torch.float64)
    _compare(reference, fused, x, None, torch.tensor([5, 2, 4, 3, 5, 5, 5, 5]), torch.float32)
    reference.eval()
    fused.eval()
    with torch.no_grad():  # beyond max_steps: the last step's running statistics
        expected, _ = reference(x)
        got, _ = fused(x.float().to(DEVICE))
    assert relative_error(got.cpu(), expected) < 1e-4


@pytest.mark.parametrize("norm", [None, "batch", "layer"])
def test_persistent_kernel_and_batch_tiles(monkeypatch, norm):
    """One program (H <= 16) runs the persistent kernel under the interpreter; 70 rows make two
    batch tiles where the statistics allow it."""
    monkeypatch.setenv("NORMRNN_PERSISTENT", "1")
    reference, fused = _pair(norm, torch.float32, input_size=3, hidden_size=9)
    _compare(reference, fused, torch.randn(4, 4, 3, dtype=torch.float64), None, torch.tensor([4, 4, 2, 3]),
             torch.float32)
    monkeypatch.delenv("NORMRNN_PERSISTENT")
    lengths = torch.randint(1, 4, (70,))
    lengths[:8] = 3
    _compare(reference, fused, torch.randn(3, 70, 3, dtype=torch.float64), None, lengths, torch.float32)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    reference, fused = _pair("layer", torch.float32, input_size=3, hidden_size=5)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 3, dtype=torch.float64).float().double()
    expected, _ = reference(x)
    got, h_n = compiled(x.float().to(DEVICE))
    assert relative_error(got.detach().cpu(), expected) < 1e-4
    got.sum().backward()
    assert fused.weight_hh_l0.grad is not None and torch.isfinite(fused.weight_hh_l0.grad).all()
