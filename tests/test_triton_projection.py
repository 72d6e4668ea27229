"""The LSTM with an output projection (``proj_size``) through the real Triton kernels, forward and
backward, against the float64 reference.

The kernels recur on r_t = o_t * tanh(N_c(c_t)) with W_hh W_hr in place of W_hh, from r = 0 with
h_0 W_hh^T added at step 0, and h_t = r_t W_hr^T is one matmul after the loop
(``normrnn/triton_lstm.py``): these tests hold the result to the reference's projecting LSTM in
every dtype and layout, the gradients of h_0 and c_0 included. On a CPU the kernels run under the
Triton interpreter, on a GPU compiled; outputs are poisoned before the kernels write them."""
import pytest
import torch

import normrnn
from conftest import draw_running_statistics
from fused_helpers import DEVICE, INTERPRETER_OFF, TOLERANCE, compare, make_pair, relative_error

if INTERPRETER_OFF:
    pytest.skip("no CUDA device and the Triton interpreter is off", allow_module_level=True)


def _pair(norm, dtype, **config):
    return make_pair(normrnn.LSTM, norm, dtype, **config)


def _states(layers, batch, proj_size, hidden_size):
    return (torch.randn(layers, batch, proj_size, dtype=torch.float64),
            torch.randn(layers, batch, hidden_size, dtype=torch.float64))


@pytest.mark.parametrize("norm", [None, "batch", "layer", "seqbatch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_single_layer_with_state_and_lengths(norm, dtype):
    reference, fused = _pair(norm, dtype, input_size=5, hidden_size=19, proj_size=6)
    x = torch.randn(6, 9, 5, dtype=torch.float64)
    compare(reference, fused, x, _states(1, 9, 6, 19), torch.tensor([6, 3, 1, 6, 4, 6, 6, 6, 5]), dtype)


@pytest.mark.parametrize("norm", [None, "batch", "layer"])
def test_two_layers_bidirectional(norm):
    reference, fused = _pair(norm, torch.float32, input_size=3, hidden_size=7, proj_size=3, num_layers=2,
                             bidirectional=True)
    x = torch.randn(5, 8, 3, dtype=torch.float64)
    compare(reference, fused, x, _states(4, 8, 3, 7), torch.tensor([5, 2, 4, 3, 5, 5, 5, 5]), torch.float32)
    compare(reference, fused, x, None, None, torch.float32)


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_eval_mode_beyond_max_steps_saves_nothing(norm):
    reference, fused = _pair(norm, torch.float32, input_size=4, hidden_size=11, proj_size=5, max_steps=3)
    draw_running_statistics(reference)
    fused.load_state_dict(reference.state_dict())
    reference.eval()
    fused.eval()
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    hx = _states(1, 2, 5, 11)
    with torch.no_grad():
        expected, (expected_h, expected_c) = reference(x, hx)
        got, (h_n, c_n) = fused(x.float().to(DEVICE), tuple(h.float().to(DEVICE) for h in hx))
    assert not got.requires_grad
    for actual, wanted in ((got, expected), (h_n, expected_h), (c_n, expected_c)):
        assert relative_error(actual.cpu(), wanted) < 1e-4


@pytest.mark.parametrize("norm", [None, "batch", "layer"])
def test_persistent_kernel_with_grid_barrier(monkeypatch, norm):
    """Step 0's given product through the persistent kernel too (one program under the
    interpreter: H <= 16), its weights held on chip."""
    from normrnn.kernels import layout
    monkeypatch.setenv("NORMRNN_PERSISTENT", "1")
    monkeypatch.setattr(layout, "resident_weights", lambda *args: True)
    reference, fused = _pair(norm, torch.float32, input_size=3, hidden_size=9, proj_size=4)
    compare(reference, fused, torch.randn(5, 4, 3, dtype=torch.float64), _states(1, 4, 4, 9),
            torch.tensor([5, 5, 2, 4]), torch.float32)


def test_batch_norm_over_a_batch_of_more_than_one_tile():
    """70 sequences under batch norm: one program walks them in two chunks of 64 rows, and the
    given product of step 0 reaches the rows of both."""
    reference, fused = _pair("batch", torch.float32, input_size=3, hidden_size=6, proj_size=2)
    lengths = torch.randint(1, 4, (70,))
    lengths[:8] = 3
    compare(reference, fused, torch.randn(3, 70, 3, dtype=torch.float64), _states(1, 70, 2, 6), lengths,
            torch.float32)


@pytest.mark.parametrize("norm,dtype", [("batch", torch.float32), ("layer", torch.float32),
                                        ("batch", torch.bfloat16)])
def test_torch_compile_fullgraph(norm, dtype):
    """Compiled, the layer computes what it computes eagerly, in the layer's dtype everywhere (in
    bfloat16 under batch norm the kernels' state is float32, c_n still the layer's dtype)."""
    torch._dynamo.reset()
    reference, fused = _pair(norm, dtype, input_size=3, hidden_size=5, proj_size=2)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 3, dtype=torch.float64).to(dtype).double()
    expected, _ = reference(x)
    got, (h_n, c_n) = compiled(x.to(DEVICE, dtype))
    assert got.shape == (4, 3, 2) and h_n.shape == (1, 3, 2) and c_n.shape == (1, 3, 5)
    assert got.dtype == h_n.dtype == c_n.dtype == dtype
    assert relative_error(got.detach().cpu(), expected) < TOLERANCE[dtype]
    got.sum().backward()
    for parameter in (fused.weight_hh_l0, fused.weight_hr_l0):
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all()


def test_no_backend_refuses_the_projection():
    """The kernels run the projecting LSTM wherever they run the LSTM: on CUDA tensors "auto"
    takes them (on CPU tensors the interpreter is for tests only, and "auto" never does)."""
    probe = torch.zeros(1, device=DEVICE)
    assert normrnn.dispatch.unavailable_reason("triton", "lstm", "batch", probe) is None
    if DEVICE == "cuda":
        assert normrnn.dispatch.resolve("auto", "lstm", "batch", probe) == "triton"
