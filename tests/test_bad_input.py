"""Every bad input raises an error that names the argument and what was expected."""
import math

import pytest
import torch

import normrnn


@pytest.mark.parametrize("kwargs,match", [
    ({"norm": "group"}, "norm must be one of"),
    ({"backend": "cuda"}, "backend must be one of"),
    ({"momentum": math.nan}, "momentum must be a finite"),
    ({"momentum": math.inf}, "momentum must be a finite"),
    ({"eps": math.nan}, "eps must be a finite positive"),
    ({"eps": 0.0}, "eps must be a finite positive"),
    ({"max_steps": 0}, "max_steps must be a positive int"),
    ({"dropout": 1.5}, "dropout must be a number in"),
    ({"hidden_size": 0}, "hidden_size must be a positive int"),
])
def test_bad_constructor_arguments(kwargs, match):
    config = {"input_size": 3, "hidden_size": 4}
    config.update(kwargs)
    with pytest.raises(ValueError, match=match):
        normrnn.LSTM(**config)


@pytest.mark.parametrize("proj_size,match", [
    (-1, "proj_size must be a non-negative int"),
    (1.5, "proj_size must be a non-negative int"),
    (True, "proj_size must be a non-negative int"),
    (4, r"proj_size must be smaller than hidden_size \(4\), got 4"),
])
def test_bad_projection(proj_size, match):
    with pytest.raises(ValueError, match=match):
        normrnn.LSTM(3, 4, proj_size=proj_size)


def test_projected_state_of_the_wrong_width_names_proj_size():
    layer = normrnn.LSTM(3, 4, proj_size=2, backend="reference")
    with pytest.raises(ValueError, match=r"hx\[0\] \(h_0\): expected shape \(1, 5, 2\) .*proj_size\), got \(1, 5, 4\)"):
        layer(torch.randn(2, 5, 3), (torch.zeros(1, 5, 4), torch.zeros(1, 5, 4)))
    with pytest.raises(ValueError, match=r"hx\[1\] \(c_0\): expected shape \(1, 5, 4\) .*hidden_size\)"):
        layer(torch.randn(2, 5, 3), (torch.zeros(1, 5, 2), torch.zeros(1, 5, 2)))


@pytest.mark.parametrize("cls, said", [(normrnn.RNN, "whatever x and h"), (normrnn.LSTM, "no longer reaches h_t")])
def test_layer_norm_over_one_hidden_unit_warns_what_it_leaves(cls, said):
    with pytest.warns(UserWarning, match=f"norm='layer' with hidden_size=1 normalizes a single value.*{said}"):
        cls(3, 1, norm="layer", backend="reference")


def test_layer_norm_over_one_unit_of_a_gru_or_of_two_units_does_not_warn(recwarn):
    normrnn.GRU(3, 1, norm="layer", backend="reference")
    normrnn.RNN(3, 2, norm="layer", backend="reference")
    normrnn.LSTM(3, 1, norm="batch", backend="reference")
    assert not [warning for warning in recwarn if "hidden_size=1" in str(warning.message)]


def test_unknown_nonlinearity():
    with pytest.raises(ValueError, match="nonlinearity must be one of"):
        normrnn.RNN(3, 4, nonlinearity="sigmoid")


@pytest.fixture
def lstm():
    return normrnn.LSTM(3, 4, num_layers=2, norm="layer", backend="reference")


def test_wrong_rank(lstm):
    with pytest.raises(ValueError, match="input must have 3 dimensions"):
        lstm(torch.randn(2, 3, 4, 3))


def test_wrong_feature_size(lstm):
    with pytest.raises(ValueError, match="input: expected input_size=3"):
        lstm(torch.randn(5, 2, 4))


def test_wrong_input_dtype(lstm):
    with pytest.raises(TypeError, match="input: expected dtype torch.float32"):
        lstm(torch.randn(5, 2, 3, dtype=torch.float64))


def test_wrong_input_device(lstm):
    with pytest.raises(ValueError, match="input: expected a tensor on cpu"):
        lstm(torch.randn(5, 2, 3, device="meta"))


@pytest.mark.parametrize("which,shape,match", [
    (0, (2, 3, 4), r"hx\[0\] \(h_0\): expected shape \(2, 2, 4\)"),
    (1, (2, 2, 5), r"hx\[1\] \(c_0\): expected shape \(2, 2, 4\)"),
])
def test_state_of_wrong_shape(lstm, which, shape, match):
    states = [torch.zeros(2, 2, 4), torch.zeros(2, 2, 4)]
    states[which] = torch.zeros(shape)
    with pytest.raises(ValueError, match=match):
        lstm(torch.randn(5, 2, 3), tuple(states))


def test_state_of_wrong_dtype_and_kind(lstm):
    with pytest.raises(TypeError, match=r"hx\[0\] \(h_0\): expected dtype torch.float32"):
        lstm(torch.randn(5, 2, 3), (torch.zeros(2, 2, 4, dtype=torch.float64), torch.zeros(2, 2, 4)))
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h_0, c_0\)"):
        lstm(torch.randn(5, 2, 3), torch.zeros(2, 2, 4))
    gru = normrnn.GRU(3, 4)
    with pytest.raises(ValueError, match=r"hx: expected shape \(1, 2, 4\)"):
        gru(torch.randn(5, 2, 3), torch.zeros(2, 2, 4))


def test_state_on_wrong_device(lstm):
    with pytest.raises(ValueError, match=r"hx\[1\] \(c_0\): expected a tensor on cpu"):
        lstm(torch.randn(5, 2, 3), (torch.zeros(2, 2, 4), torch.zeros(2, 2, 4, device="meta")))


@pytest.mark.parametrize("lengths,error,match", [
    ([5, 5, 5], ValueError, r"lengths must have shape \(2,\)"),
    ([0, 5], ValueError, r"lengths must lie in \[1, 5\]"),
    ([6, 5], ValueError, r"lengths must lie in \[1, 5\]"),
    ([-1, 2], ValueError, r"lengths must lie in \[1, 5\]"),
    (torch.tensor([2.0, 3.0]), TypeError, "lengths must hold integers"),
    ("ab", TypeError, "lengths must be a 1-D tensor or a sequence of ints"),
])
def test_bad_lengths(lstm, lengths, error, match):
    with pytest.raises(error, match=match):
        lstm(torch.randn(5, 2, 3), lengths=lengths)


def test_lengths_with_packed_sequence(lstm):
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3), [5, 3])
    with pytest.raises(ValueError, match="lengths must be None when input is a PackedSequence"):
        lstm(packed, lengths=[5, 3])


@pytest.mark.parametrize("cls", [normrnn.BNLSTM, normrnn.BNGRU, normrnn.BNRNN])
def test_batch_of_one_in_batch_norm_training(cls):
    layer = cls(3, 4)
    with pytest.raises(ValueError, match="input: norm='batch' in training needs a batch of at least 2"):
        layer(torch.randn(5, 1, 3))
    with pytest.raises(ValueError, match="needs a batch of at least 2"):
        layer(torch.randn(5, 3))  # unbatched
    layer.eval()
    out, _ = layer(torch.randn(5, 1, 3))  # evaluation uses population statistics: fine
    assert out.shape == (5, 1, 4)


def test_explicit_backend_that_cannot_run_raises():
    layer = normrnn.GRU(3, 4, backend="triton").double()
    with pytest.raises(RuntimeError, match="backend='triton' cannot run gru .*float64"):
        layer(torch.randn(5, 2, 3, dtype=torch.float64))
