"""The parameters of one layer and direction, and the padding description of a batch.

Backends (reference, Triton, C++) all take these two objects, so a module hands the same
arguments to whichever backend runs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch
from torch import Tensor

CELL_GATES = {"lstm": 4, "gru": 3, "rnn": 1}
NORMS = (None, "layer", "batch", "seqbatch")


@dataclass
class DirectionParams:
    """Weights, normalization parameters and running statistics of one layer and direction.

    Shapes, with G = gates x hidden_size, S = max_steps and R the width of the state h (the
    hidden size H, or the LSTM's proj_size P where it projects its output):
    weight_ih (G, I), weight_hh (G, R), bias_ih / bias_hh (G,) or None;
    ih_norm_weight / hh_norm_weight (G,): gains of the normalizations of W_ih x_t and W_hh h_{t-1};
    cell_norm_weight / cell_norm_bias (H,): LSTM only, the normalization of c_t;
    running statistics, norm="batch": ih/hh (S, G), cell (S, H); norm="seqbatch": ih (G,);
    weight_hr (P, H): LSTM with proj_size P only, h_t = W_hr (o_t * tanh(N_cell(c_t))).
    """
    weight_ih: Tensor
    weight_hh: Tensor
    bias_ih: Optional[Tensor] = None
    bias_hh: Optional[Tensor] = None
    ih_norm_weight: Optional[Tensor] = None
    hh_norm_weight: Optional[Tensor] = None
    cell_norm_weight: Optional[Tensor] = None
    cell_norm_bias: Optional[Tensor] = None
    ih_running_mean: Optional[Tensor] = None
    ih_running_var: Optional[Tensor] = None
    hh_running_mean: Optional[Tensor] = None
    hh_running_var: Optional[Tensor] = None
    cell_running_mean: Optional[Tensor] = None
    cell_running_var: Optional[Tensor] = None
    weight_hr: Optional[Tensor] = None

    @property
    def hidden_size(self) -> int:
        """H: the width of the cell (and of h where nothing projects it)."""
        return self.weight_hh.shape[1] if self.weight_hr is None else self.weight_hr.shape[1]

    @property
    def state_size(self) -> int:
        """The width of h_t: proj_size where the LSTM projects its output, else H."""
        return self.weight_hh.shape[1]


@dataclass
class Padding:
    """Which (timestep, sequence) positions are real: sequence b runs for ``lengths[b]`` steps.

    ``mask`` is (T, B) bool on the data's device; ``active_counts`` the number of running
    sequences at each step, as Python ints (the reference branches on them).
    All fields are None / full counts when every sequence runs the whole T steps.

    Under ``torch.compile`` the lengths are not known while the graph is traced: the padding is
    then taken as present, the mask computed in the graph, and ``count`` and ``total`` are tensors.
    """
    steps: int
    batch: int
    lengths: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    active_counts: Optional[List[int]] = None

    @staticmethod
    def from_lengths(lengths: Optional[Tensor], steps: int, batch: int, device) -> "Padding":
        """The padding of ``batch`` sequences of ``lengths`` (B,) within ``steps`` steps: sequence b
        is active at step t while t < lengths[b]; no padding where lengths is None or all are full."""
        if lengths is None:
            return Padding(steps, batch)
        lengths_cpu = lengths.to("cpu", torch.int64)
        if torch.compiler.is_compiling():
            lengths_device = lengths_cpu.to(device)
            mask = torch.arange(steps, device=device).unsqueeze(1) < lengths_device.unsqueeze(0)
            return Padding(steps, batch, lengths_device, mask)
        if bool((lengths_cpu == steps).all()):
            return Padding(steps, batch)
        time = torch.arange(steps).unsqueeze(1)
        mask_cpu = time < lengths_cpu.unsqueeze(0)
        counts = mask_cpu.sum(1).tolist()
        return Padding(steps, batch, lengths_cpu.to(device), mask_cpu.to(device), counts)

    @property
    def padded(self) -> bool:
        """Whether some sequence ends before the last step."""
        return self.mask is not None

    def active(self, step: int) -> Optional[Tensor]:
        """The (B,) bool mask of the sequences active at ``step``, or None where all are."""
        return None if self.mask is None else self.mask[step]

    def _traced(self) -> bool:
        return self.active_counts is None and torch.compiler.is_compiling()

    def _counts(self) -> List[int]:
        if self.active_counts is None:  # a padding traced by torch.compile, now used eagerly (the C++ backend)
            self.active_counts = self.mask.sum(1).tolist()
        return self.active_counts

    def count(self, step: int) -> Union[int, Tensor]:
        """The number of sequences active at ``step`` (a tensor while torch.compile traces)."""
        if self.mask is None:
            return self.batch
        return self.mask[step].sum() if self._traced() else self._counts()[step]

    @property
    def total(self) -> Union[int, Tensor]:
        """The number of active (step, sequence) positions (a tensor while torch.compile traces)."""
        if self.mask is None:
            return self.steps * self.batch
        return self.mask.sum() if self._traced() else sum(self._counts())
