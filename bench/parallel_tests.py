"""Runs pytest over test files in several processes at once, without pytest-xdist.

On a fresh GPU machine the kernel tests are bound by Triton compiling a few hundred small kernel
specializations, one after another in one process: minutes. Here the collected tests are dealt
round-robin to ``--processes`` pytest processes that run at the same time (kernels that two of
them need are compiled twice at worst; Triton's on-disk cache takes both). Each process's output
is printed when all have finished, then one line per process; the exit status is the worst of
theirs.

    python3 bench/parallel_tests.py --processes 8 tests/test_triton_lstm.py -- --timeout 120

Run it from a folder that holds the test files (the repository root): node ids are relative to it.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List


def collect(paths: List[str], pytest_args: List[str]) -> List[str]:
    """The node ids pytest collects from ``paths``."""
    # ids relative to the working directory, where the children run them
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             f"--rootdir={os.getcwd()}", *pytest_args, *paths], capture_output=True, text=True)
    ids = [line.strip() for line in result.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if not ids:
        raise SystemExit(f"no tests collected from {paths}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return ids


def deal(ids: List[str], processes: int) -> List[List[str]]:
    """``ids`` dealt round-robin into at most ``processes`` non-empty shares."""
    shares = [ids[start::processes] for start in range(processes)]
    return [share for share in shares if share]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=8)
    # in a child: run the node ids listed in this file (through a file: a command line of a few
    # hundred ids could pass the system's limit)
    parser.add_argument("--share", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help="test files; pytest's own options after --")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    arguments, pytest_args = parser.parse_args(argv[:cut]), argv[cut + 1:]
    if arguments.share:
        # this script's folder (bench/) is first on the path of a script: tests must not import from it
        sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]
        import pytest
        ids = Path(arguments.share).read_text().split("\n")
        return int(pytest.main(["-q", "-p", "no:cacheprovider", f"--rootdir={os.getcwd()}", *pytest_args, *ids]))
    if not arguments.paths:
        parser.error("name the test files")
    shares = deal(collect(arguments.paths, pytest_args), max(1, arguments.processes))
    with tempfile.TemporaryDirectory() as directory:
        running = []
        for index, share in enumerate(shares):
            ids_file = Path(directory) / f"share{index}.txt"
            ids_file.write_text("\n".join(share))
            log = open(Path(directory) / f"share{index}.log", "w+")
            command = [sys.executable, __file__, "--share", str(ids_file), "--", *pytest_args]
            running.append((share, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log))

        def stop(signal_number, frame):
            # a time limit (timeout(1) sends SIGTERM to this process only) stops the children too,
            # and what they printed so far is shown
            for _, process, _ in running:
                process.kill()
            for index, (share, process, log) in enumerate(running):
                log.seek(0)
                print(f"--- process {index}: {len(share)} tests, stopped\n{log.read()}", flush=True)
            sys.exit(128 + signal_number)

        signal.signal(signal.SIGTERM, stop)
        statuses = []
        for index, (share, process, log) in enumerate(running):
            statuses.append(process.wait())
            log.seek(0)
            print(f"--- process {index}: {len(share)} tests, exit {statuses[-1]}")
            print(log.read(), flush=True)
            log.close()
    for index, ((share, _, _), status) in enumerate(zip(running, statuses)):
        print(f"process {index}: {len(share)} tests, exit {status}")
    return max(statuses)


if __name__ == "__main__":
    sys.exit(main())
