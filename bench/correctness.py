"""Correctness at scale, recorded with the timings: the fused layers against the float64
reference at the headline shape B=64, H=512, at H=2048, B=256 and over a 10,000-step sequence,
and against cuDNN with norm=None; each with one launch per step and with the persistent kernels.

Relative error = max |a - e| / max |e| per tensor (outputs, final states, the gradients of the
input and of every parameter), the largest over tensors reported with its name, beside the
tolerance it is held to (the tests' own: 1e-4 in float32, 2e-2 in bfloat16)."""
from __future__ import annotations

import contextlib
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

import normrnn
from normrnn.kernels import buffers

from .cases import projection_keyword
from .implementations import persistent_requested

CELLS = {"lstm": normrnn.LSTM, "gru": normrnn.GRU, "rnn": normrnn.RNN}
TORCH_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


def _outputs_and_grads(module: nn.Module, x: torch.Tensor, seed: int = 0) -> Dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    output, final = module(x)
    finals = final if isinstance(final, tuple) else (final,)
    generator = torch.Generator().manual_seed(seed)
    loss = 0
    results = {"output": output.detach()}
    for index, tensor in enumerate((output,) + finals):
        weight = torch.randn(tensor.shape, generator=generator).to(torch.bfloat16).to(tensor.device, tensor.dtype)
        loss = loss + (tensor * weight).sum()
        if index:
            results[f"final{index - 1}"] = tensor.detach()
    loss.backward()
    results["grad_input"] = x.grad.detach()
    for name, parameter in module.named_parameters():
        if parameter.grad is not None:
            results["grad_" + name] = parameter.grad.detach()
    return results


def _worst(got: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> Dict:
    worst = {"relative_error": 0.0, "tensor": None}
    for key, value in expected.items():
        value = value.double()
        error = float((got[key].double().to(value.device) - value).abs().max() / value.abs().max().clamp_min(1e-12))
        if not error <= worst["relative_error"]:  # NaN counts as the worst
            worst = {"relative_error": error, "tensor": key}
    return worst


PER_STEP, PERSISTENT = "per-step", "persistent"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _fused(module: nn.Module, x: torch.Tensor, launch: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """``_outputs_and_grads`` of the fused ``module`` with ``launch``'s kernels, and the launch
    modes the launchers chose (a persistent request runs per-step launches where the grid cannot
    be resident at once: the record says which ran)."""
    buffers.LAUNCH_MODES_CHOSEN.clear()
    with persistent_requested() if launch == PERSISTENT else contextlib.nullcontext():
        got = _outputs_and_grads(module, x)
    return got, "+".join(sorted(buffers.LAUNCH_MODES_CHOSEN))


def _record(check: str, cell: str, norm, dtype: torch.dtype, batch: int, hidden: int, steps: int,
            proj_size: int = 0) -> Dict:
    """What every record of a check starts with: what was checked, at which shape."""
    return {"check": check, "cell": cell, "norm": norm, "dtype": str(dtype).split(".")[-1], "batch": batch,
            "hidden_size": hidden, "proj_size": proj_size, "steps": steps}


def _records(base: Dict, dtype: torch.dtype, expected: Dict[str, torch.Tensor], module: nn.Module, x: torch.Tensor,
             launches: Sequence[str]) -> List[Dict]:
    records = []
    for launch in launches:
        got, ran = _fused(module, x, launch)
        worst = _worst(got, expected)
        records.append({**base, "launch": launch, "kernels_ran": ran, **worst, "tolerance": TOLERANCE[dtype],
                        "passed": worst["relative_error"] < TOLERANCE[dtype]})
    return records


def against_reference(cell: str, norm, dtype: torch.dtype, batch: int, hidden: int, steps: int, device,
                      launches: Sequence[str] = (PER_STEP,), proj_size: int = 0) -> List[Dict]:
    """The fused layer in ``dtype`` (an LSTM projecting to ``proj_size`` where it is not 0), once
    per launch mode in ``launches``, against the float64 reference with the same rounded weights
    (computed once)."""
    torch.manual_seed(0)
    config = dict(norm=norm, max_steps=steps, **projection_keyword(proj_size))
    reference = CELLS[cell](hidden, hidden, backend="reference", **config).to(device).double()
    fused = CELLS[cell](hidden, hidden, backend="triton", **config).to(device, dtype)
    fused.load_state_dict(reference.state_dict())
    reference.load_state_dict({k: v.to(dtype).double() if v.is_floating_point() else v
                               for k, v in fused.state_dict().items()})
    x = torch.randn(steps, batch, hidden, device=device, dtype=torch.float64).to(dtype)
    expected = _outputs_and_grads(reference, x.double())
    del reference
    base = _record("fused vs float64 reference", cell, norm, dtype, batch, hidden, steps, proj_size)
    return _records(base, dtype, expected, fused, x, launches)


def against_cudnn(cell: str, dtype: torch.dtype, batch: int, hidden: int, steps: int, device,
                  launches: Sequence[str] = (PER_STEP,), proj_size: int = 0) -> List[Dict]:
    """The fused layer with norm=None (an LSTM projecting to ``proj_size`` where it is not 0), once
    per launch mode in ``launches``, against torch's cuDNN module with the same weights (TF32 off:
    both sides in full float32)."""
    torch.manual_seed(0)
    theirs = TORCH_CELLS[cell](hidden, hidden, **projection_keyword(proj_size)).to(device, dtype)
    ours = CELLS[cell].from_torch(theirs, backend="triton").to(device, dtype)
    x = torch.randn(steps, batch, hidden, device=device, dtype=dtype)
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        expected = _outputs_and_grads(theirs, x)
        base = _record("fused vs cuDNN (norm=None)", cell, None, dtype, batch, hidden, steps, proj_size)
        return _records(base, dtype, expected, ours, x, launches)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


def check_plans(quick: bool) -> List[Tuple[str, Dict]]:
    """(kind, arguments) of every check: "reference" for ``against_reference``, "cudnn" for
    ``against_cudnn``. Both grids hold what the fused-kernel issues ask for: the LSTM with every
    norm in fp32 and bf16 at B=64, H=512, T=100 and at B=256, H=2048 (16 steps: the float64
    reference of T=1000 there would need about 167 GB), over 10,000 steps (fp32, B=16, H=64), and
    every cell against cuDNN; the GRU and RNN with every norm in bf16 at B=64, H=512; the LSTM
    projecting to P=128 (``proj_size``) with every norm in fp32 and bf16 at B=64, H=512, and
    against cuDNN's. The full grid adds the GRU and RNN with every norm at B=256, H=2048."""
    plans = []
    for norm in (None, "layer", "batch"):
        for dtype in (torch.bfloat16, torch.float32):
            plans.append(("reference", dict(cell="lstm", norm=norm, dtype=dtype, batch=64, hidden=512, steps=100)))
    for cell in ("gru", "rnn"):
        for norm in (None, "layer", "batch"):
            plans.append(("reference", dict(cell=cell, norm=norm, dtype=torch.bfloat16, batch=64, hidden=512,
                                            steps=100)))
    for cell in ("lstm", "gru", "rnn"):
        plans.append(("cudnn", dict(cell=cell, dtype=torch.float32, batch=64, hidden=512, steps=100)))
    for norm in (None, "layer", "batch"):
        for dtype in (torch.bfloat16, torch.float32):
            plans.append(("reference", dict(cell="lstm", norm=norm, dtype=dtype, batch=64, hidden=512, steps=100,
                                            proj_size=128)))
    plans.append(("cudnn", dict(cell="lstm", dtype=torch.float32, batch=64, hidden=512, steps=100, proj_size=128)))
    for cell in ("lstm",) if quick else ("lstm", "gru", "rnn"):
        for norm in (None, "layer", "batch"):
            for dtype in (torch.bfloat16, torch.float32):
                plans.append(("reference", dict(cell=cell, norm=norm, dtype=dtype, batch=256, hidden=2048,
                                                steps=16)))
    for norm in (None, "layer", "batch"):
        plans.append(("reference", dict(cell="lstm", norm=norm, dtype=torch.float32, batch=16, hidden=64,
                                        steps=LONG_SEQUENCE_STEPS)))
    return plans


# the long-sequence checks: their float64 reference runs 10,000 steps one at a time (a few hundred
# kernel launches a step, tens of seconds a check), and no timing rests on them, so the bench runs
# them after the timings
LONG_SEQUENCE_STEPS = 10_000


def after_timings(plan: Tuple[str, Dict]) -> bool:
    """Whether the bench runs this check after its timings (a long sequence) rather than before."""
    return plan[1]["steps"] >= LONG_SEQUENCE_STEPS


def run_checks(device, plans: List[Tuple[str, Dict]], persistent: bool = True) -> List[Dict]:
    """Runs ``plans`` (from ``check_plans``) with per-step launches and, with ``persistent``, the
    persistent kernels too; each failure is recorded, and the suite goes on."""
    launches = (PER_STEP, PERSISTENT) if persistent else (PER_STEP,)
    results = []
    for kind, arguments in plans:
        try:
            check = against_reference if kind == "reference" else against_cudnn
            results += check(device=device, launches=launches, **arguments)
        except Exception as error:  # recorded, and the suite goes on
            results.append({**_record(kind, **{"norm": None, **arguments}), "error": f"{type(error).__name__}: {error}",
                            "passed": False})
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results
