"""Compiles the fused kernels for an NVIDIA GPU on a machine without one, and reports what ptxas
says of each: shared memory, registers, spills.

The Triton interpreter runs the kernels' arithmetic on a CPU but never lowers them: a ``tl.dot``
shape the tensor cores refuse, a tile that needs more shared memory than an SM has, or a construct
only the interpreter accepts would first show up on a GPU. Here every layer runs forward and
backward on CPU tensors while Triton's driver is replaced by one that only compiles (each launch
becomes a warm-up for the chosen target), so every kernel is compiled exactly as a real launch
at that shape would specialize it.

Run as a program (``python tests/gpu_compile.py --help``) for a table, or through
``tests/test_gpu_compile.py``. It must start without ``TRITON_INTERPRET=1``: Triton decides at
import time whether a kernel is interpreted.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional

# the repository's normrnn, also where it is not installed (the GPU machine runs from a checkout)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from normrnn.bench.cases import Case as LayerCase, projection_keyword  # noqa: E402

# Shared memory one block may use on sm_90 (227 KiB opt-in); Triton refuses a launch above it.
SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}


@dataclasses.dataclass
class CompiledKernel:
    """What one compiled specialization of a kernel needs on the GPU."""
    kernel: str
    case: str
    num_warps: int
    shared_bytes: int
    registers: Optional[int]
    spill_bytes: Optional[int]
    cooperative_launch: Optional[bool]
    # the grid barrier as lowered: a gpu-scope release add and gpu-scope acquire reads of the counter
    release_add: bool
    acquire_read: bool
    # loads the source asks to read past L1 (cache_modifier=".cg": data other programs wrote)
    # that compiled to an L1-cached instruction anyway, as "file:line"
    cached_despite_cg: List[str]
    cg_loads_checked: int
    constants: Dict[str, object]
    # kernels compiled with RESIDENT (W_hh loaded once before the step loop): whether every shared
    # memory copy of a weight tile sits outside all loops, i.e. W_hh stays on chip for the launch
    weights_on_chip: Optional[bool] = None


@dataclasses.dataclass
class CompileCase:
    """One layer configuration (the bench's ``Case``; its steps are the sequence length run) with
    padding or not and the launch mode: compiled forward (training, and evaluation under no_grad)
    and backward."""
    layer: LayerCase
    lengths: bool = False
    persistent: bool = False

    @property
    def name(self) -> str:
        layer = self.layer
        mode = " persistent" if self.persistent else ""
        padded = " lengths" if self.lengths else ""
        projection = f" P={layer.proj_size}" if layer.proj_size else ""
        return (f"{layer.cell} norm={layer.norm} {layer.dtype} B={layer.batch} H={layer.hidden_size}{projection}"
                f"{padded}{mode}")


def _case(cell, norm, dtype, batch, hidden_size, proj_size=0, **options) -> CompileCase:
    return CompileCase(LayerCase(cell, norm, dtype, batch, hidden_size, steps=2, proj_size=proj_size), **options)


def cases(full: bool) -> List[CompileCase]:
    """The shapes of the issue: B=64, H=512 for every cell, norm and dtype (the LSTM's also in
    float16); H=2048 with B=256, and batch norm over B=512 (one program walks it in chunks) in
    bfloat16; persistent kernels at B=64, H=512, and under batch norm at B=256 (in chunks); the
    LSTM projecting to P=128 at B=64, H=512 in bfloat16, persistent (step 0's given product, and
    float32 weights under batch norm). ``full`` adds H=2048 for every norm and dtype, and more
    persistent shapes."""
    chosen = []
    for cell in ("lstm", "gru", "rnn"):
        for norm in (None, "layer", "batch"):
            for dtype in ("float32", "bfloat16"):
                chosen.append(_case(cell, norm, dtype, 64, 512))
            chosen.append(_case(cell, norm, "bfloat16", 64, 512, persistent=True))
        chosen.append(_case(cell, "batch", "bfloat16", 256, 512, persistent=True))
        chosen.append(_case(cell, "batch", "bfloat16", 512, 2048))
        chosen.append(_case(cell, "layer", "bfloat16", 256, 2048, lengths=True))
    # float16 (what CUDA autocast defaults to) changes only the operands' dtype: the LSTM's kernels
    for norm in (None, "layer", "batch"):
        chosen.append(_case("lstm", norm, "float16", 64, 512))
    chosen.append(_case("lstm", None, "float16", 64, 512, persistent=True))
    for norm in (None, "layer", "batch"):
        chosen.append(_case("lstm", norm, "bfloat16", 64, 512, proj_size=128, persistent=True))
    if full:
        for cell in ("lstm", "gru", "rnn"):
            for norm in (None, "layer", "batch"):
                for dtype in ("float32", "bfloat16"):
                    chosen.append(_case(cell, norm, dtype, 256, 2048, lengths=True))
        # another shape where the persistent LSTM forward holds W_hh on chip: two batch tiles, H=256
        for norm in (None, "layer"):
            chosen.append(_case("lstm", norm, "bfloat16", 128, 256, persistent=True))
    return chosen


class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: names the target and launches nothing. A compiled
    kernel's launcher (what Triton hands each launch's bound arguments to, and what the per-step
    launches bound once call directly, ``kernels/step_launch.py``) appends the arguments it is
    given to ``launches``."""

    def __init__(self, target, launches: list):
        self.target = target
        self.launches = launches
        self.utils = _NoDeviceUtils()

    def launcher_cls(self, src, metadata):
        # a compiled kernel keeps its launcher for good: the record it appends to is the one of the
        # driver active when it launches
        return _record_launch

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")


def _record_launch(*arguments):
    from triton.runtime import driver
    driver.active.launches.append(arguments)


# the streaming multiprocessors of an H100 (and an H200): the programs a GPU keeps resident, as
# the driver reports them to the launchers that decide between persistent and per-step launches
MULTIPROCESSOR_COUNT = 132


class _NoDeviceUtils:
    """What a compiled kernel asks of the driver when it is first launched: nothing is loaded."""

    def get_device_properties(self, device):
        # no limit here: the report says which kernels do not fit, instead of Triton refusing them
        return {"max_shared_mem": 1 << 30, "multiprocessor_count": MULTIPROCESSOR_COUNT, "max_num_regs": 65536, "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        return object(), object(), 0, 0, 1024  # module, function, registers, spills, threads

    def unload_module(self, module):
        pass


@contextlib.contextmanager
def compile_target(capability: int) -> Iterator[list]:
    """Within it Triton compiles for ``capability`` (90: H100) and every launch goes to a launcher
    that records it in the list it yields and launches nothing."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    import normrnn.triton_backend as triton_backend

    launches: list = []
    original_interpreting = triton_backend._interpreting
    # restored as it was, not reset: resetting creates the default driver, which needs a GPU
    previous_driver = driver._active
    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", capability, 32), launches))
    # the backend's device check: CPU tensors stand in for CUDA ones here
    triton_backend._interpreting = lambda: True
    try:
        yield launches
    finally:
        triton_backend._interpreting = original_interpreting
        driver._active = previous_driver


@contextlib.contextmanager
def compile_only(capability: int) -> Iterator[list]:
    """Within it, a kernel launch through Triton compiles for ``capability`` and launches nothing;
    the compiled kernels of every such launch are appended to the list it yields."""
    from triton.runtime.jit import JITFunction

    compiled: list = []
    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    with compile_target(capability):
        JITFunction.run = run
        try:
            yield compiled
        finally:
            JITFunction.run = original_run


@contextlib.contextmanager
def persistent_launches(enabled: bool) -> Iterator[None]:
    """Makes the launchers choose their persistent kernels, with the launch options they take on a
    CUDA device (a cooperative grid where this Triton has one)."""
    if not enabled:
        yield
        return
    from normrnn.kernels import buffers
    cuda_options = buffers.persistent_launch_options("cuda")
    modules = [module for name, module in list(sys.modules.items())
               if name.startswith("normrnn.kernels.") and module is not buffers and hasattr(module, "launch_mode")]
    saved = [(module, module.launch_mode, module.persistent_launch_options) for module in modules]
    for module in modules:
        module.launch_mode = lambda programs, device: buffers.PERSISTENT
        module.persistent_launch_options = lambda device_type: cuda_options
    try:
        yield
    finally:
        for module, mode, options in saved:
            module.launch_mode = mode
            module.persistent_launch_options = options


@functools.lru_cache(maxsize=None)
def _loads_past_l1(path: str) -> frozenset:
    """Lines of ``path`` where a ``tl.load`` with ``cache_modifier=".cg"`` starts."""
    lines = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                and any(keyword.arg == "cache_modifier" and isinstance(keyword.value, ast.Constant)
                        and keyword.value.value == ".cg" for keyword in node.keywords)):
            lines.add(node.lineno)
    return frozenset(lines)


def cached_despite_cg(ptx: str) -> tuple:
    """Source lines whose loads ask for ".cg" but compiled to an instruction that may be served by
    L1 (``ld.global`` without .cg / an acquire, or ``cp.async.ca``): in the persistent kernels such a
    load could read another program's data as it was before the barrier. Returns those lines, as
    "file:line", and how many load instructions of ".cg" lines were checked."""
    files: Dict[str, str] = {}
    for declared in re.finditer(r'^\s*\.file\s+(\d+)\s+"([^"]*)"(?:,\s*"([^"]*)")?', ptx, re.MULTILINE):
        # (Triton 3.6 declares the files after the code that refers to them)
        directory, name = (declared.group(2), declared.group(3)) if declared.group(3) else ("", declared.group(2))
        files[declared.group(1)] = os.path.join(directory, name)
    location = None
    in_asm = False
    found = set()
    checked = 0
    for line in ptx.splitlines():
        # a load is one inline-asm block, its location the one in effect where the block begins:
        # Triton 3.9 also marks the block's movs of the masked-off value with the lines of other
        # loads merged with it, so the last marker before the load can name another source line
        if "// begin inline asm" in line:
            in_asm = True
        elif "// end inline asm" in line:
            in_asm = False
        marker = re.search(r"\.loc\s+(\d+)\s+(\d+)\s", line)
        if marker:
            if not in_asm:
                location = (files.get(marker.group(1)), int(marker.group(2)))
            continue
        load = re.search(r"\b(ld\.global[.a-z0-9:]*|cp\.async\.c[ag]\.shared\.global)", line)
        if load is None or location is None or location[0] is None or not os.path.isfile(location[0]):
            continue
        instruction = load.group(1)
        past_l1 = ".cg" in instruction or ".acquire" in instruction or ".volatile" in instruction
        if location[1] in _loads_past_l1(location[0]):
            checked += 1
            if not past_l1:
                found.add(f"{Path(location[0]).name}:{location[1]}")
    return sorted(found), checked


def weights_on_chip(ttgir: str, block_h: int, block_k: int, gates: int) -> bool:
    """Whether the shared-memory copies (``ttg.local_alloc``) of the (``block_h``, ``block_k``)
    weight tiles, at least one per gate, all sit at the kernel's top level, outside every loop
    and branch: Triton hoisted them out of the step loop, so each program reads its W_hh rows from
    global memory once per launch and keeps them in shared memory. A copy inside a region would be
    redone every step."""
    shape = re.compile(rf"ttg\.local_alloc %\S+ : \(tensor<({block_h}x{block_k}|{block_k}x{block_h})x")
    depth = 0
    hoisted = inside = 0
    for line in ttgir.splitlines():
        text = line.strip()
        if text.startswith("}"):
            depth -= 1
        if shape.search(text):
            # depth 2: inside the module and the function, in no region of theirs
            if depth == 2:
                hoisted += 1
            else:
                inside += 1
        if text.endswith("{"):
            depth += 1
    return hoisted >= gates and inside == 0


def _ptxas_report(ptx: str, capability: int) -> tuple:
    """(registers, spill bytes) from ``ptxas -v`` on the kernel's PTX, or (None, None) without ptxas."""
    from triton.backends.nvidia.compiler import get_ptxas
    try:
        ptxas = get_ptxas(capability).path
    except Exception:  # noqa: BLE001 - no ptxas with this Triton: the report leaves the columns empty
        return None, None
    suffix = "a" if capability >= 90 else ""
    with tempfile.TemporaryDirectory() as directory:
        source = Path(directory) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{capability}{suffix}", str(source),
                                 "-o", str(Path(directory) / "kernel.cubin")], capture_output=True, text=True)
    text = result.stdout + result.stderr
    registers = re.search(r"Used (\d+) registers", text)
    stores = re.search(r"(\d+) bytes spill stores", text)
    return (int(registers.group(1)) if registers else None, int(stores.group(1)) if stores else None)


def compile_case(case: CompileCase, capability: int) -> List[CompiledKernel]:
    """Compiles every kernel the layer launches forward (training and evaluation) and backward."""
    import torch

    import normrnn
    import normrnn.triton_backend  # noqa: F401 - every cell's launchers' modules, for persistent_launches
    from normrnn.params import CELL_GATES

    shape = case.layer
    layer_class = {"lstm": normrnn.LSTM, "gru": normrnn.GRU, "rnn": normrnn.RNN}[shape.cell]
    dtype = getattr(torch, shape.dtype)
    layer = layer_class(shape.hidden_size, shape.hidden_size, norm=shape.norm, backend="triton",
                        **projection_keyword(shape.proj_size)).to(dtype)
    x = torch.randn(shape.steps, shape.batch, shape.hidden_size, dtype=dtype, requires_grad=True)
    lengths = None
    if case.lengths:
        lengths = torch.full((shape.batch,), shape.steps, dtype=torch.int64)
        lengths[1::2] = 1
    results = []
    with compile_only(capability) as compiled, persistent_launches(case.persistent):
        layer.train()
        output, _ = layer(x) if lengths is None else layer(x, lengths=lengths)
        output.float().sum().backward()
        layer.eval()
        with torch.no_grad():
            layer(x) if lengths is None else layer(x, lengths=lengths)
    seen = set()
    for name, kernel in compiled:
        if id(kernel) in seen:
            continue
        seen.add(id(kernel))
        registers, spills = _ptxas_report(kernel.asm["ptx"], capability)
        constants = _constants(kernel)
        ptx = kernel.asm["ptx"]
        on_chip = None
        if constants.get("RESIDENT"):
            on_chip = weights_on_chip(kernel.asm["ttgir"], constants["BLOCK_H"], constants["BLOCK_K"],
                                      CELL_GATES[shape.cell])
        results.append(CompiledKernel(name, case.name, kernel.metadata.num_warps, kernel.metadata.shared, registers,
                                      spills, getattr(kernel.metadata, "launch_cooperative_grid", None),
                                      re.search(r"\b(red|atom)\.global\.gpu\.release\.add", ptx) is not None,
                                      re.search(r"\b(ld|atom)\.global\.gpu\.acquire", ptx) is not None,
                                      *cached_despite_cg(ptx), constants, on_chip))
    return results


def _constants(kernel) -> Dict[str, object]:
    """The kernel's constexpr arguments by name (NORM, BLOCK_B, ...), where this Triton keeps them."""
    source = getattr(kernel, "src", None)
    if source is None or not hasattr(source, "constants"):
        return {}
    names = source.fn.arg_names
    named = {}
    for key, value in source.constants.items():
        index = key[0] if isinstance(key, tuple) and len(key) == 1 else key
        named[names[index] if isinstance(index, int) and index < len(names) else str(key)] = _plain(value)
    return named


def _plain(value):
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def markdown_table(report: dict) -> str:
    """The report as a markdown table, one row per compiled kernel."""
    lines = [f"# Fused kernels compiled for sm_{report['capability']} (Triton {report['triton']}, no GPU)", "",
             "Written by `python tests/gpu_compile.py --markdown FILE`. Registers and spill stores are ptxas's "
             "(`-v`) per thread; each layer compiles its training forward, backward and evaluation forward.", "",
             "| case | kernel | phase / mode | warps | shared KiB | registers | spill bytes |",
             "|---|---|---|---|---|---|---|"]
    for row in report["kernels"]:
        constants = row["constants"]
        details = [f"PHASE={constants['PHASE']}"] if "PHASE" in constants else []
        if "SAVE" in constants:  # forward kernels: saving for the backward is the training forward
            details.append("train" if constants["SAVE"] else "eval")
        if row.get("weights_on_chip") is not None:
            details.append("W_hh on chip" if row["weights_on_chip"] else "W_hh copied every step")
        lines.append(f"| {row['case']} | {row['kernel']} | {' '.join(details)} | {row['num_warps']} | "
                     f"{row['shared_bytes'] / 1024:.0f} | {row['registers']} | {row['spill_bytes']} |")
    for failure in report["failures"]:
        lines.append(f"| {failure['case']} | FAILED: {failure['error'][:200]} | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capability", type=int, default=90, help="compute capability (90: H100)")
    parser.add_argument("--full", action="store_true", help="also H=2048, B=256 for every norm and dtype")
    parser.add_argument("--only", action="append", default=None,
                        help="run only the cases whose name contains this text (repeatable: any of them)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--markdown", default=None, help="write a table of the results to this file")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="cases compiled at once")
    arguments = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run without TRITON_INTERPRET=1: the kernels must be compiled, not interpreted")
    if "TRITON_CACHE_DIR" not in os.environ:
        # a cache of its own: a kernel cached from another checkout with the same source keeps that
        # checkout's file paths (and line numbers) in its PTX, which the L1 check reads
        with tempfile.TemporaryDirectory(prefix="gpu_compile_cache_") as cache:
            os.environ["TRITON_CACHE_DIR"] = cache
            try:
                return main(argv)
            finally:
                del os.environ["TRITON_CACHE_DIR"]
    import triton
    try:
        importlib.import_module("triton.backends.nvidia.compiler")
    except ImportError as error:
        if arguments.json:
            Path(arguments.json).write_text(json.dumps({"unavailable": f"no NVIDIA backend in Triton: {error}"}))
        print(f"nothing to compile: this Triton has no NVIDIA backend ({error})")
        return 0
    from normrnn.kernels.buffers import persistent_launch_options
    limit = SHARED_MEMORY_LIMIT.get(arguments.capability)
    rows, failures = [], []
    selected = [case for case in cases(arguments.full)
                if arguments.only is None or any(text in case.name for text in arguments.only)]
    with concurrent.futures.ProcessPoolExecutor(max(1, arguments.jobs)) as pool:
        futures = [pool.submit(compile_case, case, arguments.capability) for case in selected]
        for case, future in zip(selected, futures):
            try:
                kernels = future.result()
            except Exception as error:  # noqa: BLE001 - a compile error is this tool's finding
                failures.append({"case": case.name, "error": f"{type(error).__name__}: {error}"[:2000]})
                print(f"FAILED {case.name}: {type(error).__name__}: {str(error)[:400]}", flush=True)
                continue
            for kernel in kernels:
                too_big = limit is not None and kernel.shared_bytes > limit
                rows.append(dataclasses.asdict(kernel) | {"shared_memory_fits": not too_big})
                print(f"{'TOO BIG ' if too_big else ''}{case.name:48s} {kernel.kernel:48s} "
                      f"warps={kernel.num_warps} shared={kernel.shared_bytes:6d} registers={kernel.registers} "
                      f"spills={kernel.spill_bytes}", flush=True)
    report = {"triton": triton.__version__, "capability": arguments.capability, "shared_memory_limit": limit,
              "cooperative_launch_available": bool(persistent_launch_options("cuda").get("launch_cooperative_grid")),
              "kernels": rows, "failures": failures}
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(report, indent=1))
    if arguments.markdown:
        Path(arguments.markdown).write_text(markdown_table(report))
    bad = failures or [row for row in rows if not row["shared_memory_fits"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
