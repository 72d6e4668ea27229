"""The LSTM's output projection (``proj_size``, LSTMP): h_t = W_hr (o_t * tanh(N_cell(c_t))).

Without a norm it computes what ``torch.nn.LSTM(proj_size=P)`` computes (forward, gradients,
packed input, every layout); with every norm the reference passes gradcheck in float64, and so
does the C++ backend, which also equals the reference in float32 and, under ``no_grad``, the
forward that keeps its steps bit for bit. The Triton kernels against the reference:
``test_triton_projection.py``.
"""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import normrnn
from conftest import NORMS, assert_float32_backend_equals_the_reference, outputs_and_grads, relative_error
from test_reference_gradcheck import _gradcheck_module, gradcheck_two_layers_bidirectional_and_eval

CPP_REASON = normrnn.dispatch.unavailable_reason("cpp", "lstm", None, torch.zeros(1))
needs_cpp = pytest.mark.skipif(CPP_REASON is not None, reason=f"the C++ backend is not usable here: {CPP_REASON}")


def _states(layers, batch, proj_size, hidden_size):
    return (torch.randn(layers, batch, proj_size, dtype=torch.float64),
            torch.randn(layers, batch, hidden_size, dtype=torch.float64))


@pytest.mark.parametrize("layers,bidirectional,batch_first", [(1, False, False), (2, True, True), (3, False, True)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_torchs_projecting_lstm(layers, bidirectional, batch_first, bias):
    theirs = nn.LSTM(4, 6, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias,
                     proj_size=3).double()
    ours = normrnn.LSTM.from_torch(theirs, backend="reference")
    assert ours.proj_size == 3 and ours.weight_hr_l0.shape == (3, 6)
    x = torch.randn((5, 7, 4) if batch_first else (7, 5, 4), dtype=torch.float64)
    hx = _states(layers * (2 if bidirectional else 1), 5, 3, 6)
    expected = outputs_and_grads(theirs, x, hx)
    got = outputs_and_grads(ours, x, hx)
    assert got["output"].shape[-1] == 3 * (2 if bidirectional else 1)
    assert got["final0"].shape[-1] == 3 and got["final1"].shape[-1] == 6
    for key, value in expected.items():
        assert relative_error(got[key], value) < 1e-10, key


def test_packed_sequence_and_unbatched_input_match_torch():
    theirs = nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2).double()
    ours = normrnn.LSTM.from_torch(theirs, backend="reference")
    lengths = torch.tensor([3, 5, 1, 5])
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    hx = _states(4, 4, 2, 5)
    expected_out, expected_final = theirs(packed, hx)
    got_out, got_final = ours(packed, hx)
    assert relative_error(got_out.data, expected_out.data) < 1e-10
    for got, expected in zip(got_final, expected_final):
        assert relative_error(got, expected) < 1e-10
    padded_out, _ = ours(x, hx, lengths=lengths)  # lengths mean what packing means
    assert relative_error(padded_out, pad_packed_sequence(expected_out)[0]) < 1e-10
    single = torch.randn(6, 3, dtype=torch.float64)
    for got, expected in zip(ours(single)[1], theirs(single)[1]):
        assert got.shape == expected.shape and relative_error(got, expected) < 1e-10


def test_weights_round_trip_in_torchs_names_and_order():
    theirs = nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2)
    ours = normrnn.LSTM.from_torch(theirs, norm="layer", backend="reference")
    assert [[tuple(w.shape) for w in group][:5] for group in ours.all_weights] == \
        [[tuple(w.shape) for w in group] for group in theirs.all_weights]
    assert torch.equal(ours.weight_hr_l1_reverse, theirs.weight_hr_l1_reverse)
    assert "proj_size=2" in repr(ours)
    back = normrnn.LSTM.from_torch(theirs).to_torch()
    assert back.proj_size == 2
    assert all(torch.equal(back.state_dict()[name], value) for name, value in theirs.state_dict().items())


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_gradcheck_every_norm(norm, backend):
    module = normrnn.LSTM(3, 4, proj_size=2, norm=norm, backend=backend).double()
    for parameter in module.parameters():  # gains away from their init, so their gradients are generic
        parameter.data.uniform_(-1, 1)
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    _gradcheck_module(module, x, torch.tensor([4, 2, 3]), with_state=True)


@pytest.mark.parametrize("norm", ["batch", "layer"])
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_gradcheck_two_layers_bidirectional_and_eval(norm, backend):
    module = normrnn.LSTM(2, 3, proj_size=2, num_layers=2, bidirectional=True, norm=norm, max_steps=2,
                          backend=backend).double()
    for parameter in module.parameters():
        parameter.data.uniform_(-1, 1)
    gradcheck_two_layers_bidirectional_and_eval(module)


@needs_cpp
@pytest.mark.parametrize("norm", NORMS)
def test_cpp_float32_equals_the_reference(norm):
    got = assert_float32_backend_equals_the_reference(normrnn.LSTM, norm, "cpp", hidden_size=7, proj_size=3)
    assert "grad_weight_hr_l1_reverse" in got


@needs_cpp
@pytest.mark.parametrize("norm", [None, "batch"])
def test_cpp_forward_no_backward_follows_computes_what_one_kept_for_it_does(norm, monkeypatch):
    """Under no_grad, one step of buffers and the input projected 2 steps at a time: outputs,
    final states and running statistics bit for bit the forward that keeps every step."""
    monkeypatch.setattr(normrnn.cpp_backend, "INFERENCE_CHUNK_BYTES", 2 * 4 * 4 * 5 * 4)
    layer = normrnn.LSTM(4, 5, proj_size=3, num_layers=2, bidirectional=True, norm=norm, max_steps=3,
                         backend="cpp")
    twin = copy.deepcopy(layer)
    x, lengths = torch.randn(6, 4, 4), torch.tensor([6, 2, 5, 6])
    with torch.no_grad():
        output, (h_n, c_n) = layer(x, lengths=lengths)
    kept_output, (kept_h, kept_c) = twin(x, lengths=lengths)
    assert kept_output.requires_grad and not output.requires_grad
    for without, kept in ((output, kept_output), (h_n, kept_h), (c_n, kept_c)):
        assert torch.equal(without, kept.detach())
    for (name, buffer), (_, kept_buffer) in zip(layer.named_buffers(), twin.named_buffers()):
        assert torch.equal(buffer, kept_buffer), name


def test_auto_on_cpu_tensors_takes_the_cpp_backend_without_a_warning(recwarn):
    if CPP_REASON is not None:
        pytest.skip(f"the C++ backend is not usable here: {CPP_REASON}")
    layer = normrnn.LSTM(3, 4, proj_size=2, norm="batch")
    output, (h_n, c_n) = layer(torch.randn(2, 3, 3))
    assert output.shape == (2, 3, 2) and h_n.shape == (1, 3, 2) and c_n.shape == (1, 3, 4)
    assert normrnn.dispatch.resolve("auto", "lstm", "batch", torch.zeros(1)) == "cpp"
    assert not [warning for warning in recwarn if "reference" in str(warning.message)]


def test_gradient_flow_of_torchs_projecting_lstm():
    """The diagnostics take torch's projecting LSTM too (as the normrnn layer with its weights) and
    measure dL/dh_t of the projected state that the next step reads."""
    from normrnn.diagnostics import gradient_flow, hidden_norm_growth
    theirs = nn.LSTM(2, 6, proj_size=3).double()
    x = torch.randn(5, 4, 2, dtype=torch.float64)
    norms = gradient_flow(theirs, x, lambda result: result[0][-1].sum())
    assert norms.shape == (1, 5) and bool((norms > 0).all())
    expected = theirs(x)[0].norm(dim=-1).mean(dim=-1)  # the outputs are the states h_t
    assert relative_error(hidden_norm_growth(theirs, x)[0], expected) < 1e-10
