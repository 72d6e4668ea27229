"""The real Triton GRU kernels, forward and backward, against the float64 reference.

On a CPU they run under the Triton interpreter (``TRITON_INTERPRET=1``, set before triton is
imported), on a GPU compiled; outputs are poisoned with NaN before the kernels write them."""
import pytest
import torch

import normrnn
from fused_helpers import (DEVICE, INTERPRETER_OFF, assert_deterministic, compare, make_pair, relative_error,
                           saved_shapes_and_backward)

if INTERPRETER_OFF:
    pytest.skip("no CUDA device and the Triton interpreter is off", allow_module_level=True)


def _pair(norm, dtype, **config):
    return make_pair(normrnn.GRU, norm, dtype, **config)


@pytest.mark.parametrize("norm", [None, "batch", "layer", "seqbatch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_single_layer_with_state_and_lengths(norm, dtype):
    reference, fused = _pair(norm, dtype, input_size=5, hidden_size=19)
    x = torch.randn(6, 9, 5, dtype=torch.float64)  # odd sizes, at least five active rows a step
    compare(reference, fused, x, torch.randn(1, 9, 19, dtype=torch.float64), torch.tensor([6, 3, 1, 6, 4, 6, 6, 6, 5]),
             dtype)


@pytest.mark.parametrize("norm, gate_sized, hidden_sized", [(None, 1, 1), ("layer", 3, 0), ("batch", 2, 0)])
def test_without_a_norm_the_backward_keeps_the_gates_not_the_projections(norm, gate_sized, hidden_sized):
    """The (T, B, 3H) and (T, B, H) tensors autograd keeps for the backward: without a norm the
    forward's (r, z, u_n) and n, not x W_ih^T; under batch norm both raw projections; under layer
    norm both, and the raw x W_ih^T that its layer norm before the loop keeps for its own backward."""
    steps, batch, hidden = 5, 3, 6
    layer = normrnn.GRU(4, hidden, norm=norm, backend="triton").to(DEVICE)
    shapes = saved_shapes_and_backward(layer, torch.randn(steps, batch, 4, device=DEVICE))
    assert shapes.count((steps, batch, 3 * hidden)) == gate_sized, shapes
    assert shapes.count((steps, batch, hidden)) == hidden_sized, shapes


@pytest.mark.parametrize("norm, dtype, gate_sized, hidden_sized", [
    (None, torch.float32, 1, 1), (None, torch.bfloat16, 1, 1), ("layer", torch.float32, 2, 0),
    ("batch", torch.float32, 2, 0)])
def test_without_a_norm_the_backward_stores_the_shared_gradient_columns_once(monkeypatch, norm, dtype, gate_sized,
                                                                           hidden_sized):
    """The float32 (T, B, 3H) and (T, B, H) buffers the backward fills: without a norm dwh's r and z
    columns are dwx's, so dwh keeps only its candidate column r * da_n; under a norm dwx and dwh
    differ in every column. (bf16's rounded copy of dwh for the recurrent product is not float32.)"""
    import normrnn.kernels.gru_backward as gru_backward
    steps, batch, hidden = 5, 3, 6
    allocated = []

    def recording(shape, dtype, device):
        allocated.append((tuple(shape), dtype))
        return original(shape, dtype, device)
    original = gru_backward.new_buffer
    monkeypatch.setattr(gru_backward, "new_buffer", recording)
    layer = normrnn.GRU(4, hidden, norm=norm, backend="triton").to(DEVICE, dtype)
    saved_shapes_and_backward(layer, torch.randn(steps, batch, 4, device=DEVICE, dtype=dtype))
    assert allocated.count(((steps, batch, 3 * hidden), torch.float32)) == gate_sized, allocated
    assert allocated.count(((steps, batch, hidden), torch.float32)) == hidden_sized, allocated


@pytest.mark.parametrize("norm", [None, "batch", "layer"])
def test_without_bias(norm):
    reference, fused = _pair(norm, torch.float32, input_size=4, hidden_size=17, bias=False)
    compare(reference, fused, torch.randn(5, 8, 4, dtype=torch.float64), None, None, torch.float32)


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_two_layers_bidirectional_and_eval(norm):
    reference, fused = _pair(norm, torch.float32, input_size=3, hidden_size=7, num_layers=2, bidirectional=True,
                             max_steps=3)
    x = torch.randn(5, 8, 3, dtype=torch.float64)
    compare(reference, fused, x, None, torch.tensor([5, 2, 4, 3, 5, 5, 5, 5]), torch.float32)
    reference.eval()
    fused.eval()
    with torch.no_grad():  # beyond max_steps: the last step's running statistics
        expected, _ = reference(x)
        got, _ = fused(x.float().to(DEVICE))
    assert relative_error(got.cpu(), expected) < 1e-4


@pytest.mark.parametrize("resident", [True, False], ids=["weights-on-chip", "weights-streamed"])
@pytest.mark.parametrize("norm", [None, "batch", "layer"])
def test_persistent_kernel_and_batch_tiles(monkeypatch, norm, resident):
    """One program (H <= 16) runs the persistent kernel under the interpreter, its forward with W_hh
    loaded once before the loop or streamed every step, whichever ``resident_weights`` would choose
    on a GPU (forced here); 70 rows make two batch tiles, or under batch norm two chunks that one
    program walks (more in ``test_batch_norm_chunks.py``)."""
    from normrnn.kernels import layout
    monkeypatch.setenv("NORMRNN_PERSISTENT", "1")
    asked = []
    monkeypatch.setattr(layout, "resident_weights", lambda *args: asked.append(args) or resident)
    reference, fused = _pair(norm, torch.float32, input_size=3, hidden_size=9)
    compare(reference, fused, torch.randn(4, 4, 3, dtype=torch.float64), None, torch.tensor([4, 4, 2, 3]),
             torch.float32)
    assert asked  # the persistent launcher asked, and ran the path the answer chose
    monkeypatch.delenv("NORMRNN_PERSISTENT")
    lengths = torch.randint(1, 4, (70,))
    lengths[:8] = 3
    compare(reference, fused, torch.randn(3, 70, 3, dtype=torch.float64), None, lengths, torch.float32)


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


@pytest.mark.parametrize("norm", [None, "batch", "layer"])
def test_deterministic(norm):
    """Bit-identical results from the same inputs, over two programs and padded rows."""
    _, fused = _pair(norm, torch.float32, input_size=4, hidden_size=18)
    assert_deterministic(fused, torch.randn(4, 6, 4), torch.tensor([4, 2, 4, 3, 4, 4]))
