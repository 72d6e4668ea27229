"""``torch.export`` of the layers: what an exported program computes, and which backends export.

The fused layers' ops are ``torch.library`` custom ops with fake implementations, so a layer on the
Triton backend exports whole, with the sequence length and the batch dynamic (the kernels loop
over time themselves); the reference exports with a dynamic batch (its Python loop over time fixes
T). The C++ CPU backend keeps what it saves in a C++ object and cannot be exported:
``backend="auto"`` then exports the reference and warns, and ``backend="cpp"`` raises."""
import warnings

import pytest
import torch
from torch.export import Dim

import normrnn
from fused_helpers import DEVICE, INTERPRETER_OFF, relative_error

CELLS = {"LSTM": normrnn.LSTM, "GRU": normrnn.GRU, "RNN": normrnn.RNN}


def _export(layer, args, dynamic_shapes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one-time notes of the backends
        return torch.export.export(layer, args, dynamic_shapes=dynamic_shapes).module()


def _assert_same(got, expected, tolerance=1e-6):
    for got_tensor, expected_tensor in zip(torch.utils._pytree.tree_leaves(got),
                                           torch.utils._pytree.tree_leaves(expected)):
        assert got_tensor.shape == expected_tensor.shape
        assert relative_error(got_tensor, expected_tensor) < tolerance


@pytest.mark.skipif(INTERPRETER_OFF, reason="no CUDA device and the Triton interpreter is off")
@pytest.mark.parametrize("norm", [None, "layer", "batch", "seqbatch"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_fused_layers_export_with_a_dynamic_length_and_batch(cell, norm):
    """Exported once at T=5, B=3, the program runs two layers, bidirectional, in evaluation, over
    padded sequences of other lengths and batches, computing what the layer computes eagerly."""
    layer = CELLS[cell](4, 8, norm=norm, num_layers=2, bidirectional=True, backend="triton", max_steps=4)
    layer = layer.to(DEVICE).eval()
    steps, batch = Dim("steps", min=2), Dim("batch", min=2)
    program = _export(layer, (torch.randn(5, 3, 4, device=DEVICE), None, torch.tensor([5, 2, 4])),
                      ({0: steps, 1: batch}, None, {0: batch}))
    for shape, lengths in [((9, 6), [9, 1, 3, 9, 6, 2]), ((3, 2), [3, 3])]:
        x = torch.randn(*shape, 4, device=DEVICE)
        _assert_same(program(x, None, torch.tensor(lengths)), layer(x, None, torch.tensor(lengths)))


@pytest.mark.skipif(INTERPRETER_OFF, reason="no CUDA device and the Triton interpreter is off")
def test_a_dynamic_export_runs_the_whole_sequence_where_eager_inference_runs_chunks(monkeypatch):
    """A program traced for any length cannot loop over a number of chunks it does not know: it
    runs each layer's whole sequence, says so once, and computes what the chunked eager run does."""
    from normrnn import dispatch, inference_chunks
    params_from_step = inference_chunks.params_from_step
    # chunks of 3 steps of the (T, 8, 3 x 8) float32 projection
    monkeypatch.setattr(inference_chunks, "INFERENCE_CHUNK_BYTES", 3 * 8 * 24 * 4)
    monkeypatch.setattr(dispatch, "_warned", set())
    layer = normrnn.GRU(4, 8, norm="batch", backend="triton", max_steps=4).to(DEVICE).eval()
    x = torch.randn(7, 8, 4, device=DEVICE)
    with torch.no_grad():  # inference: chunks only where no backward can follow
        with pytest.warns(RuntimeWarning, match="dynamic sequence length or batch runs each layer's whole sequence"):
            program = torch.export.export(layer, (x,), dynamic_shapes=({0: Dim("steps", min=2)},)).module()
        calls = []
        monkeypatch.setattr(inference_chunks, "params_from_step",
                            lambda *args: calls.append(args) or params_from_step(*args))
        expected = layer(x)
        assert len(calls) == 3, "the eager run did not run in chunks"
        _assert_same(program(x), expected)


@pytest.mark.skipif(INTERPRETER_OFF, reason="no CUDA device and the Triton interpreter is off")
def test_an_exported_training_step_updates_the_running_statistics_and_differentiates():
    """A BN-LSTM exported in training: the program's output, running statistics and gradients are
    those of the eager layer's step."""
    torch.manual_seed(0)
    eager = normrnn.LSTM(4, 8, norm="batch", backend="triton", max_steps=3).to(DEVICE)
    exported_from = normrnn.LSTM(4, 8, norm="batch", backend="triton", max_steps=3).to(DEVICE)
    exported_from.load_state_dict(eager.state_dict())
    x = torch.randn(5, 6, 4, device=DEVICE)
    program = _export(exported_from, (x,), None)
    initial = {name: buffer.clone() for name, buffer in eager.named_buffers()}
    results = []
    for module in (eager, program):
        output, (h_n, c_n) = module(x)
        grads = torch.autograd.grad((output.sum() + h_n.sum()), list(module.parameters()))
        results.append(((output, h_n, c_n), grads, {name: buffer.clone() for name, buffer in module.named_buffers()}))
    (eager_out, eager_grads, eager_buffers), (program_out, program_grads, program_buffers) = results
    _assert_same(program_out, eager_out)
    _assert_same(program_grads, eager_grads)
    assert eager_buffers.keys() == program_buffers.keys()
    for name in eager_buffers:
        assert not torch.equal(eager_buffers[name], initial[name]), f"the step did not update {name}"
        _assert_same(program_buffers[name], eager_buffers[name])


def test_the_reference_exports_with_a_dynamic_batch():
    layer = normrnn.LSTM(4, 8, norm="batch", backend="reference", max_steps=3).eval()
    program = _export(layer, (torch.randn(5, 3, 4),), ({1: Dim("batch", min=2)},))
    x = torch.randn(5, 7, 4)
    _assert_same(program(x), layer(x), tolerance=1e-12)


def test_auto_on_cpu_exports_the_reference_and_says_why():
    """The C++ backend cannot be exported: "auto" exports the reference instead, with a warning
    naming torch.export, and the program computes what the C++ backend computes eagerly."""
    from normrnn import dispatch
    dispatch._warned.clear()
    layer = normrnn.GRU(4, 8, norm="batch", backend="auto", max_steps=3).eval()
    with pytest.warns(RuntimeWarning, match="cpp backend cannot, because .*cannot be exported by torch.export"):
        program = torch.export.export(layer, (torch.randn(5, 3, 4),)).module()
    x = torch.randn(5, 3, 4)
    _assert_same(program(x), layer(x), tolerance=1e-5)


def test_the_cpp_backend_named_explicitly_refuses_export():
    layer = normrnn.RNN(4, 8, backend="cpp")
    with pytest.raises(RuntimeError, match="backend='cpp' cannot run rnn .*cannot be exported by torch.export"):
        torch.export.export(layer, (torch.randn(5, 3, 4),))
