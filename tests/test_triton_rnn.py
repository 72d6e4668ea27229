"""The real Triton vanilla-RNN kernels, forward and backward, against the float64 reference.

On a CPU they run under the Triton interpreter (``TRITON_INTERPRET=1``, set before triton is
imported), on a GPU compiled; outputs are poisoned with NaN before the kernels write them."""
import pytest
import torch

import normrnn
from conftest import outputs_and_grads
from fused_helpers import (DEVICE, INTERPRETER_OFF, assert_deterministic, compare, make_pair, relative_error,
                           saved_shapes_and_backward)

if INTERPRETER_OFF:
    pytest.skip("no CUDA device and the Triton interpreter is off", allow_module_level=True)


def _pair(norm, dtype, **config):
    return make_pair(normrnn.RNN, norm, dtype, **config)


@pytest.mark.parametrize("norm", [None, "batch", "layer", "seqbatch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_single_layer_with_state_and_lengths(norm, dtype):
    reference, fused = _pair(norm, dtype, input_size=5, hidden_size=19)
    x = torch.randn(6, 9, 5, dtype=torch.float64)  # odd sizes, at least five active rows a step
    compare(reference, fused, x, torch.randn(1, 9, 19, dtype=torch.float64), torch.tensor([6, 3, 1, 6, 4, 6, 6, 6, 5]),
             dtype)


@pytest.mark.parametrize("nonlinearity", ["relu", None])
def test_batch_norm_in_place_of_tanh_and_bias(nonlinearity):
    """The configuration the library's question is about: BN(W_ih x) + BN(W_hh h), no activation
    (or relu), no bias."""
    reference, fused = _pair("batch", torch.float32, input_size=4, hidden_size=17, bias=False,
                             nonlinearity=nonlinearity)
    compare(reference, fused, torch.randn(5, 8, 4, dtype=torch.float64), None, None, torch.float32)


@pytest.mark.parametrize("nonlinearity", ["relu", None])
@pytest.mark.parametrize("norm", [None, "layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_and_identity_with_lengths(norm, nonlinearity, dtype):
    """The backward takes act'(pre_t) from the saved h_t: relu's from h_t > 0, the identity's 1,
    with rows that ended before the last step (their h_t is the carried state, not act(pre_t))."""
    reference, fused = _pair(norm, dtype, input_size=4, hidden_size=11, nonlinearity=nonlinearity)
    compare(reference, fused, torch.randn(6, 7, 4, dtype=torch.float64), torch.randn(1, 7, 11, dtype=torch.float64),
            torch.tensor([6, 2, 6, 5, 1, 6, 3]), dtype)


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("norm, gate_sized", [(None, 0), ("layer", 2), ("batch", 2)])
def test_only_batch_norm_keeps_the_input_projection_for_the_backward(norm, gate_sized, training):
    """The backward takes the activation's derivative from h: without a norm the kernels keep
    neither x W_ih^T nor u = h W_hh^T, under layer norm u alone (beside the raw projection that
    the layer norm of x W_ih^T before the loop keeps for its own backward), under batch norm both."""
    steps, batch, hidden = 5, 3, 6
    layer = normrnn.RNN(4, hidden, norm=norm, backend="triton").to(DEVICE).train(training)
    shapes = saved_shapes_and_backward(layer, torch.randn(steps, batch, 4, device=DEVICE))
    assert shapes.count((steps, batch, hidden)) == gate_sized, shapes


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


def test_layer_norm_over_one_hidden_unit_is_its_shift():
    """Layer norm over one feature is 0 (v - mean(v) = 0 exactly), so the pre-activation is
    b_ih + b_hh: h_t = tanh(b_ih + b_hh) at every step, and no gradient reaches x, h_0, W_ih, W_hh or
    the gains. A float32 layer norm that recomputes v - mean from its saved mean returns rounding
    noise of order |v| 2^-24 / sqrt(eps) per unit of upstream gradient in place of those zeros
    (torch's CPU layer_norm backward does, under the projection's norm), which no relative
    tolerance bounds; the noise is bounded here in absolute terms, far below the O(1) gradients of a
    layer norm that did not normalize. (The fuzzer draws H >= 3 for this reason.)"""
    with pytest.warns(UserWarning, match="hidden_size=1 normalizes a single value"):
        reference, fused = _pair("layer", torch.float32, input_size=6, hidden_size=1)
    x = torch.randn(5, 11, 6, dtype=torch.float64) * 3
    h0 = torch.randn(1, 11, 1, dtype=torch.float64)
    expected = outputs_and_grads(reference, x.float().double(), h0.float().double())
    got = outputs_and_grads(fused, x.float().to(DEVICE), h0.float().to(DEVICE))
    shift = torch.tanh(reference.bias_ih_l0 + reference.bias_hh_l0).detach()
    assert (got["output"].cpu().double() - shift).abs().max() < 1e-6
    for key in ("grad_bias_ih_l0", "grad_bias_hh_l0"):
        assert relative_error(got[key].cpu(), expected[key]) < 1e-4, key
    bias_gradient = float(expected["grad_bias_ih_l0"].abs().max())
    assert bias_gradient > 1.0
    zero_in_exact_arithmetic = ["grad_input", "grad_hx0", "grad_weight_ih_l0", "grad_weight_hh_l0",
                                "grad_ih_norm_weight_l0", "grad_hh_norm_weight_l0"]
    for key in zero_in_exact_arithmetic:
        assert float(expected[key].abs().max()) == 0.0, key
        assert float(got[key].abs().max()) < 1e-3 * bias_gradient, key


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
    reference, fused = _pair("batch", torch.float32, input_size=3, hidden_size=5, nonlinearity=None, bias=False)
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
