"""FlashRNN (Pöppel et al. 2024, the package ``flashrnn``) as a layer that takes and returns what
torch's modules do: the peer the bench times beside cuDNN, doing the same work.

FlashRNN's function takes the input projections, not the input, so the layer runs its own
``x W_ih^T`` first, as cuDNN and normrnn do inside theirs:

    projected = x W_ih^T   (T, B, input_gates * H), as (B, T, input_gates, heads=1, H)
    states = flashrnn(projected, R, b)   R (recurrent_gates, 1, H, H), b (bias_gates, 1, H)
    output = h, state 0 of ``states``   (T, B, H)

One head of ``head_dim`` = hidden_size: the dense recurrent matrix of torch's cells. FlashRNN's
gate order is torch's for the LSTM (i, f, g, o) and the Elman RNN (tanh); its GRU keeps the
recurrent part of n apart: recurrent gates (n, r, z), input gates (r, z, n), biases (b_hn,
b_ir + b_hr, b_iz + b_hz, b_in), which is torch's ``n = tanh(W_in x + b_in + r (W_hn h + b_hn))``.
``from_torch`` lays a torch module's weights out so, and the tests check the outputs against it.
"""
from __future__ import annotations

import importlib
import math

import torch
from torch import nn

# cell: (FlashRNN's function, input gates, recurrent gates, bias gates)
FUNCTIONS = {"lstm": ("lstm", 4, 4, 4), "gru": ("gru", 3, 3, 4), "rnn": ("elman", 1, 1, 1)}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class FlashRNNLayer(nn.Module):
    """One layer and direction of FlashRNN's ``cell`` ("lstm", "gru" or "rnn": tanh), from zero
    state, on (T, B, input_size); ``backend`` is FlashRNN's ("cuda_fused": its fused kernel, which
    compiles on first use; "vanilla": its PyTorch loop). Returns ``(output, None)``."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, backend: str = "cuda_fused", device=None,
                 dtype=None):
        super().__init__()
        if cell not in FUNCTIONS:
            raise ValueError(f"cell must be one of {tuple(FUNCTIONS)}, got {cell!r}")
        self.flashrnn = importlib.import_module("flashrnn.flashrnn").flashrnn
        self.function, input_gates, recurrent_gates, bias_gates = FUNCTIONS[cell]
        self.cell, self.hidden_size, self.backend = cell, hidden_size, backend
        factory = {"device": device, "dtype": dtype}
        self.weight_ih = nn.Parameter(torch.empty(input_gates * hidden_size, input_size, **factory))
        self.recurrent = nn.Parameter(torch.empty(recurrent_gates, 1, hidden_size, hidden_size, **factory))
        self.bias = nn.Parameter(torch.empty(bias_gates, 1, hidden_size, **factory))
        bound = 1.0 / math.sqrt(hidden_size)  # torch's initialization of its cells
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -bound, bound)

    @classmethod
    def from_torch(cls, module: nn.RNNBase, backend: str = "cuda_fused") -> "FlashRNNLayer":
        """The same cell as a one-layer, one-direction ``nn.LSTM``, ``nn.GRU`` or tanh ``nn.RNN``
        with biases, in FlashRNN's layout."""
        cell = {nn.LSTM: "lstm", nn.GRU: "gru", nn.RNN: "rnn"}[type(module)]
        if module.num_layers != 1 or module.bidirectional or not module.bias or module.batch_first:
            raise ValueError("module: expected one layer, one direction, biases and (T, B, I) input")
        if cell == "rnn" and module.nonlinearity != "tanh":
            raise ValueError(f"module: FlashRNN's Elman cell is tanh, got nonlinearity={module.nonlinearity!r}")
        weight = module.weight_hh_l0
        layer = cls(cell, module.input_size, module.hidden_size, backend, weight.device, weight.dtype)
        hidden = module.hidden_size
        w_hh = module.weight_hh_l0.detach().view(-1, hidden, hidden)
        b_ih = module.bias_ih_l0.detach().view(-1, hidden)
        b_hh = module.bias_hh_l0.detach().view(-1, hidden)
        with torch.no_grad():
            layer.weight_ih.copy_(module.weight_ih_l0)
            if cell == "gru":  # torch's (r, z, n) rows; FlashRNN's recurrent (n, r, z)
                layer.recurrent.copy_(w_hh[[2, 0, 1]].unsqueeze(1))
                layer.bias.copy_(torch.stack([b_hh[2], b_ih[0] + b_hh[0], b_ih[1] + b_hh[1], b_ih[2]]).unsqueeze(1))
            else:
                layer.recurrent.copy_(w_hh.unsqueeze(1))
                layer.bias.copy_((b_ih + b_hh).unsqueeze(1))
        return layer

    def forward(self, x: torch.Tensor):
        steps, batch, _ = x.shape
        projected = torch.matmul(x, self.weight_ih.t())
        projected = projected.view(steps, batch, -1, 1, self.hidden_size).transpose(0, 1)
        states, _ = self.flashrnn(projected, self.recurrent, self.bias, function=self.function, backend=self.backend,
                                  dtype=DTYPE_NAMES[x.dtype])
        return states[0, :, :, 0].transpose(0, 1), None  # states (states, B, T, heads, H): h is state 0
