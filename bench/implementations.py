"""Builders of every implementation timed for a case. Each returns a ``Runner`` (an eval-mode
forward and a training step) or raises ``Skip`` with the reason, which the results record: a
missing peer is never skipped silently.

    normrnn-triton      normrnn layer, backend="triton" (the fused kernels, one launch per step)
    normrnn-persistent  the same with the persistent kernels (NORMRNN_PERSISTENT=1: one launch per
                        layer and direction, a grid barrier between steps), where the grid fits
    normrnn-persistent-streamed
                        the persistent kernels with W_hh read from L2 every step instead of held
                        on chip (what keeping it on chip buys; norm None or layer, every cell)
    normrnn-graphs      normrnn-triton under torch.compile(mode="reduce-overhead"): the per-step
                        launches replayed from CUDA graphs, without a host launch per step
    normrnn-triton-rebinding
                        normrnn-triton with every per-step launch through Triton's binding
                        (NORMRNN_STEP_LAUNCH=triton) instead of bound once: what binding saves
    normrnn-reference   normrnn layer, backend="reference" (eager PyTorch, one step at a time)
    reference-compiled  the reference layer under torch.compile
    cudnn               torch.nn.LSTM / GRU / RNN: no normalization, the speed bar of every row
    haste               haste_pytorch LSTM / LayerNormLSTM / GRU / LayerNormGRU when it imports
    flashrnn            FlashRNN's fused CUDA LSTM / GRU / Elman when it imports, with its input
                        projection (``flashrnn_peer.py``)

CPU section: normrnn-cpp (the C++ backend), normrnn-cpp-mm (the same with every recurrent
product on ATen's mm, NORMRNN_CPU_MATMUL=aten: what its oneDNN products buy), normrnn-reference,
torch-cpu (torch's CPU module), and gemm-floor: only the matrix products that every implementation
of the cell must run, with ATen's mm and preallocated outputs (a lower bound on what is built on mm,
normalizations adding elementwise work only; torch's CPU LSTM runs on oneDNN's RNN primitive, and
normrnn-cpp its large recurrent products on oneDNN's linear, both faster than mm here, so both can
be below it).
"""
from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import nn

import normrnn
from normrnn import dispatch
from normrnn.params import CELL_GATES

from .cases import Case, projection_keyword
from .flashrnn_peer import FlashRNNLayer

# The eager reference and torch.compile of its unrolled loop take minutes at these sizes: they
# are timed up to this many hidden units x timesteps and skipped, with this reason, above it.
EAGER_LIMIT = 512 * 1000
COMPILE_STEP_LIMIT = 100


class Skip(Exception):
    """This implementation cannot or should not run this case; the message says why."""


@dataclass
class Runner:
    forward_eval: Callable[[], None]
    train_step: Optional[Callable[[], None]]
    train_skip_reason: Optional[str] = None


def _dtype(case: Case) -> torch.dtype:
    return getattr(torch, case.dtype)


def _inputs(case: Case, device, batch_first: bool = False):
    shape = (case.batch, case.steps, case.input_size) if batch_first else (case.steps, case.batch, case.input_size)
    return torch.randn(shape, device=device, dtype=_dtype(case))


def _module_runner(module: nn.Module, x: torch.Tensor, train_skip_reason: Optional[str] = None) -> Runner:
    grad = None

    def forward_eval():
        module.eval()
        with torch.no_grad():
            module(x)

    def train_step():
        nonlocal grad
        module.train()
        output = module(x)[0]
        if grad is None:
            grad = torch.randn_like(output)
        output.backward(grad)

    return Runner(forward_eval, None if train_skip_reason else train_step, train_skip_reason)


def _normrnn_layer(case: Case, device, backend: str) -> nn.Module:
    cls = {"lstm": normrnn.LSTM, "gru": normrnn.GRU, "rnn": normrnn.RNN}[case.cell]
    layer = cls(case.input_size, case.hidden_size, norm=case.norm, backend=backend, max_steps=case.steps,
                **projection_keyword(case.proj_size))
    return layer.to(device, _dtype(case))


def _batch_of_one_reason(case: Case) -> Optional[str]:
    if case.norm == "batch" and case.batch < 2:
        return "batch norm in training needs at least 2 sequences"
    return None


def normrnn_triton(case: Case, device) -> Runner:
    probe = torch.zeros(1, device=device, dtype=_dtype(case))
    reason = dispatch.unavailable_reason("triton", case.cell, case.norm, probe)
    if reason is not None:
        raise Skip(f"the triton backend cannot run this case: {reason}")
    return _module_runner(_normrnn_layer(case, device, "triton"), _inputs(case, device), _batch_of_one_reason(case))


@contextlib.contextmanager
def environment_variable(name: str, value: str):
    """``name=value`` in the environment within it (a launcher setting the layers read when they
    launch), as it was after it."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def persistent_requested():
    """Within it, the launchers choose their persistent kernels where the grid can be resident."""
    return environment_variable("NORMRNN_PERSISTENT", "1")


def normrnn_persistent(case: Case, device) -> Runner:
    """The fused layer with its persistent kernels; skipped, with the reason, where the launchers
    would fall back to per-step launches because the grid cannot be resident at once."""
    from normrnn.kernels.buffers import PERSISTENT, launch_mode
    from normrnn.kernels.layout import grid_programs
    runner = normrnn_triton(case, device)
    # the training step's grid and the evaluation's (batch norm tiles the batch only there)
    programs = max(grid_programs(case.batch, case.hidden_size, case.norm == "batch", training)
                   for training in (True, False))
    with persistent_requested():
        mode = launch_mode(programs, device)
    if mode != PERSISTENT:
        raise Skip(f"a grid of {programs} programs cannot be resident at once here: the launchers would run "
                   "one launch per step (normrnn-triton)")
    return _runner_within(persistent_requested, runner)


def _runner_within(context, runner: Runner) -> Runner:
    """``runner`` with each call made inside a fresh ``context()`` (a launcher setting that the
    layers read when they launch, not when they are built)."""
    def within(function):
        def run():
            with context():
                function()
        return run

    return Runner(within(runner.forward_eval), runner.train_step and within(runner.train_step),
                  runner.train_skip_reason)


@contextlib.contextmanager
def weights_streamed():
    from normrnn.kernels import layout
    previous = layout.RESIDENT_OPERAND_BYTES
    layout.RESIDENT_OPERAND_BYTES = 0
    try:
        yield
    finally:
        layout.RESIDENT_OPERAND_BYTES = previous


def weights_streamed_anyway(case: Case) -> Optional[str]:
    """Why normrnn-persistent already streams W_hh at ``case`` (None: it holds it on chip, as the
    launchers decide with ``resident_tiles``), so that streaming it would change nothing."""
    from normrnn.kernels.layout import NORM_LAYER, NORM_NONE, resident_tiles, step_layout
    if case.norm not in (None, "layer"):
        return ("only the persistent forward without norm or with layer norm holds W_hh on chip (under batch "
                "norm h and the product stay float32)")
    dtype = _dtype(case)
    norm = NORM_NONE if case.norm is None else NORM_LAYER
    layout = step_layout(case.batch, case.hidden_size, norm, training=False)
    if not resident_tiles(layout, CELL_GATES[case.cell], case.hidden_size, dtype, norm)["RESIDENT"]:
        return ("W_hh is not held on chip at this shape and dtype (resident_weights): normrnn-persistent "
                "streams it already")
    return None


def normrnn_persistent_streamed(case: Case, device) -> Runner:
    """normrnn-persistent with the forward's W_hh streamed from memory every step (as where it does
    not fit on chip): beside normrnn-persistent, the measured worth of the resident weights.
    Skipped where normrnn-persistent streams them too."""
    reason = weights_streamed_anyway(case)
    if reason is not None:
        raise Skip(reason)
    return _runner_within(weights_streamed, normrnn_persistent(case, device))


def normrnn_graphs(case: Case, device) -> Runner:
    """The fused layer compiled with mode="reduce-overhead", which records its launches in CUDA
    graphs: a per-step launch then costs a replay, not a launch from the host (bound once, or
    through Triton's binding)."""
    if device.type != "cuda":
        raise Skip("CUDA graphs need a CUDA device")
    normrnn_triton(case, device)  # raises Skip where the kernels cannot run the case
    compiled = torch.compile(_normrnn_layer(case, device, "triton"), mode="reduce-overhead")
    return _module_runner(compiled, _inputs(case, device), _batch_of_one_reason(case))


def launches_rebound():
    """Within it, every per-step launch goes through Triton's binding (``kernels/step_launch.py``)."""
    return environment_variable("NORMRNN_STEP_LAUNCH", "triton")


def normrnn_triton_rebinding(case: Case, device) -> Runner:
    """normrnn-triton with Triton binding the arguments of every per-step launch again
    (``kernels/step_launch.py``): beside normrnn-triton, the host time that binding once saves."""
    return _runner_within(launches_rebound, normrnn_triton(case, device))


def normrnn_reference(case: Case, device) -> Runner:
    if case.hidden_size * case.steps > EAGER_LIMIT:
        raise Skip(f"eager reference skipped above H x T = {EAGER_LIMIT} (minutes per step)")
    return _module_runner(_normrnn_layer(case, device, "reference"), _inputs(case, device), _batch_of_one_reason(case))


def reference_compiled(case: Case, device) -> Runner:
    if case.steps > COMPILE_STEP_LIMIT:
        raise Skip(f"torch.compile of the unrolled reference skipped above T = {COMPILE_STEP_LIMIT} "
                   "(compilation takes minutes)")
    if case.hidden_size * case.steps > EAGER_LIMIT:
        raise Skip(f"compiled reference skipped above H x T = {EAGER_LIMIT}")
    layer = _normrnn_layer(case, device, "reference")
    compiled = torch.compile(layer)
    return _module_runner(compiled, _inputs(case, device), _batch_of_one_reason(case))


def cudnn(case: Case, device) -> Runner:
    cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[case.cell]
    layer = cls(case.input_size, case.hidden_size, **projection_keyword(case.proj_size))
    return _module_runner(layer.to(device, _dtype(case)), _inputs(case, device))


# the dtypes each Haste layer's CUDA code dispatches on (its frameworks/pytorch/*.cc, 0.5.0rc0):
# bfloat16 nowhere, float16 in the plain GRU only
HASTE_LAYERS = {("lstm", None): ("LSTM", ("float32",)),
                ("lstm", "layer"): ("LayerNormLSTM", ("float32",)),
                ("gru", None): ("GRU", ("float32", "float16")),
                ("gru", "layer"): ("LayerNormGRU", ("float32",))}


def haste(case: Case, device) -> Runner:
    """Haste's layer for the case's cell and norm (built for the GPU machine by
    bench/build_haste.sh, carried as a wheel)."""
    try:
        module = importlib.import_module("haste_pytorch")
    except ImportError as error:
        raise Skip(f"haste_pytorch is not installed ({error})")
    if case.proj_size:
        raise Skip("Haste has no output projection (proj_size)")
    if (case.cell, case.norm) not in HASTE_LAYERS:
        raise Skip(f"Haste has no {case.cell} with norm={case.norm}")
    name, dtypes = HASTE_LAYERS[case.cell, case.norm]
    if case.dtype not in dtypes:
        raise Skip(f"Haste's {name} has no {case.dtype} kernels (it has {', '.join(dtypes)})")
    if device.type != "cuda":
        raise Skip("Haste runs on CUDA only")
    if not hasattr(module, name):  # LayerNormGRU came after the first releases
        raise Skip(f"this haste_pytorch has no {name}")
    layer = getattr(module, name)(case.input_size, case.hidden_size, batch_first=False).to(device, _dtype(case))
    return _module_runner(layer, _inputs(case, device))


def flashrnn(case: Case, device) -> Runner:
    try:
        importlib.import_module("flashrnn.flashrnn")
    except ImportError as error:
        raise Skip(f"flashrnn is not installed ({error})")
    if device.type != "cuda":
        raise Skip("FlashRNN's fused kernels run on CUDA only")
    if case.norm is not None:
        raise Skip("FlashRNN has no normalized cells")
    if case.proj_size:
        raise Skip("FlashRNN has no output projection (proj_size)")
    # its fused kernel compiles (nvcc) at the first call: in the warm-up, outside the timing
    layer = FlashRNNLayer(case.cell, case.input_size, case.hidden_size, "cuda_fused", device, _dtype(case))
    return _module_runner(layer, _inputs(case, device))


IMPLEMENTATIONS: Dict[str, Callable[[Case, torch.device], Runner]] = {
    "normrnn-triton": normrnn_triton,
    "normrnn-persistent": normrnn_persistent,
    "normrnn-persistent-streamed": normrnn_persistent_streamed,
    "normrnn-graphs": normrnn_graphs,
    "normrnn-triton-rebinding": normrnn_triton_rebinding,
    "normrnn-reference": normrnn_reference,
    "reference-compiled": reference_compiled,
    "cudnn": cudnn,
    "haste": haste,
    "flashrnn": flashrnn,
}
CPU_IMPLEMENTATIONS = ("normrnn-cpp", "normrnn-cpp-mm", "normrnn-reference", "torch-cpu", "gemm-floor")


def gemm_floor(case: Case, device) -> Runner:
    """The matrix products of one layer, nothing else. Forward: x W_ih^T for all steps in one
    product, then h_{t-1} W_hh^T step by step. Training adds dx = dwx W_ih, dW_ih = dwx^T x,
    dW_hh = dwh^T h in one product each, and dh_{t-1} = dwh_t W_hh step by step. With an output
    projection (proj_size P) h has P features, and each step adds h_t = r_t W_hr^T forward and
    dr_t = dh_t W_hr backward, and training dW_hr = dh^T r in one product."""
    dtype, hidden = _dtype(case), case.hidden_size
    state = case.proj_size or hidden
    gates = CELL_GATES[case.cell] * hidden
    rows = case.steps * case.batch
    x = torch.randn(rows, case.input_size, device=device, dtype=dtype)
    w_ih = torch.randn(gates, case.input_size, device=device, dtype=dtype)
    w_hh = torch.randn(gates, state, device=device, dtype=dtype)
    projected = torch.empty(rows, gates, device=device, dtype=dtype)
    states = torch.randn(case.steps, case.batch, state, device=device, dtype=dtype) * 0.1
    step_out = torch.empty(case.batch, gates, device=device, dtype=dtype)
    grad_gates = torch.randn(case.steps, case.batch, gates, device=device, dtype=dtype)
    grad_h = torch.empty(case.batch, state, device=device, dtype=dtype)
    grad_x = torch.empty(rows, case.input_size, device=device, dtype=dtype)
    grad_w_ih, grad_w_hh = torch.empty_like(w_ih), torch.empty_like(w_hh)
    w_hh_t = w_hh.t()
    if case.proj_size:
        w_hr = torch.randn(state, hidden, device=device, dtype=dtype)
        cell_outputs = torch.randn(case.steps, case.batch, hidden, device=device, dtype=dtype)
        grad_states = torch.randn(case.steps, case.batch, state, device=device, dtype=dtype)
        step_state, grad_cell_output = torch.empty(case.batch, state, device=device, dtype=dtype), \
            torch.empty(case.batch, hidden, device=device, dtype=dtype)
        grad_w_hr, w_hr_t = torch.empty_like(w_hr), w_hr.t()

    def forward_eval():
        torch.mm(x, w_ih.t(), out=projected)
        for step in range(case.steps):
            torch.mm(states[step], w_hh_t, out=step_out)
            if case.proj_size:
                torch.mm(cell_outputs[step], w_hr_t, out=step_state)

    def train_step():
        forward_eval()
        for step in range(case.steps - 1, -1, -1):
            if case.proj_size:
                torch.mm(grad_states[step], w_hr, out=grad_cell_output)
            torch.mm(grad_gates[step], w_hh, out=grad_h)
        flat = grad_gates.view(rows, gates)
        torch.mm(flat, w_ih, out=grad_x)
        torch.mm(flat.t(), x, out=grad_w_ih)
        torch.mm(flat.t(), states.view(rows, state), out=grad_w_hh)
        if case.proj_size:
            torch.mm(grad_states.view(rows, state).t(), cell_outputs.view(rows, hidden), out=grad_w_hr)

    return Runner(forward_eval, train_step)


def cpp_products_on_mm():
    """Within it, the C++ backend runs every recurrent product on ATen's mm (it reads the setting
    when a forward or backward begins its loop)."""
    return environment_variable("NORMRNN_CPU_MATMUL", "aten")


def cpu_runner(name: str, case: Case) -> Runner:
    """The CPU section's implementations: the C++ backend (as it chooses its products, and with all
    of them on mm), the reference, torch's CPU module, the gemm floor."""
    device = torch.device("cpu")
    if name == "torch-cpu":
        return cudnn(case, device)
    if name == "gemm-floor":
        return gemm_floor(case, device)
    backend = {"normrnn-cpp": "cpp", "normrnn-cpp-mm": "cpp", "normrnn-reference": "reference"}[name]
    if backend == "cpp":
        reason = dispatch.unavailable_reason("cpp", case.cell, case.norm, torch.zeros(1, dtype=_dtype(case)))
        if reason is not None:
            raise Skip(f"the cpp backend cannot run this case: {reason}")
    runner = _module_runner(_normrnn_layer(case, device, backend), _inputs(case, device), _batch_of_one_reason(case))
    return _runner_within(cpp_products_on_mm, runner) if name == "normrnn-cpp-mm" else runner
