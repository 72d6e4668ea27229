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
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[1, 5\]"):
        compiled(x, lengths=torch.tensor([5, 0, 4, 3]))
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[1, 5\]"):
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
