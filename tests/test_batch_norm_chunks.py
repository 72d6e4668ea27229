"""Batch norm over a batch larger than one 64-row tile, in the real kernels against the float64
reference: in training a program walks its columns' batch in chunks, several passes a step, and
merges the chunks' moments (``kernels/batch_norm.py``); in evaluation, with running statistics,
the batch is tiled on grid axis 1 instead."""
import importlib

import pytest
import torch

import normrnn
from conftest import draw_running_statistics
from fused_helpers import DEVICE, INTERPRETER_OFF, compare, make_pair, outputs_and_grads

if INTERPRETER_OFF:
    pytest.skip("no CUDA device and the Triton interpreter is off", allow_module_level=True)

CELLS = {"LSTM": ("lstm_forward", "lstm_backward"), "GRU": ("gru_forward", "gru_backward"),
         "RNN": ("rnn_forward", "rnn_backward")}


def _lengths(batch):
    lengths = torch.randint(1, 4, (batch,))
    lengths[:8] = 3  # eight sequences run every step: the statistics are never over fewer rows
    return lengths


def _record_chunking(monkeypatch, cell):
    """What the cell's launchers decided: a list that gets (forward or backward, chunked or not)."""
    decisions = []
    for name in CELLS[cell]:
        module = importlib.import_module(f"normrnn.kernels.{name}")
        decide = module.step_layout

        def recorded(*args, decide=decide, name=name):
            layout = decide(*args)
            decisions.append((name, layout.chunked))
            return layout
        monkeypatch.setattr(module, "step_layout", recorded)
    return decisions


@pytest.mark.parametrize("persistent", [False, True], ids=["per-step", "persistent"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_training_walks_the_batch_in_chunks(monkeypatch, cell, persistent):
    """131 rows: chunks of 64, 64 and 3, the last with an active row or two; per-step launches, or
    the persistent kernel (one program: H <= 16 under the interpreter)."""
    from normrnn.kernels import buffers
    if persistent:
        monkeypatch.setenv("NORMRNN_PERSISTENT", "1")
    decisions = _record_chunking(monkeypatch, cell)
    chosen = buffers.LAUNCH_MODES_CHOSEN.copy()
    reference, fused = make_pair(getattr(normrnn, cell), "batch", torch.float32, input_size=3,
                                 hidden_size=9 if persistent else 19)
    compare(reference, fused, torch.randn(3, 131, 3, dtype=torch.float64), None, _lengths(131), torch.float32)
    assert sorted(set(decisions)) == [(name, True) for name in sorted(CELLS[cell])]
    launched = buffers.LAUNCH_MODES_CHOSEN - chosen
    assert set(launched) == {buffers.PERSISTENT if persistent else buffers.STEP_LAUNCHES}


@pytest.mark.parametrize("cell", list(CELLS))
def test_chunks_without_a_running_row(cell):
    """Sequences sorted by length: after the first step only the first chunk has running rows, and
    the chunks of none must add nothing to the statistics (nor divide by their count of zero)."""
    reference, fused = make_pair(getattr(normrnn, cell), "batch", torch.float32, input_size=3, hidden_size=19)
    lengths = torch.ones(140, dtype=torch.int64)
    lengths[:9] = 3
    compare(reference, fused, torch.randn(3, 140, 3, dtype=torch.float64), None, lengths, torch.float32)


@pytest.mark.parametrize("cell", list(CELLS))
def test_bfloat16_three_chunks(cell):
    reference, fused = make_pair(getattr(normrnn, cell), "batch", torch.bfloat16, input_size=3, hidden_size=19)
    compare(reference, fused, torch.randn(3, 150, 3, dtype=torch.float64), None, _lengths(150), torch.bfloat16)


@pytest.mark.parametrize("cell", list(CELLS))
def test_evaluation_tiles_the_batch_with_running_statistics(monkeypatch, cell):
    """In evaluation nothing couples the rows: 70 of them in two tiles on grid axis 1, values and
    gradients through the fixed running statistics."""
    decisions = _record_chunking(monkeypatch, cell)
    reference, fused = make_pair(getattr(normrnn, cell), "batch", torch.float32, input_size=3, hidden_size=19,
                                 max_steps=2)
    draw_running_statistics(reference)
    fused.load_state_dict(reference.state_dict())
    reference.eval()
    fused.eval()
    compare(reference, fused, torch.randn(3, 70, 3, dtype=torch.float64), None, _lengths(70), torch.float32)
    assert decisions and not any(chunks for _, chunks in decisions)


def test_chunked_statistics_are_deterministic():
    """Bit-identical results from the same inputs: the chunks' moments and sums are merged in
    chunk order, without atomics."""
    _, fused = make_pair(normrnn.LSTM, "batch", torch.float32, input_size=3, hidden_size=18)
    x = torch.randn(3, 100, 3)
    fused.reset_running_stats()
    first = outputs_and_grads(fused, x.to(DEVICE), None, None)
    fused.reset_running_stats()
    second = outputs_and_grads(fused, x.to(DEVICE), None, None)
    for key in first:
        assert torch.equal(first[key], second[key]), key
