"""How the C++ backend multiplies every step by its recurrent weight (csrc/recurrent_product.h):
ATen's mm, or oneDNN's linear on the weight reordered once per call, chosen by dtype and shape (or
by NORMRNN_CPU_MATMUL). Both give the reference's values and gradients."""
import pytest
import torch

import normrnn
from conftest import CELLS, NORMS, assert_float32_backend_equals_the_reference

reason = normrnn.dispatch.unavailable_reason("cpp", "lstm", None, torch.zeros(1))
if reason is not None:
    pytest.skip(f"the C++ backend is not usable here: {reason}", allow_module_level=True)

from normrnn.cpp_backend import extension  # noqa: E402

ONEDNN = torch.backends.mkldnn.is_available()
# (batch, in_features, out_features, steps): the LSTM's h W_hh^T at B=32, H=256, T=100
LARGE = (32, 256, 1024, 100)


def test_the_choice_follows_dtype_shape_and_setting(monkeypatch):
    kind = extension().recurrent_product_kind
    monkeypatch.delenv("NORMRNN_CPU_MATMUL", raising=False)
    assert kind(torch.float32, *LARGE) == ("onednn" if ONEDNN else "aten")
    assert kind(torch.float64, *LARGE) == "aten"  # oneDNN has no float64 products
    assert kind(torch.float32, 32, 128, 512, 100) == "aten"  # a weight of 2^16 elements: mm was faster
    assert kind(torch.float32, 3, 256, 1024, 100) == "aten"  # a batch of three
    assert kind(torch.float32, 32, 256, 1024, 15) == "aten"  # 15 steps may not repay the reordering
    # the flag itself: torch.backends.mkldnn.flags() also sets allow_tf32, which warns on a CPU build
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        assert kind(torch.float32, *LARGE) == "aten"
    finally:
        torch.backends.mkldnn.enabled = enabled
    monkeypatch.setenv("NORMRNN_CPU_MATMUL", "aten")
    assert kind(torch.float32, *LARGE) == "aten"
    monkeypatch.setenv("NORMRNN_CPU_MATMUL", "onednn")
    assert kind(torch.float32, 1, 3, 2, 1) == ("onednn" if ONEDNN else "aten")
    assert kind(torch.float64, *LARGE) == "aten"
    monkeypatch.setenv("NORMRNN_CPU_MATMUL", "fast")
    with pytest.raises(RuntimeError, match="NORMRNN_CPU_MATMUL: expected auto, aten or onednn, got 'fast'"):
        kind(torch.float32, *LARGE)


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN")
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("norm", NORMS)
def test_onednn_products_equal_the_reference(cell, norm, monkeypatch):
    """Two layers, bidirectional, padded, training and evaluation past max_steps, with every
    product on oneDNN (forced: the shapes are below the automatic choice's)."""
    monkeypatch.setenv("NORMRNN_CPU_MATMUL", "onednn")
    assert_float32_backend_equals_the_reference(CELLS[cell], norm, "cpp", hidden_size=7)


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN")
@pytest.mark.parametrize("norm", [None, "layer", "batch"])
def test_onednn_products_of_a_projecting_lstm_equal_the_reference(norm, monkeypatch):
    monkeypatch.setenv("NORMRNN_CPU_MATMUL", "onednn")
    assert_float32_backend_equals_the_reference(normrnn.LSTM, norm, "cpp", hidden_size=7, proj_size=3)


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN")
def test_the_setting_changes_which_products_run(monkeypatch):
    """Which products ran, as torch's profiler records the ops the extension dispatches: oneDNN's
    linear (and its weight reordering) under NORMRNN_CPU_MATMUL=onednn, none of it under =aten (the
    tests above would pass on mm alone); and values that agree, that both compute the same thing.
    (The bits cannot tell the two apart on every machine: over 256 terms mm and oneDNN differed on a
    2-core AMD EPYC and agreed to the bit on a 2-core Intel Xeon with AVX-512.)"""
    layer = normrnn.LSTM(64, 256, backend="cpp")
    x = torch.randn(12, 16, 64)
    results = {}
    for kind in ("aten", "onednn"):
        monkeypatch.setenv("NORMRNN_CPU_MATMUL", kind)
        x_kind = x.clone().requires_grad_(True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            output, _ = layer(x_kind)
            output.square().sum().backward()
        calls = {event.key: event.count for event in profile.key_averages()}
        # 12 steps forward and 12 backward, one product each; the weight reordered for each way round
        assert calls.get("mkldnn::_linear_pointwise", 0) == (24 if kind == "onednn" else 0), calls
        assert calls.get("mkldnn::_reorder_linear_weight", 0) == (2 if kind == "onednn" else 0), calls
        results[kind] = (output.detach(), x_kind.grad)
    for on_mm, on_onednn in zip(results["aten"], results["onednn"]):
        torch.testing.assert_close(on_onednn, on_mm, rtol=1e-5, atol=1e-5)
