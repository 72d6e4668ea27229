"""``first_step``: a sequence fed in pieces, the state carried in ``hx`` and each piece told where
it starts, computes what the whole sequence computes: outputs, final states, every gradient and
the per-timestep running statistics of batch norm, in training and in evaluation, on every
backend (the Triton kernels under the interpreter on a CPU). Told nothing, the pieces would each
start at step 0, and batch norm would normalize them with the wrong step's statistics."""
import copy

import pytest
import torch
from torch import nn

import normrnn
from conftest import CELLS, outputs_and_grads, relative_error
from fused_helpers import DEVICE, INTERPRETER_OFF, every_backend

# the last piece runs past max_steps=4, where training updates the last slot once per step
PIECES = ((0, 2), (2, 3), (3, 7))
MAX_STEPS = 4
# every sequence lasts into the last piece (a piece's lengths are at least 1), and at least two
# are active at every step (batch statistics of one row do not exist)
LENGTHS = torch.tensor([7, 4, 5, 7])


class InPieces(nn.Module):
    """Runs ``layer`` over ``PIECES`` of its input, carrying the state from piece to piece, each
    piece with its own ``lengths`` and ``first_step`` (or, with ``tell_first_step=False``, 0)."""

    def __init__(self, layer: nn.Module, tell_first_step: bool = True):
        super().__init__()
        self.layer = layer
        self.tell_first_step = tell_first_step

    def forward(self, x, hx=None, lengths=None):
        outputs = []
        for start, end in PIECES:
            piece_lengths = None if lengths is None else (lengths - start).clamp(1, end - start)
            output, hx = self.layer(x[start:end], hx, lengths=piece_lengths,
                                    first_step=start if self.tell_first_step else 0)
            outputs.append(output)
        return torch.cat(outputs), hx


def _layers(cell, backend, dtype, device, **config):
    """The float64 reference layer, run whole, and the same layer on ``backend`` in ``dtype``,
    with running statistics and gains away from their initial values."""
    reference = CELLS[cell](3, 5, norm="batch", max_steps=MAX_STEPS, backend="reference", **config).double()
    for name, tensor in list(reference.named_parameters()) + list(reference.named_buffers()):
        if "var" in name:
            tensor.data.uniform_(0.5, 1.5)
        elif "norm" in name or "running" in name:
            tensor.data.uniform_(0.2, 1.2) if "norm_weight" in name else tensor.data.normal_()
    layer = CELLS[cell](3, 5, norm="batch", max_steps=MAX_STEPS, backend=backend, **config).to(device, dtype)
    layer.load_state_dict(reference.state_dict())
    reference.load_state_dict({key: value.to(dtype).double() if value.is_floating_point() else value
                               for key, value in layer.state_dict().items()})
    return reference, layer


def _compare_pieces_with_whole(reference, layer, x, lengths, tolerance, tell_first_step=True):
    expected = outputs_and_grads(reference, x, None, lengths)
    got = outputs_and_grads(InPieces(layer, tell_first_step), x.to(layer.weight_hh_l0), None, lengths)
    got = {key.replace("layer.", ""): value for key, value in got.items()}
    assert got.keys() == expected.keys()
    return {key: relative_error(got[key].cpu(), value) for key, value in expected.items()}


@pytest.mark.parametrize("backend, dtype, device, tolerance", every_backend(1e-10), ids=lambda value: str(value))
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_pieces_compute_the_whole_sequence(backend, dtype, device, tolerance, cell, training):
    """In float32 the bound is the rule of ``test_triton_lstm``'s few-row batch norm: 1e-4, or four
    times the float32 reference's own worst error on the same pieces where that is larger. Steps 5
    and 6 normalize over two active rows, where x - mean cancels and the error lands in whichever
    gradient the cancellation hits, by the order of the float32 sums: for the LSTM in training the
    kernels reach 1.09e-4 in grad_weight_ih_l0 where the float32 reference reaches 2.8e-5 (a
    wrong gradient is off by far more)."""
    reference, layer = _layers(cell, backend, dtype, device, num_layers=2)
    # copies before the runs below update the running statistics
    float32_pair = (copy.deepcopy(reference), copy.deepcopy(reference).float()) if dtype == torch.float32 else None
    x = torch.randn(7, 4, 3, dtype=torch.float64)
    bound = tolerance
    if float32_pair is not None:
        for module in float32_pair:
            module.train(training)
        floor = _compare_pieces_with_whole(*float32_pair, x, LENGTHS, tolerance)
        bound = max(tolerance, 4 * max(floor.values()))
    reference.train(training)
    layer.train(training)
    errors = _compare_pieces_with_whole(reference, layer, x, LENGTHS, tolerance)
    worst = max(errors, key=errors.get)
    assert errors[worst] < bound, f"{worst}: relative error {errors[worst]:.2e}, bound {bound:.2e}"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_pieces_that_all_start_at_step_0_differ(training):
    """What the test above would not see if ``first_step`` were ignored: the statistics of the
    wrong steps (in training the running statistics, in evaluation the outputs) differ."""
    reference, layer = _layers("lstm", "reference", torch.float64, "cpu")
    reference.train(training)
    layer.train(training)
    errors = _compare_pieces_with_whole(reference, layer, torch.randn(7, 4, 3, dtype=torch.float64), LENGTHS,
                                        1e-10, tell_first_step=False)
    assert max(errors.values()) > 1e-2


class StartingAt(nn.Module):
    """``layer`` run over its whole input as if it started at step ``first_step``."""

    def __init__(self, layer: nn.Module, first_step: int):
        super().__init__()
        self.layer = layer
        self.first_step = first_step

    def forward(self, x, hx=None):
        return self.layer(x, hx, first_step=self.first_step)


def test_in_training_first_step_moves_only_the_running_statistics():
    """Training normalizes every step with its batch's statistics: ``first_step`` chooses which
    running slot a step updates, and nothing else (docs/findings.md, section 6)."""
    reference, layer = _layers("lstm", "reference", torch.float64, "cpu")
    layer.load_state_dict(reference.state_dict())
    initial = {name: buffer.clone() for name, buffer in reference.named_buffers()}
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    at_0 = outputs_and_grads(reference, x)
    at_2 = {key.replace("layer.", ""): value for key, value in outputs_and_grads(StartingAt(layer, 2), x).items()}
    for key, value in at_0.items():
        if key in initial:  # steps 0, 1, 2 updated slots 0, 1, 2 there and slots 2, 3, 3 here
            assert not torch.equal(value[0], initial[key][0]), key
            assert torch.equal(at_2[key][:2], initial[key][:2]), key
        else:
            assert torch.equal(at_2[key], value), key


def test_first_step_past_max_steps_uses_the_last_slot():
    """One step at a time, in evaluation, far past ``max_steps``: the last slot's statistics."""
    reference, layer = _layers("gru", "reference", torch.float64, "cpu")
    reference.eval()
    layer.eval()
    x = torch.randn(12, 3, 3, dtype=torch.float64)
    expected, h_n = reference(x)
    hidden = None
    for step in range(12):
        output, hidden = layer(x[step:step + 1], hidden, first_step=step)
        assert torch.allclose(output[0], expected[step], rtol=0, atol=1e-12), step
    assert torch.allclose(hidden, h_n, rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm", [None, "layer", "seqbatch"])
def test_norms_without_per_step_statistics_ignore_first_step(norm):
    layer = normrnn.LSTM(3, 5, norm=norm, backend="reference").double().eval()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    assert torch.equal(layer(x)[0], layer(x, first_step=9)[0])


@pytest.mark.parametrize("first_step, error, words", [
    (-1, ValueError, "non-negative"), (1.0, TypeError, "Python int"), (torch.tensor(1), TypeError, "Python int"),
    (True, TypeError, "Python int")])
def test_bad_first_step_is_named(first_step, error, words):
    layer = normrnn.LSTM(3, 5, norm="batch", backend="reference")
    with pytest.raises(error, match=f"first_step.*{words}"):
        layer(torch.randn(2, 2, 3), first_step=first_step)


def test_bidirectional_layer_takes_only_first_step_0():
    layer = normrnn.GRU(3, 5, norm="batch", bidirectional=True, backend="reference")
    layer(torch.randn(2, 2, 3), first_step=0)
    with pytest.raises(ValueError, match="first_step=2: a bidirectional layer takes only first_step=0"):
        layer(torch.randn(2, 2, 3), first_step=2)


@pytest.mark.skipif(INTERPRETER_OFF, reason="no CUDA device and the Triton interpreter is off")
def test_fused_pieces_under_torch_compile_are_the_eager_pieces():
    """The kernels update a view of the running statistics that starts at ``first_step``'s slot:
    compiled with ``fullgraph=True`` the pieces compute, and update, what they do eagerly."""
    _, layer = _layers("lstm", "triton", torch.float32, DEVICE)
    x = torch.randn(7, 4, 3, device=DEVICE)
    initial = {key: value.clone() for key, value in layer.state_dict().items()}
    expected = outputs_and_grads(InPieces(layer), x, None, LENGTHS)
    layer.load_state_dict(initial)
    torch._dynamo.reset()
    got = outputs_and_grads(torch.compile(InPieces(layer), fullgraph=True, backend="aot_eager"), x, None, LENGTHS)
    got = {key.replace("_orig_mod.", ""): value for key, value in got.items()}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
