"""The compiled CPU backend: the whole sequence loop of every cell and norm in C++ (``csrc/``).

The extension is built on first use with ``torch.utils.cpp_extension`` (needs a C++ compiler and
ninja; the build is cached by torch in its extensions folder, so later processes load it in
well under a second). Each cell's forward and hand-written backward run in C++ over all
timesteps, on ATen CPU tensors (the recurrent matmul is BLAS, sigmoid/tanh are ATen's vectorized
kernels in place, everything else a fused loop over rows, parallel over ATen's threads); a
``torch.autograd.Function`` per cell connects them. Internal buffers are pooled across calls
(``release_workspace`` frees them). A forward that no backward follows keeps one step of them and
projects its input in chunks of steps (``INFERENCE_CHUNK_BYTES``).

As in the Triton backend, the normalizations that need no recurrence (layer norm of x W_ih^T,
sequence-wise batch norm) run on the whole input projection before the loop in PyTorch; the
per-timestep batch norms of both projections and every normalization inside the recurrence run
in C++. Covered: LSTM (with or without an output projection, ``proj_size``), GRU and RNN with
every norm, float32 and float64, CPU tensors.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .first_derivatives import first_derivatives_only, needs_gradient
from .params import DirectionParams, Padding
from .reference.common import zero_padding
from .reference.norms import sequence_batch_norm
from .tracing import untraced

NONE, LAYER, BATCH = 0, 1, 2
ACTIVATIONS = {"tanh": 0, "relu": 1, None: 2}
SUPPORTED_DTYPES = (torch.float32, torch.float64)

_build_lock = threading.Lock()
_extension = None
_build_error: Optional[str] = None
# A build takes one to two minutes on a 2-core machine; a lock file older than this was left by a
# build that did not finish
STALE_BUILD_LOCK_SECONDS = 600


def _sources():
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(here, "..", "csrc"), os.path.join(here, "csrc")):
        path = os.path.join(folder, "bindings.cpp")
        if os.path.exists(path):
            return [os.path.normpath(path)], os.path.normpath(folder)
    return None, None


def _build_directory(name: str) -> Optional[str]:
    """torch's build folder of extension ``name``, or None from a torch without this private helper
    (then the messages below are not given; the build itself does not need them)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
        return _get_build_directory(name, verbose=False)
    except Exception:
        return None


def _is_built(build_directory: Optional[str], name: str) -> bool:
    """Whether torch's extension cache already holds this build (only to tell the user that a
    first build takes a while)."""
    return build_directory is not None and os.path.exists(os.path.join(build_directory, f"{name}.so"))


def _clear_stale_build_lock(build_directory: Optional[str], poll_seconds: float = 1.0) -> None:
    """torch.utils.cpp_extension guards a build with a ``lock`` file in its build folder and, while
    that file exists, waits without end and without a word; a build interrupted midway (Ctrl-C, a
    timeout, a killed process) leaves it behind, and every later process would hang on it. A lock
    younger than ``STALE_BUILD_LOCK_SECONDS`` is taken for another process's build under way: it
    is waited for here, the wait said, until it is gone (that build ended) or has grown older than
    that, which no build takes, and is then removed with a warning. Only then does torch look."""
    if build_directory is None:
        return
    lock = os.path.join(build_directory, "lock")
    said = False
    while True:
        try:
            age = time.time() - os.path.getmtime(lock)
        except OSError:  # no lock (the usual case), or the other build has ended
            return
        if age > STALE_BUILD_LOCK_SECONDS:
            from .dispatch import warn_once
            warn_once(f"normrnn: removing {lock}, {age / 60:.0f} minutes old: left by a build of the C++ CPU backend "
                      "that was interrupted, it would keep every later build waiting")
            try:
                os.remove(lock)
            except OSError:
                pass
            return
        if not said:
            print(f"normrnn: waiting for another process's build of the C++ CPU backend ({lock} is {age:.0f} s old; "
                  f"a lock still there at {STALE_BUILD_LOCK_SECONDS / 60:.0f} minutes is taken for one left by an "
                  "interrupted build and removed; delete it yourself if no other process is building)",
                  file=sys.stderr, flush=True)
            said = True
        time.sleep(poll_seconds)


def extension():
    """The compiled module, built on first call; raises RuntimeError with the reason if it cannot be."""
    global _extension, _build_error
    with _build_lock:
        if _extension is None and _build_error is None:
            sources, folder = _sources()
            if sources is None:
                _build_error = "the C++ sources (csrc/bindings.cpp) are not installed with this package"
            else:
                try:
                    from torch.utils.cpp_extension import load
                    # torch caches builds by name and sources, not headers: the name carries a hash
                    # of every C++ file in csrc/, so an edited header or a new version rebuilds
                    digest = hashlib.sha256()
                    for name in sorted(os.listdir(folder)):
                        if name.endswith((".h", ".cpp")):
                            with open(os.path.join(folder, name), "rb") as handle:
                                digest.update(name.encode() + handle.read())
                    name = f"normrnn_cpu_{digest.hexdigest()[:12]}"
                    build_directory = _build_directory(name)
                    _clear_stale_build_lock(build_directory)
                    if not _is_built(build_directory, name):
                        print("normrnn: building the C++ CPU backend (first use, about a minute; cached "
                              "afterwards)", file=sys.stderr, flush=True)
                    _extension = load(name=name, sources=sources, extra_include_paths=[folder],
                                      extra_cflags=["-O3"], verbose=False)
                except Exception as error:  # no compiler, no ninja, a failed build
                    message = str(error).strip().splitlines()
                    _build_error = (f"the C++ extension could not be built ({type(error).__name__}: "
                                    f"{message[-1] if message else ''}); it needs a C++ compiler and ninja")
        if _extension is None:
            raise RuntimeError(_build_error)
        return _extension


def release_workspace() -> int:
    """Frees the internal buffers (saved activations, gradient buffers) that the C++ loops keep
    for reuse by the next call of the same shape (at most 1 GiB; reused to spare the page faults
    of fresh memory); returns the bytes freed. Nothing is freed if the backend was never built."""
    if _extension is None:
        return 0
    held = _extension.workspace_bytes()
    _extension.release_workspace()
    return held


# The C++ loops keep their saved state in an object of their own and build the extension under a
# lock, neither of which torch.compile can trace: a compiled model runs them as they are, between
# its graphs, and with fullgraph=True the error says why it cannot.
NOT_TRACEABLE = ("normrnn's C++ CPU backend cannot be traced by torch.compile: with fullgraph=True use "
                 "backend='reference' (compiled with the model) or backend='triton' on CUDA tensors")


# torch.export has no eager code between graphs to fall back on: the whole forward must trace
NOT_EXPORTABLE = ("normrnn's C++ CPU backend cannot be exported by torch.export (its loops keep what they save "
                  "in a C++ object, not in tensors that a graph could hold): export with backend='reference', or "
                  "backend='triton' on CUDA tensors")


def unsupported_reason(cell: str, norm: Optional[str], x: Tensor, nonlinearity) -> Optional[str]:
    """Why the C++ backend cannot run this case, or None."""
    if torch.compiler.is_exporting():
        return NOT_EXPORTABLE
    return untraced(NOT_TRACEABLE, _unsupported_reason, cell, norm, x, nonlinearity)


def _unsupported_reason(cell: str, norm: Optional[str], x: Tensor, nonlinearity) -> Optional[str]:
    if x.device.type != "cpu":
        return f"it runs on CPU tensors (got {x.device.type})"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} is not supported (float32 and float64 are)"
    try:
        extension()
    except RuntimeError as error:
        return str(error)
    return None


def describe_availability(probe: Tensor) -> str:
    """Whether the C++ backend can run here, and what it covers (``python -m normrnn`` prints it)."""
    reason = unsupported_reason("lstm", None, probe, None)
    if reason is None:
        return "usable on CPU (LSTM, with or without proj_size, GRU, RNN; every norm; float32, float64)"
    return f"not usable: {reason}"


def _backward_through_saved(ctx, extension_backward, *output_grads) -> tuple:
    """``extension_backward`` of the C++ ``Sequence`` the forward kept, then that ``Sequence`` freed
    unless the backward retains the graph, as autograd frees the tensors of ``save_for_backward``: its
    buffers return to the pool now, for the next forward, instead of staying held by the graph until
    the caller drops the output (a training loop holds the last loss's graph through the next
    forward, which then found no buffer to reuse: at B=64, I=H=512, T=100 a BN-LSTM's 210 MB of
    them). The gradients, and None for the forward's config."""
    if ctx.saved is None:
        raise RuntimeError(
            "normrnn (cpp backend): Trying to backward through the graph a second time: the values the "
            "C++ loops saved for it were freed by the first backward. Specify retain_graph=True in the first "
            "backward (or autograd.grad) to differentiate the graph again.")
    grads = extension_backward(ctx.saved, *(grad.contiguous() for grad in output_grads))
    # the question AOTAutograd asks for its own saved tensors; a torch without it keeps them
    retained = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: True)()
    if not retained:
        ctx.saved = None
    return (*grads, None)


class _LSTMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, wx, h0, c0, w_hh, bias, ih_weight, hh_weight, cell_weight, cell_bias, w_hr, config):
        # w_hr: the output projection (proj_size, H), or an empty tensor for none
        running, lengths, norms, training, momentum, eps, keep = config
        output, h_n, c_n, saved = extension().lstm_forward(
            wx, h0, c0, w_hh, bias, ih_weight, hh_weight, cell_weight, cell_bias, running, lengths, *norms, training,
            momentum, eps, keep, w_hr)
        ctx.saved = saved
        return output, h_n, c_n

    @staticmethod
    @first_derivatives_only("cpp")
    def backward(ctx, grad_output, grad_h_n, grad_c_n):
        return _backward_through_saved(ctx, extension().lstm_backward, grad_output, grad_h_n, grad_c_n)


class _GRUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, wx, h0, w_hh, bias_ih, bias_hh, ih_weight, hh_weight, config):
        running, lengths, norms, training, momentum, eps, keep = config
        output, h_n, saved = extension().gru_forward(wx, h0, w_hh, bias_ih, bias_hh, ih_weight, hh_weight, running,
                                                     lengths, norms[0], norms[1], training, momentum, eps, keep)
        ctx.saved = saved
        return output, h_n

    @staticmethod
    @first_derivatives_only("cpp")
    def backward(ctx, grad_output, grad_h_n):
        return _backward_through_saved(ctx, extension().gru_backward, grad_output, grad_h_n)


class _RNNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, wx, h0, w_hh, bias, ih_weight, hh_weight, config):
        running, lengths, norms, training, momentum, eps, activation, keep = config
        output, h_n, saved = extension().rnn_forward(wx, h0, w_hh, bias, ih_weight, hh_weight, running, lengths,
                                                     norms[0], norms[1], activation, training, momentum, eps, keep)
        ctx.saved = saved
        return output, h_n

    @staticmethod
    @first_derivatives_only("cpp")
    def backward(ctx, grad_output, grad_h_n):
        return _backward_through_saved(ctx, extension().rnn_backward, grad_output, grad_h_n)


def _project(x: Tensor, params: DirectionParams, norm: Optional[str], padding: Padding, training: bool,
             momentum: float, eps: float, bias: Optional[Tensor]) -> Tensor:
    """x W_ih^T for all steps, with the normalizations that need no recurrence; plus ``bias`` (the
    input's bias, folded in here where it is not None: into the matmul as addmm, as layer norm's
    beta, or into sequence-wise batch norm's scaling pass)."""
    if bias is not None and norm is None:
        rows = torch.addmm(bias, x.reshape(-1, x.shape[-1]), params.weight_ih.t())
        return rows.view(*x.shape[:-1], rows.shape[-1])
    wx = torch.matmul(x, params.weight_ih.t())
    if norm == "layer":
        wx = torch.nn.functional.layer_norm(wx, (wx.shape[-1],), params.ih_norm_weight, bias, eps)
    elif norm == "seqbatch":
        wx = sequence_batch_norm(wx, padding.mask, padding.total, params.ih_norm_weight, params.ih_running_mean,
                                 params.ih_running_var, training, momentum, eps, bias)
    return wx.contiguous()


def run_direction(cell, norm, x, state, params: DirectionParams, padding: Padding, training, momentum, eps,
                  nonlinearity) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """One layer and direction in C++ (the interface of ``normrnn.dispatch``)."""
    return untraced(NOT_TRACEABLE, _run_direction, cell, norm, x, state, params, padding, training, momentum, eps,
                    nonlinearity)


# A forward that no backward follows projects its input and runs the loop a chunk of steps at a
# time, with the state carried from chunk to chunk: the (T, B, G) projection, four times the
# output's size for an LSTM, is never whole. A chunk's projection takes at most this much memory.
INFERENCE_CHUNK_BYTES = 16 << 20


def _run_direction(cell, norm, x, state, params: DirectionParams, padding: Padding, training, momentum, eps,
                   nonlinearity) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    gates, hidden, state_size = params.weight_hh.shape[0], params.hidden_size, params.state_size
    like = params.weight_hh
    ones_gates, zeros_gates = like.new_ones(gates), like.new_zeros(gates)
    in_loop = norm in ("batch", "layer")
    ih_weight = params.ih_norm_weight if norm == "batch" else ones_gates
    hh_weight = params.hh_norm_weight if in_loop else ones_gates
    ih_code = BATCH if norm == "batch" else NONE
    hh_code = {"batch": BATCH, "layer": LAYER}.get(norm, NONE)

    def placeholder(width):
        return [like.new_zeros(1, width), like.new_ones(1, width)]
    running = ([params.ih_running_mean, params.ih_running_var] if norm == "batch" else placeholder(gates))
    running += ([params.hh_running_mean, params.hh_running_var] if norm == "batch" else placeholder(gates))
    if cell == "lstm" and norm == "batch":
        running += [params.cell_running_mean, params.cell_running_var]
    else:
        running += placeholder(hidden)
    lengths = padding.lengths.to(torch.int64) if padding.padded else torch.empty(0, dtype=torch.int64)
    state = tuple(value.contiguous() for value in state)
    w_hh = params.weight_hh.contiguous()
    norms = (ih_code, hh_code)
    # Without a per-step norm of x W_ih^T the input's bias is added to the whole projection before the
    # loop, by the ops that make it (addmm, layer norm's beta, sequence-wise batch norm's scaling),
    # not step by step in the loop: one add over (B, G) a step less, and the loop gets an empty bias
    # (csrc/sequence.h, input_carries_bias)
    fold_bias = ih_code == NONE
    if cell == "gru":  # b_hh stays apart: torch's GRU puts it inside r * (W_hh h + b_hh)
        input_bias = params.bias_ih
        bias_hh = params.bias_hh if params.bias_hh is not None else zeros_gates
    else:
        biases = [b for b in (params.bias_ih, params.bias_hh) if b is not None]
        input_bias = biases[0] + biases[1] if len(biases) == 2 else (biases[0] if biases else None)
    projected_bias = input_bias if fold_bias else None
    loop_bias = like.new_empty(0) if fold_bias else (input_bias if input_bias is not None else zeros_gates)
    if cell == "gru":
        weights = (w_hh, loop_bias, bias_hh, ih_weight, hh_weight)
    else:
        weights = (w_hh, loop_bias, ih_weight, hh_weight)
        if cell == "lstm":
            weights += (params.cell_norm_weight if in_loop else like.new_ones(hidden),
                        params.cell_norm_bias if in_loop else like.new_zeros(hidden))
            norms += ({"batch": BATCH, "layer": LAYER}.get(norm, NONE),)
            weights += (params.weight_hr.contiguous() if params.weight_hr is not None else like.new_empty(0),)
    function = {"lstm": _LSTMFunction, "gru": _GRUFunction, "rnn": _RNNFunction}[cell]
    keep = needs_gradient(x, params.weight_ih, params.ih_norm_weight, params.bias_ih, params.bias_hh, *state,
                          *weights)

    def run(wx: Tensor, state: Tuple[Tensor, ...], running: List[Tensor], lengths: Tensor):
        config = (running, lengths, norms, bool(training), float(momentum), float(eps))
        if cell == "rnn":
            config += (ACTIVATIONS[nonlinearity],)
        output, *final = function.apply(wx, *state, *weights, config + (keep,))
        return output, tuple(final)

    steps = x.shape[0]
    chunk = max(1, INFERENCE_CHUNK_BYTES // (x.shape[1] * gates * x.element_size()))
    # sequence-wise batch norm in training needs the statistics of the whole projection; a sequence
    # of one chunk runs whole, its output not copied
    if keep or (norm == "seqbatch" and training) or chunk >= steps:
        wx = _project(zero_padding(x, padding), params, norm, padding, training, momentum, eps, projected_bias)
        return run(wx, state, running, lengths)
    output = x.new_empty(steps, x.shape[1], state_size)
    for start in range(0, steps, chunk):
        stop = min(steps, start + chunk)
        piece = zero_padding(x[start:stop], padding, first_step=start)
        wx = _project(piece, params, norm, padding, training, momentum, eps, projected_bias)
        # the chunk's step t is step start + t: per-step statistics from slot min(start, S - 1) on
        # (the slots past the last one are the last one), and lengths counted from its first step
        chunk_running = [statistics[min(start, statistics.shape[0] - 1):] for statistics in running]
        chunk_lengths = (lengths - start).clamp_min(0) if padding.padded else lengths
        piece_output, state = run(wx, state, chunk_running, chunk_lengths)
        output[start:stop] = piece_output
    return output, state
