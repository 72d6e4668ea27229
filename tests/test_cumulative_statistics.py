"""``momentum=None``: each slot's running statistics are the average of every batch statistic that
updated it (``normrnn.cumulative``), on every backend (the Triton kernels under the interpreter on
a CPU), with the counts of updates kept in ``num_batches_tracked`` buffers. The expected averages
are built from a layer of the same weights at momentum 1, whose running statistics after a call
are that call's batch statistics, with one slot per step."""
import pytest
import torch

import normrnn
from conftest import CELLS, outputs_and_grads, relative_error
from fused_helpers import DEVICE, INTERPRETER_OFF, every_backend

STEPS, MAX_STEPS = 7, 4
# one active sequence at the last two steps: they update nothing
LENGTHS = torch.tensor([7, 3, 5, 4])


def _statistics(layer):
    return {name: buffer.clone() for name, buffer in layer.named_buffers() if "running_" in name}


def _expected_batch_averages(layer, inputs, lengths):
    """Per slot of ``layer`` (max_steps=MAX_STEPS), the average over ``inputs`` of the batch
    statistics of every step that updates it, from a float64 reference of one slot per step."""
    per_step = CELLS[layer.cell](layer.input_size, layer.hidden_size, norm="batch", momentum=1.0,
                                 max_steps=STEPS, backend="reference").double()
    with torch.no_grad():
        for name, parameter in per_step.named_parameters():
            parameter.copy_(getattr(layer, name).double())
    updated = (torch.arange(STEPS).unsqueeze(1) < lengths.unsqueeze(0)).sum(1) >= 2
    slots = torch.arange(STEPS).clamp(max=MAX_STEPS - 1)
    sums, counts = {}, torch.zeros(MAX_STEPS)
    for x in inputs:
        per_step(x.double().cpu(), lengths=lengths)
        for name, statistics in _statistics(per_step).items():
            total = sums.setdefault(name, torch.zeros(MAX_STEPS, statistics.shape[1], dtype=torch.float64))
            total.index_add_(0, slots[updated], statistics[updated])
        counts.index_add_(0, slots[updated], torch.ones(int(updated.sum())))
    return {name: total / counts.unsqueeze(1) for name, total in sums.items()}, counts


@pytest.mark.parametrize("backend, dtype, device, tolerance", every_backend(1e-12), ids=lambda value: str(value))
@pytest.mark.parametrize("cell", list(CELLS))
def test_batch_norm_slots_are_the_average_of_their_updates(backend, dtype, device, tolerance, cell):
    layer = CELLS[cell](3, 5, norm="batch", momentum=None, max_steps=MAX_STEPS, backend=backend).to(device, dtype)
    inputs = [torch.randn(STEPS, 4, 3, dtype=dtype, device=device) for _ in range(3)]
    for x in inputs:
        layer(x, lengths=LENGTHS)
    expected, counts = _expected_batch_averages(layer, inputs, LENGTHS)
    # slots 0..2 once a call; the last slot at steps 3 and 4 (steps 5 and 6 have one active sequence)
    assert counts.tolist() == [3, 3, 3, 6]
    assert layer.num_batches_tracked_l0.tolist() == [3, 3, 3, 6]
    for name, value in _statistics(layer).items():
        assert relative_error(value.cpu(), expected[name]) < tolerance, name


@pytest.mark.parametrize("backend, dtype, device, tolerance", every_backend(1e-12), ids=lambda value: str(value))
def test_sequence_batch_norm_is_the_average_of_its_calls(backend, dtype, device, tolerance):
    layer = normrnn.GRU(3, 5, norm="seqbatch", momentum=None, backend=backend).to(device, dtype)
    per_call = normrnn.GRU(3, 5, norm="seqbatch", momentum=1.0, backend="reference").double()
    with torch.no_grad():
        for name, parameter in per_call.named_parameters():
            parameter.copy_(getattr(layer, name).double())
    sums = {}
    for _ in range(3):
        x = torch.randn(STEPS, 4, 3, dtype=torch.float64)
        layer(x.to(device, dtype), lengths=LENGTHS)
        per_call(x, lengths=LENGTHS)
        for name, statistics in _statistics(per_call).items():
            sums[name] = sums.get(name, 0) + statistics
    assert int(layer.num_batches_tracked_l0) == 3
    for name, value in _statistics(layer).items():
        assert relative_error(value.cpu(), sums[name] / 3) < tolerance, name


def test_the_first_update_replaces_the_initial_statistics_and_nothing_else_changes():
    """After one call a cumulative average is that call's statistics (momentum 1); outputs and
    gradients are those of any momentum (training normalizes with batch statistics)."""
    cumulative = normrnn.LSTM(3, 5, norm="batch", momentum=None, max_steps=MAX_STEPS, backend="reference").double()
    exponential = normrnn.LSTM(3, 5, norm="batch", momentum=1.0, max_steps=MAX_STEPS, backend="reference").double()
    exponential.load_state_dict({k: v for k, v in cumulative.state_dict().items() if "num_batches" not in k})
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    got, expected = outputs_and_grads(cumulative, x), outputs_and_grads(exponential, x)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert cumulative.num_batches_tracked_l0.tolist() == [1, 1, 1, 0]
    cumulative.reset_running_stats()
    assert cumulative.num_batches_tracked_l0.tolist() == [0, 0, 0, 0]


def test_with_first_step_the_counts_follow_the_slots():
    layer = normrnn.RNN(3, 5, norm="batch", momentum=None, max_steps=MAX_STEPS, backend="reference")
    layer(torch.randn(2, 4, 3), first_step=1)
    assert layer.num_batches_tracked_l0.tolist() == [0, 1, 1, 0]
    layer(torch.randn(3, 4, 3), first_step=5)
    assert layer.num_batches_tracked_l0.tolist() == [0, 1, 1, 3]


def test_evaluation_and_other_norms_keep_no_count():
    layer = normrnn.LSTM(3, 5, norm="batch", momentum=None, backend="reference").eval()
    layer(torch.randn(2, 4, 3))
    assert int(layer.num_batches_tracked_l0.sum()) == 0
    assert not any("num_batches" in name for name, _ in normrnn.LSTM(3, 5, norm="layer", momentum=None).named_buffers())
    assert not any("num_batches" in name for name, _ in normrnn.LSTM(3, 5, norm="batch").named_buffers())


def test_momentum_none_set_on_a_trained_layer_re_estimates_its_statistics():
    """Set after construction, the counts begin at zero: the next update of a slot replaces it."""
    layer = normrnn.LSTM(3, 5, norm="batch", max_steps=MAX_STEPS, backend="reference").double()
    layer(torch.randn(2, 4, 3, dtype=torch.float64))  # exponential statistics, momentum 0.1
    fresh = normrnn.LSTM(3, 5, norm="batch", max_steps=MAX_STEPS, momentum=None, backend="reference").double()
    fresh.load_state_dict(layer.state_dict(), strict=False)
    layer.momentum = None
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    layer(x)
    fresh.reset_running_stats()
    fresh(x)
    assert layer.num_batches_tracked_l0.tolist() == [1, 1, 1, 0]
    for name, buffer in fresh.named_buffers():
        # slot 3 of the running statistics is not reached by three steps: as it was, in both
        if "running_" in name:
            assert torch.equal(getattr(layer, name)[:3], buffer[:3]), name


@pytest.mark.parametrize("momentum", [True, -0.1, "0.1"])
def test_bad_momentum_is_named(momentum):
    with pytest.raises(ValueError, match="momentum must be a finite number in \\[0, 1\\], or None"):
        normrnn.LSTM(3, 5, norm="batch", momentum=momentum)


@pytest.mark.skipif(INTERPRETER_OFF, reason="no CUDA device and the Triton interpreter is off")
def test_fused_layer_under_torch_compile_averages_as_eagerly():
    layer = normrnn.LSTM(3, 5, norm="batch", momentum=None, max_steps=MAX_STEPS, backend="triton", device=DEVICE)
    inputs = [torch.randn(STEPS, 4, 3, device=DEVICE) for _ in range(2)]
    for x in inputs:
        layer(x, lengths=LENGTHS)
    expected = {name: buffer.clone() for name, buffer in layer.named_buffers()}
    layer.reset_running_stats()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for x in inputs:
        compiled(x, lengths=LENGTHS)
    for name, buffer in layer.named_buffers():
        assert torch.equal(buffer, expected[name]), name
