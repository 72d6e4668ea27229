"""Random layer configurations, each run on every backend usable here against the float64
reference: the combinations no hand-written test names.

A case draws a cell, a norm and the constructor's options (layers, dropout between them on a CPU,
direction, bias, projection, batch_first, momentum or the cumulative average, eps, max_steps
shorter than the sequence, the RNN's nonlinearity), an input form (padded with ``lengths``, a PackedSequence, full length,
unbatched), an initial state or none, and ``first_step``. It then compares, with the float64
reference holding the same weights:

1. a training step: the output, the final states, the gradients of the input, of the initial
   state and of every parameter, and the running statistics;
2. a second training step on fresh data (running statistics and update counts accumulate);
3. evaluation under ``no_grad`` over a sequence longer than ``max_steps``.

The Triton kernels run in float32 (or, in a fifth of the cases, bfloat16 or float16),
interpreted on a CPU; the C++ backend runs in float64. Each tensor must be within the dtype's
tolerance (1e-4, 2e-2) or within four times the worst error of the other CPU implementations run
in that dtype (the reference, and the C++ backend in float32) on a tensor of its kind (the same
quantity in any layer and direction, ``tensor_kind``), whichever is larger: batch
statistics of a few rows, an RNN of one hidden unit and layer norm of a rank-P product are
ill-conditioned, and no order of the same floating-point operations does better than the rounding
they amplify. A tensor is measured relative to its largest entry, or to ``smallest_scale`` where that
is larger: the final hidden state on the scale of the outputs, of which it is the last step.
The C++ backend in float64 must be within 1e-9.

``tests/test_fuzz_layers.py`` runs a few seeds in CI; as a command it runs seeds until a time
budget is spent and prints every mismatch with the configuration that reproduces it::

    python tests/fuzz_layers.py --minutes 30 [--first-seed N] [--seed N] [--persistent] [--log F]
"""
import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import sys
import time
import warnings
from typing import Dict, List, Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["NORMRNN_POISON"] = "1"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import normrnn  # noqa: E402
from conftest import outputs_and_grads, tensor_error, to_dtype  # noqa: E402

from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float64: 1e-9}
LAYERS = {"lstm": normrnn.LSTM, "gru": normrnn.GRU, "rnn": normrnn.RNN}
# batch statistics over fewer rows are ill-conditioned beyond what any tolerance should absorb
# (see test_triton_lstm.test_batch_norm_over_few_rows_is_as_accurate_as_float32_allows)
FEWEST_ROWS_UNDER_BATCH_NORM = 5
# layer norm over the H hidden units (an RNN's two projections, an LSTM's cell) is ill-conditioned
# beyond any tolerance at these H, drawn as H = 3 instead. Over two features the gradient is a
# difference of terms (var + eps) / eps times larger than it, so any relative error of the gradient
# that reaches it comes out that much larger (seed 22853, a bfloat16 LSTM of two hidden units: 4e-1
# to 1.3 from float64, the bfloat16 reference 1.2e-1 to 6.5e-1; in float32, or at H = 3, both within
# the bound). Over one, v - mean(v) is 0 and every gradient through it is 0, which the LSTM's cell
# norm computes exactly in every backend (its mean of one value is that value); but the RNN's
# projection through x W_ih^T is torch's layer_norm in the Triton layer, whose CPU backward
# recomputes v - mean and returns rounding noise of |v| 2^-24 / sqrt(eps) in place of those zeros
# (seeds 21135 and 21523 passed only while the C++ peer used torch's too). test_triton_rnn bounds
# that case in absolute terms. The LSTM's and the GRU's projections normalize 4H and 3H features.
ILL_CONDITIONED_LAYER_NORM_WIDTHS = {"rnn": (1, 2), "lstm": (2,)}
# the drawn problems' outputs and gradients are of order 0.1 to 10: a tensor whose entries are all
# below this is measured against it in absolute terms
SMALLEST_SCALE = 1e-3


@dataclasses.dataclass
class Case:
    """One drawn configuration: everything needed to reproduce it."""
    seed: int
    cell: str
    norm: Optional[str]
    input_size: int
    hidden_size: int
    num_layers: int
    dropout: float
    bidirectional: bool
    bias: bool
    batch_first: bool
    proj_size: int
    momentum: Optional[float]
    eps: float
    max_steps: int
    nonlinearity: Optional[str]
    steps: int
    batch: int
    input_form: str  # "lengths", "packed", "full", "unbatched"
    lengths: List[int]
    with_state: bool
    first_step: int
    triton_dtype: str
    persistent: bool = False

    def constructor(self) -> dict:
        config = dict(input_size=self.input_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
                      dropout=self.dropout, bidirectional=self.bidirectional, bias=self.bias, batch_first=self.batch_first,
                      norm=self.norm, momentum=self.momentum, eps=self.eps, max_steps=self.max_steps)
        if self.cell == "lstm":
            config["proj_size"] = self.proj_size
        if self.cell == "rnn":
            config["nonlinearity"] = self.nonlinearity
        return config


def draw_case(seed: int, persistent: bool = False) -> Case:
    """The configuration of ``seed``: small odd sizes, every option drawn independently, then the
    draws that the layer refuses by design (a reverse direction from a first_step other than 0)
    or that batch norm cannot condition (under five active rows at a step) made valid, and a
    layer norm over so few hidden units that no tolerance bounds it
    (``ILL_CONDITIONED_LAYER_NORM_WIDTHS``) widened. With ``persistent`` the Triton layer runs its
    persistent kernels, every program of a launch at once in threads of the interpreter
    (``concurrent_interpreter``), and H goes up to 40: up to three programs of 16 hidden units that
    exchange h through memory at every step's grid barrier."""
    rng = random.Random(seed)
    cell = rng.choice(["lstm", "gru", "rnn"])
    norm = rng.choice([None, "layer", "batch", "seqbatch"])
    bidirectional = rng.random() < 0.35
    batch = rng.randint(1, 11)
    steps = rng.randint(1, 7)
    input_form = rng.choice(["lengths", "packed", "full", "full", "unbatched"])
    if norm in ("batch", "seqbatch"):
        # training statistics need more than one row; a step with fewer than five is ill-conditioned
        batch = rng.randint(FEWEST_ROWS_UNDER_BATCH_NORM, 11)
        input_form = rng.choice(["lengths", "packed", "full"])
    if input_form == "unbatched":
        batch = 1
    lengths = [steps] * batch
    if input_form in ("lengths", "packed"):
        lengths = [rng.randint(1, steps) for _ in range(batch)]
        lengths[rng.randrange(batch)] = steps  # the padded length is the longest sequence's
        if norm == "batch":
            keep = min(FEWEST_ROWS_UNDER_BATCH_NORM, batch)
            for row in rng.sample(range(batch), keep):
                lengths[row] = steps
    max_steps = rng.randint(1, steps + 2)
    first_step = 0
    if not bidirectional and norm == "batch" and rng.random() < 0.4:
        first_step = rng.randint(1, max_steps + 1)
    hidden_size = rng.randint(1, 40 if persistent else 21)
    if norm == "layer" and hidden_size in ILL_CONDITIONED_LAYER_NORM_WIDTHS.get(cell, ()):
        hidden_size = 3
    proj_size = 0
    if cell == "lstm" and hidden_size > 1 and rng.random() < 0.3:
        proj_size = rng.randint(1, hidden_size - 1)  # torch's rule: 0 < proj_size < hidden_size
    num_layers = rng.choice([1, 1, 2])
    # between layers; the same seed draws the same mask in every dtype on a CPU, where the reference
    # runs, but the Triton layer's on a GPU would draw CUDA's
    dropout = 0.3 if num_layers == 2 and rng.random() < 0.4 and not torch.cuda.is_available() else 0.0
    case = Case(
        seed=seed, cell=cell, norm=norm, input_size=rng.randint(1, 9), hidden_size=hidden_size,
        num_layers=num_layers, dropout=dropout, bidirectional=bidirectional, bias=rng.random() < 0.8,
        batch_first=rng.random() < 0.3, proj_size=proj_size,
        momentum=None if rng.random() < 0.25 else rng.choice([0.1, 0.3, 1.0]),
        eps=rng.choice([1e-5, 1e-3]), max_steps=max_steps,
        nonlinearity=rng.choice(["tanh", "relu", None]) if cell == "rnn" else None,
        steps=steps, batch=batch, input_form=input_form, lengths=lengths,
        with_state=rng.random() < 0.5, first_step=first_step,
        triton_dtype=rng.choices(["float32", "bfloat16", "float16"], weights=[8, 1, 1])[0], persistent=persistent,
    )
    if case.hidden_size == 1:
        # a layer of one unit in 16 bits: each weight's gradient is one number, a sum whose terms
        # cancel, and two implementations' errors on it are two draws from a long tail. Over 40
        # weight draws of seed 23257's configuration (a bidirectional two-layer bfloat16 RNN under
        # sequence-wise batch norm) the Triton layer's median error was half the bfloat16
        # reference's for every gradient (W_hh's: 5.5e-3 against 1.1e-2), and both reached past 1
        # (3.4 and 4.7): no multiple of one draw bounds the other (seeds 22336, 23257)
        case.triton_dtype = "float32"
    if case.nonlinearity == "relu":
        # a pre-activation within 16-bit rounding of zero takes the other side of relu's kink in the
        # kernel than in float64, and its whole term of the gradient with it (seed 3155: 5e-2 in
        # bfloat16 from a pre-activation of 1.5e-4): legitimate, and no tolerance bounds it
        case.triton_dtype = "float32"
    return case


def _layer(case: Case, backend: str, dtype: torch.dtype, template: Optional[torch.nn.Module] = None):
    layer = LAYERS[case.cell](backend=backend, **case.constructor())
    if template is None:
        for name, parameter in layer.named_parameters():
            if "norm" in name:
                # gains and shifts away from their init, so that a dropped gain or shift shows
                with torch.no_grad():
                    parameter.uniform_(0.5, 1.5) if "weight" in name else parameter.uniform_(-0.5, 0.5)
    else:
        layer.load_state_dict(template.state_dict())
    return layer.to(dtype)


def _inputs(case: Case, generator: torch.Generator, steps: int):
    """x as the layer takes it (float64), the initial state or None, and the lengths or None."""
    directions = 2 if case.bidirectional else 1
    state_size = case.proj_size or case.hidden_size
    if case.input_form == "unbatched":
        x = torch.randn(steps, case.input_size, generator=generator, dtype=torch.float64)
        state_shape, cell_shape = (case.num_layers * directions, state_size), (case.num_layers * directions,
                                                                               case.hidden_size)
    else:
        x = torch.randn(steps, case.batch, case.input_size, generator=generator, dtype=torch.float64)
        if case.batch_first:
            x = x.transpose(0, 1).contiguous()
        state_shape = (case.num_layers * directions, case.batch, state_size)
        cell_shape = (case.num_layers * directions, case.batch, case.hidden_size)
    hx = None
    if case.with_state:
        h0 = torch.randn(state_shape, generator=generator, dtype=torch.float64)
        hx = (h0, torch.randn(cell_shape, generator=generator, dtype=torch.float64)) if case.cell == "lstm" else h0
    lengths = None
    if case.input_form in ("lengths", "packed"):
        lengths = [min(length, steps) for length in case.lengths]
        lengths[case.lengths.index(case.steps)] = steps
    return x, hx, lengths


def _forward(case: Case, layer, x, hx, lengths):
    """The layer on ``x`` in the case's input form; the output padded again where it was packed."""
    kwargs = {"first_step": case.first_step} if case.first_step else {}
    torch.manual_seed(case.seed)  # the same dropout masks in every layer compared
    if case.input_form == "packed":
        packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=case.batch_first, enforce_sorted=False)
        out, final = layer(packed, hx, **kwargs)
        steps = x.shape[1] if case.batch_first else x.shape[0]
        return pad_packed_sequence(out, batch_first=case.batch_first, total_length=steps)[0], final
    if case.input_form == "lengths":
        return layer(x, hx, lengths=torch.tensor(lengths), **kwargs)
    return layer(x, hx, **kwargs)


def _run(case: Case, layer, x, hx, lengths, train: bool) -> Dict[str, torch.Tensor]:
    """In training the outputs, final states, gradients (``outputs_and_grads``, through a fixed
    random projection of every output) and buffers in a flat dict; in evaluation, under
    ``no_grad``, the outputs, final states and buffers."""
    layer.train(train)
    if train:
        return outputs_and_grads(layer, x, hx, seed=case.seed,
                                 call=lambda x, hx: _forward(case, layer, x, hx, lengths))
    with torch.no_grad():
        out, final = _forward(case, layer, x, hx, lengths)
    results = {"output": out}
    for index, tensor in enumerate(final if isinstance(final, tuple) else (final,)):
        results[f"final{index}"] = tensor
    results.update({name: buffer.clone() for name, buffer in layer.named_buffers()})
    return results


@contextlib.contextmanager
def _launches(case: Case, backend: str):
    """How ``backend`` runs the case: as it is, or for the Triton layer of a persistent case, with
    its persistent kernels, their programs at once in threads (on a GPU, simply persistent)."""
    if backend != "triton" or not case.persistent:
        yield
        return
    from normrnn.kernels import buffers
    chosen = buffers.LAUNCH_MODES_CHOSEN.copy()
    previous = os.environ.get("NORMRNN_PERSISTENT")
    os.environ["NORMRNN_PERSISTENT"] = "1"
    try:
        if torch.cuda.is_available():
            yield
        else:
            from concurrent_interpreter import concurrent_programs
            with concurrent_programs(seed=case.seed):
                yield
    finally:
        if previous is None:
            del os.environ["NORMRNN_PERSISTENT"]
        else:
            os.environ["NORMRNN_PERSISTENT"] = previous
    ran = buffers.LAUNCH_MODES_CHOSEN - chosen
    if buffers.PERSISTENT not in ran:
        raise AssertionError(f"a persistent case ran no persistent kernel (launch modes: {dict(ran)})")


def _peers(dtype: torch.dtype, candidate: str) -> List[str]:
    """The CPU implementations other than ``candidate`` that run in ``dtype``, whose errors
    against float64 bound the rounding error of the problem; none in float64."""
    if dtype == torch.float64:
        return []
    peers = ["reference"]
    probe = torch.zeros(1, dtype=dtype)
    if candidate != "cpp" and normrnn.dispatch.unavailable_reason("cpp", "lstm", None, probe) is None:
        peers.append("cpp")
    return peers


def _backends() -> List[tuple]:
    """(name, backend, dtype) of every backend to check here."""
    found = []
    probe = torch.zeros(1)
    if normrnn.dispatch.unavailable_reason("cpp", "lstm", None, probe) is None:
        found.append(("cpp", "cpp", torch.float64))
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        found.append(("triton", "triton", None))
    return found


def tensor_kind(key: str) -> str:
    """``key`` without its layer and direction (``grad_bias_ih_l1_reverse``: ``grad_bias_ih``).

    The floor of a tensor's error is the peers' worst error over every tensor of its kind: the same
    quantity in another layer or direction is as conditioned, and a single tensor's error is one
    draw of the rounding, too noisy a floor where the tensor holds a few numbers (seed 22336, before
    layers of one unit were drawn in float32 only: in a bidirectional bfloat16 RNN of one hidden
    unit the bias gradient, a single number (-0.13 where W_hh's is -24), came out 1.4e-1 from
    float64 in the forward direction where the bfloat16 reference's happened to be 3.4e-2, and
    3.2e-2 in the reverse one where the reference's was 5.3e-2)."""
    return re.sub(r"_l\d+(_reverse)?$", "", key)


def smallest_scale(key: str, expected: Dict[str, torch.Tensor]) -> float:
    """The scale below which tensor ``key`` of ``expected`` is measured in absolute terms.

    ``SMALLEST_SCALE``, except for the final hidden state h_n ("final0"), which is the last step of
    a layer's output and is measured on the scale of the outputs: a single h_n can be a sum of
    terms of the outputs' order that cancel, and its rounding error is then one ulp of those terms,
    not of itself (persistent seed 33515: a float16 LSTM under layer norm with ``proj_size=1``,
    h_n = r_T W_hr^T = 0.00156 where the outputs reach 0.19; Triton's float32 accumulation came in
    1.1e-4 from float64, one float16 ulp of the terms, 7.2e-2 of h_n itself, where the float16
    reference happened to land at 1.6e-2 of it; over 40 weight draws of that configuration
    Triton's error on h_n was a median 0.54 times the reference's). A wrong h_n, from the wrong
    step or row, is off by the outputs' order and still fails."""
    if key == "final0":
        return max(SMALLEST_SCALE, float(expected["output"].abs().max()))
    return SMALLEST_SCALE


def check_case(case: Case, stop_at_first_phase_failing: bool = False) -> List[str]:
    """Every mismatch of every backend against the float64 reference on ``case``, as lines
    naming the phase, backend, tensor, error and bound; empty when all agree (with
    ``stop_at_first_phase_failing``, those of the first phase that has any)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(case.seed)
    reference = _layer(case, "reference", torch.float64)
    generator = torch.Generator().manual_seed(case.seed)
    phases = [("train", _inputs(case, generator, case.steps), True),
              ("train again", _inputs(case, generator, case.steps), True),
              ("eval beyond max_steps", _inputs(case, generator, case.max_steps + 2), False)]
    failures = []
    for name, backend, dtype in _backends():
        dtype = dtype or getattr(torch, case.triton_dtype)
        candidate = _layer(case, backend, dtype, reference).to(device)
        # the reference holds the weights as rounded to the candidate's dtype, and so do the other
        # implementations run in that dtype on the CPU: their worst error is the floor of the rounding
        exact = _layer(case, "reference", torch.float64, candidate.cpu())
        others = [_layer(case, other, dtype, candidate.cpu()) for other in _peers(dtype, backend)]
        candidate.to(device)
        for phase, (x, hx, lengths), train in phases:
            x, hx = x.to(dtype).double(), to_dtype(to_dtype(hx, dtype), torch.float64)
            expected = _run(case, exact, x, hx, lengths, train)
            floors = [_run(case, other, x.to(dtype), to_dtype(hx, dtype), lengths, train) for other in others]
            with _launches(case, backend):
                got = _run(case, candidate, x.to(device, dtype), to_dtype(hx, dtype, device), lengths, train)
            floor_of_kind: Dict[str, float] = {}
            for key in expected:
                scale = smallest_scale(key, expected)
                floor = max((tensor_error(key, other[key], expected, scale) for other in floors), default=0.0)
                kind = tensor_kind(key)
                floor_of_kind[kind] = max(floor_of_kind.get(kind, 0.0), floor)
            for key in expected:
                error = tensor_error(key, got[key], expected, smallest_scale(key, expected))
                bound = max(TOLERANCE[dtype], 4 * floor_of_kind[tensor_kind(key)])
                if not error < bound:
                    failures.append(f"{phase}: {name} {str(dtype)[6:]} {key}: error {error:.2e}, bound {bound:.2e}")
            if failures and stop_at_first_phase_failing:
                return failures
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="time budget")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, help="run this one case only, and print its configuration")
    parser.add_argument("--log", help="append one JSON line per case to this file")
    parser.add_argument("--persistent", action="store_true",
                        help="run the Triton layer's persistent kernels, every program at once (in threads on a CPU)")
    arguments = parser.parse_args()
    warnings.simplefilter("ignore")
    seeds = [arguments.seed] if arguments.seed is not None else range(arguments.first_seed, sys.maxsize)
    deadline = time.monotonic() + 60 * arguments.minutes
    ran, failed = 0, 0
    for seed in seeds:
        if time.monotonic() > deadline:
            break
        case = draw_case(seed, arguments.persistent)
        started = time.monotonic()
        try:
            failures = check_case(case)
        except Exception as error:  # noqa: BLE001 - a crash is a finding, reported with its case
            failures = [f"raised {type(error).__name__}: {error}"]
        ran += 1
        failed += bool(failures)
        line = {"case": dataclasses.asdict(case), "failures": failures, "seconds": round(time.monotonic() - started, 1)}
        if arguments.log:
            with open(arguments.log, "a") as log:
                log.write(json.dumps(line) + "\n")
        if failures or arguments.seed is not None:
            print(json.dumps(line, indent=None if arguments.seed is None else 2), flush=True)
    print(f"{ran} cases, {failed} with mismatches", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
