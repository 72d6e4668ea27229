"""The kernels with several programs at once, on a CPU, against the float64 reference: above all
the persistent kernels, and the per-step launches too.

Triton's interpreter runs a launch's programs one after another, so the other kernel tests can run
a persistent kernel only as a single program. Here ``concurrent_interpreter.concurrent_programs``
runs every program of a launch in a thread of its own, all at once, one of them lagging behind
at every memory access: the grid barriers' counting, the exchange of h, dz and the layer norm's
partial statistics between programs through memory, and the order of each step's phases are
checked before a GPU runs them (the GPU's memory model is the compile check's and the GPU run's).
The tests below that break a barrier on purpose show that a race is caught, not passed by luck.
"""
import importlib

import pytest
import torch

import normrnn
# before triton: it turns the interpreter on
from fused_helpers import DEVICE, INTERPRETER_OFF, compare, make_pair, outputs_and_grads, relative_error

if INTERPRETER_OFF or DEVICE != "cpu":
    # on a GPU the programs run at once anyway: the GPU session runs every kernel test with
    # NORMRNN_PERSISTENT=1 (bench/gpu_session.sh)
    pytest.skip("runs the persistent kernels' programs in threads of the Triton interpreter",
                allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from concurrent_interpreter import LaunchTimeout, concurrent_programs  # noqa: E402
from normrnn.kernels import buffers, layout  # noqa: E402

CELLS = {"LSTM": normrnn.LSTM, "GRU": normrnn.GRU, "RNN": normrnn.RNN}


def _lengths(batch, longest):
    lengths = torch.randint(1, longest + 1, (batch,))
    lengths[:5] = longest  # five sequences run every step: batch statistics never over fewer rows
    return lengths


def _run_concurrently(monkeypatch, reference, fused, x, hx, lengths, programs, seed=0, mode=buffers.PERSISTENT):
    """``compare`` with the persistent kernels (or per-step launches), every launch's programs at
    once; asserts that every launch took that mode and that the widest had ``programs`` programs."""
    if mode == buffers.PERSISTENT:
        monkeypatch.setenv("NORMRNN_PERSISTENT", "1")
    else:
        monkeypatch.delenv("NORMRNN_PERSISTENT", raising=False)
    chosen = buffers.LAUNCH_MODES_CHOSEN.copy()
    with concurrent_programs(seed=seed) as record:
        compare(reference, fused, x, hx, lengths, torch.float32)
    assert set(buffers.LAUNCH_MODES_CHOSEN - chosen) == {mode}
    assert record["widest"] == programs and record["launches"] >= 2


@pytest.mark.parametrize("resident", [True, False], ids=["weights-on-chip", "weights-streamed"])
@pytest.mark.parametrize("norm", [None, "layer", "batch"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_three_programs(monkeypatch, cell, norm, resident):
    """H=35: three programs of 16 units, the last one's partly masked; lengths and an initial
    state; the forward's W_hh loaded once before the step loop or streamed every step (forced:
    under the interpreter the rule would always stream)."""
    monkeypatch.setattr(layout, "resident_weights", lambda *args: resident)
    reference, fused = make_pair(CELLS[cell], norm, torch.float32, input_size=3, hidden_size=35)
    h0 = torch.randn(1, 7, 35, dtype=torch.float64)
    hx = (h0, torch.randn(1, 7, 35, dtype=torch.float64)) if cell == "LSTM" else h0
    _run_concurrently(monkeypatch, reference, fused, torch.randn(4, 7, 3, dtype=torch.float64), hx, _lengths(7, 4),
                      programs=3)


@pytest.mark.parametrize("norm", [None, "layer", "batch"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_per_step_launches(monkeypatch, cell, norm):
    """A GPU runs the programs of a per-step launch at once too: none may read what another
    writes in the same launch (h_t, dz_t and the layer norm's partial statistics are read by the
    next launch, or phase), which the interpreter's one-after-another order could hide."""
    reference, fused = make_pair(CELLS[cell], norm, torch.float32, input_size=3, hidden_size=35)
    _run_concurrently(monkeypatch, reference, fused, torch.randn(4, 7, 3, dtype=torch.float64), None, _lengths(7, 4),
                      programs=3, mode=buffers.STEP_LAUNCHES)


@pytest.mark.parametrize("norm", [None, "layer"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_batch_tiles_on_the_second_grid_axis(monkeypatch, cell, norm):
    """70 rows are two 64-row tiles on grid axis 1, times two programs of units: four programs
    wait at each barrier; the layer norm's statistics of a row come from the two programs that
    share its tile."""
    reference, fused = make_pair(CELLS[cell], norm, torch.float32, input_size=3, hidden_size=20)
    _run_concurrently(monkeypatch, reference, fused, torch.randn(3, 70, 3, dtype=torch.float64), None,
                      _lengths(70, 3), programs=4)


@pytest.mark.parametrize("cell", list(CELLS))
def test_batch_norm_chunks_and_evaluation(monkeypatch, cell):
    """Training with batch norm over 131 rows: two programs each walk their columns' batch in three
    chunks, several passes a step; then evaluation with the running statistics it left, where the
    batch is tiled on grid axis 1 (3 x 2 programs), a step past ``max_steps`` included."""
    reference, fused = make_pair(CELLS[cell], "batch", torch.float32, input_size=3, hidden_size=20, max_steps=2)
    x = torch.randn(3, 131, 3, dtype=torch.float64)
    _run_concurrently(monkeypatch, reference, fused, x, None, _lengths(131, 3), programs=2)
    reference.eval()
    fused.eval()
    with torch.no_grad(), concurrent_programs(seed=1) as record:
        expected, _ = reference(x)
        got, _ = fused(x.float())
    assert record["widest"] == 6
    assert relative_error(got, expected) < 1e-4


@pytest.mark.parametrize("cell", list(CELLS))
def test_layer_norm_statistics_of_five_programs(monkeypatch, cell):
    """H=80: a row's layer-norm statistics combine the partials of five programs (a block of eight
    partials, three masked), in the same order in every program."""
    reference, fused = make_pair(CELLS[cell], "layer", torch.float32, input_size=3, hidden_size=80)
    _run_concurrently(monkeypatch, reference, fused, torch.randn(3, 6, 3, dtype=torch.float64), None, _lengths(6, 3),
                      programs=5)


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_two_layers_bidirectional(monkeypatch, norm):
    """Every layer and direction one persistent launch forward and one backward."""
    reference, fused = make_pair(normrnn.LSTM, norm, torch.float32, input_size=3, hidden_size=18, num_layers=2,
                                 bidirectional=True)
    _run_concurrently(monkeypatch, reference, fused, torch.randn(3, 6, 3, dtype=torch.float64), None, _lengths(6, 3),
                      programs=2)


@triton.jit
def _barrier_one_phase_early(barrier_ptr, arrivals):
    """A broken grid barrier: it lets a program go on once the others have reached the previous
    barrier, so it may run one phase ahead of the slowest."""
    tl.debug_barrier()
    tl.atomic_add(barrier_ptr, 1, sem="release")
    previous = arrivals - tl.num_programs(0) * tl.num_programs(1)
    arrived = tl.atomic_add(barrier_ptr, 0, sem="acquire")
    while arrived < previous:
        arrived = tl.atomic_add(barrier_ptr, 0, sem="acquire")


def _persistent_kernels():
    """(cell, norm, kernel file) for every persistent kernel and every norm it runs."""
    pairs = [("LSTM", norm, f"lstm_{way}") for norm in (None, "batch") for way in ("forward", "backward")]
    pairs += [("LSTM", "layer", f"lstm_layer_norm_{way}") for way in ("forward", "backward")]
    pairs += [(cell, norm, f"{cell.lower()}_{way}") for cell in ("GRU", "RNN") for norm in (None, "layer", "batch")
              for way in ("forward", "backward")]
    return pairs


@pytest.mark.parametrize("cell, norm, kernels", _persistent_kernels())
def test_a_barrier_one_phase_early_is_caught(monkeypatch, cell, norm, kernels):
    """With one kernel's barriers broken, a program reads what another has not written yet (NaN,
    poisoned) or overwrites what it has not read yet: the comparison must fail, for every
    persistent kernel under every norm it runs. Whether a program runs ahead is a race that the
    threads' pauses make likely, not certain (one clean-clone CI run in many saw the RNN's
    forward pass): up to three schedules (seeds) are tried, and one must fail; a correct barrier
    passes every schedule (``test_three_programs`` and the others above)."""
    monkeypatch.setattr(importlib.import_module(f"normrnn.kernels.{kernels}"), "grid_barrier",
                        _barrier_one_phase_early)
    monkeypatch.setenv("NORMRNN_PERSISTENT", "1")
    reference, fused = make_pair(CELLS[cell], norm, torch.float32, input_size=3, hidden_size=35)
    x = torch.randn(4, 7, 3, dtype=torch.float64)
    caught = False
    for seed in range(3):
        with concurrent_programs(seed=seed) as record:
            try:
                compare(reference, fused, x, None, _lengths(7, 4), torch.float32)
            except AssertionError:
                caught = True
        assert record["widest"] == 3
        if caught:
            break
    assert caught, f"{kernels}: the broken barrier passed three schedules"


@triton.jit
def _barrier_that_never_opens(barrier_ptr, arrivals):
    tl.atomic_add(barrier_ptr, 1, sem="release")
    arrived = tl.atomic_add(barrier_ptr, 0, sem="acquire")
    while arrived < arrivals + 1:
        arrived = tl.atomic_add(barrier_ptr, 0, sem="acquire")


def test_a_barrier_that_never_opens_ends_in_an_error_that_says_so(monkeypatch):
    """The launch is given up after its timeout, its programs stop, and the error names the kernel
    (the interpreter wraps it in its own)."""
    from normrnn.kernels import rnn_forward
    monkeypatch.setattr(rnn_forward, "grid_barrier", _barrier_that_never_opens)
    monkeypatch.setenv("NORMRNN_PERSISTENT", "1")
    layer = normrnn.RNN(3, 20, backend="triton")
    expected = "rnn_forward_persistent_kernel: 2 programs did not finish within 3 s"
    with concurrent_programs(timeout=3.0), pytest.raises(Exception, match=expected) as caught, torch.no_grad():
        layer(torch.randn(2, 4, 3))
    assert LaunchTimeout.__name__ in repr(caught.value)


@pytest.mark.parametrize("cell, norm", [("LSTM", "layer"), ("LSTM", "batch"), ("GRU", "layer")])
def test_bit_identical_whichever_program_lags(monkeypatch, cell, norm):
    """Partial statistics combined in a fixed order, no float atomics: two schedules (another
    program lagging at every launch) give the same bits, forward and backward."""
    monkeypatch.setenv("NORMRNN_PERSISTENT", "1")
    _, fused = make_pair(CELLS[cell], norm, torch.float32, input_size=3, hidden_size=35)
    x, lengths = torch.randn(3, 7, 3), _lengths(7, 3)
    results = []
    for seed in (0, 1):
        fused.reset_running_stats()  # both runs start from the same running statistics
        with concurrent_programs(seed=seed) as record:
            results.append(outputs_and_grads(fused, x, None, lengths))
        assert record["widest"] == 3
    for key, value in results[0].items():
        assert torch.equal(value, results[1][key]), key
