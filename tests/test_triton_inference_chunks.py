"""A fused forward that no backward follows runs a chunk of steps at a time
(``normrnn/inference_chunks.py``), so that the input projection of a long sequence is never whole:
the real kernels, run in chunks of two steps, against the same layer run whole. Chunks cross
sequence ends and ``max_steps``; the state, the running statistics (updated in training under
no_grad) and the outputs are carried across them."""
import pytest
import torch

from fused_helpers import DEVICE, INTERPRETER_OFF  # first: on a CPU it turns the interpreter on
import normrnn  # noqa: E402
from normrnn import inference_chunks, triton_backend  # noqa: E402
from conftest import CELLS  # noqa: E402

if INTERPRETER_OFF:
    pytest.skip("no CUDA device and the Triton interpreter is off", allow_module_level=True)

GATES = {"lstm": 4, "gru": 3, "rnn": 1}
BATCH, HIDDEN = 5, 7
LENGTHS = torch.tensor([7, 3, 1, 6, 4])


def _layer(cell, norm, **config):
    layer = CELLS[cell](4, HIDDEN, norm=norm, backend="triton", max_steps=3, **config).to(DEVICE)
    for name, value in layer.named_buffers():  # population statistics that differ slot by slot
        if "running_var" in name:
            value.uniform_(0.5, 1.5)
        elif "running_mean" in name:
            value.normal_()
    return layer


@pytest.fixture
def calls(monkeypatch):
    """Counts the launches of each cell's forward (``triton_backend.run_*``: one per chunk)."""
    counted = []
    for name in ("run_lstm", "run_gru", "run_rnn"):
        original = getattr(triton_backend, name)

        def counting(*args, original=original):
            counted.append(args[1].shape[0])  # the steps of the chunk
            return original(*args)
        monkeypatch.setattr(triton_backend, name, counting)
    return counted


def _two_steps_a_chunk(monkeypatch, cell, hidden=HIDDEN):
    monkeypatch.setattr(inference_chunks, "INFERENCE_CHUNK_BYTES", 2 * BATCH * GATES[cell] * hidden * 4)


def _run(layer, x, hx, lengths):
    output, final = layer(x, hx, lengths=lengths)
    finals = final if isinstance(final, tuple) else (final,)
    return (output,) + tuple(finals) + tuple(buffer.clone() for buffer in layer.buffers())


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("norm", [None, "layer", "batch", "seqbatch"])
@pytest.mark.parametrize("training", [False, True])
def test_chunks_compute_what_the_whole_sequence_computes(monkeypatch, calls, cell, norm, training):
    """7 steps in chunks of 2, 2, 2 and 1 under no_grad: outputs, final states and running
    statistics (the training slots past max_steps=3 folded into the last) as the whole sequence
    computes them, to float32 rounding (the chunk's input projection is a smaller product)."""
    layer = _layer(cell, norm)
    layer.train(training)
    x = torch.randn(7, BATCH, 4, device=DEVICE)
    hx = torch.randn(1, BATCH, HIDDEN, device=DEVICE)
    hx = (hx, torch.randn(1, BATCH, HIDDEN, device=DEVICE)) if cell == "lstm" else hx
    before = {name: value.clone() for name, value in layer.state_dict().items()}
    with torch.no_grad():
        whole = _run(layer, x, hx, LENGTHS)
        layer.load_state_dict(before)
        _two_steps_a_chunk(monkeypatch, cell)
        calls.clear()
        chunked = _run(layer, x, hx, LENGTHS)
    # sequence-wise batch norm in training normalizes with the whole sequence's statistics
    assert calls == ([7] if norm == "seqbatch" and training else [2, 2, 2, 1])
    for got, expected in zip(chunked, whole):
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6), (got - expected).abs().max()
    if training and norm == "batch":  # the chunks did update the statistics
        assert not torch.equal(layer.ih_running_mean_l0, before["ih_running_mean_l0"])


def test_a_forward_that_a_backward_may_follow_runs_whole(monkeypatch, calls):
    layer = _layer("lstm", "batch")
    _two_steps_a_chunk(monkeypatch, "lstm")
    x = torch.randn(7, BATCH, 4, device=DEVICE, requires_grad=True)
    output, _ = layer(x)
    assert calls == [7]
    output.sum().backward()
    assert x.grad is not None
    calls.clear()
    with torch.no_grad():  # in no_grad, the same layer and input run in chunks
        layer(x)
    assert calls == [2, 2, 2, 1]


@pytest.mark.parametrize("norm", [None, "layer", "batch"])
def test_two_layers_bidirectional_and_a_projection_in_chunks(monkeypatch, calls, norm):
    """Each direction of each layer runs in chunks (the reverse one on its reversed sequences);
    the projecting LSTM carries h = r W_hr^T from chunk to chunk, which its next chunk multiplies
    by W_hh instead of r by W_hh W_hr: the same to float32 rounding."""
    layer = _layer("lstm", norm, num_layers=2, bidirectional=True, proj_size=3).eval()
    x = torch.randn(7, BATCH, 4, device=DEVICE)
    with torch.no_grad():
        whole = _run(layer, x, None, LENGTHS)
        _two_steps_a_chunk(monkeypatch, "lstm")
        calls.clear()
        chunked = _run(layer, x, None, LENGTHS)
    assert calls == [2, 2, 2, 1] * 4
    for got, expected in zip(chunked, whole):
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (got - expected).abs().max()


def test_chunk_bounds_hold_the_projection_within_the_budget():
    assert inference_chunks.chunk_bounds(7, 5, 28, budget=2 * 5 * 28 * 4) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert inference_chunks.chunk_bounds(7, 5, 28, budget=1) == [(t, t + 1) for t in range(7)]
    # the default holds a long float32 LSTM at B=256, H=2048 in chunks of 128 steps
    assert inference_chunks.chunk_bounds(1000, 256, 4 * 2048)[:2] == [(0, 128), (128, 256)]


def test_a_chunk_counts_lengths_and_statistics_slots_from_its_first_step():
    padding = normrnn.params.Padding.from_lengths(LENGTHS, 7, BATCH, "cpu")
    piece = inference_chunks.chunk_padding(padding, 2, 4)
    assert piece.lengths.tolist() == [2, 1, 0, 2, 2]
    assert torch.equal(piece.mask, padding.mask[2:4]) and piece.active_counts == padding.active_counts[2:4]
    whole = inference_chunks.chunk_padding(normrnn.params.Padding(7, BATCH), 2, 4)
    assert not whole.padded and whole.steps == 2
    layer = _layer("gru", "batch")
    params = layer.direction_params("_l0", None)
    for start, first_slot in ((0, 0), (2, 2), (5, 2)):  # 3 slots: from the last one on, the last
        moved = inference_chunks.params_from_step(params, "batch", start)
        assert moved.hh_running_var.data_ptr() == params.hh_running_var[first_slot].data_ptr()
        assert moved.cell_running_mean is None
    assert inference_chunks.params_from_step(params, "layer", 2) is params


def test_chunks_under_torch_compile(monkeypatch):
    """Compiled with fullgraph=True, a padded evaluation in chunks traces whole (the chunks are
    unrolled in the graph) and computes what it computes eagerly."""
    torch._dynamo.reset()
    layer = _layer("lstm", "batch").eval()
    _two_steps_a_chunk(monkeypatch, "lstm")
    graphs = []

    def keep_graph(graph, example_inputs):
        graphs.append(graph)
        return graph.forward
    compiled = torch.compile(layer, fullgraph=True, backend=keep_graph)
    x = torch.randn(7, BATCH, 4, device=DEVICE)
    with torch.no_grad():
        expected_output, (expected_h, expected_c) = layer(x, lengths=LENGTHS)
        output, (h_n, c_n) = compiled(x, lengths=LENGTHS)
    (graph,) = graphs
    assert [str(node.target) for node in graph.graph.nodes].count(str(torch.ops.normrnn.lstm_forward)) == 4
    for got, expected in ((output, expected_output), (h_n, expected_h), (c_n, expected_c)):
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
