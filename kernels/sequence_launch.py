"""A layer's kernels run over its whole sequence in one of two ways, chosen by ``launch_mode``:

- persistent: one launch for all T steps, ``persistent_kernel[grid](steps, barrier, ...)``, whose
  programs meet at a grid barrier (a step counter in ``barrier``) between steps and phases; only
  where every program of the grid is resident at once, or the barrier's spin never ends;
- per step: ``step_kernel[grid](t, ...)`` once per step (and per phase of a step), each bound once
  (``step_launch.py``): what the Triton interpreter runs, and the fallback on a GPU.

Every cell's forward and backward launcher ends in ``launch_sequence``, so that the choice, the
barrier and the persistent launch options are made in one place.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .buffers import PERSISTENT, launch_mode, persistent_launch_options
from .layout import StepLayout
from .step_launch import launch_steps


def launch_sequence(step_kernel, persistent_kernel, layout: StepLayout, steps: int, arguments: Sequence,
                    constants: dict, device: torch.device, *, backward: bool = False, phases: Optional[int] = None,
                    persistent_constants: Optional[Callable[[], dict]] = None) -> None:
    """Runs ``steps`` steps of a layer on ``layout.grid``:
    ``persistent_kernel(steps, barrier, *arguments, **constants, **persistent_constants())`` where
    ``launch_mode`` says the grid can be resident, otherwise
    ``step_kernel(t, *arguments, **constants)`` for t = 0 .. steps-1, each of ``phases`` phases
    in order (``PHASE``). ``backward``: steps from the last down to 0, and the step kernel takes
    ``steps`` after ``t``. ``persistent_constants``: what only the persistent kernel takes
    (``layout.resident_tiles``: whether W_hh stays on chip), asked only where it runs."""
    if launch_mode(layout.programs, device) == PERSISTENT:
        barrier = torch.zeros(1, dtype=torch.int32, device=device)
        # persistent_constants may replace some of constants (the BLOCK_K of resident weights)
        persistent = {**constants, **(persistent_constants() if persistent_constants else {}),
                      **persistent_launch_options(device.type)}
        persistent_kernel[layout.grid](steps, barrier, *arguments, **persistent)
        return
    step_arguments = (steps, *arguments) if backward else tuple(arguments)
    launch_steps(step_kernel, layout.grid, step_arguments, constants, steps, reverse=backward, phases=phases)
