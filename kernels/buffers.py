"""Allocation of kernel outputs and the launch modes shared by every kernel file.

``POISON`` (set by the tests) fills every new output with NaN, so that an element a kernel
forgets to write cannot pass a comparison by luck.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import os

import torch

POISON = os.environ.get("NORMRNN_POISON") == "1"

# One launch per timestep (what the Triton interpreter can run, and the fallback on a GPU), or
# one persistent launch per layer and direction with a grid barrier between timesteps.
STEP_LAUNCHES = "step"
PERSISTENT = "persistent"
# how many programs of one launch the Triton interpreter runs at once: one after another, unless
# tests/concurrent_interpreter.py runs them in threads, all at once, as a GPU runs a resident grid
INTERPRETER_RESIDENT_PROGRAMS = 1
# every launch_mode decision, counted: what a caller (the bench's correctness checks) reads to know
# which kernels a layer ran, since a persistent request runs per-step launches where it must
LAUNCH_MODES_CHOSEN: collections.Counter = collections.Counter()


def new_buffer(shape, dtype, device) -> torch.Tensor:
    """An uninitialized kernel output (NaN everywhere when ``POISON``)."""
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def stand_in(shape, device) -> torch.Tensor:
    """A float32 buffer of statistics that the norm does not have, passed where a kernel takes
    one and returned where an op returns it: zeros, never indexed by the kernels. Not left
    uninitialized, so that an op returns the same values from the same inputs
    (``torch.library.opcheck`` compares them)."""
    return torch.zeros(shape, dtype=torch.float32, device=device)


def launch_options(block_b: int, block_h: int) -> dict:
    """Triton launch options of every kernel whose programs own ``block_b`` rows x ``block_h`` units.

    ``num_warps``: 8 for tiles of at least 64 x 16, 4 below. Chosen from ptxas's reports for sm_90
    (``tests/gpu_compile.py``; no GPU timing yet): at B=64, H=512 with 4 warps the backward
    kernels, the persistent kernels and the batch-norm forward need more than the 255 registers a
    thread may have and spill up to 1.1 KB a thread (3.3 KB over the 105 kernels of that shape);
    with 8 warps 0.2 KB in all, most kernels none. Smaller tiles fit in 4 warps without spilling.

    ``enable_fp_fusion``: multiply-adds fused, as every Triton release so far has defaulted to;
    Triton 3.10 turns the default off, and the kernels should compute the same on every version."""
    return {"num_warps": 8 if block_b * block_h >= 1024 else 4, "enable_fp_fusion": True}


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def launch_mode(programs: int, device: torch.device) -> str:
    """The persistent kernel needs every program resident at once (the barrier spins); that
    holds when there are no more programs than streaming multiprocessors. It is opt-in with
    ``NORMRNN_PERSISTENT=1`` until its barrier has been validated on a GPU; under the interpreter
    programs run one after another, so only a single program can be persistent there
    (``INTERPRETER_RESIDENT_PROGRAMS``)."""
    mode = _launch_mode(programs, device)
    LAUNCH_MODES_CHOSEN[mode] += 1
    return mode


def _launch_mode(programs: int, device: torch.device) -> str:
    if os.environ.get("NORMRNN_PERSISTENT") != "1":
        return STEP_LAUNCHES
    if device.type == "cuda":
        resident = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        resident = INTERPRETER_RESIDENT_PROGRAMS
    if programs <= resident:
        return PERSISTENT
    from normrnn.dispatch import warn_once
    where = "on this GPU" if device.type == "cuda" else "under the Triton interpreter"
    warn_once(f"NORMRNN_PERSISTENT=1: a grid of {programs} programs cannot be resident at once {where} (at most "
              f"{resident}), so these kernels run one launch per step")
    return STEP_LAUNCHES


@functools.lru_cache(maxsize=None)
def persistent_launch_options(device_type: str) -> dict:
    """Launch options of the persistent kernels: a cooperative launch where this Triton has it
    (``launch_cooperative_grid``, in Triton's CUDA options since 3.3), so that the driver
    guarantees every program is resident at once or refuses the launch, instead of a spin that
    never ends. Without it the grid is kept to one program per streaming multiprocessor."""
    if device_type != "cuda":
        return {}
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return {}
    names = {field.name for field in dataclasses.fields(CUDAOptions)}
    return {"launch_cooperative_grid": True} if "launch_cooperative_grid" in names else {}
