"""Correctness at scale, recorded with the timings: the fused layers against the float64
reference at H=2048, B=256 and over a 10,000-step sequence, and against cuDNN with norm=None.

Relative error = max |a - e| / max |e| per tensor (outputs, final states, the gradients of the
input and of every parameter), the largest over tensors reported with its name."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

import normrnn

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


def against_reference(cell: str, norm, dtype: torch.dtype, batch: int, hidden: int, steps: int, device) -> Dict:
    """The fused layer in ``dtype`` against the float64 reference with the same rounded weights."""
    torch.manual_seed(0)
    reference = CELLS[cell](hidden, hidden, norm=norm, backend="reference", max_steps=steps).to(device).double()
    fused = CELLS[cell](hidden, hidden, norm=norm, backend="triton", max_steps=steps).to(device, dtype)
    fused.load_state_dict(reference.state_dict())
    reference.load_state_dict({k: v.to(dtype).double() if v.is_floating_point() else v
                               for k, v in fused.state_dict().items()})
    x = torch.randn(steps, batch, hidden, device=device, dtype=torch.float64).to(dtype)
    expected = _outputs_and_grads(reference, x.double())
    got = _outputs_and_grads(fused, x)
    return {"check": "fused vs float64 reference", "cell": cell, "norm": norm, "dtype": str(dtype).split(".")[-1],
            "batch": batch, "hidden_size": hidden, "steps": steps, **_worst(got, expected)}


def against_cudnn(cell: str, dtype: torch.dtype, batch: int, hidden: int, steps: int, device) -> Dict:
    """The fused layer with norm=None against torch's cuDNN module with the same weights
    (TF32 off: both sides in full float32)."""
    torch.manual_seed(0)
    theirs = TORCH_CELLS[cell](hidden, hidden).to(device, dtype)
    ours = CELLS[cell].from_torch(theirs, backend="triton").to(device, dtype)
    x = torch.randn(steps, batch, hidden, device=device, dtype=dtype)
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        expected = _outputs_and_grads(theirs, x)
        got = _outputs_and_grads(ours, x)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous
    return {"check": "fused vs cuDNN (norm=None)", "cell": cell, "norm": None, "dtype": str(dtype).split(".")[-1],
            "batch": batch, "hidden_size": hidden, "steps": steps, **_worst(got, expected)}


def check_plans(quick: bool) -> List[Tuple[str, Dict]]:
    """(kind, arguments) of every check the issue asks for: "reference" for ``against_reference``,
    "cudnn" for ``against_cudnn``; fewer steps with ``quick``."""
    plans = []
    for norm in (None, "layer", "batch"):
        for dtype in (torch.float32, torch.bfloat16):
            plans.append(("reference", dict(cell="lstm", norm=norm, dtype=dtype, batch=256, hidden=2048,
                                            steps=4 if quick else 16)))
        plans.append(("reference", dict(cell="lstm", norm=norm, dtype=torch.float32, batch=16, hidden=64,
                                        steps=1000 if quick else 10_000)))
    for cell in ("lstm", "gru", "rnn"):
        plans.append(("cudnn", dict(cell=cell, dtype=torch.float32, batch=64, hidden=512, steps=100)))
    return plans


def run_checks(device, quick: bool) -> List[Dict]:
    """Runs ``check_plans(quick)``; each failure is recorded, and the suite goes on."""
    results = []
    for kind, arguments in check_plans(quick):
        try:
            if kind == "reference":
                results.append(against_reference(device=device, **arguments))
            else:
                results.append(against_cudnn(device=device, **arguments))
        except Exception as error:  # recorded, and the suite goes on
            results.append({"check": kind, **{k: str(v) for k, v in arguments.items()},
                            "error": f"{type(error).__name__}: {error}"})
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results
