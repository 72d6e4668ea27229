"""A kernel launched once per timestep, with only ``t`` changing: its arguments bound once.

``kernel[grid](t, *arguments, **constants)`` pays, at every call, for Triton's binding: each of
the 30-odd arguments is specialized (a tensor's dtype and 16-byte alignment, an integer's
divisibility), the result hashed to find the compiled kernel, launch metadata built. Across the T
launches of a layer's loop nothing of that changes: ``t`` is the only argument that does, and no
kernel specializes on it (``do_not_specialize``), so every step runs the same compiled kernel with
the same argument list but ``t``. ``StepLaunch`` makes the first launch through Triton, keeps the
compiled kernel Triton returns, and launches every later step through that kernel's launcher with
the argument list Triton binds, in the form Triton's own launch path hands it over
(``JITFunction.run`` in Triton 3.6 to 3.9; ``tests/launch_record.py`` records both paths' launches
under a driver that only compiles and asserts they are the same).

Measured with a launcher that does nothing (the LSTM's forward step kernel at B=64, H=512, bf16,
this project's 2-core CPU): 32 us a launch through Triton, 1.3 us bound; the CUDA launch itself
comes on top of either. ``NORMRNN_STEP_LAUNCH=triton`` launches every step through Triton (the
comparison the bench times); under the Triton interpreter every step goes through Triton anyway.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

from .buffers import interpreted

# how many launches went the bound way: what the launch record reads to know the bound path ran
BOUND_LAUNCHES = {"count": 0}
MODES = ("bound", "triton")


def bind_requested() -> bool:
    """Whether per-step launches are bound once: ``NORMRNN_STEP_LAUNCH`` bound (the default) or
    triton, and never under the interpreter, which runs every launch itself."""
    mode = os.environ.get("NORMRNN_STEP_LAUNCH", "bound")
    if mode not in MODES:
        raise ValueError(f"NORMRNN_STEP_LAUNCH={mode!r}: expected one of {', '.join(MODES)} (bound: the "
                         "arguments of a kernel's per-step launches bound once; triton: every launch through Triton)")
    return mode == "bound" and not interpreted()


class StepLaunch:
    """``launch(t)`` launches ``kernel[grid](t, *arguments, **constants)``: the first call through
    Triton, the others through the compiled kernel's launcher, bound once (see the module's doc).
    One per kernel and layer call: the stream and the hooks in force are read at the first call."""

    def __init__(self, kernel, grid: Sequence[int], arguments: Sequence, constants: dict):
        self._kernel = kernel
        self._grid = tuple(grid)
        self._arguments = tuple(arguments)
        self._constants = constants
        self._bound: Optional[Callable[[int], None]] = None
        self._bind = bind_requested()

    def __call__(self, t: int) -> None:
        if self._bound is not None:
            self._bound(t)
            BOUND_LAUNCHES["count"] += 1
            return
        compiled = self._kernel[self._grid](t, *self._arguments, **self._constants)
        if self._bind:
            self._bind = False  # one try: a kernel that cannot be bound launches through Triton
            self._bound = self._bound_launch(compiled)

    def _bound_launch(self, compiled) -> Optional[Callable[[int], None]]:
        from normrnn.dispatch import warn_once
        try:
            from triton import knobs
            from triton.runtime import driver
            kernel = self._kernel
            if kernel.pre_run_hooks:
                warn_once(f"a pre-run hook is registered on {getattr(kernel, '__name__', kernel)}: its per-step "
                          "launches go through Triton, so that the hook sees each of them")
                return None
            given = 1 + len(self._arguments)
            trailing = list(self._arguments)
            for param in kernel.params[given:]:
                trailing.append(self._constants[param.name] if param.name in self._constants else param.default)
            grid_x, grid_y, grid_z = (self._grid + (1, 1))[:3]
            device = driver.active.get_current_device()
            stream = driver.active.get_current_stream(device)
            launcher, function, packed_metadata = compiled.run, compiled.function, compiled.packed_metadata
            enter_hook, exit_hook = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        except (AttributeError, ImportError, RuntimeError, TypeError) as error:
            warn_once(f"the per-step launches cannot be bound with this Triton ({type(error).__name__}: {error}): "
                      "every step goes through Triton's launch, which costs more host time per step")
            return None
        grid = self._grid

        if _hooked(enter_hook) or _hooked(exit_hook):
            # a profiler's hooks read each launch's metadata: built as Triton builds it
            def launch(t: int) -> None:
                metadata = compiled.launch_metadata(grid, stream, t, *trailing)
                launcher(grid_x, grid_y, grid_z, stream, function, packed_metadata, metadata, enter_hook,
                         exit_hook, t, *trailing)
        else:
            # no hook to read the metadata: Triton would build it for nobody
            def launch(t: int) -> None:
                launcher(grid_x, grid_y, grid_z, stream, function, packed_metadata, None, enter_hook, exit_hook,
                         t, *trailing)
        return launch


def _hooked(hook) -> bool:
    """Whether a launch hook does anything: Triton 3.6 and later keep a chain of them, empty
    unless a profiler registered one; earlier a hook was a function or None."""
    if hook is None:
        return False
    return bool(getattr(hook, "calls", True))


def launch_steps(kernel, grid: Sequence[int], arguments: Sequence, constants: dict, steps: int,
                 reverse: bool = False, phases: Optional[int] = None) -> None:
    """``kernel[grid](t, *arguments, **constants)`` for t = 0 .. steps-1 (from steps-1 down with
    ``reverse``), each bound once; with ``phases``, the kernel's phases 0 .. phases-1 of each step
    in order (``PHASE``, a compile-time constant: a compiled kernel, and a binding, each)."""
    variants = [constants] if phases is None else [dict(constants, PHASE=phase) for phase in range(phases)]
    launches = [StepLaunch(kernel, grid, arguments, variant) for variant in variants]
    for t in (reversed(range(steps)) if reverse else range(steps)):
        for launch in launches:
            launch(t)
