"""The bench suite's command on a CPU: the no-CUDA path exits 0 and writes the CPU section."""
import json
import os

import pytest
import torch

import normrnn
from normrnn.bench import cases, cli, implementations, report


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
    projected = [row for row in timed if row["case"]["proj_size"]]  # the LSTM with proj_size
    assert {row["implementation"] for row in projected} >= {"normrnn-reference", "torch-cpu"}
    assert all("P=4" in row["label"] for row in projected)
    if normrnn.dispatch.unavailable_reason("cpp", "lstm", None, torch.zeros(1)) is None:
        assert {row["implementation"] for row in timed} >= {"normrnn-cpp", "normrnn-cpp-mm"}


def test_cpp_on_mm_sets_the_product_choice_only_while_it_runs(monkeypatch):
    seen = []
    runner = implementations.Runner(lambda: seen.append(os.environ.get("NORMRNN_CPU_MATMUL")), None, "no train")
    monkeypatch.setenv("NORMRNN_CPU_MATMUL", "onednn")
    on_mm = implementations._runner_within(implementations.cpp_products_on_mm, runner)
    on_mm.forward_eval()
    assert seen == ["aten"] and os.environ["NORMRNN_CPU_MATMUL"] == "onednn"
    assert on_mm.train_step is None and on_mm.train_skip_reason == "no train"
    monkeypatch.delenv("NORMRNN_CPU_MATMUL")
    on_mm.forward_eval()
    assert seen == ["aten", "aten"] and "NORMRNN_CPU_MATMUL" not in os.environ


def test_a_second_run_of_the_day_does_not_overwrite_the_first(tmp_path):
    def results(started):
        environment = report.environment(torch.device("cpu"))
        environment.update(device="Some CPU x2", date="2026-12-03", started=started)
        return {"section": "cpu", "timings": [], "environment": environment}
    first = report.write(results("2026-12-03T10:00:00"), str(tmp_path), plots=False)
    assert [p.rsplit("/", 1)[1] for p in first] == ["some-cpu-x2-2026-12-03-cpu.json", "some-cpu-x2-2026-12-03-cpu.md"]
    assert report.write(results("2026-12-03T10:00:00"), str(tmp_path), plots=False) == first  # its own rewrite
    second = report.write(results("2026-12-03T18:19:07"), str(tmp_path), plots=False)
    assert second[0].endswith("some-cpu-x2-2026-12-03-181907-cpu.json")
    assert json.loads(open(first[0]).read())["environment"]["started"] == "2026-12-03T10:00:00"


def test_quick_grid_is_the_documented_subset():
    quick = cases.quick_grid()
    assert all(case.batch == 64 for case in quick)
    # H=512, and the bf16 BN-LSTM and LN-LSTM at T=100 over the other hidden sizes for the plot against H
    swept = [case for case in quick if case.hidden_size != 512]
    assert sorted((case.norm, case.hidden_size) for case in swept) == [
        (norm, size) for norm in ("batch", "layer") for size in (128, 1024, 2048)]
    assert {(case.cell, case.dtype, case.steps, case.proj_size) for case in swept} == {("lstm", "bfloat16", 100, 0)}
    assert {case.norm for case in quick if case.cell == "lstm"} == {None, "layer", "batch"}
    assert len(cases.full_grid()) == 3 * 3 * 2 * 4 * 4 * 2 + 3 * 2 * 4  # and the LSTMP per norm, dtype, H
    assert [(case.norm, case.proj_size) for case in quick if case.proj_size] == [(None, 128), ("layer", 128),
                                                                                 ("batch", 128)]


def test_quick_times_the_slow_implementations_where_the_docstring_says():
    """--quick keeps the compiled reference to the headline case, the eager reference to T=100,
    CUDA graphs and the rebound launches to the LSTM at T=100 and FlashRNN to the bf16 LSTM, each
    skip with its reason; the builder wrapper raises it."""
    from normrnn.bench.implementations import IMPLEMENTATIONS, Skip
    quick = cases.quick_grid()
    timed = {name: [case for case in quick if cases.quick_skip(name, case) is None] for name in IMPLEMENTATIONS}
    assert timed["reference-compiled"] == [] and cases.QUICK_COMPILED_REFERENCE in quick  # a pass of its own
    assert {case.steps for case in timed["normrnn-reference"]} == {100}
    for name in ("normrnn-graphs", "normrnn-triton-rebinding"):
        assert {(case.cell, case.dtype, case.steps, case.hidden_size) for case in timed[name]} == {
            ("lstm", "bfloat16", 100, 512)}, name
    assert {(case.cell, case.dtype, case.hidden_size) for case in timed["flashrnn"]} == {("lstm", "bfloat16", 512)}
    assert {case.steps for case in timed["flashrnn"]} == {100, 1000}
    for name in ("normrnn-triton", "normrnn-persistent", "cudnn", "haste"):
        assert timed[name] == quick, name
    def never(case):
        raise AssertionError("built although --quick skips it")
    built = cli._builder("reference-compiled", lambda case, device: never(case), torch.device("cpu"), quick=True)
    with pytest.raises(Skip, match="--quick compiles the reference for one case only"):
        built(cases.Case("gru", None, "bfloat16", 64, 512, 100))
    full = cli._builder("reference-compiled", lambda case, device: "runner", torch.device("cpu"), quick=False)
    assert full(cases.Case("gru", None, "bfloat16", 64, 512, 100)) == "runner"


def test_partial_results_say_they_are_incomplete(tmp_path):
    case = cases.Case("lstm", "layer", "float32", 2, 8, 5)
    results = {"section": "cuda", "environment": report.environment(torch.device("cpu")), "complete": False,
               "warmup": {"shapes": 3, "jobs": 2, "seconds": 4.5, "failures": []},
               "timings": [{"case": case.as_dict(), "label": case.label(), "implementation": "cudnn",
                            "mode": "train", "median_ms": 1.0}], "correctness": []}
    paths = report.write(results, str(tmp_path), plots=False)
    assert len(paths) == 2 and not list(tmp_path.glob("*.png"))
    text = open(paths[1]).read()
    assert "**Incomplete**: the run stopped (or is still running) after 1 cases" in text
    assert "3 layer shapes in 2 processes, 4.5 s" in text
    results["complete"] = True
    assert "Incomplete" not in report.markdown(results)


def test_the_results_name_the_launcher_settings_in_force(monkeypatch):
    """The GPU session runs the bench with NORMRNN_STEP_LAUNCH=triton where the bound launches fail
    their check: the fused rows then ran something else, and the results must say so; they name the
    peers' versions too."""
    monkeypatch.delenv("NORMRNN_PERSISTENT", raising=False)
    monkeypatch.setenv("NORMRNN_STEP_LAUNCH", "triton")
    env = report.environment(torch.device("cpu"))
    assert env["settings"].get("NORMRNN_STEP_LAUNCH") == "triton" and "NORMRNN_PERSISTENT" not in env["settings"]
    text = report.markdown({"section": "cuda", "environment": env, "timings": [], "correctness": []})
    header = text.splitlines()[2]
    assert header.startswith("torch ") and ", NORMRNN_STEP_LAUNCH=triton" in header, header
    # and which peers were there to time, with their versions
    assert set(env["peers"]) == {"flashrnn", "haste_pytorch"}
    for package, version in env["peers"].items():
        assert f", {package} {version or 'not installed'}" in header, header


def test_warmup_compiles_every_launch_mode_in_worker_processes_and_reports_failures():
    """The warm-up's workers (spawned) run each shape's layer in every launch mode; on a CPU under
    the interpreter, which the workers inherit. A shape that cannot run is reported, not raised."""
    import os
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or the Triton interpreter")
    from normrnn.bench import correctness, warmup
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = warmup.shapes_of([cases.Case("lstm", "layer", "float32", 3, 16, 2),
                               cases.Case("lstm", "layer", "float32", 3, 16, 7)],
                              [dict(cell="gru", norm="batch", dtype=torch.float32, batch=3, hidden=8),
                               dict(cell="rnn", norm="no such norm", dtype=torch.float32, batch=3, hidden=8)])
    assert shapes == [("lstm", "layer", "float32", 3, 16, 0), ("gru", "batch", "float32", 3, 8, 0),
                      ("rnn", "no such norm", "float32", 3, 8, 0)]  # the sequence length does not specialize
    assert warmup.shapes_of([cases.Case("lstm", "batch", "bfloat16", 3, 16, 2, proj_size=4)], []) == [
        ("lstm", "batch", "bfloat16", 3, 16, 4)]
    summary = warmup.warm_kernels(shapes, jobs=2, device=device)
    assert summary["shapes"] == 3 and summary["seconds"] > 0
    assert [failure["shape"] for failure in summary["failures"]] == [["rnn", "no such norm", "float32", 3, 8, 0]]
    assert "norm" in summary["failures"][0]["error"]
    # a worker that does not finish in time is a failure, not a hang (the interpreter at H=512 is slow)
    late = warmup.warm_kernels([("lstm", None, "float32", 64, 512, 0)], jobs=1, device=device, persistent=False,
                               timeout=1.0)
    assert late["failures"] == [{"shape": ["lstm", None, "float32", 64, 512, 0],
                                 "error": "not done within the warm-up's 1 s"}]
    # the check plans are what the warm-up reads shapes from
    assert all({"cell", "batch", "hidden"} <= set(arguments) for _, arguments in correctness.check_plans(True))


def test_gpu_run_compiles_first_writes_after_every_case_and_ends_complete(tmp_path, monkeypatch):
    """run_gpu end to end on a toy case (the kernels under the interpreter on a CPU): the warm-up
    is recorded, the results file is rewritten after each case, and the last write says complete."""
    import argparse
    import os
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or the Triton interpreter")
    from normrnn.bench import correctness
    from normrnn.bench.implementations import IMPLEMENTATIONS
    def toy_plans(quick):
        return [("reference", dict(cell="lstm", norm="layer", dtype=torch.float32, batch=3, hidden=8, steps=3))]
    monkeypatch.setattr(correctness, "check_plans", toy_plans)
    monkeypatch.setattr(cli, "check_plans", toy_plans)
    writes = []
    monkeypatch.setattr(cli, "write", lambda results, out, plots=True: writes.append(
        (results["complete"], len(results["timings"]), plots)) or [])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    toy = [cases.Case("lstm", "layer", "float32", 3, 16, 2), cases.Case("gru", None, "float32", 3, 8, 2)]
    args = argparse.Namespace(quick=True, jobs=2, no_checks=False, repetitions=2, max_seconds=0.05, quiet=True,
                              out=str(tmp_path), skip=["haste"])
    results = cli.run_gpu(args, device=device, cases=toy)
    assert results["complete"] and results["warmup"]["shapes"] == 3 and not results["warmup"]["failures"]
    per_case = 2 * len(IMPLEMENTATIONS)  # forward and train rows of every implementation
    assert writes == [(False, 0, False), (False, per_case, False), (False, 2 * per_case, False)]  # checks first
    # each check with per-step launches and with the persistent kernels (one program under the
    # interpreter: persistent there), and the record says which kernels ran
    assert [(check["launch"], check["kernels_ran"], check["relative_error"] < 1e-4, check["passed"])
            for check in results["correctness"]] == [("per-step", "step", True, True),
                                                     ("persistent", "persistent", True, True)]
    skipped = {row["implementation"]: row["skipped"] for row in results["timings"] if "skipped" in row}
    assert "--quick" in skipped["reference-compiled"]
    assert skipped["haste"] == "left out of this run (--skip)"


def test_a_warmup_that_hangs_leaves_the_persistent_kernels_out_of_the_timing(tmp_path, monkeypatch):
    import argparse
    monkeypatch.setattr(cli, "warm_kernels", lambda shapes, jobs, device, persistent, timeout: {
        "shapes": 1, "jobs": jobs, "seconds": timeout, "failures": [
            {"shape": ["lstm", "layer", "float32", 3, 16], "error": f"not done within the warm-up's {timeout:.0f} s"}]})
    monkeypatch.setattr(cli, "write", lambda results, out, plots=True: [])
    monkeypatch.setattr(cli, "time_case", lambda case, builders, device, repetitions, max_seconds: [
        {"implementation": name, "skipped": _skip_reason(build, case)} for name, build in builders.items()])
    args = argparse.Namespace(quick=True, jobs=2, no_checks=True, repetitions=2, max_seconds=0.05, quiet=True,
                              out=str(tmp_path), skip=[])
    results = cli.run_gpu(args, device=torch.device("cpu"), cases=[cases.Case("lstm", "layer", "float32", 3, 16, 2)])
    reasons = {row["implementation"]: row["skipped"] for row in results["timings"]}
    for name in cli.PERSISTENT_IMPLEMENTATIONS:
        assert "did not finish" in reasons[name], reasons
    assert reasons["cudnn"] is None  # the rest is timed


def _skip_reason(build, case):
    from normrnn.bench.implementations import Skip
    try:
        build(case)
    except Skip as skip:
        return str(skip)
    return None


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
    checks = (correctness.against_reference("lstm", "layer", torch.float32, 4, 16, 3, device)
              + correctness.against_cudnn("rnn", torch.float32, 4, 16, 3, device)
              + correctness.against_reference("lstm", "batch", torch.float32, 4, 16, 3, device, proj_size=5)
              + correctness.against_cudnn("lstm", torch.float32, 4, 16, 3, device, proj_size=5))
    assert [check["passed"] for check in checks] == [True] * 4, checks
    assert [check["proj_size"] for check in checks] == [0, 0, 5, 5]
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
    from normrnn.bench import implementations
    from normrnn.bench.implementations import IMPLEMENTATIONS, Skip
    from normrnn.kernels import layout
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = []
    rule = layout.resident_weights

    def decide(*args):  # as on a GPU at a shape that fits: on chip unless the budget is taken away
        chosen.append(layout.RESIDENT_OPERAND_BYTES > 0)
        return chosen[-1]

    monkeypatch.setattr(layout, "resident_weights", decide)  # what the bench's builder and the launcher ask
    case = cases.Case("lstm", "layer", "float32", 3, 16, 2)  # one program: persistent under the interpreter
    for name, resident in (("normrnn-persistent", True), ("normrnn-persistent-streamed", False)):
        runner = IMPLEMENTATIONS[name](case, device)
        chosen.clear()  # what the launcher is asked as the layer runs
        runner.forward_eval()
        assert chosen == [resident], name
    assert layout.RESIDENT_OPERAND_BYTES > 0  # restored after the call
    build = IMPLEMENTATIONS["normrnn-persistent-streamed"]
    with pytest.raises(Skip, match="only the persistent forward without norm or with layer norm"):
        build(cases.Case("lstm", "batch", "float32", 3, 16, 2), device)
    monkeypatch.setattr(layout, "resident_weights", rule)
    monkeypatch.setattr(layout, "interpreted", lambda: False)  # the products a GPU would run
    for cell in ("gru", "rnn"):  # their persistent forward holds W_hh on chip too, where it fits
        assert implementations.weights_streamed_anyway(cases.Case(cell, "layer", "bfloat16", 64, 512, 100)) is None
        assert "not held on chip" in implementations.weights_streamed_anyway(cases.Case(cell, None, "bfloat16", 64,
                                                                                        2048, 100))
    monkeypatch.setattr(layout, "resident_weights", rule)
    with pytest.raises(Skip, match="not held on chip at this shape"):  # float32: streamed anyway
        build(cases.Case("lstm", None, "float32", 64, 512, 100), device)


def test_haste_is_skipped_with_the_reason_where_it_has_no_kernels(monkeypatch):
    """Haste's layers dispatch on float32 (the GRU also float16), never bfloat16: the bench records
    why instead of failing in the peer's CUDA code; only a case it has reaches the device check."""
    import sys
    import types
    from normrnn.bench.implementations import IMPLEMENTATIONS, Skip
    fake = types.ModuleType("haste_pytorch")
    fake.LSTM = fake.LayerNormLSTM = fake.GRU = fake.LayerNormGRU = object
    monkeypatch.setitem(sys.modules, "haste_pytorch", fake)
    build, cpu = IMPLEMENTATIONS["haste"], torch.device("cpu")
    expected = [(("lstm", "layer", "bfloat16"), "Haste's LayerNormLSTM has no bfloat16 kernels"),
                (("lstm", None, "float16"), "Haste's LSTM has no float16 kernels"),
                (("lstm", "batch", "float32"), "Haste has no lstm with norm=batch"),
                (("rnn", None, "float32"), "Haste has no rnn with norm=None"),
                (("lstm", "layer", "float32"), "Haste runs on CUDA only"),
                (("gru", None, "float16"), "Haste runs on CUDA only")]
    for (cell, norm, dtype), reason in expected:
        with pytest.raises(Skip, match=reason):
            build(cases.Case(cell, norm, dtype, 64, 512, 100), cpu)


def test_a_deadline_lists_the_cases_not_begun_and_the_run_ends_as_usual(tmp_path, monkeypatch):
    """Past --deadline no case is begun: the rest are listed with the reason, the run completes
    (plots and summary follow), and the table says what was not timed."""
    import argparse
    import types
    now = [0.0]
    monkeypatch.setattr(cli, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def ten_seconds(case, builders, device, repetitions, max_seconds):
        now[0] += 10.0
        return [{"case": case.as_dict(), "label": case.label(), "implementation": "cudnn", "mode": "train",
                 "median_ms": 1.0}]
    monkeypatch.setattr(cli, "time_case", ten_seconds)
    monkeypatch.setattr(cli, "write", lambda results, out, plots=True: [])
    toy = [cases.Case("lstm", None, "float32", 3, 8, steps) for steps in (2, 3, 4, 5)]
    args = argparse.Namespace(quick=True, jobs=1, no_checks=True, repetitions=2, max_seconds=0.05, quiet=True,
                              out=str(tmp_path), skip=[], deadline=15.0)
    results = cli.run_gpu(args, device=torch.device("cpu"), cases=toy)
    assert [row["label"] for row in results["timings"]] == [case.label() for case in toy[:2]]
    assert results["complete"] and results["not_timed"] == {
        "reason": "the run's deadline of 15 s had passed", "cases": [case.label() for case in toy[2:]]}
    text = report.markdown(results)
    assert f"**Not timed** (the run's deadline of 15 s had passed): {toy[2].label()}; {toy[3].label()}." in text
    args.deadline = None
    now[0] = 0.0
    assert "not_timed" not in cli.run_gpu(args, device=torch.device("cpu"), cases=toy)


def test_check_plans_hold_what_the_fused_kernel_issue_asks_for_in_both_grids():
    from normrnn.bench import correctness
    for quick in (True, False):
        plans = [(kind, arguments["cell"], arguments.get("norm"), str(arguments["dtype"]), arguments["batch"],
                  arguments["hidden"], arguments["steps"]) for kind, arguments in correctness.check_plans(quick)]
        for norm in (None, "layer", "batch"):
            for dtype in ("torch.float32", "torch.bfloat16"):
                assert ("reference", "lstm", norm, dtype, 64, 512, 100) in plans
                assert ("reference", "lstm", norm, dtype, 256, 2048, 16) in plans
                assert ("reference", "lstm", norm, dtype, 256, 2048, 1000) in plans
            assert ("reference", "lstm", norm, "torch.float32", 16, 64, 10_000) in plans
        assert {plan[1] for plan in plans if plan[0] == "cudnn"} == {"lstm", "gru", "rnn"}
        for cell in ("gru", "rnn"):  # their bf16 paths (rounded h, W_hh on chip) at the headline shape
            for norm in (None, "layer", "batch"):
                assert ("reference", cell, norm, "torch.bfloat16", 64, 512, 100) in plans
        projecting = [(kind, arguments.get("norm"), arguments["dtype"]) for kind, arguments
                      in correctness.check_plans(quick) if arguments.get("proj_size")]
        assert len(projecting) == 7 and ("cudnn", None, torch.float32) in projecting
        for steps in (16, 1000):
            at_scale = {plan[1] for plan in plans if plan[5] == 2048 and plan[6] == steps}
            assert at_scale == ({"lstm"} if quick else {"lstm", "gru", "rnn"})
        # past 2^31 elements in the LSTM's (T, B, 4H) tensors, against cuDNN
        wide = ("cudnn", "lstm", None, "torch.float32", 256, 2048, correctness.WIDE_OFFSET_STEPS)
        assert wide in plans and correctness.WIDE_OFFSET_STEPS * 256 * 4 * 2048 > 2**31
        # the checks after the timings come last: the 10,000-step ones, the one past 2^31 elements,
        # then T=1000 at B=256, H=2048
        later = [plan[6] for plan, full in zip(plans, correctness.check_plans(quick))
                 if correctness.after_timings(full)]
        assert later == [10_000] * 3 + [correctness.WIDE_OFFSET_STEPS] + [1000] * len(later[4:])
        assert plans[-len(later):] == [plan for plan in plans if plan[6] >= 1000]
    # the headline layers first: a run's first minutes check what its timings rest on
    assert correctness.check_plans(True)[0] == ("reference", dict(cell="lstm", norm=None, dtype=torch.bfloat16,
                                                                  batch=64, hidden=512, steps=100))


def test_long_sequence_checks_run_after_the_timings_and_not_past_the_deadline(tmp_path, monkeypatch):
    """The 10,000-step checks (slow, and no timing rests on them) run after the cases; past the
    deadline they are listed as not run; the others run before the timings."""
    import argparse
    import types
    from normrnn.bench import correctness
    now = [0.0]
    monkeypatch.setattr(cli, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    events = []
    plans = [("reference", dict(cell="lstm", norm=None, dtype=torch.float32, batch=3, hidden=8, steps=5)),
             ("reference", dict(cell="lstm", norm="layer", dtype=torch.float32, batch=3, hidden=8,
                                steps=correctness.LONG_SEQUENCE_STEPS)),
             ("reference", dict(cell="lstm", norm="batch", dtype=torch.float32, batch=3, hidden=8,
                                steps=correctness.LONG_SEQUENCE_STEPS))]
    monkeypatch.setattr(cli, "check_plans", lambda quick: plans)

    def checks(device, chosen, persistent):
        events.append(("checks", [arguments["steps"] for _, arguments in chosen]))
        now[0] += 10.0
        return [{"check": "reference", "passed": True, "hidden_size": arguments["hidden"], **arguments}
                for _, arguments in chosen]

    def timing(case, builders, device, repetitions, max_seconds):
        events.append(("case", case.steps))
        return []
    monkeypatch.setattr(cli, "run_checks", checks)
    monkeypatch.setattr(cli, "time_case", timing)
    monkeypatch.setattr(cli, "write", lambda results, out, plots=True: [])
    args = argparse.Namespace(quick=True, jobs=1, no_checks=False, repetitions=2, max_seconds=0.05, quiet=True,
                              out=str(tmp_path), skip=[], deadline=10.0 + cli.LONG_CHECK_SECONDS + 5)
    results = cli.run_gpu(args, device=torch.device("cpu"), cases=[cases.Case("lstm", None, "float32", 3, 8, 2)])
    # the second long check would begin at 20 s, too near the deadline for its 30 s
    assert events == [("checks", [5]), ("case", 2), ("checks", [10_000])]
    assert results["checks_not_run"]["checks"] == [plans[2][1]]
    assert ("**Checks not run** (a check over 10000 steps takes about 30 s, and the run's deadline of 45 s was "
            "nearer): lstm norm=batch T=10000.") in report.markdown(results)
    # in --quick they come before the compiled reference's pass, which needs minutes of its own
    events.clear()
    now[0] = 0.0
    args.deadline = 1000.0
    results = cli.run_gpu(args, device=torch.device("cpu"), cases=[cases.QUICK_COMPILED_REFERENCE])
    assert events == [("checks", [5]), ("case", 100), ("checks", [10_000]), ("checks", [10_000]), ("case", 100)]
    assert "checks_not_run" not in results


def test_checks_record_which_kernels_ran_and_fail_loudly(monkeypatch):
    """A persistent request at a grid that cannot be resident runs per-step launches, and the record
    says so; a check that raises is recorded as failed; without persistent only per-step runs."""
    import os
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or the Triton interpreter")
    from normrnn.bench import correctness
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    launches = (correctness.PER_STEP, correctness.PERSISTENT)
    # two programs (H=32 in blocks of 16 units): more than the interpreter can run at once
    records = correctness.against_reference("rnn", "batch", torch.float32, 3, 32, 3, device, launches=launches)
    expected_ran = "persistent" if torch.cuda.is_available() else "step"
    assert [(record["launch"], record["kernels_ran"]) for record in records] == [
        ("per-step", "step"), ("persistent", expected_ran)]
    assert all(record["passed"] and record["tolerance"] == 1e-4 for record in records), records
    results = correctness.run_checks(device, [
        ("reference", dict(cell="lstm", norm="layer", dtype=torch.float32, batch=3, hidden=8, steps=2)),
        ("cudnn", dict(cell="lstm", dtype=torch.float32, batch=3, hidden=-8, steps=2))], persistent=False)
    assert [record.get("launch") for record in results] == ["per-step", None]
    assert results[1]["passed"] is False and results[1]["error"]
    text = cli.checks_summary(results)
    assert text.startswith("correctness checks: 1 of 2 passed")
    assert "  passed  fused vs float64 reference: lstm norm=layer float32 B=3 H=8 T=2: " in text
    assert "  FAILED  cudnn: lstm norm=None float32 B=3 H=-8 T=2: error: " in text


def test_quick_grid_times_the_speed_targets_first():
    """A run stopped by its deadline keeps what it timed first: the bf16 LSTM at T=100 with every
    norm, then at T=1000; fp32 after the GRU and RNN; the LSTMP; the sweep over H for its plot;
    the compiled reference last."""
    quick = cases.quick_grid()
    assert [(case.cell, case.norm, case.dtype, case.steps) for case in quick[:6]] == [
        ("lstm", norm, "bfloat16", steps) for steps in (100, 1000) for norm in (None, "layer", "batch")]
    assert [case.cell for case in quick[6:12]] == ["gru"] * 3 + ["rnn"] * 3
    assert {case.dtype for case in quick[12:18]} == {"float32"} and len(quick) == 27
    assert all(case.proj_size == 128 for case in quick[18:21])
    assert all(case.hidden_size != 512 for case in quick[21:])


def test_quick_compiles_the_reference_once_after_every_other_case(tmp_path, monkeypatch):
    """--quick's last pass times the compiled reference of the headline case alone, and its rows
    replace the first pass's, which said it comes later; the deadline can leave it out too."""
    import argparse
    from normrnn.bench.implementations import Skip
    monkeypatch.setattr(cli, "write", lambda results, out, plots=True: [])
    monkeypatch.setattr(cli, "IMPLEMENTATIONS", {"cudnn": lambda case, device: "cudnn runner",
                                                 cases.COMPILED_REFERENCE: lambda case, device: "compiled runner"})
    passes = []

    def record(case, builders, device, repetitions, max_seconds):
        passes.append((case, sorted(builders)))
        rows = []
        for name, build in builders.items():
            try:
                rows.append({"label": case.label(), "implementation": name, "mode": "train", "built": build(case)})
            except Skip as skip:
                rows.append({"label": case.label(), "implementation": name, "mode": "train", "skipped": str(skip)})
        return rows
    monkeypatch.setattr(cli, "time_case", record)
    headline = cases.QUICK_COMPILED_REFERENCE
    other = cases.Case("lstm", None, "bfloat16", 64, 512, 100)
    args = argparse.Namespace(quick=True, jobs=1, no_checks=True, repetitions=2, max_seconds=0.05, quiet=True,
                              out=str(tmp_path), skip=[], deadline=None)
    results = cli.run_gpu(args, device=torch.device("cpu"), cases=[headline, other])
    assert passes == [(headline, ["cudnn", "reference-compiled"]), (other, ["cudnn", "reference-compiled"]),
                      (headline, ["reference-compiled"])]
    compiled = [row for row in results["timings"] if row["implementation"] == "reference-compiled"]
    assert [(row["label"], row.get("built")) for row in compiled] == [
        (other.label(), None), (headline.label(), "compiled runner")]
    assert "after every other case" in compiled[0]["skipped"]
    # too near the deadline for the compile: not begun, and said so (the plots were written first)
    import types
    now = [0.0]
    monkeypatch.setattr(cli, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    writes = []
    monkeypatch.setattr(cli, "write", lambda results, out, plots=True: writes.append(plots) or [])
    args.deadline = cli.LATE_PASS_SECONDS - 1
    passes.clear()
    results = cli.run_gpu(args, device=torch.device("cpu"), cases=[headline, other])
    assert [case for case, _ in passes] == [headline, other]
    assert results["not_timed"]["cases"] == [f"{headline.label()} (reference-compiled)"]
    assert "compiled reference's pass takes about 120 s" in results["not_timed"]["reason"]
    assert writes == [False, False, True]


def test_fastest_summary_names_the_fastest_fused_layer_per_case_and_mode():
    case = cases.Case("lstm", "batch", "bfloat16", 64, 512, 100)
    rows = [{"case": case.as_dict(), "label": case.label(), "implementation": name, "mode": "train", "median_ms": ms}
            for name, ms in (("normrnn-triton", 8.0), ("normrnn-persistent", 3.0), ("normrnn-reference", 1.0),
                             ("cudnn", 6.0))]
    report.add_ratios(rows)
    text = cli.fastest_summary(rows, "cudnn")
    assert text.splitlines()[1].split() == case.label().split() + ["train", "0.50x", "3.000", "ms",
                                                                   "(normrnn-persistent)"]
    assert len(text.splitlines()) == 2


def test_speed_targets_take_the_fastest_fused_layer_and_the_barrier_floor():
    """The speed-target table: per LSTM case at B=64, H=512, bf16 and mode, the fastest fused layer
    against cuDNN, the target it meets or not, and per step its time beside its grid barriers'."""
    rows = []
    for norm, steps in ((None, 100), ("layer", 1000)):
        case = cases.Case("lstm", norm, "bfloat16", 64, 512, steps)
        for name, train, forward in (("cudnn", 5.0, 2.0), ("normrnn-triton", 6.0, 3.0),
                                     ("normrnn-persistent", 2.0 if norm else 6.0, 1.0), ("normrnn-reference", 0.1, 0.1)):
            for mode, ms in (("train", train), ("forward", forward)):
                rows.append({"case": case.as_dict(), "label": case.label(), "implementation": name, "mode": mode,
                             "median_ms": ms})
    other = cases.Case("gru", None, "bfloat16", 64, 512, 100)  # not a target case
    rows += [{"case": other.as_dict(), "label": other.label(), "implementation": name, "mode": "train",
              "median_ms": 1.0} for name in ("cudnn", "normrnn-triton")]
    report.add_ratios(rows)
    table = {(entry["label"].split()[1], entry["mode"]): entry for entry in report.speed_targets(rows)}
    assert set(table) == {("norm=none", "train"), ("norm=none", "forward"), ("norm=layer", "train"),
                          ("norm=layer", "forward")}
    slow = table["norm=none", "train"]  # the eager reference's 0.1 ms does not count: not fused
    assert (slow["implementation"], slow["ratio_to_cudnn"], slow["met"], slow["aim_met"]) == (
        "normrnn-triton", 1.2, False, False)
    fast = table["norm=layer", "train"]
    assert (fast["implementation"], fast["ratio_to_cudnn"], fast["met"], fast["aim_met"]) == (
        "normrnn-persistent", 0.4, True, True)
    assert fast["microseconds_per_step"] == 2.0 and fast["barrier_floor_microseconds_per_step"] == 6
    assert fast["cudnn_ms"] == 5.0 and fast["target"] == "<= 1.0x aim 0.5x"
    forward = table["norm=layer", "forward"]
    assert (forward["ratio_to_cudnn"], forward["met"], forward["aim_met"], forward["target"]) == (
        0.5, None, False, "aim 0.33x")
    assert forward["barrier_floor_microseconds_per_step"] == 3  # the forward's barriers alone
    results = {"section": "cuda", "environment": report.environment(torch.device("cpu")), "timings": rows}
    text = report.markdown(results)
    assert "## Speed targets: LSTM, B=64, I=H=512, bf16" in text and "## Every timing" in text
    assert f"| {cases.Case('lstm', 'layer', 'bfloat16', 64, 512, 1000).label()} | train | normrnn-persistent | " \
           "2.000 | 5.000 | 0.40x | <= 1.0x aim 0.5x | yes, aim met | 2.0 | 6 |" in text
    assert text.index("## Speed targets") < text.index("| case | mode | implementation |")
