"""The real Triton LSTM kernels, forward and backward, against the float64 reference.

On a CPU they run under the Triton interpreter (``TRITON_INTERPRET=1``, set here before triton is
imported), on a GPU compiled; outputs are poisoned with NaN before the kernels write them (``NORMRNN_POISON``)."""
import pytest
import torch

import normrnn
from conftest import draw_running_statistics
from fused_helpers import (DEVICE, INTERPRETER_OFF, assert_deterministic, compare, make_pair, outputs_and_grads,
                           relative_error, saved_shapes_and_backward)

if INTERPRETER_OFF:
    pytest.skip("no CUDA device and the Triton interpreter is off", allow_module_level=True)


def _pair(norm, dtype, **config):
    return make_pair(normrnn.LSTM, norm, dtype, **config)


@pytest.mark.parametrize("norm", [None, "batch", "layer", "seqbatch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_single_layer_with_state_and_lengths(norm, dtype):
    reference, fused = _pair(norm, dtype, input_size=5, hidden_size=19)
    # odd sizes, batch not a multiple of the block, at least five active rows at every step
    x = torch.randn(6, 9, 5, dtype=torch.float64)
    hx = (torch.randn(1, 9, 19, dtype=torch.float64), torch.randn(1, 9, 19, dtype=torch.float64))
    compare(reference, fused, x, hx, torch.tensor([6, 3, 1, 6, 4, 6, 6, 6, 5]), dtype)


def test_batch_norm_over_few_rows_is_as_accurate_as_float32_allows():
    """Batch statistics of two or three rows are ill-conditioned: x - mean cancels, and the float32
    reference itself lands near 1e-4 of the float64 one (up to 1.6e-4 over seeds, in whichever
    tensor the cancellation hits; a different but equally valid order of float32 operations lands
    elsewhere in the same range). The kernel must be within 1e-4 or within four times the float32
    reference's worst error on the same problem: a wrong gradient is off by far more."""
    reference, fused = _pair("batch", torch.float32, input_size=5, hidden_size=19)
    reference32 = normrnn.LSTM(norm="batch", backend="reference", input_size=5, hidden_size=19)
    reference32.load_state_dict(fused.state_dict())
    reference.load_state_dict({k: v.double() for k, v in fused.state_dict().items()})
    x = torch.randn(6, 5, 5).double()
    hx = (torch.randn(1, 5, 19).double(), torch.randn(1, 5, 19).double())
    lengths = torch.tensor([6, 3, 1, 6, 4])  # two active rows at steps 4 and 5
    expected = outputs_and_grads(reference, x, hx, lengths)
    floor = outputs_and_grads(reference32, x.float(), tuple(h.float() for h in hx), lengths)
    got = outputs_and_grads(fused, x.to(DEVICE, torch.float32), tuple(h.to(DEVICE, torch.float32) for h in hx),
                            lengths)
    bound = max(1e-4, 4 * max(relative_error(floor[key], value) for key, value in expected.items()))
    for key, value in expected.items():
        error = relative_error(got[key].cpu(), value)
        assert error < bound, f"{key}: relative error {error:.2e}, bound {bound:.2e}"


@pytest.mark.parametrize("norm", [None, "batch", "layer"])
def test_two_layers_bidirectional(norm):
    reference, fused = _pair(norm, torch.float32, input_size=3, hidden_size=7, num_layers=2, bidirectional=True)
    # at least five active rows at every step: batch norm over two or three rows amplifies fp32
    # rounding to about 2e-4 (see the issue notes)
    x = torch.randn(5, 8, 3, dtype=torch.float64)
    compare(reference, fused, x, None, torch.tensor([5, 2, 4, 3, 5, 5, 5, 5]), torch.float32)
    compare(reference, fused, x, None, None, torch.float32)


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_eval_mode_uses_running_statistics_and_saves_nothing(norm):
    reference, fused = _pair(norm, torch.float32, input_size=4, hidden_size=19, max_steps=3)
    draw_running_statistics(reference)
    fused.load_state_dict(reference.state_dict())
    reference.eval()
    fused.eval()
    x = torch.randn(5, 1, 4, dtype=torch.float64)  # beyond max_steps, batch of one
    with torch.no_grad():
        expected, _ = reference(x)
        got, _ = fused(x.float().to(DEVICE))
    assert relative_error(got.cpu(), expected) < 1e-4


@pytest.mark.parametrize("norm, gate_sized", [(None, 1), ("batch", 2)])
def test_training_keeps_for_the_backward_only_the_gate_sized_tensors_its_norm_needs(norm, gate_sized):
    """Without a norm the forward saves z = wx + wh + b and the backward reads it alone, so x W_ih^T
    is not kept alive; per-timestep batch norm needs both raw projections for its backward."""
    steps, batch, hidden = 5, 3, 6
    layer = normrnn.LSTM(4, hidden, norm=norm, backend="triton").to(DEVICE)
    shapes = saved_shapes_and_backward(layer, torch.randn(steps, batch, 4, device=DEVICE))
    assert shapes.count((steps, batch, 4 * hidden)) == gate_sized, shapes


@pytest.mark.parametrize("norm", [None, "batch", "layer"])
def test_deterministic(norm):
    """Bit-identical results from the same inputs: no float atomics, fixed reduction orders."""
    _, fused = _pair(norm, torch.float32, input_size=4, hidden_size=18)
    assert_deterministic(fused, torch.randn(4, 3, 4))


@pytest.mark.parametrize("resident", [True, False], ids=["weights-on-chip", "weights-streamed"])
@pytest.mark.parametrize("norm", [None, "batch", "layer"])
def test_persistent_kernel_with_grid_barrier(monkeypatch, norm, resident):
    """The persistent kernel (one launch, grid barriers between steps and phases), with W_hh loaded
    once before the loop or streamed every step, whichever ``resident_weights`` would choose on a
    GPU (forced here: the rule is tested on its own). The interpreter runs programs one after
    another, so it can run it with a single program (H <= 16)."""
    from normrnn.kernels import layout
    from normrnn.kernels.buffers import PERSISTENT, launch_mode
    monkeypatch.setenv("NORMRNN_PERSISTENT", "1")
    asked = []
    monkeypatch.setattr(layout, "resident_weights", lambda *args: asked.append(args) or resident)
    reference, fused = _pair(norm, torch.float32, input_size=3, hidden_size=9)
    assert launch_mode(1, torch.device(DEVICE)) == PERSISTENT
    compare(reference, fused, torch.randn(5, 4, 3, dtype=torch.float64), None, torch.tensor([5, 5, 2, 4]),
             torch.float32)
    assert asked  # the persistent launcher asked, and ran the path the answer chose


def test_a_persistent_request_that_cannot_hold_says_so_once(monkeypatch):
    """NORMRNN_PERSISTENT=1 with a grid that cannot be resident at once (here two programs under the
    interpreter) runs per-step launches and warns once, naming the grid; without the request there
    is nothing to say."""
    import warnings
    from normrnn.kernels.buffers import PERSISTENT, STEP_LAUNCHES, launch_mode
    device = torch.device(DEVICE)
    too_many = 1 if DEVICE == "cpu" else torch.cuda.get_device_properties(device).multi_processor_count
    too_many += 7  # a count no other test uses: the warning is once per process and message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert launch_mode(too_many, device) == STEP_LAUNCHES
        monkeypatch.setenv("NORMRNN_PERSISTENT", "1")
        assert launch_mode(too_many, device) == STEP_LAUNCHES
        assert launch_mode(too_many, device) == STEP_LAUNCHES
        assert launch_mode(1, device) == PERSISTENT
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 1 and f"a grid of {too_many} programs cannot be resident at once" in messages[0]


def test_weights_stay_on_chip_only_where_the_compile_report_showed_it_pays():
    """On warpgroup tensor cores (16-bit operands, 64-row tiles) with W_hh's rows and the h tile
    within the budget: B=64, H=512 in bf16 yes; H=1024, a 16-row tile, float32 products, or the
    float32 pair of batch norm's tf32x3, no."""
    from normrnn.kernels.layout import resident_weights
    assert resident_weights(64, 16, 4, 512, torch.bfloat16, "native")
    assert resident_weights(64, 16, 4, 300, torch.float16, "native")
    assert not resident_weights(64, 16, 4, 1024, torch.bfloat16, "native")
    assert not resident_weights(16, 16, 4, 512, torch.bfloat16, "native")
    assert not resident_weights(64, 16, 4, 256, torch.float32, "ieee")
    assert not resident_weights(64, 16, 4, 128, torch.float32, "tf32x3")


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_torch_compile_fullgraph(norm):
    torch._dynamo.reset()
    reference, fused = _pair(norm, torch.float32, input_size=3, hidden_size=5)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    expected, _ = reference(x)
    got, (h_n, c_n) = compiled(x.float().to(DEVICE))
    assert relative_error(got.detach().cpu(), expected) < 1e-4
    got.sum().backward()
    assert fused.weight_hh_l0.grad is not None and torch.isfinite(fused.weight_hh_l0.grad).all()


_FIRST_CALL_COMPILED = """
import copy, sys, torch
sys.path.insert(0, {tests!r})
import fused_helpers
import normrnn
layer = normrnn.LSTM(3, 9, norm="batch", backend="triton", device=fused_helpers.DEVICE)
cast = copy.deepcopy(layer).to(torch.float16)
compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
x = torch.randn(5, 4, 3, device=fused_helpers.DEVICE)
with torch.autocast(x.device.type, dtype=torch.float16):
    output, _ = compiled(x)
output.float().sum().backward()
expected, _ = cast(x.half())
expected.float().sum().backward()
assert output.dtype == torch.float16 and torch.equal(output, expected), "output"
assert torch.equal(layer.weight_hh_l0.grad, cast.weight_hh_l0.grad.float()), "grad"
print("compiled first call: ok")
"""


def test_a_layer_whose_first_call_is_compiled_under_autocast():
    """In a fresh process, where nothing has imported the Triton backend yet (Dynamo cannot trace
    an import: the layer imports its backend when it is built), a layer's first call is
    ``torch.compile(fullgraph=True)``'s, under autocast: it computes bit for bit what the layer cast
    to float16 computes."""
    import pathlib
    import subprocess
    import sys
    tests = str(pathlib.Path(__file__).resolve().parent)
    result = subprocess.run([sys.executable, "-c", _FIRST_CALL_COMPILED.format(tests=tests)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and "compiled first call: ok" in result.stdout, result.stderr[-3000:]


def test_auto_uses_the_kernels_and_warns_for_what_they_do_not_cover():
    if DEVICE == "cuda":
        assert normrnn.dispatch.resolve("auto", "lstm", None, torch.zeros(1, device=DEVICE)) == "triton"
        with pytest.warns(RuntimeWarning, match="float64"):
            chosen = normrnn.dispatch.resolve("auto", "gru", None, torch.zeros(1, device=DEVICE, dtype=torch.float64))
        assert chosen == "reference"
    else:  # the interpreter is for tests only: "auto" on CPU tensors never picks it
        assert normrnn.dispatch.resolve("auto", "lstm", None, torch.zeros(1)) != "triton"


@pytest.mark.parametrize("norm", [None, "layer", "batch"])
def test_batch_larger_than_one_tile(norm):
    """70 sequences: two batch tiles of 64 rows on grid axis 1 (None, layer), or one program that
    walks them in two chunks where batch statistics must stay in it (batch: more in
    ``test_batch_norm_chunks.py``)."""
    reference, fused = _pair(norm, torch.float32, input_size=3, hidden_size=19)
    lengths = torch.randint(1, 4, (70,))
    lengths[:8] = 3
    compare(reference, fused, torch.randn(3, 70, 3, dtype=torch.float64), None, lengths, torch.float32)
