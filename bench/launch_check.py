"""On a CUDA GPU: the per-step launches bound once (``kernels/step_launch.py``) compute bit for
bit what launches through Triton compute: the same compiled kernels on the same arguments, and
no kernel reduces with float atomics. The LSTM with every norm at the headline shape (B=64,
I=H=512, bf16, 20 steps), forward in training, backward, forward in evaluation.

``python -m normrnn.bench.launch_check`` (or ``python bench/launch_check.py`` from a checkout):
exit status 0 when every output, gradient and running statistic is equal, 1 when one differs or
the bound launches fail (``bench/gpu_session.sh`` then runs the rest with
``NORMRNN_STEP_LAUNCH=triton``), 0 with a message where there is no CUDA device.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import normrnn  # noqa: E402
from normrnn.bench.implementations import environment_variable  # noqa: E402


def results(norm: Optional[str], mode: str, device: str, batch: int, hidden_size: int,
            steps: int) -> Dict[str, torch.Tensor]:
    """Outputs, gradients and running statistics of a freshly seeded layer, with the per-step
    launches bound (``mode="bound"``) or through Triton (``"triton"``)."""
    torch.manual_seed(0)
    layer = normrnn.LSTM(hidden_size, hidden_size, norm=norm, backend="triton", max_steps=steps)
    layer = layer.to(device, torch.bfloat16)
    x = torch.randn(steps, batch, hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True)
    with environment_variable("NORMRNN_STEP_LAUNCH", mode):
        output, (h_n, c_n) = layer(x)
        (output.float().square().mean() + h_n.float().sum() + c_n.float().sum()).backward()
        layer.eval()
        with torch.no_grad():
            evaluated, _ = layer(x)
    found = {"output": output, "h_n": h_n, "c_n": c_n, "evaluated": evaluated, "grad x": x.grad}
    found.update({f"grad {name}": parameter.grad for name, parameter in layer.named_parameters()})
    found.update({f"buffer {name}": buffer for name, buffer in layer.named_buffers()})
    return found


def differences(norm: Optional[str], device: str = "cuda", batch: int = 64, hidden_size: int = 512,
                steps: int = 20) -> List[str]:
    """What differs between the layer run with bound launches and through Triton (empty: nothing),
    and whether any launch was bound at all."""
    from normrnn.kernels.step_launch import BOUND_LAUNCHES
    found = []
    through_triton = results(norm, "triton", device, batch, hidden_size, steps)
    before = BOUND_LAUNCHES["count"]
    bound = results(norm, "bound", device, batch, hidden_size, steps)
    if BOUND_LAUNCHES["count"] == before:
        found.append(f"norm={norm}: no launch was bound")
    for name, expected in through_triton.items():
        if not torch.equal(expected, bound[name]):
            worst = (expected.double() - bound[name].double()).abs().max().item()
            found.append(f"norm={norm} {name}: differs by up to {worst:.3g}")
    return found


def main() -> int:
    """Compares the two launch paths for every norm; the exit status (see the module's doc)."""
    if not torch.cuda.is_available():
        print("no CUDA device: the bound launches are checked against Triton's on a GPU only")
        return 0
    found = []
    for norm in (None, "layer", "batch"):
        found += differences(norm)
        print(f"norm={norm}: compared", flush=True)
    for line in found:
        print("DIFFERENT", line)
    print("bound launches: " + ("bit for bit Triton's" if not found else "NOT equal to Triton's"))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
