"""Under ``torch.autocast`` a float32 layer computes as the same layer cast to the autocast dtype.

``nn.LSTM`` runs in the autocast dtype under autocast; so do normrnn's layers, and bit for bit as
``layer.to(dtype)`` would: the same outputs and final states, the gradients of the input and of
every parameter (brought back to float32 by the casts' backward) and the same float32 running
statistics. The fused kernels run here under the Triton interpreter, in float16 (CUDA autocast's
default dtype)."""
import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import normrnn
from fused_helpers import DEVICE, INTERPRETER_OFF

CELLS = {"lstm": normrnn.LSTM, "gru": normrnn.GRU, "rnn": normrnn.RNN}


def _run(layer, x, hx, lengths, autocast=None):
    """Output, final states and every gradient of a fixed random loss, as one flat dict; with
    ``autocast`` (device type, dtype) the forward runs in that autocast region and the backward,
    as PyTorch recommends, after it."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    device_type, dtype = autocast or ("cpu", None)
    with torch.autocast(device_type, dtype=dtype, enabled=autocast is not None):
        output, final = layer(x, hx, lengths=lengths)
    finals = final if isinstance(final, tuple) else (final,)
    generator = torch.Generator().manual_seed(1)
    loss = sum((tensor.float() * torch.randn(tensor.shape, generator=generator).to(tensor.device)).sum()
               for tensor in (output, *finals))
    loss.backward()
    results = {"output": output.detach(), "grad_input": x.grad}
    results.update({f"final{index}": tensor.detach() for index, tensor in enumerate(finals)})
    results.update({"grad_" + name: parameter.grad for name, parameter in layer.named_parameters()})
    results.update({name: buffer.clone() for name, buffer in layer.named_buffers()})
    return results


def _assert_autocast_is_the_cast_layer(layer, x, hx, lengths, device_type, dtype):
    cast = copy.deepcopy(layer).to(dtype)
    got = _run(layer, x, hx, lengths, autocast=(device_type, dtype))
    low_hx = None if hx is None else tuple(h.to(dtype) for h in hx) if isinstance(hx, tuple) else hx.to(dtype)
    expected = _run(cast, x.to(dtype), low_hx, lengths)
    assert got["output"].dtype == dtype
    for name, parameter in layer.named_parameters():
        assert parameter.dtype == torch.float32 and got["grad_" + name].dtype == torch.float32, name
    assert got["grad_input"].dtype == x.dtype
    for key, value in expected.items():
        assert torch.equal(got[key], value.to(got[key].dtype)), key
        # the cast layer's gradients are in dtype: autocast's, brought to float32, carry no more
        assert torch.equal(got[key].to(value.dtype), value), key


@pytest.mark.parametrize("norm", [None, "batch", "layer", "seqbatch"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_reference_under_cpu_autocast_is_the_bfloat16_layer(cell, norm):
    layer = CELLS[cell](5, 7, num_layers=2, bidirectional=True, norm=norm, backend="reference")
    x = torch.randn(6, 4, 5)
    hx = torch.randn(4, 4, 7)
    hx = (hx, torch.randn(4, 4, 7)) if cell == "lstm" else hx
    _assert_autocast_is_the_cast_layer(layer, x, hx, torch.tensor([6, 2, 5, 6]), "cpu", torch.bfloat16)


@pytest.mark.skipif(INTERPRETER_OFF, reason="no CUDA device and the Triton interpreter is off")
@pytest.mark.parametrize("cell, norm", [("lstm", "batch"), ("lstm", "layer"), ("gru", "batch"), ("rnn", None)])
def test_fused_kernels_under_autocast_are_the_float16_layer(cell, norm):
    layer = CELLS[cell](3, 9, norm=norm, backend="triton", device=DEVICE)
    x = torch.randn(5, 4, 3, device=DEVICE)
    _assert_autocast_is_the_cast_layer(layer, x, None, torch.tensor([5, 5, 3, 4]), torch.device(DEVICE).type,
                                       torch.float16)


def test_packed_sequence_under_autocast():
    layer = normrnn.LSTM(3, 6, norm="batch", backend="reference")
    x = torch.randn(5, 4, 3)
    lengths = torch.tensor([5, 2, 4, 3])
    cast = copy.deepcopy(layer).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed, (h_n, c_n) = layer(pack_padded_sequence(x, lengths, enforce_sorted=False))
    expected, (h_expected, c_expected) = cast(pack_padded_sequence(x.bfloat16(), lengths, enforce_sorted=False))
    assert packed.data.dtype == torch.bfloat16
    assert torch.equal(packed.data, expected.data) and torch.equal(packed.batch_sizes, expected.batch_sizes)
    assert torch.equal(h_n, h_expected) and torch.equal(c_n, c_expected)


def test_float64_layer_ignores_autocast():
    layer = normrnn.GRU(3, 4, norm="layer", backend="reference").double()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, _ = layer(x)
    assert output.dtype == torch.float64
    assert torch.equal(output, layer(x)[0])


def test_autocast_off_on_another_device_type_changes_nothing():
    """Autocast on CUDA does not touch a layer whose parameters are on the CPU."""
    layer = normrnn.RNN(3, 4, backend="reference")
    x = torch.randn(4, 2, 3)
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        output, _ = layer(x)
    assert output.dtype == torch.float32


def test_float64_input_under_autocast_names_the_autocast_dtype():
    layer = normrnn.LSTM(3, 4, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="autocast") as error:
        layer(torch.randn(4, 2, 3, dtype=torch.float64))
    assert "torch.bfloat16" in str(error.value) and "float64" in str(error.value)
