"""Reference LSTM over a whole sequence, one layer and direction: the definition that the
Triton kernels in ``normrnn.kernels.lstm_*`` are tested against.

Gate order as in ``torch.nn.LSTM`` (i, f, g, o). With N the chosen normalization:

    z_t = N_hh(W_hh h_{t-1}) + N_ih(W_ih x_t) + b_ih + b_hh
    i, f, g, o = sigmoid(z_i), sigmoid(z_f), tanh(z_g), sigmoid(z_o)
    c_t = f * c_{t-1} + i * g
    h_t = o * tanh(N_cell(c_t))               (h_t = W_hr (o * tanh(N_cell(c_t))) with proj_size)

With ``proj_size`` P (``params.weight_hr``, (P, H), as in ``torch.nn.LSTM``) the state h_t and
the output have P features, W_hh is (4H, P), and the cell keeps H.

norm=None: every N is the identity (exactly torch's LSTM).
norm="batch" (Cooijmans et al. 2016): N_ih, N_hh are batch norms with gain and no shift, N_cell
    a batch norm with gain and shift, each with its own statistics at every timestep.
norm="layer" (Ba et al. 2016): layer norms over the 4H gate pre-activations (gain only) and over
    the H cells (gain and shift).
norm="seqbatch" (Laurent et al. 2016): N_ih is a batch norm over batch and time, the rest identity.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..params import DirectionParams, Padding
from .common import emit, observe_state, keep_active, normalize_step, project_inputs, sum_biases, zero_padding


def lstm_sequence(x: Tensor, h0: Tensor, c0: Tensor, params: DirectionParams, norm: Optional[str],
                  padding: Padding, training: bool, momentum: float, eps: float
                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """Runs the LSTM above over ``x`` (T, B, I) from ``h0`` (B, P or H) and ``c0`` (B, H).

    Returns ``output`` (T, B, P or H), zero at padded positions, and ``(h_n, c_n)`` taken at each
    sequence's own last step. Running statistics in ``params`` are updated in training.
    """
    x = zero_padding(x, padding)
    projected = project_inputs(x, params, norm, padding, training, momentum, eps)
    bias = sum_biases(params)
    h, c = h0, c0
    outputs = []
    for step in range(x.shape[0]):
        active = padding.active(step)
        z = (normalize_step(projected[step], "ih", params, norm, step, padding, training, momentum, eps)
             + normalize_step(torch.matmul(h, params.weight_hh.t()), "hh", params, norm, step, padding,
                              training, momentum, eps))
        if bias is not None:
            z = z + bias
        z_i, z_f, z_g, z_o = z.chunk(4, dim=-1)
        c_new = torch.sigmoid(z_f) * c + torch.sigmoid(z_i) * torch.tanh(z_g)
        c_normalized = normalize_step(c_new, "cell", params, norm, step, padding, training, momentum, eps,
                                      bias=params.cell_norm_bias)
        h_new = torch.sigmoid(z_o) * torch.tanh(c_normalized)
        if params.weight_hr is not None:
            h_new = torch.matmul(h_new, params.weight_hr.t())
        h_new = observe_state(step, h_new)
        h = keep_active(h_new, h, active)
        c = keep_active(c_new, c, active)
        outputs.append(emit(h_new, active))
    return torch.stack(outputs), h, c
