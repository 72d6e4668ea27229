"""Choice of the backend that runs one layer and direction.

Backends: "reference" (pure PyTorch, any device and dtype), "triton" (fused Triton kernels:
CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), "cpp" (the compiled CPU backend in
``csrc/``). ``backend="auto"`` takes the fastest backend that covers the case (triton on CUDA tensors, cpp on
CPU tensors) and otherwise the
reference, warning once per reason; an explicitly named backend that cannot run the case raises.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Dict, Optional, Tuple

from torch import Tensor

from .params import DirectionParams, Padding

BACKENDS = ("auto", "reference", "triton", "cpp")

_warned: set = set()


def warn_once(message: str) -> None:
    """A warning printed once per process for each distinct message."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _reference_run(cell, norm, x, state, params, padding, training, momentum, eps, nonlinearity):
    from .reference import gru_sequence, lstm_sequence, rnn_sequence
    if cell == "lstm":
        out, h, c = lstm_sequence(x, state[0], state[1], params, norm, padding, training, momentum, eps)
        return out, (h, c)
    if cell == "gru":
        out, h = gru_sequence(x, state[0], params, norm, padding, training, momentum, eps)
        return out, (h,)
    out, h = rnn_sequence(x, state[0], params, norm, padding, training, momentum, eps, nonlinearity)
    return out, (h,)


class _LazyBackend:
    """A backend in its own module, imported on first use so that a missing optional dependency
    (triton, a C++ compiler) costs nothing until asked for."""

    def __init__(self, module: str):
        self.module_name = module
        self._module = None
        self._import_error: Optional[str] = None

    def module(self):
        """The backend's module, imported on first call; None where it cannot be imported."""
        if self._module is None and self._import_error is None:
            try:
                self._module = importlib.import_module(self.module_name, __package__)
            except ModuleNotFoundError as error:
                self._import_error = (f"{self.module_name.lstrip('.')} is not part of this version"
                                      if error.name and error.name.endswith(self.module_name.lstrip("."))
                                      else f"{type(error).__name__}: {error}")
            except Exception as error:  # an optional dependency is absent or broken
                self._import_error = f"{type(error).__name__}: {error}"
        return self._module

    def unavailable_reason(self, cell: str, norm: Optional[str], x: Tensor, nonlinearity) -> Optional[str]:
        """Why this backend cannot run the case, or None where it can."""
        module = self.module()
        if module is None:
            return f"it could not be imported ({self._import_error})"
        return module.unsupported_reason(cell, norm, x, nonlinearity)

    def run(self, *args):
        """One layer and direction on this backend (``run_direction`` of its module)."""
        return self.module().run_direction(*args)


_LAZY: Dict[str, _LazyBackend] = {
    "triton": _LazyBackend(".triton_backend"),
    "cpp": _LazyBackend(".cpp_backend"),
}


def preload(backend: str) -> None:
    """Imports the backend modules that ``backend`` may run now, while no ``torch.compile`` is
    tracing: Dynamo cannot trace an import, so a layer whose first call is compiled
    (``fullgraph=True``) would fail in the lazy import. For "auto" that is the Triton backend only
    where CUDA is (on CPU tensors "auto" never takes it: importing Triton costs a second)."""
    import torch
    names = {"triton": ["triton"], "cpp": ["cpp"],
             "auto": ["cpp"] + (["triton"] if torch.cuda.is_available() else [])}.get(backend, [])
    for name in names:
        _LAZY[name].module()


def unavailable_reason(backend: str, cell: str, norm: Optional[str], x: Tensor, nonlinearity=None) -> Optional[str]:
    """Why ``backend`` cannot run this case, or None if it can (every backend runs the LSTM's
    output projection, ``proj_size``, wherever it runs the LSTM)."""
    if backend == "reference":
        return None
    return _LAZY[backend].unavailable_reason(cell, norm, x, nonlinearity)


def resolve(backend: str, cell: str, norm: Optional[str], x: Tensor, nonlinearity=None) -> str:
    """The backend that will run this case (see the module docstring)."""
    if backend == "reference":
        return backend
    if backend != "auto":
        reason = unavailable_reason(backend, cell, norm, x, nonlinearity)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} cannot run {cell} with norm={norm!r} on "
                               f"{x.device.type} {x.dtype}: {reason}")
        return backend
    # the Triton interpreter (TRITON_INTERPRET=1) is for testing the kernels, never the fast path:
    # on CPU tensors "auto" means the C++ backend
    preferred = "triton" if x.is_cuda else "cpp"
    if x.is_cuda or x.device.type == "cpu":
        reason = unavailable_reason(preferred, cell, norm, x, nonlinearity)
        if reason is None:
            return preferred
        warn_once(f"normrnn: backend='auto' runs {cell} norm={norm!r} on {x.device.type} {x.dtype} "
                  f"with the eager reference (slow): the {preferred} backend cannot, because {reason}")
    return "reference"


def run_direction(backend: str, cell: str, norm: Optional[str], x: Tensor, state: Tuple[Tensor, ...],
                  params: DirectionParams, padding: Padding, training: bool, momentum: float, eps: float,
                  nonlinearity: Optional[str] = None) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """Runs one layer and direction over ``x`` (T, B, I) with the backend ``resolve`` picks.

    Returns the output (T, B, H, or proj_size P where the LSTM projects) and the final state:
    ``(h_n, c_n)`` for LSTM, ``(h_n,)`` otherwise.
    """
    chosen = resolve(backend, cell, norm, x, nonlinearity)
    args = (cell, norm, x, state, params, padding, training, momentum, eps, nonlinearity)
    if chosen == "reference":
        return _reference_run(*args)
    return _LAZY[chosen].run(*args)


def available_backends() -> Dict[str, str]:
    """Each backend and whether it can run here, for ``python -m normrnn``."""
    import torch
    probe = torch.zeros(1)
    report = {"reference": "usable (any device, any dtype)"}
    for name in ("triton", "cpp"):
        module = _LAZY[name].module()
        if module is None:
            report[name] = f"not usable: {_LAZY[name]._import_error}"
        else:
            report[name] = module.describe_availability(probe)
    return report


