"""The normalization semantics: per-timestep batch norm equals nn.BatchNorm1d applied step by
step, padding takes no part in anything, population statistics beyond max_steps, steps with a
single active sequence, running statistics and their state_dict round trip."""
import pytest
import torch
from torch import nn

import normrnn
from conftest import CELLS, NORMS, outputs_and_grads, relative_error


def _batchnorm(weight, features, momentum):
    bn = nn.BatchNorm1d(features, momentum=momentum).double()
    bn.weight.data.copy_(weight.detach())
    bn.bias.data.zero_()
    return bn


def test_bn_lstm_equals_batchnorm1d_step_by_step():
    steps, batch, inputs, hidden = 5, 6, 3, 4
    layer = normrnn.LSTM(inputs, hidden, norm="batch", momentum=0.3, backend="reference").double()
    for p in layer.parameters():
        p.data.uniform_(-1, 1)
    x = torch.randn(steps, batch, inputs, dtype=torch.float64)
    out, (h_n, c_n) = layer(x)

    bns = [(_batchnorm(layer.ih_norm_weight_l0, 4 * hidden, 0.3), _batchnorm(layer.hh_norm_weight_l0, 4 * hidden, 0.3),
            _batchnorm(layer.cell_norm_weight_l0, hidden, 0.3)) for _ in range(steps)]
    for _, _, bn_cell in bns:
        bn_cell.bias.data.copy_(layer.cell_norm_bias_l0.detach())
    h = torch.zeros(batch, hidden, dtype=torch.float64)
    c = torch.zeros_like(h)
    expected = []
    bias = layer.bias_ih_l0 + layer.bias_hh_l0
    for t in range(steps):
        bn_ih, bn_hh, bn_cell = bns[t]
        z = bn_ih(x[t] @ layer.weight_ih_l0.t()) + bn_hh(h @ layer.weight_hh_l0.t()) + bias
        i, f, g, o = z.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(bn_cell(c))
        expected.append(h)
    assert relative_error(out, torch.stack(expected)) < 1e-12
    assert relative_error(c_n[0], c) < 1e-12
    for t, (bn_ih, bn_hh, bn_cell) in enumerate(bns):
        assert relative_error(layer.ih_running_mean_l0[t], bn_ih.running_mean) < 1e-12
        assert relative_error(layer.hh_running_var_l0[t], bn_hh.running_var) < 1e-12
        assert relative_error(layer.cell_running_var_l0[t], bn_cell.running_var) < 1e-12
    assert torch.equal(layer.ih_running_mean_l0[steps:], torch.zeros(100 - steps, 4 * hidden, dtype=torch.float32))

    # evaluation uses the per-timestep population statistics
    layer.eval()
    for bn_set in bns:
        for bn in bn_set:
            bn.eval()
    out_eval, _ = layer(x)
    h = torch.zeros(batch, hidden, dtype=torch.float64)
    c = torch.zeros_like(h)
    for t in range(steps):
        bn_ih, bn_hh, bn_cell = bns[t]
        z = bn_ih(x[t] @ layer.weight_ih_l0.t()) + bn_hh(h @ layer.weight_hh_l0.t()) + bias
        i, f, g, o = z.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(bn_cell(c))
    # running statistics are float32 buffers, so evaluation agrees to float32 rounding
    assert relative_error(out_eval[-1], h) < 1e-6


def test_bn_rnn_in_place_of_tanh_equals_batchnorm1d():
    layer = normrnn.RNN(3, 4, norm="batch", nonlinearity=None, bias=False, backend="reference").double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    out, _ = layer(x)
    h = torch.zeros(5, 4, dtype=torch.float64)
    for t in range(4):
        h = (_batchnorm(layer.ih_norm_weight_l0, 4, 0.1)(x[t] @ layer.weight_ih_l0.t())
             + _batchnorm(layer.hh_norm_weight_l0, 4, 0.1)(h @ layer.weight_hh_l0.t()))
        assert relative_error(out[t], h) < 1e-12


def test_seqbatch_statistics_over_batch_and_time():
    layer = normrnn.GRU(3, 4, norm="seqbatch", momentum=0.5, backend="reference").double()
    x = torch.randn(6, 5, 3, dtype=torch.float64)
    layer(x)
    projected = (x @ layer.weight_ih_l0.t()).reshape(-1, 12)
    assert relative_error(layer.ih_running_mean_l0, 0.5 * projected.mean(0)) < 1e-6
    assert relative_error(layer.ih_running_var_l0, 0.5 + 0.5 * projected.var(0, unbiased=True)) < 1e-6


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_takes_no_part(cell, norm, bidirectional):
    """Garbage (NaN, huge values) at padded positions changes no output, state, gradient or
    running statistic; padded outputs are exactly zero."""
    lengths = torch.tensor([6, 2, 4, 6])
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    garbage = x.clone()
    for b, length in enumerate(lengths.tolist()):
        garbage[length:, b] = float("nan") if b % 2 else 1e30
    results = []
    for data in (x, garbage):
        torch.manual_seed(0)
        layer = CELLS[cell](3, 5, num_layers=2, bidirectional=bidirectional, norm=norm, backend="reference").double()
        results.append(outputs_and_grads(layer, data, lengths=lengths))
    clean, dirty = results
    for key in clean:
        assert torch.isfinite(dirty[key]).all(), key
        assert torch.equal(clean[key], dirty[key]) or relative_error(dirty[key], clean[key]) < 1e-12, key
    for b, length in enumerate(lengths.tolist()):
        assert torch.equal(clean["output"][length:, b], torch.zeros_like(clean["output"][length:, b]))


@pytest.mark.parametrize("norm", [None, "layer"])
def test_padded_sequences_equal_separate_runs(norm):
    """Without batch statistics, a padded batch gives each sequence exactly its own run; the
    final state is taken at each sequence's own last step, in both directions."""
    layer = normrnn.LSTM(3, 4, bidirectional=True, norm=norm, backend="reference").double()
    lengths = [5, 2, 3]
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    out, (h_n, c_n) = layer(x, lengths=lengths)
    for b, length in enumerate(lengths):
        alone, (h_alone, c_alone) = layer(x[:length, b:b + 1])
        assert relative_error(out[:length, b], alone[:, 0]) < 1e-12
        assert relative_error(h_n[:, b], h_alone[:, 0]) < 1e-12
        assert relative_error(c_n[:, b], c_alone[:, 0]) < 1e-12


def test_batch_statistics_ignore_padding():
    """Sequence b's statistics at step t are those of the sequences still running at t."""
    layer = normrnn.RNN(2, 3, norm="batch", backend="reference").double()
    x = torch.randn(3, 4, 2, dtype=torch.float64)
    layer(x[:2, :3], lengths=None)  # steps 0-1 with three sequences
    expected = layer.ih_running_mean_l0.clone()
    layer.reset_running_stats()
    layer(x, lengths=[2, 2, 2, 1])  # step 0 has four sequences; step 1 has three
    step1 = (x[1, :3] @ layer.weight_ih_l0.t()).mean(0)
    assert relative_error(layer.ih_running_mean_l0[1], 0.1 * step1) < 1e-6
    assert relative_error(layer.ih_running_mean_l0[1], expected[1]) < 1e-6


def test_step_with_one_active_sequence_uses_running_statistics():
    layer = normrnn.LSTM(3, 4, norm="batch", backend="reference").double()
    for name, buffer in layer.named_buffers():
        buffer.uniform_(0.5, 2.0) if "var" in name else buffer.normal_()
    before = {name: buffer.clone() for name, buffer in layer.named_buffers()}
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    out, _ = layer(x, lengths=[4, 2])
    for name, buffer in layer.named_buffers():
        assert torch.equal(buffer[2:], before[name][2:]), name  # steps 2, 3: one sequence only
        assert not torch.equal(buffer[:2], before[name][:2]), name
    # the lone sequence's steps are normalized exactly as evaluation does them with those statistics
    _, (h_mid, c_mid) = layer(x[:2])
    tail = normrnn.LSTM(3, 4, norm="batch", backend="reference").double()
    tail.load_state_dict(layer.state_dict())
    for name, buffer in tail.named_buffers():
        buffer[:2] = before[name][2:4]
    tail.eval()
    expected, _ = tail(x[2:, :1], (h_mid[:, :1], c_mid[:, :1]))
    assert relative_error(out[2:, 0], expected[:, 0]) < 1e-6


def test_evaluation_beyond_max_steps_uses_last_step_statistics():
    layer = normrnn.GRU(3, 4, norm="batch", max_steps=3, backend="reference").double()
    for name, buffer in layer.named_buffers():
        buffer.uniform_(0.5, 2.0) if "var" in name else buffer.normal_()
    layer.eval()
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    out, _ = layer(x)
    longer = normrnn.GRU(3, 4, norm="batch", max_steps=7, backend="reference").double()
    state = layer.state_dict()
    for name, buffer in state.items():
        if "running" in name:
            state[name] = torch.cat([buffer, buffer[-1:].expand(4, -1)])
    longer.load_state_dict(state)
    longer.eval()
    assert relative_error(out, longer(x)[0]) < 1e-12


def test_training_beyond_max_steps_updates_last_slot_once_per_step():
    layer = normrnn.RNN(2, 3, norm="batch", max_steps=2, momentum=0.5, backend="reference").double()
    x = torch.randn(4, 5, 2, dtype=torch.float64)
    layer(x)
    expected = torch.zeros(3, dtype=torch.float64)
    for t in (1, 2, 3):
        expected = 0.5 * expected + 0.5 * (x[t] @ layer.weight_ih_l0.t()).mean(0)
    assert relative_error(layer.ih_running_mean_l0[1], expected) < 1e-6


def test_running_statistics_round_trip_through_state_dict():
    layer = normrnn.LSTM(3, 4, num_layers=2, norm="batch", backend="reference")
    layer(torch.randn(5, 4, 3))
    copy = normrnn.LSTM(3, 4, num_layers=2, norm="batch", backend="reference")
    copy.load_state_dict(layer.state_dict())
    layer.eval()
    copy.eval()
    x = torch.randn(6, 2, 3)
    assert torch.equal(layer(x)[0], copy(x)[0])
    assert "cell_running_var_l1" in layer.state_dict()


def test_half_precision_layer_keeps_float32_statistics():
    layer = normrnn.LSTM(3, 4, norm="batch").to(torch.bfloat16)
    assert layer.weight_ih_l0.dtype == torch.bfloat16
    assert layer.ih_running_mean_l0.dtype == torch.float32
    out, _ = layer(torch.randn(3, 2, 3, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_gamma_init():
    assert torch.all(normrnn.BNLSTM(2, 3).ih_norm_weight_l0 == 0.1)
    assert torch.all(normrnn.BNLSTM(2, 3).cell_norm_bias_l0 == 0.0)
    assert torch.all(normrnn.LNLSTM(2, 3).hh_norm_weight_l0 == 1.0)
    assert torch.all(normrnn.BNGRU(2, 3, gamma_init=1.0).hh_norm_weight_l0 == 1.0)
