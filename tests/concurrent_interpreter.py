"""Runs the programs of a Triton launch at once, each in its own thread, under the interpreter.

Triton's interpreter runs the programs of a launch one after another, so a persistent kernel,
whose programs wait for each other at a grid barrier every step, can run there only as a single
program: the barrier's counting, the exchange of h, dz and the layer norm's partial statistics
between programs, and the order of a step's phases would first be exercised on a GPU. Inside
``concurrent_programs()`` every program of an interpreted launch runs in a thread of its own, all
started before any is awaited, as a GPU runs a co-resident grid; they share the launch's memory,
and the interpreter's atomics (C++ std::atomic operations) are the barrier's. Threads switch
often; one program of each launch (another from launch to launch) sleeps at every load, store and
atomic, and the others at random (seeded) ones, so that the programs drift apart between
barriers: a read of what another program has not yet written (poisoned with NaN by the tests), or
a write over what another has not yet read, shows up as a wrong result instead of passing by the
luck of the schedule.

A barrier that never opens would spin forever: a launch that has not finished within ``timeout``
seconds is aborted (each program stops at its next atomic or memory access) and raises
``LaunchTimeout``. What this cannot show: the GPU's memory model (stores reach other threads here
at once, L1 or not); that is what the compile check (``tests/gpu_compile.py``) and the GPU run are
for.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import random
import sys
import threading
import time
import types
from typing import Iterator


class LaunchTimeout(RuntimeError):
    """The programs of a launch did not all finish in time: a barrier that never opened."""


class _Aborted(BaseException):
    """Stops a program's thread once its launch has been given up (not an Exception: the
    interpreter's own handlers must not catch and wrap it)."""


@contextlib.contextmanager
def concurrent_programs(timeout: float = 300.0, seed: int = 0, pause_probability: float = 0.05,
                        lag: float = 2e-3) -> Iterator[dict]:
    """Within this context, interpreted launches run all their programs at once, in threads.

    Yields a dict that counts the launches (``"launches"``) and the most programs one had at once
    (``"widest"``), so that a test can assert its kernels really ran concurrently. Meanwhile the
    launchers' ``launch_mode`` lets a grid of any size be persistent
    (``buffers.INTERPRETER_RESIDENT_PROGRAMS``). ``lag``: the laggard's sleep at every memory
    access, in seconds; ``pause_probability``: how often the others sleep, up to 2 ms."""
    from triton.runtime import interpreter
    from normrnn.kernels import buffers

    builder = interpreter.interpreter_builder
    original_class = type(builder)
    original_call = interpreter.GridExecutor.__call__
    local = threading.local()
    record = {"launches": 0, "widest": 0}

    def pause():
        if not hasattr(local, "abort"):
            return  # the launching thread
        if local.abort.is_set():
            raise _Aborted()
        if local.laggard:
            time.sleep(lag)
        elif local.random.random() < pause_probability:
            # a pause of up to 2 ms lets the other programs run ahead of this one
            time.sleep(local.random.random() * 2e-3)

    class ConcurrentBuilder(original_class):
        # the index of the program is the thread's own: the interpreter keeps it on its one builder
        @property
        def grid_idx(self):
            return getattr(local, "grid_idx", None)

        @grid_idx.setter
        def grid_idx(self, value):
            local.grid_idx = value

        def create_atomic_rmw(self, *args, **kwargs):
            pause()
            return super().create_atomic_rmw(*args, **kwargs)

        def create_masked_load(self, *args, **kwargs):
            pause()
            return super().create_masked_load(*args, **kwargs)

        def create_masked_store(self, *args, **kwargs):
            pause()
            return super().create_masked_store(*args, **kwargs)

    def concurrent_call(executor, *args, **kwargs):
        kernel = executor.fn
        threads, failures = [], []
        abort = threading.Event()

        def program(index, laggard, arguments):
            local.grid_idx = index
            local.abort = abort
            local.random = random.Random(hash((seed, record["launches"], index)))
            local.laggard = laggard
            try:
                kernel(**arguments)
            except _Aborted:
                pass
            except BaseException as error:  # noqa: B902 - handed to the launching thread
                failures.append(error)
                abort.set()

        def start_program(**arguments):
            # the interpreter's loop over the grid calls this once per program, with the index set
            index, programs = builder.grid_idx, math.prod(builder.grid_dim)
            # one program of each launch lags behind the others at every memory access, a
            # different one from launch to launch
            laggard = len(threads) == (seed + record["launches"]) % programs
            thread = threading.Thread(target=program, args=(index, laggard, arguments), daemon=True)
            threads.append(thread)
            thread.start()
            if len(threads) == programs:
                _await(threads, timeout, abort, kernel)
                if failures:
                    raise failures[0]
                record["launches"] += 1
                record["widest"] = max(record["widest"], len(threads))

        executor.fn = _standing_in_for(kernel, start_program)
        try:
            return original_call(executor, *args, **kwargs)
        finally:
            executor.fn = kernel

    # a device function's first call rewrites it and adds names to its module's globals while
    # another program's call iterates over them to patch triton.language: one at a time
    preparing = threading.RLock()
    original_patch, original_rewrite = interpreter._patch_lang, interpreter.InterpretedFunction.rewrite

    def patch_lang(fn):
        with preparing:
            return original_patch(fn)

    def rewrite(function):
        with preparing:
            return original_rewrite(function)

    switch_interval = sys.getswitchinterval()
    resident = buffers.INTERPRETER_RESIDENT_PROGRAMS
    builder.__class__ = ConcurrentBuilder
    interpreter.GridExecutor.__call__ = concurrent_call
    interpreter._patch_lang = patch_lang
    interpreter.InterpretedFunction.rewrite = rewrite
    buffers.INTERPRETER_RESIDENT_PROGRAMS = sys.maxsize
    sys.setswitchinterval(1e-4)
    try:
        yield record
    finally:
        sys.setswitchinterval(switch_interval)
        buffers.INTERPRETER_RESIDENT_PROGRAMS = resident
        interpreter.InterpretedFunction.rewrite = original_rewrite
        interpreter._patch_lang = original_patch
        interpreter.GridExecutor.__call__ = original_call
        builder.__class__ = original_class


def _standing_in_for(kernel, target):
    """A function that calls ``target`` and looks like ``kernel`` to the interpreter, which reads
    the signature and the globals (where it finds triton.language to patch) of what it calls."""
    def stand_in(**arguments):
        return target(**arguments)
    function = types.FunctionType(stand_in.__code__, kernel.__globals__, kernel.__name__, None, stand_in.__closure__)
    function.__signature__ = inspect.signature(kernel)
    return function


def _await(threads, timeout: float, abort: threading.Event, kernel) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        abort.set()
        for thread in threads:
            thread.join(10.0)
        name = getattr(kernel, "__name__", "kernel")
        raise LaunchTimeout(f"{name}: {len(threads)} programs did not finish within {timeout:.0f} s "
                            "(a grid barrier that never opened?)")
