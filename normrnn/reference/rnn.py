"""Reference vanilla RNN over a whole sequence, one layer and direction.

    h_t = act(N_ih(W_ih x_t) + N_hh(W_hh h_{t-1}) + b_ih + b_hh),   act in {tanh, relu, identity}

With ``norm="batch", nonlinearity=None, bias=False`` the per-timestep batch norms take the place
of tanh and the bias: the configuration asked about in the question this library answers.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..params import DirectionParams, Padding
from .common import emit, observe_state, keep_active, normalize_step, project_inputs, sum_biases, zero_padding

ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, None: lambda v: v}


def rnn_sequence(x: Tensor, h0: Tensor, params: DirectionParams, norm: Optional[str], padding: Padding,
                 training: bool, momentum: float, eps: float, nonlinearity: Optional[str] = "tanh"
                 ) -> Tuple[Tensor, Tensor]:
    """Runs the RNN above over ``x`` (T, B, I) from ``h0`` (B, H); returns ``output`` (T, B, H),
    zero at padded positions, and ``h_n`` at each sequence's own last step."""
    x = zero_padding(x, padding)
    activation = ACTIVATIONS[nonlinearity]
    projected = project_inputs(x, params, norm, padding, training, momentum, eps)
    bias = sum_biases(params)
    h = h0
    outputs = []
    for step in range(x.shape[0]):
        active = padding.active(step)
        pre = (normalize_step(projected[step], "ih", params, norm, step, padding, training, momentum, eps)
               + normalize_step(torch.matmul(h, params.weight_hh.t()), "hh", params, norm, step, padding,
                                training, momentum, eps))
        if bias is not None:
            pre = pre + bias
        h_new = activation(pre)
        h_new = observe_state(step, h_new)
        h = keep_active(h_new, h, active)
        outputs.append(emit(h_new, active))
    return torch.stack(outputs), h
