"""Records, without a GPU, what every per-step launch hands Triton's CUDA launcher, through
Triton's own launch path and through the launches bound once (``kernels/step_launch.py``), and
says where the two differ.

The bound path calls a compiled kernel's launcher directly with an argument list it assembled
itself; if that list differed from what ``JITFunction.run`` would pass (an argument out of place,
a default missed, a wrong grid or stream), the kernel would read the wrong memory on a GPU. Here
every layer below runs forward (training and evaluation) and backward under the compile-only
driver of ``gpu_compile.py``, whose launchers record their arguments instead of launching, once
with ``NORMRNN_STEP_LAUNCH=triton`` and once bound; the two records must be the same launch for
launch. Tensors are compared by shape, strides, dtype, offset and which buffer they are (the
order in which a run first passes each storage), everything else by value or identity. Launch
metadata is compared where a launch hook is registered (a profiler's), the one case where
Triton's launchers read it.

``python tests/launch_record.py [--json FILE]``: exit status 1 when a record differs. Runs
without ``TRITON_INTERPRET=1`` (the kernels are compiled for sm_90, not interpreted); run through
``tests/test_step_launch.py`` in CI.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# (cell, norm, dtype, batch, hidden size, steps, lengths): odd sizes; batch norm over 70 rows walks
# them in chunks (another kernel variant); layer norm runs phases (a binding per phase)
CASES = [
    ("lstm", None, "bfloat16", 5, 24, 4, True),
    ("lstm", "layer", "float32", 5, 24, 3, False),
    ("lstm", "batch", "float32", 70, 24, 3, True),
    ("gru", "layer", "bfloat16", 5, 24, 3, True),
    ("rnn", "batch", "float32", 5, 24, 3, False),
]


@contextlib.contextmanager
def launch_hook(hook) -> Iterator[None]:
    from triton import knobs
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        yield
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)


def run_layer(cell: str, norm: Optional[str], dtype_name: str, batch: int, hidden_size: int, steps: int,
              lengths: bool) -> None:
    import torch

    import normrnn
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    layer_class = {"lstm": normrnn.LSTM, "gru": normrnn.GRU, "rnn": normrnn.RNN}[cell]
    layer = layer_class(hidden_size, hidden_size, norm=norm, backend="triton").to(dtype)
    x = torch.randn(steps, batch, hidden_size, dtype=dtype, requires_grad=True)
    keywords = {}
    if lengths:
        keywords["lengths"] = torch.tensor([steps - index % steps for index in range(batch)])
    layer.train()
    output, _ = layer(x, **keywords)
    output.float().sum().backward()
    layer.eval()
    with torch.no_grad():
        layer(x, **keywords)


def record(case, mode: str, hooked: bool = False) -> tuple:
    """The launches of ``case`` run with ``NORMRNN_STEP_LAUNCH=mode``, and how many went bound."""
    from gpu_compile import compile_target

    from normrnn.bench.implementations import environment_variable
    from normrnn.kernels import step_launch
    before = step_launch.BOUND_LAUNCHES["count"]
    with compile_target(90) as launches, environment_variable("NORMRNN_STEP_LAUNCH", mode):
        if hooked:
            # registered is what matters: it makes both paths build launch metadata (the recording
            # launchers never call it)
            with launch_hook(lambda metadata: None):
                run_layer(*case)
        else:
            run_layer(*case)
    return launches, step_launch.BOUND_LAUNCHES["count"] - before


def normalize(launches: List[tuple], hooked: bool) -> List[tuple]:
    """Each launch as comparable values (see the module's doc)."""
    import torch
    storages: dict = {}

    def value(item):
        if isinstance(item, torch.Tensor):
            storage = storages.setdefault(item.untyped_storage().data_ptr(), len(storages))
            return ("tensor", tuple(item.shape), item.stride(), str(item.dtype), item.storage_offset(), storage)
        if isinstance(item, (int, float, str, bool, type(None), tuple)):
            return item
        return ("object", type(item).__name__, id(item))

    normalized = []
    for launch in launches:
        grid_and_stream, (function, packed_metadata, metadata), rest = launch[:4], launch[4:7], launch[7:]
        if hooked:
            metadata = {key: value(item) for key, item in sorted(metadata.get().items())}
        else:
            metadata = "unread: no launch hook"
        normalized.append((grid_and_stream, value(function), packed_metadata, metadata,
                           tuple(value(item) for item in rest)))
    return normalized


def differences(reference: List[tuple], bound: List[tuple]) -> List[str]:
    if len(reference) != len(bound):
        return [f"{len(reference)} launches through Triton, {len(bound)} bound"]
    found = []
    for index, (expected, actual) in enumerate(zip(reference, bound)):
        if expected != actual:
            fields = ["grid and stream", "function", "packed metadata", "launch metadata", "arguments"]
            for field, want, got in zip(fields, expected, actual):
                if want == got:
                    continue
                if field == "arguments" and len(want) == len(got):
                    # the hooks, then the kernel's arguments in its order
                    for position, (wanted, given) in enumerate(zip(want, got)):
                        if wanted != given:
                            found.append(f"launch {index}, argument {position - 2}: through Triton {wanted!r}, "
                                         f"bound {given!r}")
                else:
                    found.append(f"launch {index}, {field}: through Triton {want!r}, bound {got!r}"[:600])
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="write the results to this file")
    arguments = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run without TRITON_INTERPRET=1: the kernels must be compiled, not interpreted")
    import triton
    results = []
    runs = [(case, False) for case in CASES] + [(CASES[0], True)]
    for case, hooked in runs:
        through_triton, bound_before = record(case, "triton", hooked)
        bound, bound_count = record(case, "bound", hooked)
        found = differences(normalize(through_triton, hooked), normalize(bound, hooked))
        name = " ".join(str(item) for item in case) + (" with a launch hook" if hooked else "")
        results.append({"case": name, "launches": len(bound), "bound_launches": bound_count,
                        "bound_launches_with_triton_mode": bound_before, "differences": found})
        print(f"{name}: {len(bound)} launches, {bound_count} bound, {len(found)} differences", flush=True)
        for line in found[:5]:
            print("   ", line)
    report = {"triton": triton.__version__, "cases": results}
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(report, indent=1))
    bad = [result for result in results if result["differences"] or not result["bound_launches"]
           or result["bound_launches_with_triton_mode"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
