"""Timing of one implementation of a case: CUDA events after warm-up (time.perf_counter on a
CPU), the median of many repetitions, and peak memory."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict

import torch


def measure(step: Callable[[], None], device: torch.device, warmup: int = 3, repetitions: int = 20,
            max_seconds: float = 20.0) -> Dict[str, float]:
    """Median and minimum milliseconds of ``step()`` and its peak memory (MiB, CUDA only).

    Repetitions stop early once ``max_seconds`` of timed work have run (at least three are
    always taken), so that a slow implementation (the eager reference at T=1000) cannot stall
    the suite."""
    for _ in range(warmup):
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    spent = 0.0
    while len(times) < repetitions and (len(times) < 3 or spent < max_seconds):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            started = time.perf_counter()
            step()
            elapsed = (time.perf_counter() - started) * 1e3
        times.append(elapsed)
        spent += elapsed / 1e3
    result = {"median_ms": statistics.median(times), "min_ms": min(times), "repetitions": len(times)}
    if cuda:
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return result
