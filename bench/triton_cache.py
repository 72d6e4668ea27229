"""Triton's cache of compiled kernels, built on a machine without a GPU for the project's GPU
machine, so that a session there spends its device time running kernels, not compiling them.

    python bench/triton_cache.py build [--jobs N] [--out .whl/triton-cache.tar.xz]   # here
    python bench/triton_cache.py install .whl/triton-cache.tar.xz                   # there
    python bench/triton_cache.py count                                              # kernels cached

Triton compiles a kernel specialization at its first launch, in the launching process. A GPU
session (``bench/gpu_session.sh``; 15 minutes of device time, the machine's start included) first
runs the kernel tests, which launch several hundred small specializations, then the bench, whose
warm-up compiles every launch mode of each layer shape it times (a few seconds each at H=512).
``build`` compiles all of them here for sm_90 (``tests/compile_only_plugin.py``: every launch
compiled as on the GPU and launched nowhere) into ``CACHE_DIR``, and packs the cubins into an
archive that the session carries in ``.whl``:

- the kernel tests of ``bench/kernel_tests.txt``, with per-step launches and with
  ``NORMRNN_PERSISTENT=1``: their values are not computed, so most of them fail, after their
  launches;
- every launch mode of every layer shape that ``python -m normrnn bench --quick`` warms up
  (``warmup.shapes_of`` its grid and its correctness checks).

A cached kernel is found where its key matches: a hash of Triton's own files and of libtriton (so
the same Triton release built for the same Python: the GPU machine has Triton 3.6.0 under Python
3.12, ``GPU_MACHINE``), ptxas's version (Triton's own), the target, the launch options, the
specialization and the kernel's source with the functions it calls. A cache entry names its files
by absolute path, so the cache lives at the same fixed path on both machines. ``install`` unpacks
the archive there when its manifest names this machine's Triton (release, files and ptxas) and
Python (otherwise it says what differs and unpacks nothing); whatever does not match is compiled
at its launch as before, and ``gpu_session.sh`` logs how many kernels the session still compiled.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script from a checkout: its normrnn, installed or not
    sys.path.insert(0, str(ROOT))
CACHE_DIR = Path("/tmp/normrnn-triton-cache")
MANIFEST = "normrnn-manifest.json"
DEFAULT_ARCHIVE = ROOT / ".whl" / "triton-cache.tar.xz"
# what the project's GPU machine runs (its device tool's notes): the cache key depends on both
GPU_MACHINE = {"triton": "3.6.0", "python": "3.12"}


def kernel_tests() -> List[str]:
    """The node ids of ``bench/kernel_tests.txt``."""
    lines = (ROOT / "bench" / "kernel_tests.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def this_machine() -> Dict[str, str]:
    """What a cache entry's key depends on besides the kernels and their launches: Triton's
    release, Python's minor version (Triton's wheels differ by it), the processor architecture,
    the hash of Triton's own files and library (``triton_key``, shortened) and the ptxas that
    compiles for sm_90 (Triton's own, unless ``TRITON_PTXAS_PATH`` names another)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import triton_key
    backend = make_backend(GPUTarget("cuda", 90, 32)).hash()
    ptxas = [line.strip() for line in backend.splitlines() if "release" in line]
    return {"triton": triton.__version__, "python": ".".join(platform.python_version_tuple()[:2]),
            "machine": platform.machine(), "triton_key": hashlib.sha256(triton_key().encode()).hexdigest()[:16],
            "ptxas": ptxas[0] if ptxas else backend}


def kernel_sources_digest() -> str:
    """sha256 over ``kernels/*.py``: whether the cached kernels were built from these sources."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "kernels").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def count(cache_dir: Optional[Path] = None) -> int:
    """Kernels in the cache: one entry (a folder with a group file) each."""
    cache_dir = CACHE_DIR if cache_dir is None else cache_dir
    if not cache_dir.is_dir():
        return 0
    return sum(1 for entry in cache_dir.iterdir() if entry.is_dir() and any(entry.glob("__grp__*.json")))


def compile_environment(cache_dir: Optional[Path] = None) -> Dict[str, str]:
    """The environment of a process that compiles into the cache (``cache_dir``, default
    ``CACHE_DIR``) what it launches: cubins only, compiled kernels (not interpreted), the
    repository and its tests importable."""
    cache_dir = CACHE_DIR if cache_dir is None else cache_dir
    environment = dict(os.environ, TRITON_CACHE_DIR=str(cache_dir), TRITON_STORE_BINARY_ONLY="1",
                       TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    environment.pop("NORMRNN_PERSISTENT", None)
    return environment


def _compile_tests(jobs: int, persistent: bool, log) -> int:
    """Runs the kernel tests under the compile-only plugin in ``jobs`` pytest processes."""
    environment = compile_environment()
    if persistent:
        environment["NORMRNN_PERSISTENT"] = "1"
    command = [sys.executable, str(ROOT / "bench" / "parallel_tests.py"), "--processes", str(jobs), *kernel_tests(),
               "--", "-p", "compile_only_plugin"]
    return subprocess.run(command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT).returncode


def _compile_shape(shape) -> tuple:
    """In a worker: every launch mode of one bench shape, compiled as on the GPU."""
    os.environ.update(compile_environment())
    sys.path[:0] = [path for path in (str(ROOT), str(ROOT / "tests")) if path not in sys.path]
    from compile_only_plugin import compile_as_on_the_gpu

    from normrnn.bench.warmup import _launch_every_mode
    compile_as_on_the_gpu()
    return _launch_every_mode(shape, "cpu", True)


def bench_shapes() -> list:
    """The layer shapes that ``bench --quick`` warms up."""
    from normrnn.bench.cases import quick_grid
    from normrnn.bench.correctness import check_plans
    from normrnn.bench.warmup import shapes_of
    return shapes_of(quick_grid(), [arguments for _, arguments in check_plans(True)])


def build(out: Path, jobs: int) -> int:
    """Compiles, into an emptied ``CACHE_DIR``, what the kernel tests launch (per-step, then
    persistent) and what the quick bench warms up, in ``jobs`` processes, and packs it into
    ``out``. Exit status 1 where a bench shape failed to compile."""
    machine = this_machine()
    for key, wanted in GPU_MACHINE.items():
        if machine[key] != wanted:
            print(f"warning: this {key} is {machine[key]}, the GPU machine's {wanted}: its Triton will find none "
                  "of these kernels", flush=True)
    shutil.rmtree(CACHE_DIR, ignore_errors=True)
    CACHE_DIR.mkdir(parents=True)
    started = time.perf_counter()
    parts = {}
    with tempfile.TemporaryDirectory() as directory:
        for persistent in (False, True):
            name = "tests, persistent" if persistent else "tests, per-step"
            before = count()
            with open(Path(directory) / "tests.log", "w+") as log:
                status = _compile_tests(jobs, persistent, log)
                log.seek(0)
                summary = [line for line in log.read().splitlines() if line.startswith("process ")]
            parts[name] = {"kernels": count() - before, "pytest processes": summary}
            print(f"{name}: {count() - before} kernels compiled ({time.perf_counter() - started:.0f} s; pytest "
                  f"exit {status}: the tests fail where they compare values, which nobody computed)", flush=True)
    before = count()
    shapes = bench_shapes()
    with multiprocessing.get_context("spawn").Pool(max(1, jobs)) as pool:
        errors = [(shape, error) for shape, _, error in pool.imap_unordered(_compile_shape, shapes) if error]
    parts["bench --quick warm-up"] = {"kernels": count() - before, "shapes": len(shapes),
                                      "errors": [f"{shape}: {error}" for shape, error in errors]}
    print(f"bench --quick: {count() - before} kernels compiled for {len(shapes)} layer shapes "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    for shape, error in errors:
        print(f"  {shape}: {error}", flush=True)
    manifest = pack(out, dict(seconds=round(time.perf_counter() - started), parts=parts))
    print(f"{out}: {manifest['kernels']} kernels, {out.stat().st_size / 2**20:.1f} MiB", flush=True)
    return 1 if errors else 0


def pack(out: Path, details: dict) -> dict:
    """Writes the manifest (this machine's Triton, Python and architecture, the cache's path, the
    kernels' sources, ``details``) into ``CACHE_DIR`` and packs the folder into ``out``."""
    manifest = dict(this_machine(), cache_dir=str(CACHE_DIR), kernels=count(),
                    kernel_sources=kernel_sources_digest(), built=time.strftime("%Y-%m-%d %H:%M:%S"), **details)
    (CACHE_DIR / MANIFEST).write_text(json.dumps(manifest, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:xz") as archive:
        archive.add(CACHE_DIR, arcname=CACHE_DIR.name, filter=_binaries_only)
    return manifest


def _binaries_only(member: tarfile.TarInfo) -> Optional[tarfile.TarInfo]:
    """Leaves out each entry's Triton IR (``.source``), which Triton writes even with
    TRITON_STORE_BINARY_ONLY and never reads back: a cached kernel is loaded from its cubin and
    metadata, and a group's files that are missing are left out of it (``get_group``)."""
    return None if member.name.endswith(".source") else member


def _manifest(archive_path: Path) -> Optional[dict]:
    with tarfile.open(archive_path) as archive:
        member = archive.extractfile(f"{CACHE_DIR.name}/{MANIFEST}")
        return json.loads(member.read()) if member else None


def install(archive_path: Path) -> int:
    """Unpacks the archive at ``CACHE_DIR`` where it was built for this machine's Triton and
    Python; exit status 1, with the reason, where not (nothing unpacked)."""
    manifest = _manifest(archive_path)
    if manifest is None:
        print(f"{archive_path}: no {MANIFEST} in it: not installed")
        return 1
    # an entry's group file names its files by absolute path: the cache is found only where it was built
    machine = dict(this_machine(), cache_dir=str(CACHE_DIR))
    differing = [f"{key} {manifest.get(key)} (here {value})" for key, value in machine.items()
                 if manifest.get(key) != value]
    if differing:
        print(f"{archive_path}: built for another {', '.join(differing)}: not installed")
        return 1
    shutil.rmtree(CACHE_DIR, ignore_errors=True)
    with tarfile.open(archive_path) as archive:
        if hasattr(tarfile, "data_filter"):  # refuses links and paths out of the folder
            archive.extractall(CACHE_DIR.parent, filter="data")
        else:
            archive.extractall(CACHE_DIR.parent)
    same = manifest.get("kernel_sources") == kernel_sources_digest()
    print(f"Triton cache: {count()} kernels in {CACHE_DIR}, built {manifest.get('built')} for Triton "
          f"{manifest['triton']}, Python {manifest['python']}"
          + ("" if same else "; kernels/ has changed since: the changed kernels are compiled again"))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="compile the session's kernels for sm_90 and pack them")
    build_parser.add_argument("--out", type=Path, default=DEFAULT_ARCHIVE)
    build_parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    install_parser = commands.add_parser("install", help=f"unpack an archive at {CACHE_DIR}")
    install_parser.add_argument("archive", type=Path)
    commands.add_parser("count", help="kernels in the cache")
    commands.add_parser("dir", help="where the cache lives (TRITON_CACHE_DIR)")
    arguments = parser.parse_args(argv)
    if arguments.command == "build":
        return build(arguments.out, arguments.jobs)
    if arguments.command == "install":
        return install(arguments.archive)
    print(count() if arguments.command == "count" else CACHE_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
