"""The bench's float64 reference over sequences too long to keep whole: ``run_checkpointed``
computes, a chunk of steps at a time under activation checkpointing, the output, final state and
every gradient of the whole sequence, so that the check at B=256, H=2048, T=1000 that the fused-kernel
issue asks for fits on a GPU (the reference would keep about 470 GB whole under batch norm)."""
import pytest
import torch

from conftest import CELLS, relative_error
from fused_helpers import DEVICE, INTERPRETER_OFF
from normrnn.bench import correctness


def _reference(cell, norm, **config):
    layer = CELLS[cell](5, 7, norm=norm, backend="reference", **config).double()
    for name, parameter in layer.named_parameters():
        if "norm" in name:  # gains away from their init, so that their gradients are not symmetric
            parameter.data.uniform_(0.5, 1.5)
    return layer


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("norm", [None, "layer", "batch"])
def test_chunks_compute_what_the_whole_sequence_computes(cell, norm):
    """Chunks of 4, 4 and 1 steps of a 9-step sequence in training: per-timestep batch norm takes
    each chunk's steps at their place in the sequence, the state and its gradient cross the
    chunks; each chunk is computed once forward and once more in the backward (checkpointed)."""
    layer = _reference(cell, norm, max_steps=9)
    x = torch.randn(9, 4, 5, dtype=torch.float64)
    whole = correctness._outputs_and_grads(layer, x)
    calls = []
    handle = layer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(args[0].shape[0]),
                                             with_kwargs=True)
    chunked = correctness._outputs_and_grads(layer, x, steps_per_chunk=4)
    handle.remove()
    assert calls == [4, 4, 1] + [1, 4, 4]  # the backward computes them again, the last chunk first
    assert whole.keys() == chunked.keys()
    for key, value in whole.items():
        assert relative_error(chunked[key], value) < 1e-12, key


def test_a_chunk_as_long_as_the_sequence_runs_it_whole():
    layer = _reference("lstm", "batch", max_steps=6)
    calls = []
    layer.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    correctness._outputs_and_grads(layer, torch.randn(6, 3, 5, dtype=torch.float64), steps_per_chunk=6)
    assert calls == [6]


@pytest.mark.parametrize("config", [dict(norm="seqbatch"), dict(norm="batch", bidirectional=True)])
def test_what_sees_the_whole_sequence_at_once_is_not_split(config):
    layer = _reference("lstm", **config)
    with pytest.raises(ValueError, match="cannot run in chunks"):
        correctness.run_checkpointed(layer, torch.randn(4, 3, 5, dtype=torch.float64), 2)


def test_steps_per_chunk_split_only_what_does_not_fit():
    """At the bench's shapes: the headline check (B=64, H=512, T=100) and the 10,000-step one (B=16,
    H=64) run whole, as before chunks existed; B=256, H=2048, T=1000 runs in chunks of 32 steps,
    16 GiB of kept steps each."""
    assert correctness.reference_steps_per_chunk(64, 512) >= 100
    assert correctness.reference_steps_per_chunk(16, 64) >= correctness.LONG_SEQUENCE_STEPS
    assert correctness.reference_steps_per_chunk(256, 2048) == 32
    assert correctness.reference_steps_per_chunk(10**6, 10**6) == 1


@pytest.mark.skipif(INTERPRETER_OFF, reason="no CUDA device and the Triton interpreter is off")
@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_a_check_against_a_chunked_reference_holds_the_fused_layer_to_its_tolerance(monkeypatch, norm):
    """The check's record says in how many steps a chunk its reference ran (here 2 of 5, through
    the real kernels), and the fused layer passes against it."""
    monkeypatch.setattr(correctness, "REFERENCE_CHUNK_BYTES", 2 * correctness.REFERENCE_STEP_UNITS * 3 * 16 * 8)
    records = correctness.against_reference("lstm", norm, torch.float32, 3, 16, 5, torch.device(DEVICE))
    assert [(record["reference_steps_per_chunk"], record["passed"]) for record in records] == [(2, True)], records
    assert records[0]["relative_error"] < 1e-4
