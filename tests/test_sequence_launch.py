"""How a launcher's sequence is launched (``kernels/sequence_launch.py``): the per-step launches in
order (the backward's from the last step down, each step's phases in order, ``steps`` after ``t``)
and the one persistent launch with its barrier and the constants only it takes."""
import pytest
import torch

import fused_helpers  # noqa: F401 - before Triton: on a CPU the kernels it imports are interpreted
from normrnn.kernels import buffers, sequence_launch, step_launch
from normrnn.kernels.layout import NORM_NONE, step_layout


class _RecordedKernel:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
        return launch


def _never_asked():
    raise AssertionError("the persistent kernel's constants were asked for per-step launches")


@pytest.fixture
def per_step(monkeypatch):
    monkeypatch.setattr(step_launch, "bind_requested", lambda: False)  # every launch through the kernel
    monkeypatch.setattr(sequence_launch, "launch_mode", lambda programs, device: buffers.STEP_LAUNCHES)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_per_step_launches_run_every_step_and_phase_in_order(per_step, backward):
    layout = step_layout(20, 35, NORM_NONE, training=True)
    step_kernel, persistent_kernel = _RecordedKernel(), _RecordedKernel()
    arguments, constants = ("wx", "w_hh"), {"BLOCK_K": 32, "H": 35}
    sequence_launch.launch_sequence(step_kernel, persistent_kernel, layout, 3, arguments, constants,
                                    torch.device("cpu"), backward=backward, phases=2,
                                    persistent_constants=_never_asked)
    order = [2, 1, 0] if backward else [0, 1, 2]
    leading = (3,) if backward else ()  # the backward's step kernel also takes the number of steps
    expected = [(layout.grid, (t, *leading, *arguments), dict(constants, PHASE=phase))
                for t in order for phase in (0, 1)]
    assert step_kernel.launches == expected
    assert persistent_kernel.launches == []


def test_a_persistent_launch_takes_the_barrier_and_its_own_constants(monkeypatch):
    monkeypatch.setattr(sequence_launch, "launch_mode", lambda programs, device: buffers.PERSISTENT)
    layout = step_layout(64, 512, NORM_NONE, training=True)
    step_kernel, persistent_kernel = _RecordedKernel(), _RecordedKernel()
    constants = {"BLOCK_K": 64, "H": 512}
    sequence_launch.launch_sequence(step_kernel, persistent_kernel, layout, 7, ("wx",), constants,
                                    torch.device("cpu"), backward=True, phases=3,
                                    persistent_constants=lambda: {"RESIDENT": True, "BLOCK_K": 512})
    assert step_kernel.launches == []
    ((grid, args, kwargs),) = persistent_kernel.launches
    steps, barrier, *rest = args
    assert grid == layout.grid and steps == 7 and rest == ["wx"]
    assert barrier.dtype == torch.int32 and barrier.tolist() == [0]  # the step counter starts at zero
    assert kwargs == {"BLOCK_K": 512, "H": 512, "RESIDENT": True}  # its BLOCK_K replaces the streamed one
    assert constants == {"BLOCK_K": 64, "H": 512}  # the caller's constants are left as they were
