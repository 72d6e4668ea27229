"""Correctness at scale, recorded with the timings: the fused layers against the float64
reference at the headline shape B=64, H=512, at H=2048, B=256 and over a 10,000-step sequence,
and against cuDNN with norm=None (there also past 2^31 elements a tensor); each with one launch per
step and with the persistent kernels.

Relative error = max |a - e| / max |e| per tensor (outputs, final states, the gradients of the
input and of every parameter), the largest over tensors reported with its name, beside the
tolerance it is held to (the tests' own: 1e-4 in float32, 2e-2 in bfloat16)."""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import normrnn
from normrnn.kernels import buffers

from .cases import projection_keyword
from .implementations import persistent_requested

CELLS = {"lstm": normrnn.LSTM, "gru": normrnn.GRU, "rnn": normrnn.RNN}
TORCH_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


# What one step of the float64 reference keeps for its backward, in units of batch x hidden x 8
# bytes: measured 9.6 for the LSTM without norm, 35.7 with layer norm, 112 with batch norm
# (per-timestep statistics of three norms), rounded up to cover them all
REFERENCE_STEP_UNITS = 128
# What the reference's kept steps may hold at once. A longer sequence (B=256, H=2048, T=1000 would
# keep about 470 GB under batch norm) runs in chunks of steps under activation checkpointing: each
# chunk keeps only its input and initial state, and its steps are computed again in the backward
REFERENCE_CHUNK_BYTES = 16 * 2**30


def reference_steps_per_chunk(batch: int, hidden: int) -> int:
    """How many steps of the float64 reference at this shape fit in REFERENCE_CHUNK_BYTES."""
    return max(1, REFERENCE_CHUNK_BYTES // (REFERENCE_STEP_UNITS * batch * hidden * 8))


def run_checkpointed(module: nn.Module, x: torch.Tensor, steps_per_chunk: int):
    """``module(x)`` (time-major, one direction) computed ``steps_per_chunk`` steps at a time, each
    chunk under ``torch.utils.checkpoint``: the output, the final state and every gradient are
    those of the whole sequence (the state is carried between chunks, and ``first_step`` numbers
    each chunk's steps for per-timestep batch norm), while the autograd graph holds one chunk's
    steps at a time. Sequence-wise batch norm, whose statistics span the whole sequence, cannot
    be split; nor can a bidirectional layer. In training the running statistics are updated once
    more as each chunk is recomputed: what this serves compares outputs and gradients only."""
    if getattr(module, "norm", None) == "seqbatch" or getattr(module, "bidirectional", False):
        raise ValueError("run_checkpointed: sequence-wise batch norm and bidirectional layers see the whole "
                         "sequence at once and cannot run in chunks")

    def run_chunk(first_step: int, piece: torch.Tensor, *state: torch.Tensor):
        initial = None if not state else (state if len(state) > 1 else state[0])
        output, final = module(piece, initial, first_step=first_step)
        return (output,) + (final if isinstance(final, tuple) else (final,))

    outputs, state = [], ()
    for first in range(0, x.shape[0], steps_per_chunk):
        output, *state = checkpoint(run_chunk, first, x[first:first + steps_per_chunk], *state,
                                    use_reentrant=False)
        outputs.append(output)
    return torch.cat(outputs), (tuple(state) if len(state) > 1 else state[0])


def _outputs_and_grads(module: nn.Module, x: torch.Tensor, seed: int = 0, steps_per_chunk: Optional[int] = None
                       ) -> Dict[str, torch.Tensor]:
    """The output, final states and the gradients of the input and every parameter, for a fixed
    random projection of every output; ``steps_per_chunk`` below the sequence's length runs it
    through ``run_checkpointed``."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    if steps_per_chunk is not None and steps_per_chunk < x.shape[0]:
        output, final = run_checkpointed(module, x, steps_per_chunk)
    else:
        output, final = module(x)
    finals = final if isinstance(final, tuple) else (final,)
    # drawn where the tensors are: on a GPU, the weights of a (1000, 256, 2048) output take
    # seconds to draw on the host, three times a check
    generator = torch.Generator(device=x.device).manual_seed(seed)
    loss = 0
    results = {"output": output.detach()}
    for index, tensor in enumerate((output,) + finals):
        weight = torch.randn(tensor.shape, generator=generator, device=tensor.device)
        weight = weight.to(torch.bfloat16).to(tensor.dtype)
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
        actual = got[key].double()
        # one expected tensor at a time where the fused layer's are: a large check keeps them on the host
        value = value.to(actual.device, torch.float64)
        error = float((actual - value).abs().max() / value.abs().max().clamp_min(1e-12))
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
    (computed once, in chunks of ``reference_steps_per_chunk`` steps where the whole sequence's
    steps would not fit in REFERENCE_CHUNK_BYTES)."""
    torch.manual_seed(0)
    config = dict(norm=norm, max_steps=steps, **projection_keyword(proj_size))
    reference = CELLS[cell](hidden, hidden, backend="reference", **config).to(device).double()
    fused = CELLS[cell](hidden, hidden, backend="triton", **config).to(device, dtype)
    fused.load_state_dict(reference.state_dict())
    reference.load_state_dict({k: v.to(dtype).double() if v.is_floating_point() else v
                               for k, v in fused.state_dict().items()})
    x = torch.randn(steps, batch, hidden, device=device, dtype=torch.float64).to(dtype)
    steps_per_chunk = min(steps, reference_steps_per_chunk(batch, hidden))
    expected = _outputs_and_grads(reference, x.double(), steps_per_chunk=steps_per_chunk)
    del reference
    # on the host while the fused layer runs: at B=256, H=2048, T=1000 its output and the input's
    # gradient alone take 8.6 GB in float64, beside the fused layer's own 35-43 GB of saved steps
    expected = {key: value.cpu() for key, value in expected.items()}
    base = {**_record("fused vs float64 reference", cell, norm, dtype, batch, hidden, steps, proj_size),
            "reference_steps_per_chunk": steps_per_chunk}
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
    norm in fp32 and bf16 at B=64, H=512, T=100, at B=256, H=2048 over 16 steps (before the
    timings) and over 1000 steps (after them: the float64 reference runs in checkpointed chunks
    there, ``run_checkpointed``, and each check takes tens of seconds), over 10,000 steps (fp32, B=16,
    H=64), and every cell against cuDNN; the GRU and RNN with every norm in bf16 at B=64, H=512; the
    LSTM projecting to P=128 (``proj_size``) with every norm in fp32 and bf16 at B=64, H=512, and
    against cuDNN's; the LSTM against cuDNN over ``WIDE_OFFSET_STEPS`` at B=256, H=2048, where its
    (T, B, 4H) tensors pass 2^31 elements. The full grid adds the GRU and RNN with every norm at
    B=256, H=2048, T=16 and T=1000. The checks that run after the timings (``after_timings``) come
    last: the 10,000-step ones, the one past 2^31 elements, then those over 1000 steps."""
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

    def at_scale(steps: int) -> List[Tuple[str, Dict]]:
        return [("reference", dict(cell=cell, norm=norm, dtype=dtype, batch=256, hidden=2048, steps=steps))
                for cell in (("lstm",) if quick else ("lstm", "gru", "rnn")) for norm in (None, "layer", "batch")
                for dtype in (torch.bfloat16, torch.float32)]
    plans += at_scale(AT_SCALE_SHORT_STEPS)
    plans += [("reference", dict(cell="lstm", norm=norm, dtype=torch.float32, batch=16, hidden=64,
                                 steps=LONG_SEQUENCE_STEPS)) for norm in (None, "layer", "batch")]
    plans.append(("cudnn", dict(cell="lstm", dtype=torch.float32, batch=256, hidden=2048, steps=WIDE_OFFSET_STEPS)))
    return plans + at_scale(AT_SCALE_STEPS)


# B=256, H=2048: over a few steps before the timings (seconds a check), and over the 1000
# steps after them (the float64 reference in checkpointed chunks: tens of seconds a check)
AT_SCALE_SHORT_STEPS, AT_SCALE_STEPS = 16, 1000
# the long-sequence checks: their float64 reference runs 10,000 steps one at a time (a few hundred
# kernel launches a step, tens of seconds a check)
LONG_SEQUENCE_STEPS = 10_000
# the LSTM's wx, wh and their gradients, (T, B, 4H), hold more than 2^31 elements at B=256, H=2048
# from T=1025 on: the kernels' step offsets are 64-bit (``kernels/tiles.py``, ``step_offset``), and
# this check runs them past that bound against cuDNN (seconds; about 60 GB in float32)
WIDE_OFFSET_STEPS = 1100


def after_timings(plan: Tuple[str, Dict]) -> bool:
    """Whether the bench runs this check after its timings rather than before: a sequence of 1000
    steps or more, whose float64 reference runs for tens of seconds, and on which no timing rests."""
    return plan[1]["steps"] >= AT_SCALE_STEPS


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
