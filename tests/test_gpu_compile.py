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

# batch norm over a batch of 512 at H=2048 (walked in chunks); the persistent kernels at the shape of
# the speed targets (the layer norm's phases and no norm with W_hh on chip, batch norm with it
# streamed; the GRU's and RNN's with W_hh on chip) and the LSTM's under batch norm walking a batch
# of 256 in chunks; float16 operands (CUDA autocast's default) with W_hh on chip; float32 recurrent
# products; lengths at H=2048; the LSTM projecting to P=128 (step 0's given product beside W_hh on
# chip, and under batch norm the float32 product W_hh W_hr)
CASES = {
    "lstm norm=layer bfloat16 B=64 H=512 P=128 persistent": {"layer_norm_lstm_forward_persistent_kernel",
                                                             "layer_norm_lstm_backward_persistent_kernel"},
    "lstm norm=batch bfloat16 B=64 H=512 P=128 persistent": {"lstm_forward_persistent_kernel",
                                                             "lstm_backward_persistent_kernel"},
    "gru norm=layer bfloat16 B=64 H=512 persistent": {"gru_forward_persistent_kernel",
                                                      "gru_backward_persistent_kernel"},
    "rnn norm=None bfloat16 B=64 H=512 persistent": {"rnn_forward_persistent_kernel",
                                                     "rnn_backward_persistent_kernel"},
    "lstm norm=batch bfloat16 B=512 H=2048": {"lstm_forward_step_kernel", "lstm_backward_step_kernel"},
    "lstm norm=batch bfloat16 B=64 H=512 persistent": {"lstm_forward_persistent_kernel",
                                                       "lstm_backward_persistent_kernel"},
    "lstm norm=batch bfloat16 B=256 H=512 persistent": {"lstm_forward_persistent_kernel",
                                                        "lstm_backward_persistent_kernel"},
    "lstm norm=layer bfloat16 B=64 H=512 persistent": {"layer_norm_lstm_forward_persistent_kernel",
                                                       "layer_norm_lstm_backward_persistent_kernel"},
    "lstm norm=None bfloat16 B=64 H=512 persistent": {"lstm_forward_persistent_kernel",
                                                      "lstm_backward_persistent_kernel"},
    "lstm norm=None float16 B=64 H=512 persistent": {"lstm_forward_persistent_kernel",
                                                     "lstm_backward_persistent_kernel"},
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


def test_loads_of_other_programs_data_bypass_l1(report):
    """Every load the kernels mark ``cache_modifier=".cg"`` (h_{t-1}, dwh_{t+1}, the layer norm's
    per-program partial statistics: what other programs wrote) compiles to an instruction that
    bypasses L1, which is not coherent across SMs; one served from L1 could read another program's
    data as it was before the grid barrier."""
    data, _ = report
    offenders = {(row["case"], row["kernel"]): row["cached_despite_cg"] for row in data["kernels"]
                 if row["cached_despite_cg"]}
    assert not offenders, offenders
    # the check found the loads it is about (h_{t-1} and dwh_{t+1} at least) in every persistent kernel
    assert all(row["cg_loads_checked"] > 0 for row in data["kernels"] if row["kernel"].endswith("persistent_kernel"))


def test_the_l1_check_flags_a_cached_load_of_a_cg_line(tmp_path):
    """The check above on a hand-written PTX: a ".cg" load compiled to a plain ld.global or to
    cp.async.ca is flagged, one compiled to ld.global.cg or cp.async.cg is not."""
    sys.path.insert(0, str(HERE))
    from gpu_compile import cached_despite_cg
    source = tmp_path / "kernel.py"
    source.write_text("x = tl.load(p)\ny = tl.load(q,\n    cache_modifier='.cg')\n")
    header = f'\t.file\t1 "{source}"\n\t.loc\t1 2 5\n'
    assert cached_despite_cg(header + "\tld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\n") == (["kernel.py:2"], 1)
    assert cached_despite_cg(header + "\tcp.async.ca.shared.global [%r1], [%rd1], 0x8;\n") == (["kernel.py:2"], 1)
    assert cached_despite_cg(header + "\tld.global.cg.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\n") == ([], 1)
    assert cached_despite_cg(header + "\tcp.async.cg.shared.global [%r1], [%rd1], 0x10;\n") == ([], 1)
    unmarked = f'\t.file\t1 "{source}"\n\t.loc\t1 1 5\n\tld.global.v4.b32 {{%r1}}, [%rd1];\n'
    assert cached_despite_cg(unmarked) == ([], 0)
    # line 1's load as Triton 3.9 emits it when merged with line 2's: an inline-asm block whose movs
    # carry line 2's marker; the load is line 1's, where the block begins
    merged = (f'\t.file\t1 "{source}"\n\t.loc\t1 1 5\n\t// begin inline asm\n\t.loc\t1 1 5\n\tmov.u32 %r1, %r9;\n'
              '\t.loc\t1 2 5\n\tmov.u32 %r2, %r9;\n\tld.global.v2.b32 { %r1, %r2 }, [ %rd1 + 0 ];\n'
              '\t// end inline asm\n')
    assert cached_despite_cg(merged) == ([], 0)
    assert cached_despite_cg(merged.replace("\t.loc\t1 1 5\n\t// begin", "\t.loc\t1 2 5\n\t// begin")) == (
        ["kernel.py:2"], 1)


def test_batch_norm_over_a_batch_of_512_stays_in_registers(report):
    """Walked in 64-row chunks, batch norm's training kernels at B=512, H=2048 hold their tiles in
    registers: when one program held the whole batch they spilled 1 to 9 KB a thread (sm_90,
    Triton 3.6 and 3.9); now none (at most a few bytes allowed: ptxas varies)."""
    data, _ = report
    rows = [row for row in data["kernels"] if row["case"] == "lstm norm=batch bfloat16 B=512 H=2048"]
    assert {row["kernel"] for row in rows} == {"lstm_forward_step_kernel", "lstm_backward_step_kernel"}
    for row in rows:
        assert row["spill_bytes"] is not None and row["spill_bytes"] <= 16, row


def test_persistent_forward_keeps_its_weights_on_chip(report):
    """At the speed targets' shape (B=64, H=512, bf16) the persistent forward kernels of every cell
    load their W_hh rows once (``RESIDENT``) and Triton keeps them in shared memory for the whole launch:
    no copy of a weight tile is redone inside the step loop. Any kernel compiled with RESIDENT
    must show the same."""
    data, _ = report
    resident = [row for row in data["kernels"] if row["constants"].get("RESIDENT")]
    expected = {"layer_norm_lstm_forward_persistent_kernel", "lstm_forward_persistent_kernel",
                "gru_forward_persistent_kernel", "rnn_forward_persistent_kernel"}
    assert expected <= {row["kernel"] for row in resident}
    for row in resident:
        assert row["weights_on_chip"] is True, row


def test_the_on_chip_check_flags_a_weight_copy_inside_the_loop():
    """The check above on hand-written TTGIR: the four (16, 512) weight copies before the loop
    pass; one of them inside the loop, or fewer copies than gates, fails."""
    sys.path.insert(0, str(HERE))
    from gpu_compile import weights_on_chip
    copy = "    %w{0} = ttg.local_alloc %v{0} : (tensor<16x512xbf16, #blocked>) -> !ttg.memdesc<16x512xbf16>\n"
    head = "module attributes {ttg.target = 1} {\n  tt.func public @kernel() {\n"
    loop = "    scf.for %t = %c0 to %n step %c1 : i32 {\n"
    inside = "      %h = ttg.local_alloc %x : (tensor<64x512xbf16, #blocked>) -> !ttg.memdesc<64x512xbf16>\n"
    tail = "    } loc(#loc1)\n    tt.return\n  }\n}\n"
    before = "".join(copy.format(gate) for gate in range(4))
    assert weights_on_chip(head + before + loop + inside + tail, 16, 512, 4)
    assert not weights_on_chip(head + before + loop + "  " + copy.format(9) + tail, 16, 512, 4)
    assert not weights_on_chip(head + before + loop + tail, 16, 512, 5)
