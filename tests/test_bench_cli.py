"""The bench suite's command on a CPU: the no-CUDA path exits 0 and writes the CPU section."""
import json

import pytest
import torch

from normrnn.bench import cases, cli, report


def test_cpu_section_writes_json_and_markdown_with_times_and_ratios(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this checks the no-CUDA path")
    assert cli.main(["--tiny", "--quiet", "--repetitions", "3", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "no CUDA device" in printed and "ratio to torch-cpu" in printed
    (json_path,) = tmp_path.glob("*.json")
    results = json.loads(json_path.read_text())
    assert results["section"] == "cpu" and results["environment"]["torch"] == torch.__version__
    timed = [row for row in results["timings"] if "median_ms" in row]
    assert {row["implementation"] for row in timed} >= {"normrnn-reference", "torch-cpu"}
    assert all(row["median_ms"] > 0 for row in timed)
    assert any("ratio_to_torch-cpu" in row for row in timed if row["implementation"] == "normrnn-reference")
    skipped = [row for row in results["timings"] if "skipped" in row]
    assert all(row["skipped"] for row in skipped)  # every skip says why
    assert "| case | mode | implementation |" in next(tmp_path.glob("*.md")).read_text()


def test_quick_grid_is_the_documented_subset():
    quick = cases.quick_grid()
    assert all(case.batch == 64 and case.hidden_size == 512 for case in quick)
    assert {case.norm for case in quick if case.cell == "lstm"} == {None, "layer", "batch"}
    assert len(cases.full_grid()) == 3 * 3 * 2 * 4 * 4 * 2


def test_ratios_compare_with_the_unnormalized_module_of_the_same_shape():
    case = cases.Case("lstm", "layer", "float32", 2, 8, 5).as_dict()
    rows = [{"case": case, "implementation": "normrnn-reference", "mode": "train", "median_ms": 6.0},
            {"case": case, "implementation": "torch-cpu", "mode": "train", "median_ms": 2.0},
            {"case": dict(case, batch=4), "implementation": "torch-cpu", "mode": "train", "median_ms": 1.0}]
    report.add_ratios(rows)
    assert rows[0]["ratio_to_torch-cpu"] == 3.0


def test_gpu_section_logic_runs_every_implementation_on_a_tiny_case(tmp_path):
    """The CUDA section's code path (builders, interleaved timing, skips with reasons, correctness
    checks, report) on a CPU: the fused kernels under the Triton interpreter, a toy size."""
    import os
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or the Triton interpreter")
    from normrnn.bench import correctness
    from normrnn.bench.implementations import IMPLEMENTATIONS
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = cases.Case("lstm", "batch", "float32", 3, 16, 2)
    builders = {name: (lambda c, build=build: build(c, device)) for name, build in IMPLEMENTATIONS.items()
                if name != "reference-compiled"}  # compiling takes most of a minute on a CPU
    rows = cli.time_case(case, builders, device, repetitions=3, max_seconds=0.5)
    assert {(row["implementation"], row["mode"]) for row in rows} == {(name, mode) for name in builders
                                                                      for mode in ("forward", "train")}
    timed = {row["implementation"] for row in rows if "median_ms" in row}
    assert {"normrnn-triton", "normrnn-reference", "cudnn"} <= timed
    assert all(row["skipped"] for row in rows if "median_ms" not in row)
    checks = [correctness.against_reference("lstm", "layer", torch.float32, 4, 16, 3, device),
              correctness.against_cudnn("rnn", torch.float32, 4, 16, 3, device)]
    assert all(check["relative_error"] < 1e-4 for check in checks), checks
    report.add_ratios(rows)
    results = {"section": "cuda", "environment": report.environment(device), "timings": rows, "correctness": checks}
    paths = report.write(results, str(tmp_path))
    assert "Correctness at scale" in open(paths[1]).read()



def test_streamed_weights_variant_times_the_persistent_lstm_and_says_where_it_does_not_apply(monkeypatch):
    """normrnn-persistent-streamed runs the persistent layer-norm LSTM with W_hh streamed where
    normrnn-persistent holds it on chip, and is skipped, with the reason, where nothing differs."""
    import os
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or the Triton interpreter")
    from normrnn.bench.implementations import IMPLEMENTATIONS, Skip
    from normrnn.kernels import lstm_forward, lstm_layer_norm_forward
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = []
    decide = lstm_forward.resident_weights

    def recorded(*args):
        chosen.append(decide(*args))
        return chosen[-1]

    monkeypatch.setattr(lstm_layer_norm_forward, "resident_weights", recorded)
    case = cases.Case("lstm", "layer", "float32", 3, 16, 2)  # one program: persistent under the interpreter
    for name, resident in (("normrnn-persistent", True), ("normrnn-persistent-streamed", False)):
        chosen.clear()
        IMPLEMENTATIONS[name](case, device).forward_eval()
        assert chosen == [resident], name
    assert lstm_forward.RESIDENT_OPERAND_BYTES > 0  # restored after the call
    build = IMPLEMENTATIONS["normrnn-persistent-streamed"]
    with pytest.raises(Skip, match="only the persistent LSTM"):
        build(cases.Case("lstm", "batch", "float32", 3, 16, 2), device)
    with pytest.raises(Skip, match="only the persistent LSTM"):
        build(cases.Case("gru", None, "float32", 3, 16, 2), device)
