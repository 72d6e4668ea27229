"""The bench's FlashRNN peer does the work cuDNN does: with a torch module's weights laid out in
FlashRNN's gate order, it computes that module's output (through FlashRNN's own PyTorch loop, its
"vanilla" backend, which takes the same layout as its fused CUDA kernel and runs on a CPU)."""
import pytest
import torch

pytest.importorskip("flashrnn")

from normrnn.bench.flashrnn_peer import FlashRNNLayer  # noqa: E402


@pytest.mark.parametrize("module_class", [torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN])
def test_the_peer_computes_the_torch_module_it_was_given(module_class):
    module = module_class(5, 9)
    with torch.no_grad():  # biases away from their initial range, so that a misplaced one shows
        for name, parameter in module.named_parameters():
            if "bias" in name:
                parameter.normal_()
    layer = FlashRNNLayer.from_torch(module, backend="vanilla")
    x = torch.randn(7, 4, 5)
    expected = module(x)[0]
    got, _ = layer(x)
    assert got.shape == expected.shape == (7, 4, 9)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()
    got.sum().backward()
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in layer.parameters())


def test_the_peer_refuses_what_it_cannot_lay_out():
    with pytest.raises(ValueError, match="nonlinearity='relu'"):
        FlashRNNLayer.from_torch(torch.nn.RNN(3, 4, nonlinearity="relu"), backend="vanilla")
    with pytest.raises(ValueError, match="one layer, one direction"):
        FlashRNNLayer.from_torch(torch.nn.LSTM(3, 4, bidirectional=True), backend="vanilla")


def test_the_bench_skips_it_off_cuda_and_for_normalized_cells_with_the_reason():
    from normrnn.bench import cases
    from normrnn.bench.implementations import Skip, flashrnn
    with pytest.raises(Skip, match="CUDA only"):
        flashrnn(cases.Case("lstm", None, "float32", 3, 8, 2), torch.device("cpu"))
    if torch.cuda.is_available():
        with pytest.raises(Skip, match="no normalized cells"):
            flashrnn(cases.Case("lstm", "layer", "float32", 3, 8, 2), torch.device("cuda"))
