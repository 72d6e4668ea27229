"""Reference GRU over a whole sequence, one layer and direction.

Gate order and bias placement as in ``torch.nn.GRU`` (r, z, n). With N the chosen normalization
applied to the whole 3H projections:

    a_t = N_ih(W_ih x_t) + b_ih,   u_t = N_hh(W_hh h_{t-1}) + b_hh
    r = sigmoid(a_r + u_r),  z = sigmoid(a_z + u_z)
    n = tanh(a_n + r * u_n)
    h_t = (1 - z) * n + z * h_{t-1}

norm="batch": per-timestep batch norms (gain, no shift) of both projections; "layer": layer norms
over the 3H values of each projection; "seqbatch": batch norm of W_ih x over batch and time only.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..params import DirectionParams, Padding
from .common import emit, observe_state, keep_active, normalize_step, project_inputs, zero_padding


def gru_sequence(x: Tensor, h0: Tensor, params: DirectionParams, norm: Optional[str], padding: Padding,
                 training: bool, momentum: float, eps: float) -> Tuple[Tensor, Tensor]:
    """Runs the GRU above over ``x`` (T, B, I) from ``h0`` (B, H); returns ``output`` (T, B, H),
    zero at padded positions, and ``h_n`` at each sequence's own last step."""
    x = zero_padding(x, padding)
    projected = project_inputs(x, params, norm, padding, training, momentum, eps)
    h = h0
    outputs = []
    for step in range(x.shape[0]):
        active = padding.active(step)
        a = normalize_step(projected[step], "ih", params, norm, step, padding, training, momentum, eps)
        u = normalize_step(torch.matmul(h, params.weight_hh.t()), "hh", params, norm, step, padding,
                           training, momentum, eps)
        if params.bias_ih is not None:
            a = a + params.bias_ih
        if params.bias_hh is not None:
            u = u + params.bias_hh
        a_r, a_z, a_n = a.chunk(3, dim=-1)
        u_r, u_z, u_n = u.chunk(3, dim=-1)
        r = torch.sigmoid(a_r + u_r)
        z = torch.sigmoid(a_z + u_z)
        n = torch.tanh(a_n + r * u_n)
        h_new = (1 - z) * n + z * h
        h_new = observe_state(step, h_new)
        h = keep_active(h_new, h, active)
        outputs.append(emit(h_new, active))
    return torch.stack(outputs), h
