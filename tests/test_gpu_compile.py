"""The fused kernels compile for an H100 (sm_90) with the Triton installed here, without a GPU.

The interpreter tests check the kernels' arithmetic; this checks that the same kernels lower to
machine code for the GPU they are written for, at the shapes the issues name, and that every one
fits in an SM's shared memory (Triton would refuse the launch otherwise). It runs
``tests/gpu_compile.py`` in a fresh process, because Triton decides at import time whether kernels
are interpreted, and the other kernel tests turn the interpreter on."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# triton itself is imported only in the child process: imported here, before the interpreter tests
# set TRITON_INTERPRET=1, its own library functions would be compiled-mode and break them
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

HERE = Path(__file__).resolve().parent

# the largest tiles (batch norm over a whole batch of 512 at H=2048), the persistent kernels with
# the layer norm's phases, float32 recurrent products, lengths at H=2048
CASES = {
    "lstm norm=batch bfloat16 B=512 H=2048": {"lstm_forward_step_kernel", "lstm_backward_step_kernel"},
    "lstm norm=layer bfloat16 B=64 H=512 persistent": {"layer_norm_lstm_forward_persistent_kernel",
                                                       "layer_norm_lstm_backward_persistent_kernel"},
    "gru norm=batch float32 B=64 H=512": {"gru_forward_step_kernel", "gru_backward_step_kernel"},
    "rnn norm=layer bfloat16 B=256 H=2048 lengths": {"rnn_forward_step_kernel", "rnn_backward_step_kernel"},
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    output = tmp_path_factory.mktemp("gpu_compile") / "report.json"
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), environment.get("PYTHONPATH", "")])
    command = [sys.executable, str(HERE / "gpu_compile.py"), "--capability", "90", "--json", str(output)]
    for case in CASES:
        command += ["--only", case]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=1800)
    assert output.exists(), f"gpu_compile.py wrote no report:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    data = json.loads(output.read_text())
    if "unavailable" in data:
        pytest.skip(data["unavailable"])
    return data, result


def test_every_kernel_compiles_for_sm90(report):
    data, result = report
    assert not data["failures"], f"kernels that did not compile: {data['failures']}"
    assert result.returncode == 0, result.stdout[-3000:]
    for case, expected in CASES.items():
        compiled = {row["kernel"] for row in data["kernels"] if row["case"] == case}
        assert expected <= compiled, f"{case}: compiled {sorted(compiled)}, expected at least {sorted(expected)}"


def test_every_kernel_fits_in_shared_memory(report):
    data, _ = report
    limit = data["shared_memory_limit"]
    for row in data["kernels"]:
        assert 0 <= row["shared_bytes"] <= limit, f"{row['case']} {row['kernel']}: {row['shared_bytes']} > {limit}"


def test_persistent_kernels_ask_for_a_cooperative_launch(report):
    """Where this Triton has cooperative launches, the persistent kernels use them: the driver then
    refuses a grid that cannot be resident at once instead of letting the barrier spin forever."""
    data, _ = report
    expected = data["cooperative_launch_available"]
    persistent = [row for row in data["kernels"] if row["kernel"].endswith("persistent_kernel")]
    assert persistent
    for row in persistent:
        assert bool(row["cooperative_launch"]) == expected, row


def test_the_grid_barrier_lowers_to_gpu_scope_release_and_acquire(report):
    """The persistent kernels' barrier is a release add and acquire reads at GPU scope (what makes
    one program's h_t visible to the others); the per-step kernels synchronize by launching and
    have no such atomics."""
    data, _ = report
    for row in data["kernels"]:
        persistent = row["kernel"].endswith("persistent_kernel")
        assert row["release_add"] == persistent and row["acquire_read"] == persistent, row
