"""``python -m normrnn bench [--quick] [--cpu] [--out DIR]``.

On a CUDA machine: the correctness checks at scale, then every case of the grid (``--quick``: the
documented subset, a few minutes on an H100), each implementation timed in one process and
interleaved (eval-mode forward under no_grad, and a training step: forward + backward), then the
checks over 10,000 steps and over 1000 at B=256, H=2048, then a summary of ratios to cuDNN. Without CUDA it says so and runs the
CPU section only (the C++ backend and the reference against torch's CPU modules), which also runs
anywhere with ``--cpu``.
Results go to ``--out`` (default ``bench/results``): ``<device>-<date>.json``, ``.md`` and plots,
rewritten after every case. The kernels are compiled first in ``--jobs`` processes (``warmup.py``);
``--skip`` leaves implementations out; what ``--quick`` leaves out is ``cases.quick_skip``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Dict, List, Optional

import torch

from . import cases as grid
from .correctness import after_timings, check_plans, run_checks
from .implementations import CPU_IMPLEMENTATIONS, IMPLEMENTATIONS, Runner, Skip, cpu_runner
from .report import add_ratios, environment, fastest_fused, speed_targets, write
from .timing import measure
from .warmup import NOT_DONE, shapes_of, warm_kernels

DEFAULT_OUT = os.path.join("bench", "results")
PERSISTENT_IMPLEMENTATIONS = ("normrnn-persistent", "normrnn-persistent-streamed")
# what the compiled reference's pass may take (its compile): it is begun only this long before the
# deadline, since a pass begun later would run past the deadline by about this much
LATE_PASS_SECONDS = 120.0
# likewise what one check after the timings may take (its float64 reference: 10,000 eager steps,
# or B=256, H=2048, T=1000 in checkpointed chunks)
LONG_CHECK_SECONDS = 30.0


def _progress(total: int, description: str, quiet: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or quiet:
        return (lambda label: None), (lambda: None)
    bar = tqdm(total=total, desc=description, unit="case")

    def step(label: str) -> None:
        bar.set_postfix_str(label[:60])
        bar.update(1)
    return step, bar.close


def time_case(case: grid.Case, builders: Dict, device: torch.device, repetitions: int, max_seconds: float
              ) -> List[Dict]:
    """Every implementation of one case, forward (eval) and training step; skips recorded."""
    rows = []
    runners: Dict[str, Runner] = {}
    for name, build in builders.items():
        try:
            runners[name] = build(case)
        except Skip as skip:
            for mode in ("forward", "train"):
                rows.append({"case": case.as_dict(), "label": case.label(), "implementation": name, "mode": mode,
                             "skipped": str(skip)})
        except Exception as error:
            for mode in ("forward", "train"):
                rows.append({"case": case.as_dict(), "label": case.label(), "implementation": name, "mode": mode,
                             "skipped": f"failed to build: {type(error).__name__}: {error}"})
    # interleaved: each mode times every implementation before the next mode
    for mode in ("forward", "train"):
        for name, runner in runners.items():
            row = {"case": case.as_dict(), "label": case.label(), "implementation": name, "mode": mode}
            step = runner.forward_eval if mode == "forward" else runner.train_step
            if step is None:
                row["skipped"] = runner.train_skip_reason
            else:
                try:
                    row.update(measure(step, device, repetitions=repetitions, max_seconds=max_seconds))
                except Exception as error:
                    row["skipped"] = f"failed: {type(error).__name__}: {str(error)[:300]}"
            rows.append(row)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def summary(rows: List[Dict], bar: str) -> str:
    """Median ratio to ``bar`` per implementation and mode, over the cases where both ran."""
    lines = [f"ratio to {bar} (median over cases; below 1 is faster):"]
    found = {}
    for row in rows:
        ratio = row.get(f"ratio_to_{bar}")
        if ratio is not None and row["implementation"] != bar:
            found.setdefault((row["implementation"], row["mode"]), []).append(ratio)
    for (implementation, mode), ratios in sorted(found.items()):
        lines.append(f"  {implementation:20s} {mode:8s} {statistics.median(ratios):8.2f}x  ({len(ratios)} cases)")
    return "\n".join(lines)


def fastest_summary(rows: List[Dict], bar: str) -> str:
    """Per case and mode, the fastest fused normrnn implementation and its ratio to ``bar``: the
    numbers the speed targets are read from."""
    lines = [f"fastest fused normrnn per case, ratio to {bar} (below 1 is faster):"]
    for (label, mode), row in fastest_fused(rows, bar).items():
        lines.append(f"  {label:48s} {mode:8s} {row[f'ratio_to_{bar}']:6.2f}x  {row['median_ms']:9.3f} ms  "
                     f"({row['implementation']})")
    return "\n".join(lines)


def run_cpu(args) -> Dict:
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cpu")
    cases = grid.cpu_grid(tiny=args.tiny)
    step, close = _progress(len(cases), "bench (cpu)", args.quiet)
    builders = {name: (lambda case, name=name: cpu_runner(name, case)) for name in CPU_IMPLEMENTATIONS}
    rows = []
    for case in cases:
        rows += time_case(case, builders, device, repetitions=args.repetitions, max_seconds=args.max_seconds)
        step(case.label())
    close()
    add_ratios(rows)
    return {"section": "cpu", "environment": environment(device), "timings": rows}


def _builder(name: str, build, device: torch.device, quick: bool, left_out: Optional[str] = None):
    def built(case: grid.Case) -> Runner:
        if left_out:
            raise Skip(left_out)
        reason = grid.quick_skip(name, case) if quick else None
        if reason is not None:
            raise Skip(reason)
        return build(case, device)
    return built


def checks_summary(checks: List[Dict]) -> str:
    """One line per correctness check: passed or FAILED, the worst error against its tolerance."""
    lines = [f"correctness checks: {sum(bool(check.get('passed')) for check in checks)} of {len(checks)} passed"]
    for check in checks:
        shape = (f"{check['cell']} norm={check.get('norm')} {check['dtype']} B={check['batch']} "
                 f"H={check['hidden_size']} " + (f"P={check['proj_size']} " if check.get("proj_size") else "")
                 + f"T={check['steps']}")
        if "relative_error" in check:
            outcome = (f"{check['relative_error']:.2e} ({check['tensor']}) vs {check['tolerance']:.0e}, "
                       f"{check['launch']} requested, {check['kernels_ran']} ran")
        else:
            outcome = f"error: {check.get('error')}"
        lines.append(f"  {'passed' if check.get('passed') else 'FAILED'}  {check['check']}: {shape}: {outcome}")
    return "\n".join(lines)


def run_gpu(args, device: Optional[torch.device] = None, cases: Optional[List[grid.Case]] = None) -> Dict:
    """Kernels compiled in parallel first (``--jobs``), then the correctness checks (what a timing
    is worth rests on them), then every case timed, then the checks over 1000 and 10,000 steps
    (``correctness.after_timings``: slow, and no timing rests on them), then in ``--quick`` the
    compiled reference's pass; the results so far are
    written after the checks and after each case (``complete``: false), so that a run cut short
    still leaves them. With ``--deadline``, cases and long checks not begun within that many seconds
    of the start are listed as not run, and the run ends as usual (plots and summary) instead of
    being cut off.
    ``device`` (default CUDA) and ``cases`` (default the grid ``args`` chooses) are for tests."""
    started = time.perf_counter()
    deadline = getattr(args, "deadline", None)
    device = device or torch.device("cuda")
    if cases is None:
        cases = grid.quick_grid() if args.quick else grid.full_grid()
    results = {"section": "cuda", "grid": "quick" if args.quick else "full", "environment": environment(device),
               "complete": False, "timings": [], "correctness": []}
    left_out = {name: "left out of this run (--skip)" for name in args.skip}
    persistent = not set(PERSISTENT_IMPLEMENTATIONS) <= set(args.skip)
    plans = [] if args.no_checks else check_plans(args.quick)
    if args.jobs > 1:
        shapes = shapes_of(cases, [arguments for _, arguments in plans])
        rounds = -(-len(shapes) // args.jobs)  # each worker's shapes one after another
        timeout = max(180.0, 90.0 * rounds)
        if deadline is not None:  # the warm-up may take at most half of the run's time
            timeout = min(timeout, deadline / 2)
        warmup = results["warmup"] = warm_kernels(shapes, args.jobs, device.type, persistent, timeout=timeout)
        print(f"kernels compiled in {warmup['seconds']} s ({warmup['shapes']} layer shapes, "
              f"{args.jobs} processes; failures: {len(warmup['failures'])})", flush=True)
        hung = [failure for failure in warmup["failures"] if failure["error"].startswith(NOT_DONE)]
        if hung and persistent:
            # the timing process would hang where the warm-up did: a grid barrier that never opens
            reason = (f"left out: the warm-up of {len(hung)} shape(s), e.g. {hung[0]['shape']}, did not finish "
                      "(a persistent grid barrier that never opens?)")
            left_out.update({name: reason for name in PERSISTENT_IMPLEMENTATIONS if name not in left_out})
            persistent = False
    if plans:
        results["correctness"] = run_checks(device, [plan for plan in plans if not after_timings(plan)], persistent)
        write(results, args.out, plots=False)
        print(checks_summary(results["correctness"]), flush=True)
    builders = {name: _builder(name, build, device, args.quick, left_out.get(name))
                for name, build in IMPLEMENTATIONS.items()}
    # --quick: the compiled reference of one case after the rest (its compile is the one long step);
    # its rows replace those of the first pass, which said it comes later
    compiled = None
    if args.quick and grid.QUICK_COMPILED_REFERENCE in cases:
        name = grid.COMPILED_REFERENCE
        compiled = {name: _builder(name, IMPLEMENTATIONS[name], device, False, left_out.get(name))}
    compiled_label = f"{grid.QUICK_COMPILED_REFERENCE.label()} ({grid.COMPILED_REFERENCE})"
    later_checks = [plan for plan in plans if after_timings(plan)]

    def nearer_than(seconds: float) -> bool:
        """Whether the deadline is less than ``seconds`` away (or past)."""
        return deadline is not None and time.perf_counter() - started + seconds > deadline

    def time_into_rows(case: grid.Case, case_builders: Dict) -> None:
        timed = time_case(case, case_builders, device, repetitions=args.repetitions, max_seconds=args.max_seconds)
        rows[:] = [row for row in rows if not (row["label"] == case.label() and row["implementation"] in case_builders)]
        rows.extend(timed)
        step(case.label())
        add_ratios(rows)
        write(results, args.out, plots=False)

    step, close = _progress(len(cases) + (compiled is not None), "bench (cuda)", args.quiet)
    rows = results["timings"]
    for index, case in enumerate(cases):
        if nearer_than(0):
            results["not_timed"] = {"reason": f"the run's deadline of {deadline:.0f} s had passed",
                                    "cases": [later.label() for later in cases[index:]]
                                    + ([compiled_label] if compiled else [])}
            print(f"deadline: {len(results['not_timed']['cases'])} cases not timed", flush=True)
            compiled = None
            break
        time_into_rows(case, builders)
    if later_checks or compiled:  # plots of the timings before the long steps, in case a time limit cuts them
        write(results, args.out)
    for index, plan in enumerate(later_checks):  # after the cases, before the compiled reference
        if nearer_than(LONG_CHECK_SECONDS):
            results["checks_not_run"] = {"reason": f"a check over {plan[1]['steps']} steps takes about "
                                                   f"{LONG_CHECK_SECONDS:.0f} s, and the run's deadline of "
                                                   f"{deadline:.0f} s was nearer",
                                         "checks": [arguments for _, arguments in later_checks[index:]]}
            break
        results["correctness"] += run_checks(device, [plan], persistent)
        write(results, args.out, plots=False)
    if later_checks:
        print(checks_summary(results["correctness"]), flush=True)
    if compiled and nearer_than(LATE_PASS_SECONDS):
        results["not_timed"] = {"reason": f"the compiled reference's pass takes about {LATE_PASS_SECONDS:.0f} s, "
                                          f"and the run's deadline of {deadline:.0f} s was nearer",
                                "cases": [compiled_label]}
        print("deadline: the compiled reference not timed", flush=True)
    elif compiled:
        time_into_rows(grid.QUICK_COMPILED_REFERENCE, compiled)
    close()
    add_ratios(rows)
    results["speed_targets"] = speed_targets(rows)
    results["complete"] = True
    return results


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m normrnn bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the documented subset of the grid")
    parser.add_argument("--cpu", action="store_true", help="run the CPU section (also on a CUDA machine)")
    parser.add_argument("--tiny", action="store_true", help="CPU section at a toy size (for tests)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--repetitions", type=int, default=20)
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="timed seconds per implementation and mode (default 10; 1 with --quick)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes that compile the kernels before timing (1: compile as they launch)")
    parser.add_argument("--no-checks", action="store_true", help="skip the correctness checks at scale")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds after which no further case is begun; the rest are listed as not "
                             "timed, and the results, plots and summary are written as usual")
    parser.add_argument("--skip", action="append", default=[], choices=sorted(IMPLEMENTATIONS),
                        help="leave this implementation out (repeatable), e.g. the persistent kernels where "
                             "their grid barrier has not been validated on this GPU")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.max_seconds is None:
        args.max_seconds = 1.0 if args.quick else 10.0
    written = []
    if torch.cuda.is_available():
        results = run_gpu(args)
        written += write(results, args.out)
        print(summary(results["timings"], "cudnn"))
        print(fastest_summary(results["timings"], "cudnn"))
        if results["correctness"]:
            print(checks_summary(results["correctness"]))
    else:
        print("python -m normrnn bench: no CUDA device here, so the GPU suite does not run; the CPU section does.")
    if args.cpu or not torch.cuda.is_available():
        results = run_cpu(args)
        written += write(results, args.out)
        print(summary(results["timings"], "torch-cpu"))
    print("wrote: " + ", ".join(written))
    return 0
