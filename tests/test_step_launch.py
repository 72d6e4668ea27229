"""The per-step launches bound once (``kernels/step_launch.py``) hand Triton's launcher what
Triton's own launch path hands it, launch for launch, with Triton 3.x's real binding and compiled
kernels (``tests/launch_record.py``, in a fresh process: it compiles, the other kernel tests
interpret); a kernel that cannot be bound launches through Triton, with a warning; the GPU
session's bit-for-bit check of the two (``bench/launch_check.py``) reports what it must."""
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

# before anything here imports triton: on a CPU the interpreter (the launch record strips it from
# its own process, which compiles)
from fused_helpers import DEVICE, INTERPRETER_OFF  # noqa: E402

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    output = tmp_path_factory.mktemp("launch_record") / "record.json"
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("TRITON_INTERPRET", "NORMRNN_STEP_LAUNCH", "NORMRNN_PERSISTENT")}
    environment["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), environment.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, str(HERE / "launch_record.py"), "--json", str(output)],
                            capture_output=True, text=True, env=environment, timeout=900)
    assert output.exists(), f"launch_record.py wrote no record:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return json.loads(output.read_text()), result


def test_bound_launches_equal_tritons_own(record):
    data, result = record
    for case in data["cases"]:
        assert not case["differences"], f"{case['case']}: {case['differences'][:5]}"
    assert result.returncode == 0, result.stdout[-3000:]


def test_every_step_after_the_first_is_bound(record):
    data, _ = record
    assert any("launch hook" in case["case"] for case in data["cases"])
    for case in data["cases"]:
        # forward, backward and evaluation of T steps: T - 1 bound launches of each kernel variant
        assert 0 < case["bound_launches"] < case["launches"], case
        assert case["bound_launches_with_triton_mode"] == 0, f"NORMRNN_STEP_LAUNCH=triton bound {case}"


class _UnbindableKernel:
    """Launches as a kernel does, but what it returns is not a compiled kernel."""

    params = ()
    pre_run_hooks = ()

    def __init__(self):
        self.launched = []

    def __getitem__(self, grid):
        def launch(t, *arguments, **constants):
            self.launched.append((grid, t, arguments, constants))
            return object()
        return launch


def test_a_kernel_that_cannot_be_bound_launches_through_triton_with_a_warning(monkeypatch):
    from normrnn import dispatch
    from normrnn.kernels import step_launch
    monkeypatch.setattr(step_launch, "interpreted", lambda: False)
    monkeypatch.delenv("NORMRNN_STEP_LAUNCH", raising=False)
    monkeypatch.setattr(dispatch, "_warned", set())
    kernel = _UnbindableKernel()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step_launch.launch_steps(kernel, (3, 2), ("x",), {"H": 8}, steps=3, reverse=True, phases=2)
    assert [(t, constants["PHASE"]) for _, t, _, constants in kernel.launched] == [
        (2, 0), (2, 1), (1, 0), (1, 1), (0, 0), (0, 1)]
    assert all(grid == (3, 2) and arguments == ("x",) for grid, _, arguments, _ in kernel.launched)
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 1 and "cannot be bound" in messages[0], messages


def test_an_unknown_step_launch_mode_is_refused(monkeypatch):
    from normrnn.kernels import step_launch
    monkeypatch.setenv("NORMRNN_STEP_LAUNCH", "fast")
    with pytest.raises(ValueError, match="NORMRNN_STEP_LAUNCH='fast': expected one of bound, triton"):
        step_launch.StepLaunch(_UnbindableKernel(), (1,), (), {})


def test_the_gpu_launch_check_finds_unbound_launches_and_any_difference(monkeypatch):
    """``bench/launch_check.py`` (run by the GPU session) compares bound launches with Triton's bit
    for bit; here, under the interpreter, nothing is bound, which it must say, and a tensor changed
    in the bound run must be named."""
    if INTERPRETER_OFF:
        pytest.skip("no CUDA device and the Triton interpreter is off")
    from normrnn.bench import launch_check
    shape = dict(device=DEVICE, batch=3, hidden_size=8, steps=3)
    found = launch_check.differences("batch", **shape)
    assert found == ([] if DEVICE == "cuda" else ["norm=batch: no launch was bound"])
    real = launch_check.results

    def changed_when_bound(norm, mode, *args):
        tensors = real(norm, mode, *args)
        if mode == "bound":
            tensors["c_n"] = tensors["c_n"] + 2.0 ** -7
        return tensors

    monkeypatch.setattr(launch_check, "results", changed_when_bound)
    found = launch_check.differences(None, **shape)
    assert [line for line in found if "no launch" not in line] == ["norm=None c_n: differs by up to 0.00781"]


def test_a_kernel_with_a_pre_run_hook_launches_every_step_through_triton_and_says_so(monkeypatch):
    from normrnn import dispatch
    from normrnn.kernels import step_launch
    monkeypatch.setattr(step_launch, "interpreted", lambda: False)
    monkeypatch.delenv("NORMRNN_STEP_LAUNCH", raising=False)
    monkeypatch.setattr(dispatch, "_warned", set())
    kernel = _UnbindableKernel()
    kernel.pre_run_hooks = [print]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step_launch.launch_steps(kernel, (1,), (), {}, steps=4)
    assert [t for _, t, _, _ in kernel.launched] == [0, 1, 2, 3]
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 1 and "pre-run hook" in messages[0], messages
