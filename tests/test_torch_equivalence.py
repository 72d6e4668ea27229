"""norm=None layers equal torch's modules with the same weights: forward and gradients, for
every input form (batch_first, PackedSequence, hx, unbatched, layers, directions, dropout)."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import normrnn
from conftest import outputs_and_grads, relative_error

PAIRS = [(normrnn.LSTM, nn.LSTM, {}), (normrnn.GRU, nn.GRU, {}), (normrnn.RNN, nn.RNN, {"nonlinearity": "tanh"}),
         (normrnn.RNN, nn.RNN, {"nonlinearity": "relu"})]


def _state(cls, layers, batch, hidden, dtype=torch.float64):
    shape = (layers, batch, hidden)
    if cls is normrnn.LSTM:
        return (torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype))
    return torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize("ours_class,torch_class,extra", PAIRS)
@pytest.mark.parametrize("layers,bidirectional,batch_first", [(1, False, False), (2, True, True), (3, False, True)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_torch(ours_class, torch_class, extra, layers, bidirectional, batch_first, bias):
    theirs = torch_class(4, 5, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                         bias=bias, **extra).double()
    ours = ours_class.from_torch(theirs, backend="reference")
    x = torch.randn((3, 6, 4) if batch_first else (6, 3, 4), dtype=torch.float64)
    hx = _state(ours_class, layers * (2 if bidirectional else 1), 3, 5)
    expected = outputs_and_grads(theirs, x, hx)
    got = outputs_and_grads(ours, x, hx)
    for key, value in expected.items():
        assert relative_error(got[key], value) < 1e-10, key


@pytest.mark.parametrize("ours_class,torch_class,extra", PAIRS[:3])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequence_matches_torch(ours_class, torch_class, extra, enforce_sorted):
    theirs = torch_class(3, 4, num_layers=2, bidirectional=True, **extra).double()
    ours = ours_class.from_torch(theirs, backend="reference")
    lengths = torch.tensor([5, 5, 3, 1]) if enforce_sorted else torch.tensor([3, 5, 1, 5])
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    hx = _state(ours_class, 4, 4, 4)
    expected_out, expected_final = theirs(packed, hx)
    got_out, got_final = ours(packed, hx)
    assert isinstance(got_out, type(packed))
    assert torch.equal(got_out.batch_sizes, expected_out.batch_sizes)
    assert relative_error(got_out.data, expected_out.data) < 1e-10
    for got, expected in zip(got_final if isinstance(got_final, tuple) else (got_final,),
                             expected_final if isinstance(expected_final, tuple) else (expected_final,)):
        assert relative_error(got, expected) < 1e-10
    # lengths on padded input mean the same thing as packing
    padded_out, _ = ours(x, hx, lengths=lengths)
    unpacked, _ = pad_packed_sequence(expected_out)
    assert relative_error(padded_out, unpacked) < 1e-10


@pytest.mark.parametrize("ours_class,torch_class,extra", PAIRS[:3])
def test_unbatched_input_matches_torch(ours_class, torch_class, extra):
    theirs = torch_class(3, 4, **extra).double()
    ours = ours_class.from_torch(theirs, backend="reference")
    x = torch.randn(5, 3, dtype=torch.float64)
    expected_out, expected_final = theirs(x)
    got_out, got_final = ours(x)
    assert got_out.shape == expected_out.shape == (5, 4)
    assert relative_error(got_out, expected_out) < 1e-10


def test_dropout_between_layers_matches_torch():
    theirs = nn.LSTM(3, 4, num_layers=3, dropout=0.5).double()
    ours = normrnn.LSTM.from_torch(theirs, backend="reference")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.manual_seed(1)
    expected, _ = theirs(x)
    torch.manual_seed(1)
    got, _ = ours(x)
    assert relative_error(got, expected) < 1e-10
    ours.eval()
    theirs.eval()
    assert relative_error(ours(x)[0], theirs(x)[0]) < 1e-10


def test_state_dict_of_torch_module_loads_non_strict():
    theirs = nn.GRU(3, 4, num_layers=2, bidirectional=True)
    ours = normrnn.GRU(3, 4, num_layers=2, bidirectional=True, norm="batch", backend="reference")
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert not unexpected
    assert missing and all("norm" in name or "running" in name for name in missing)
    assert torch.equal(ours.weight_hh_l1_reverse, theirs.weight_hh_l1_reverse)


def test_from_torch_adds_norm_and_keeps_aliases_norm():
    theirs = nn.LSTM(3, 4)
    assert normrnn.LSTM.from_torch(theirs, norm="layer").norm == "layer"
    assert normrnn.BNLSTM.from_torch(theirs).norm == "batch"
    assert normrnn.LNRNN(3, 4).norm == "layer"
    with pytest.raises(TypeError, match="module"):
        normrnn.GRU.from_torch(theirs)


@pytest.mark.parametrize("ours_class,torch_class,extra", PAIRS[:3])
def test_the_weight_accessors_of_torchs_modules(ours_class, torch_class, extra):
    """``all_weights`` lists the same tensors in torch's order (then the norm's gains), and
    ``flatten_parameters`` (called by code written for cuDNN's packed weights) runs and changes
    nothing."""
    theirs = torch_class(3, 4, num_layers=2, bidirectional=True, **extra)
    ours = ours_class.from_torch(theirs, backend="reference")
    assert [[tuple(w.shape) for w in group] for group in ours.all_weights] == \
        [[tuple(w.shape) for w in group] for group in theirs.all_weights]
    for our_group, their_group in zip(ours.all_weights, theirs.all_weights):
        assert all(torch.equal(a, b) for a, b in zip(our_group, their_group))
    before = {name: value.clone() for name, value in ours.state_dict().items()}
    assert ours.flatten_parameters() is None
    assert all(torch.equal(before[name], value) for name, value in ours.state_dict().items())
    normalized = ours_class(3, 4, num_layers=2, norm="layer")
    names = {id(parameter): name for name, parameter in normalized.named_parameters()}
    assert [names[id(parameter)] for parameter in normalized.all_weights[1]][:2] == ["weight_ih_l1", "weight_hh_l1"]
    assert "hh_norm_weight_l1" in [names[id(parameter)] for parameter in normalized.all_weights[1]]


@pytest.mark.parametrize("ours_class,torch_class,extra", PAIRS)
def test_to_torch_gives_the_module_that_computes_the_layer(ours_class, torch_class, extra):
    """A layer without norm exported to torch's module (cuDNN on a GPU) computes what it computes,
    forward and gradients; a normalized layer, or an RNN without activation, has no such module."""
    ours = ours_class(4, 5, num_layers=2, bidirectional=True, batch_first=True, backend="reference", **extra).double()
    theirs = ours.to_torch()
    assert type(theirs) is torch_class and theirs.batch_first and theirs.bidirectional and theirs.num_layers == 2
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    hx = _state(ours_class, 4, 3, 5)
    expected = outputs_and_grads(ours, x, hx)
    got = outputs_and_grads(theirs, x, hx)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert relative_error(got[key], value) < 1e-10, key
    with pytest.raises(ValueError, match="norm='layer': torch's modules have no normalization"):
        ours_class(4, 5, norm="layer").to_torch()
    if ours_class is normrnn.RNN:
        with pytest.raises(ValueError, match="nonlinearity=None"):
            normrnn.RNN(4, 5, nonlinearity=None).to_torch()
