"""Results of a bench run: a JSON named by device and date, a markdown table, plots."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
from typing import Dict, List, Optional

import torch


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return platform.processor() or "cpu"


PEER_PACKAGES = ("flashrnn", "haste_pytorch")


def peer_versions() -> Dict[str, Optional[str]]:
    """The installed version of each peer package, None where it is not installed (its rows then
    say it was skipped)."""
    versions = {}
    for package in PEER_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def environment(device: torch.device) -> Dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": name, "device_type": device.type, "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat(), "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "peers": peer_versions(),
            # launcher settings in force for the whole run (the GPU session sets NORMRNN_STEP_LAUNCH=triton
            # when the bound launches fail their check): what the fused rows ran
            "settings": {name: value for name, value in sorted(os.environ.items()) if name.startswith("NORMRNN_")}}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def add_ratios(rows: List[Dict]) -> None:
    """Each timing gains its ratio to torch's unnormalized module (``cudnn`` on a GPU,
    ``torch-cpu`` on a CPU), timed in the same case as the speed bar of every norm, to the
    eager reference of the same case and mode, and on a CPU to the ``gemm-floor`` (the matrix
    products alone)."""
    def key(row, implementation):
        return (implementation, row["mode"], tuple(sorted((k, str(v)) for k, v in row["case"].items())))
    index = {key(row, row["implementation"]): row for row in rows if "median_ms" in row}
    for row in rows:
        if "median_ms" not in row:
            continue
        for bar in ("cudnn", "torch-cpu", "normrnn-reference", "gemm-floor"):
            other = index.get(key(row, bar))
            if other is not None and other is not row:
                row[f"ratio_to_{bar}"] = row["median_ms"] / other["median_ms"]


# the fused layers' implementations (``implementations.py``): the speed targets take the fastest
FUSED_IMPLEMENTATIONS = ("normrnn-triton", "normrnn-persistent", "normrnn-persistent-streamed", "normrnn-graphs",
                         "normrnn-triton-rebinding")
# Grid barriers a timestep of the persistent kernels waits at, (forward, backward), by norm and
# cell: the design's floor per step is that many barriers, about 1 us each on an H100 (a probe of
# ours with 16 to 128 programs)
BARRIERS_PER_STEP = {None: {"lstm": (1, 1), "gru": (1, 1), "rnn": (1, 1)},
                     "batch": {"lstm": (1, 1), "gru": (1, 1), "rnn": (1, 1)},
                     "layer": {"lstm": (3, 3), "gru": (2, 2), "rnn": (2, 2)}}
BARRIER_MICROSECONDS = 1.0
# the fused-kernel issue's targets, as ratios to cuDNN's plain LSTM at B=64, I=H=512, bf16:
# mode -> (at most, aiming for)
SPEED_TARGETS = {"train": (1.0, 0.5), "forward": (None, 0.33)}


def fastest_fused(rows: List[Dict], bar: str) -> Dict:
    """(label, mode) -> the row of the fastest fused implementation that has a ratio to ``bar``."""
    best: Dict = {}
    for row in rows:
        if row["implementation"] in FUSED_IMPLEMENTATIONS and f"ratio_to_{bar}" in row:
            key = (row["label"], row["mode"])
            if key not in best or row["median_ms"] < best[key]["median_ms"]:
                best[key] = row
    return best


def speed_targets(rows: List[Dict]) -> List[Dict]:
    """The speed targets' cases (LSTM, B=64, H=512, bf16, every norm and T): for each mode the
    fastest fused layer against cuDNN, its time per step beside the floor of the design (its grid
    barriers per step), and whether the target holds."""
    table = []
    for (label, mode), row in fastest_fused(rows, "cudnn").items():
        case = row["case"]
        if ((case["cell"], case["dtype"], case["batch"], case["hidden_size"]) != ("lstm", "bfloat16", 64, 512)
                or case.get("proj_size")):  # the targets are the unprojected LSTM's
            continue
        forward, backward = BARRIERS_PER_STEP[case["norm"]][case["cell"]]
        barriers = forward + (backward if mode == "train" else 0)
        at_most, aim = SPEED_TARGETS[mode]
        ratio = row["ratio_to_cudnn"]
        table.append({"label": label, "mode": mode, "implementation": row["implementation"],
                      "median_ms": row["median_ms"], "cudnn_ms": row["median_ms"] / ratio, "ratio_to_cudnn": ratio,
                      "microseconds_per_step": 1e3 * row["median_ms"] / case["steps"],
                      "barrier_floor_microseconds_per_step": barriers * BARRIER_MICROSECONDS,
                      "target": " ".join(filter(None, [at_most and f"<= {at_most}x", f"aim {aim}x"])),
                      "met": (ratio <= at_most if at_most else None), "aim_met": ratio <= aim})
    return table


def _speed_target_lines(results: Dict) -> List[str]:
    table = speed_targets(results["timings"])
    if not table:
        return []
    lines = ["## Speed targets: LSTM, B=64, I=H=512, bf16, against cuDNN's plain LSTM", "",
             "The fastest fused implementation per case and mode; per step: its time over T, beside the floor of "
             f"the design, its grid barriers per step at about {BARRIER_MICROSECONDS:g} us each.", "",
             "| case | mode | fastest fused | ms | cuDNN ms | ratio | target | met | us per step | barrier floor us |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for entry in table:
        met = {True: "yes", False: "no", None: "-"}[entry["met"]] + (", aim met" if entry["aim_met"] else "")
        lines.append(f"| {entry['label']} | {entry['mode']} | {entry['implementation']} | {entry['median_ms']:.3f} | "
                     f"{entry['cudnn_ms']:.3f} | {entry['ratio_to_cudnn']:.2f}x | {entry['target']} | {met} | "
                     f"{entry['microseconds_per_step']:.1f} | {entry['barrier_floor_microseconds_per_step']:g} |")
    return lines + ["", "## Every timing", ""]


def markdown(results: Dict) -> str:
    env = results["environment"]
    floor = any("ratio_to_gemm-floor" in row for row in results["timings"])
    lines = [f"# normrnn bench: {env['device']} ({env['date']})", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, {env['cpu_threads']} CPU threads"
             + "".join(f", {name}={value}" for name, value in env.get("settings", {}).items())
             + ("".join(f", {package} {version or 'not installed'}" for package, version in env.get("peers", {}).items())
                if results["section"] == "cuda" else "") + ". "
             "Median ms, and ratios to torch's unnormalized module of the same cell and shape (the speed bar "
             "of every norm) and to the eager reference; below 1 is faster."
             + (" The last column: the ratio to gemm-floor, the matrix products alone that every implementation "
                "runs, with ATen's mm (a lower bound for what is built on mm; torch's CPU LSTM, and normrnn-cpp's "
                "large recurrent products, run on oneDNN and can be below it). normrnn-cpp-mm: normrnn-cpp with "
                "every product on mm." if floor else ""), "",
             "| case | mode | implementation | median ms | vs torch | vs reference | peak MiB |"
             + (" vs gemm floor |" if floor else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if floor else "")]
    if results.get("complete") is False:
        timed = len({row["label"] for row in results["timings"]})
        lines[2:2] = [f"**Incomplete**: the run stopped (or is still running) after {timed} cases"
                      + ("." if results.get("correctness") else "; no correctness checks yet."), ""]
    not_run = results.get("checks_not_run")
    if not_run:
        lines[2:2] = [f"**Checks not run** ({not_run['reason']}): "
                      + "; ".join(f"{check['cell']} norm={check.get('norm')} T={check['steps']}"
                                  for check in not_run["checks"]) + ".", ""]
    not_timed = results.get("not_timed")
    if not_timed:
        lines[2:2] = [f"**Not timed** ({not_timed['reason']}): " + "; ".join(not_timed["cases"]) + ".", ""]
    warmup = results.get("warmup")
    if warmup:
        lines[2:2] = [f"Kernels compiled before timing: {warmup['shapes']} layer shapes in {warmup['jobs']} "
                      f"processes, {warmup['seconds']} s; failures: {len(warmup['failures'])}.", ""]
    if results.get("section") != "cpu":
        lines[-2:-2] = _speed_target_lines(results)
    for row in results["timings"]:
        label = row["label"]
        if "median_ms" in row:
            ratio = row.get("ratio_to_cudnn", row.get("ratio_to_torch-cpu"))
            reference = row.get("ratio_to_normrnn-reference")
            to_floor = row.get("ratio_to_gemm-floor")
            lines.append(f"| {label} | {row['mode']} | {row['implementation']} | {row['median_ms']:.3f} | "
                         f"{'' if ratio is None else f'{ratio:.2f}x'} | "
                         f"{'' if reference is None else f'{reference:.2f}x'} | {row.get('peak_memory_mib', 0):.0f} |"
                         + (f" {'' if to_floor is None else f'{to_floor:.2f}x'} |" if floor else ""))
        else:
            lines.append(f"| {label} | {row['mode']} | {row['implementation']} | skipped: {row['skipped']} | | | |"
                         + (" |" if floor else ""))
    if results.get("correctness"):
        lines += ["", "## Correctness at scale", "",
                  "Launch: the kernels requested (one launch per step, or persistent) and, after it, those the "
                  "launchers ran (persistent ones only where the grid can be resident at once).", "",
                  "| check | cell | norm | dtype | B | H | T | launch | worst relative error | tolerance | |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for check in results["correctness"]:
            worst = (f"{check['relative_error']:.2e} ({check['tensor']})" if "relative_error" in check
                     else f"error: {check.get('error')}")
            launch = f"{check['launch']}: {check['kernels_ran']}" if "launch" in check else ""
            lines.append(f"| {check['check']} | {check['cell']} | {check.get('norm')} | {check['dtype']} | "
                         f"{check['batch']} | {check['hidden_size']}"
                         + (f" P={check['proj_size']}" if check.get("proj_size") else "") + " "
                         f"| {check['steps']} | {launch} | {worst} | {check.get('tolerance', '')} | "
                         f"{'passed' if check.get('passed') else 'FAILED'} |")
    return "\n".join(lines) + "\n"


def draw_plots(results: Dict, out: str, stem: str) -> List[str]:
    """Training-step time against T and against H (log scales), one line per implementation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in results["timings"] if "median_ms" in row and row["mode"] == "train"]
    paths = []
    for axis in ("steps", "hidden_size"):
        groups: Dict = {}
        for row in rows:
            case = row["case"]
            fixed = tuple((k, case.get(k)) for k in ("cell", "norm", "dtype", "batch", "hidden_size", "proj_size", "steps")
                          if k != axis)
            groups.setdefault(fixed, {}).setdefault(row["implementation"], []).append((case[axis], row["median_ms"]))
        groups = {fixed: lines for fixed, lines in groups.items() if any(len(points) > 1 for points in lines.values())}
        if not groups:
            continue
        figure, panes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
        for pane, (fixed, lines) in zip(panes[0], groups.items()):
            for implementation, points in sorted(lines.items()):
                points.sort()
                pane.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=implementation)
            pane.set_xscale("log")
            pane.set_yscale("log")
            pane.set_xlabel(axis)
            pane.set_ylabel("training step, ms")
            pane.set_title(", ".join(f"{k}={v}" for k, v in fixed), fontsize=8)
            pane.legend(fontsize=7)
        figure.tight_layout()
        path = os.path.join(out, f"{stem}-by-{axis}.png")
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths


def _stem(results: Dict, out: str) -> str:
    """``<device>-<date>[-cpu]``, or, where ``out`` holds another run of that name (the same
    device and day, a different start), ``<device>-<date>-<HHMMSS of this run's start>[-cpu]``:
    a second run of a day must not overwrite results that are committed. The run's own rewrites
    (after every case) keep its name."""
    env = results["environment"]
    suffix = "-cpu" if results.get("section") == "cpu" else ""
    stem = f"{slug(env['device'])}-{env['date']}"
    started = env.get("started")
    try:
        with open(os.path.join(out, stem + suffix + ".json")) as handle:
            other = json.load(handle).get("environment", {}).get("started")
    except (OSError, ValueError):
        return stem + suffix  # no run of that name yet (or an unreadable one, which a rerun replaces)
    if started is None or other == started:
        return stem + suffix
    return f"{stem}-{started.split('T')[1].replace(':', '')}{suffix}"


def write(results: Dict, out: str, plots: bool = True) -> List[str]:
    """results.json, the markdown table and (``plots``) the plots, named ``<device>-<date>`` (see
    ``_stem``); returns the paths."""
    os.makedirs(out, exist_ok=True)
    stem = _stem(results, out)
    json_path = os.path.join(out, stem + ".json")
    with open(json_path, "w") as handle:
        json.dump(results, handle, indent=1, default=str)
    markdown_path = os.path.join(out, stem + ".md")
    with open(markdown_path, "w") as handle:
        handle.write(markdown(results))
    paths = [json_path, markdown_path]
    if not plots:
        return paths
    try:
        paths += draw_plots(results, out, stem)
    except ImportError:
        pass  # matplotlib is an extra: the JSON and the table are written regardless
    return paths
