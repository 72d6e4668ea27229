"""Padded batches (``lengths``) under ``torch.compile``.

While Dynamo traces, the lengths' values are unknown: the fused kernels count the active sequences
on the device and need nothing more, so a layer on the Triton backend traces with
``fullgraph=True`` and computes what it computes eagerly; the lengths are checked when the graph
runs. So does the reference, whose batch norm then chooses between batch and running statistics
in the graph. The kernels run here under the Triton interpreter."""
import pytest
import torch

import normrnn
from conftest import outputs_and_grads, relative_error
from fused_helpers import DEVICE, INTERPRETER_OFF

CELLS = {"lstm": normrnn.LSTM, "gru": normrnn.GRU, "rnn": normrnn.RNN}


def _compiled_equals_eager(layer, x, lengths, tolerance=None):
    """Outputs, gradients and running statistics of ``layer`` compiled with ``fullgraph=True``
    against its eager ones: equal, or within ``tolerance`` (relative error)."""
    layer.reset_running_stats()
    expected = outputs_and_grads(layer, x, None, lengths)
    layer.reset_running_stats()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = outputs_and_grads(compiled, x, None, lengths)
    got = {key.replace("_orig_mod.", ""): value for key, value in got.items()}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if tolerance is None:
            assert torch.equal(got[key], value), key
        else:
            assert relative_error(got[key], value) < tolerance, key


@pytest.mark.skipif(INTERPRETER_OFF, reason="no CUDA device and the Triton interpreter is off")
@pytest.mark.parametrize("cell, norm", [("lstm", "batch"), ("lstm", "seqbatch"), ("gru", "layer"), ("rnn", "batch")])
def test_fused_layer_with_lengths_traces_whole(cell, norm):
    layer = CELLS[cell](3, 6, norm=norm, backend="triton", device=DEVICE)
    _compiled_equals_eager(layer, torch.randn(5, 4, 3, device=DEVICE), torch.tensor([5, 2, 4, 3]))


@pytest.mark.skipif(INTERPRETER_OFF, reason="no CUDA device and the Triton interpreter is off")
def test_compiled_graph_checks_the_lengths_when_it_runs():
    layer = normrnn.GRU(3, 6, norm="batch", backend="triton", device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 4, 3, device=DEVICE)
    compiled(x, lengths=torch.tensor([5, 2, 4, 3]))
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[1, T\]"):
        compiled(x, lengths=torch.tensor([5, 0, 4, 3]))
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[1, T\]"):
        compiled(x, lengths=torch.tensor([5, 6, 4, 3]))


@pytest.mark.parametrize("norm", [None, "layer", "seqbatch"])
def test_reference_with_lengths_traces_whole(norm):
    layer = normrnn.LSTM(3, 5, norm=norm, backend="reference")
    _compiled_equals_eager(layer, torch.randn(4, 3, 3), torch.tensor([4, 2, 3]))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_reference_batch_norm_with_lengths_traces_whole(cell):
    """In the traced graph the number of active rows of a step is data, so batch norm chooses
    between batch and running statistics without a branch (``batch_norm_step``) and takes masked
    sums: the same values as eagerly up to rounding, including a step of one active row (running
    statistics, not updated) and the running statistics."""
    layer = CELLS[cell](3, 5, norm="batch", backend="reference", max_steps=3).double()
    x, lengths = torch.randn(5, 3, 3, dtype=torch.float64), torch.tensor([5, 2, 3])  # steps 3, 4: one row
    _compiled_equals_eager(layer, x, lengths, tolerance=1e-12)


@pytest.mark.skipif(INTERPRETER_OFF, reason="no CUDA device and the Triton interpreter is off")
@pytest.mark.parametrize("norm", [None, "batch"])
def test_one_graph_serves_every_length_and_batch_with_dynamic_shapes(norm):
    """``torch.compile(dynamic=True)``: the fused layer's graph guards on neither the length nor the
    batch, so other shapes run it without a recompile, in training and in inference (where the
    decision to run in chunks guards on the projection's size, which these shapes all fit)."""
    from torch._dynamo.utils import counters
    layer = normrnn.LSTM(3, 6, norm=norm, backend="triton", device=DEVICE)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for train in (True, False):
        layer.train(train)
        with torch.set_grad_enabled(train):
            for steps, batch in [(5, 4), (8, 3), (3, 6)]:
                x = torch.randn(steps, batch, 3, device=DEVICE)
                lengths = torch.randint(1, steps + 1, (batch,))
                torch.manual_seed(0)
                got, _ = compiled(x, lengths=lengths)
                expected, _ = layer(x, lengths=lengths)
                assert relative_error(got, expected) < 1e-6
    # one graph for training and one for evaluation (the mode is a constant of the graph)
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.skipif(INTERPRETER_OFF, reason="no CUDA device and the Triton interpreter is off")
def test_with_dynamic_shapes_inference_still_runs_in_chunks_where_the_projection_does_not_fit(monkeypatch):
    """The graph guards on the projection's size: a sequence that fits runs whole in the dynamic
    graph, one that does not runs in chunks (in a graph for its length), both as eagerly."""
    from normrnn import inference_chunks
    # chunks of 3 steps of the (T, 8, 3 x 8) float32 projection
    monkeypatch.setattr(inference_chunks, "INFERENCE_CHUNK_BYTES", 3 * 8 * 24 * 4)
    chunk_starts = []
    params_from_step = inference_chunks.params_from_step
    monkeypatch.setattr(inference_chunks, "params_from_step",
                        lambda params, norm, start: chunk_starts.append(start) or params_from_step(params, norm, start))
    layer = normrnn.GRU(4, 8, norm="batch", backend="triton", max_steps=4, device=DEVICE).eval()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch.no_grad():
        for steps, expected_starts in [(2, []), (3, []), (7, [0, 3, 6])]:
            chunk_starts.clear()
            x = torch.randn(steps, 8, 4, device=DEVICE)
            got, _ = compiled(x)
            assert chunk_starts == expected_starts, steps
            expected, _ = layer(x)
            assert relative_error(got, expected) < 1e-6
