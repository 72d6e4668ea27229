"""Compiles the fused kernels that a bench run will launch, in parallel processes, before anything
is timed.

Triton compiles a kernel at its first launch, in the launching process, one kernel after another;
``--quick`` launches about 250 specializations (cell x norm x dtype x launch mode x train /
eval / backward, and the shapes of the correctness checks), a few seconds each. Compiled here in
``jobs`` processes, each running every launch mode of one layer shape on a two-step sequence, they
land in Triton's on-disk cache, where the timing process finds them: the same shapes and dtypes
give the same specializations (the sequence length is not specialized on).
"""
from __future__ import annotations

import multiprocessing
import time
from typing import Dict, Iterable, List, Tuple

# (cell, norm, dtype name, batch, hidden size, proj_size): what a kernel specialization depends on
# (the LSTM's projection gives step 0 a product of its own, and float32 weights under batch norm)
Shape = Tuple[str, object, str, int, int, int]
# how the error of a shape not done in time begins (``warm_kernels``), which the bench reads
NOT_DONE = "not done within"


def shapes_of(cases: Iterable, checks: Iterable[Dict]) -> List[Shape]:
    """The distinct layer shapes of the timed ``cases`` (``normrnn.bench.cases.Case``) and of the
    correctness ``checks`` (``correctness.check_plans``), in first-seen order."""
    shapes: List[Shape] = []
    for case in cases:
        shapes.append((case.cell, case.norm, case.dtype, case.batch, case.hidden_size, case.proj_size))
    for check in checks:
        dtype = str(check.get("dtype", "torch.float32")).split(".")[-1]
        shapes.append((check["cell"], check.get("norm"), dtype, check["batch"], check["hidden"],
                       check.get("proj_size", 0)))
    return list(dict.fromkeys(shapes))


def _launch_every_mode(shape: Shape, device_name: str, persistent: bool) -> Tuple[Shape, float, str]:
    """In a worker: the fused layer of ``shape`` forward (training), backward and forward (eval),
    with per-step launches and, with ``persistent``, the persistent kernels and, where they hold
    W_hh on chip, the persistent layer with it streamed (normrnn-persistent-streamed). Returns the
    shape, the seconds it took and the error ("" when none)."""
    started = time.perf_counter()
    try:
        import torch

        import normrnn
        from normrnn.bench.cases import Case, projection_keyword
        from normrnn.bench.implementations import persistent_requested, weights_streamed, weights_streamed_anyway
        cell, norm, dtype_name, batch, hidden, proj_size = shape
        device = torch.device(device_name)
        dtype = getattr(torch, dtype_name)
        layer_class = {"lstm": normrnn.LSTM, "gru": normrnn.GRU, "rnn": normrnn.RNN}[cell]
        layer = layer_class(hidden, hidden, norm=norm, backend="triton", **projection_keyword(proj_size))
        layer = layer.to(device, dtype)
        x = torch.randn(2, batch, hidden, device=device, dtype=dtype, requires_grad=True)

        def run() -> None:
            layer.train()
            output, _ = layer(x)
            output.float().sum().backward()
            layer.eval()
            with torch.no_grad():
                layer(x)

        run()
        if not persistent:
            return shape, time.perf_counter() - started, ""
        with persistent_requested():
            run()
            if weights_streamed_anyway(Case(cell, norm, dtype_name, batch, hidden, 2, proj_size)) is None:
                with weights_streamed():
                    run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return shape, time.perf_counter() - started, ""
    except Exception as error:  # noqa: BLE001 - reported; the timing run meets it again and records it
        return shape, time.perf_counter() - started, f"{type(error).__name__}: {str(error)[:300]}"


def warm_kernels(shapes: List[Shape], jobs: int, device: str = "cuda", persistent: bool = True,
                 timeout: float = 180.0) -> Dict:
    """Runs every launch mode of each shape (the persistent ones only with ``persistent``) in
    ``jobs`` spawned processes (CUDA cannot be forked); returns the wall time, the slowest shape and
    the failures, for the results. Shapes not done within ``timeout`` seconds (a grid barrier that
    never opens would spin forever) are failures, and their workers are terminated."""
    started = time.perf_counter()
    done = []
    with multiprocessing.get_context("spawn").Pool(max(1, min(jobs, len(shapes)))) as pool:
        pending = [(shape, pool.apply_async(_launch_every_mode, (shape, device, persistent))) for shape in shapes]
        for shape, result in pending:
            try:
                done.append(result.get(timeout=max(0.0, started + timeout - time.perf_counter())))
            except multiprocessing.TimeoutError:
                done.append((shape, timeout, f"{NOT_DONE} the warm-up's {timeout:.0f} s"))
    # (leaving the pool terminates its workers, a hung one too)
    slowest = max(done, key=lambda item: item[1]) if done else None
    return {"shapes": len(shapes), "jobs": jobs, "seconds": round(time.perf_counter() - started, 1),
            "slowest_shape": list(slowest[0]) if slowest else None,
            "slowest_seconds": round(slowest[1], 1) if slowest else None,
            "failures": [{"shape": list(shape), "error": error} for shape, _, error in done if error]}
