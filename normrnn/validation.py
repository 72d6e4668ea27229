"""Argument checks: each error names the argument and says what was expected."""
from __future__ import annotations

import math
import operator
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .dispatch import BACKENDS
from .params import NORMS

NONLINEARITIES = ("tanh", "relu", None)


def check_constructor(input_size, hidden_size, num_layers, dropout, norm, momentum, eps, max_steps,
                      backend, nonlinearity=None, proj_size=0) -> None:
    """Raises, naming the argument and what was expected, for a constructor argument out of range."""
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                        ("num_layers", num_layers), ("max_steps", max_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                 or not math.isfinite(momentum) or not 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be a finite number in [0, 1], or None for a cumulative average; "
                         f"got {momentum!r}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0.0:
        raise ValueError(f"eps must be a finite positive number, got {eps!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}")
    if isinstance(proj_size, bool) or not isinstance(proj_size, int) or proj_size < 0:
        raise ValueError(f"proj_size must be a non-negative int (0: no output projection), got {proj_size!r}")
    if proj_size >= hidden_size:
        raise ValueError(f"proj_size must be smaller than hidden_size ({hidden_size}), got {proj_size}")


def check_input(input: Tensor, input_size: int, dtype: torch.dtype, device: torch.device,
                dtype_source: str = "the dtype of the layer's parameters") -> None:
    """Raises, naming ``input`` and what was expected, unless it is a (T, B, I) tensor ((B, T, I)
    with batch_first) or an unbatched (T, I) one, of ``input_size`` features, in ``dtype`` on
    ``device``, with at least one step and sequence."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor or PackedSequence, got {type(input).__name__}")
    if input.dim() not in (2, 3):
        raise ValueError(f"input must have 3 dimensions (T, B, input_size) or (B, T, input_size) with "
                         f"batch_first, or 2 for an unbatched sequence; got shape {tuple(input.shape)}")
    if input.shape[-1] != input_size:
        raise ValueError(f"input: expected input_size={input_size} features in the last dimension, "
                         f"got shape {tuple(input.shape)}")
    if input.dtype != dtype:
        raise TypeError(f"input: expected dtype {dtype} ({dtype_source}), got {input.dtype}")
    if input.device != device:
        raise ValueError(f"input: expected a tensor on {device} (where the layer's parameters are), "
                         f"got one on {input.device}")
    if input.dim() == 3 and (input.shape[0] == 0 or input.shape[1] == 0):
        raise ValueError(f"input: expected at least one timestep and one sequence, got shape {tuple(input.shape)}")


def check_first_step(first_step, bidirectional: bool) -> int:
    """Returns ``first_step`` as an int after checking it is a non-negative integer, and 0 where
    the layer is bidirectional (its reverse direction has no place in a continued sequence)."""
    if isinstance(first_step, Tensor) or isinstance(first_step, bool):
        raise TypeError(f"first_step must be a non-negative Python int, got {type(first_step).__name__}")
    try:
        value = operator.index(first_step)
    except TypeError:
        raise TypeError(f"first_step must be a non-negative Python int, got {first_step!r}") from None
    if value < 0:
        raise ValueError(f"first_step must be a non-negative int, got {value}")
    if value and bidirectional:
        raise ValueError(f"first_step={value}: a bidirectional layer takes only first_step=0 (its reverse "
                         "direction reads each sequence from its end, so a piece of a sequence has no place in it)")
    return value


def check_lengths(lengths: Union[Tensor, Sequence[int], None], batch: int, steps: int) -> Optional[Tensor]:
    """Returns ``lengths`` as a CPU int64 tensor, after checking it is (B,) with values in [1, T]."""
    if lengths is None:
        return None
    if isinstance(lengths, Tensor):
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must hold integers, got dtype {lengths.dtype}")
        lengths = lengths.detach().to("cpu", torch.int64)
    else:
        try:
            lengths = torch.as_tensor(list(lengths), dtype=torch.int64)
        except (TypeError, ValueError) as error:
            raise TypeError(f"lengths must be a 1-D tensor or a sequence of ints, got {lengths!r}") from error
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"lengths must have shape ({batch},), one length per sequence, got {tuple(lengths.shape)}")
    if torch.compiler.is_compiling():
        # a traced graph does not know the values: it checks them when it runs. Its message is a
        # constant of the graph, so it does not name T's value: that would specialize a graph
        # traced for any length (dynamic shapes) to this one
        torch._assert_async(((lengths >= 1) & (lengths <= steps)).all(),
                            "lengths must lie in [1, T], T the input's number of timesteps")
        return lengths
    if bool((lengths < 1).any()) or bool((lengths > steps).any()):
        raise ValueError(f"lengths must lie in [1, {steps}] (the number of timesteps), got "
                         f"min {int(lengths.min())} and max {int(lengths.max())}")
    return lengths


def check_state(name: str, state: Tensor, shape, dtype: torch.dtype, device: torch.device,
                width_name: str = "hidden_size") -> None:
    """Raises, naming the state (``hx``, ``h_0``, ``c_0``), unless it has ``shape``, ``dtype``,
    ``device``; ``width_name`` names its last dimension (``proj_size`` for a projecting LSTM's h)."""
    if not isinstance(state, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(state).__name__}")
    if tuple(state.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} (num_layers * num_directions, batch, "
                         f"{width_name}), got {tuple(state.shape)}")
    if state.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {state.dtype}")
    if state.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {state.device}")
