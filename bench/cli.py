"""``python -m normrnn bench [--quick] [--cpu] [--out DIR]``.

On a CUDA machine: every case of the grid (``--quick``: the documented subset, a few minutes on
an H100), each implementation timed in one process and interleaved (eval-mode forward under
no_grad, and a training step: forward + backward), the correctness checks at scale, then a
summary of ratios to cuDNN. Without CUDA it says so and runs the CPU section only (the C++
backend and the reference against torch's CPU modules), which also runs anywhere with ``--cpu``.
Results go to ``--out`` (default ``bench/results``): ``<device>-<date>.json``, ``.md`` and plots.
"""
from __future__ import annotations

import argparse
import os
import statistics
from typing import Dict, List, Optional

import torch

from . import cases as grid
from .correctness import run_checks
from .implementations import CPU_IMPLEMENTATIONS, IMPLEMENTATIONS, Runner, Skip, cpu_runner
from .report import add_ratios, environment, write
from .timing import measure

DEFAULT_OUT = os.path.join("bench", "results")


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


def run_gpu(args) -> Dict:
    device = torch.device("cuda")
    cases = grid.quick_grid() if args.quick else grid.full_grid()
    step, close = _progress(len(cases), "bench (cuda)", args.quiet)
    builders = {name: (lambda case, build=build: build(case, device)) for name, build in IMPLEMENTATIONS.items()}
    rows = []
    for case in cases:
        rows += time_case(case, builders, device, repetitions=args.repetitions, max_seconds=args.max_seconds)
        step(case.label())
    close()
    add_ratios(rows)
    return {"section": "cuda", "grid": "quick" if args.quick else "full", "environment": environment(device),
            "timings": rows, "correctness": [] if args.no_checks else run_checks(device, args.quick)}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m normrnn bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the documented subset of the grid")
    parser.add_argument("--cpu", action="store_true", help="run the CPU section (also on a CUDA machine)")
    parser.add_argument("--tiny", action="store_true", help="CPU section at a toy size (for tests)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--repetitions", type=int, default=20)
    parser.add_argument("--max-seconds", type=float, default=10.0, help="timed seconds per implementation and mode")
    parser.add_argument("--no-checks", action="store_true", help="skip the correctness checks at scale")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    written = []
    if torch.cuda.is_available():
        results = run_gpu(args)
        written += write(results, args.out)
        print(summary(results["timings"], "cudnn"))
    else:
        print("python -m normrnn bench: no CUDA device here, so the GPU suite does not run; the CPU section does.")
    if args.cpu or not torch.cuda.is_available():
        results = run_cpu(args)
        written += write(results, args.out)
        print(summary(results["timings"], "torch-cpu"))
    print("wrote: " + ", ".join(written))
    return 0
