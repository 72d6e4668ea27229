"""The benchmark grid: cell x norm x dtype x batch x hidden size x sequence length (I = H)."""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import List, Optional

CELLS = ("lstm", "gru", "rnn")
NORMS = (None, "layer", "batch")
DTYPES = ("float32", "bfloat16")
BATCHES = (1, 16, 64, 256)
HIDDEN_SIZES = (128, 512, 1024, 2048)
LENGTHS = (100, 1000)


@dataclass(frozen=True)
class Case:
    cell: str
    norm: Optional[str]
    dtype: str
    batch: int
    hidden_size: int
    steps: int
    proj_size: int = 0  # the LSTM's output projection (LSTMP), 0 for none

    @property
    def input_size(self) -> int:
        return self.hidden_size

    def label(self) -> str:
        return (f"{self.cell} norm={self.norm or 'none'} {self.dtype} B={self.batch} H={self.hidden_size} "
                + (f"P={self.proj_size} " if self.proj_size else "") + f"T={self.steps}")

    def as_dict(self) -> dict:
        return asdict(self)


def projection_keyword(proj_size: int) -> dict:
    """``proj_size`` as a layer's keyword where it is not 0: the GRU and RNN (torch's and
    normrnn's) take none."""
    return {"proj_size": proj_size} if proj_size else {}


def projecting_cases(dtypes=DTYPES, hidden_sizes=HIDDEN_SIZES) -> List[Case]:
    """The LSTM with an output projection to P = H / 4 (``proj_size``) at B=64, T=100, every norm:
    cuDNN's LSTMP is its bar (Haste and FlashRNN have none)."""
    return [Case("lstm", norm, dtype, 64, hidden, 100, proj_size=hidden // 4)
            for dtype in dtypes for hidden in hidden_sizes for norm in NORMS]


def full_grid() -> List[Case]:
    """Every combination of the issue's grid (a batch of one is skipped for batch norm in training,
    which needs two sequences; its eval-mode forward is still timed), then ``projecting_cases``."""
    return ([Case(*values) for values in itertools.product(CELLS, NORMS, DTYPES, BATCHES, HIDDEN_SIZES, LENGTHS)]
            + projecting_cases())


# the other hidden sizes --quick times the bf16 BN-LSTM and LN-LSTM at (B=64, T=100), so that its
# plot of time against H has a line per implementation, not a point
QUICK_HIDDEN_SWEEP = (128, 1024, 2048)
QUICK_HIDDEN_SIZE = 512

# the one case where --quick times the reference under torch.compile (the mission's headline
# layer), after every other case: the compile is the one long step
QUICK_COMPILED_REFERENCE = Case("lstm", "batch", "bfloat16", 64, QUICK_HIDDEN_SIZE, 100)
COMPILED_REFERENCE = "reference-compiled"


def quick_grid() -> List[Case]:
    """The subset ``--quick`` runs (a few minutes on an H100), in the order of what the speed
    targets rest on, since a run stopped by its deadline keeps what it timed first: the LSTM with
    every norm at the headline shape B=64, I=H=512 in bf16 at T=100, then T=1000, the GRU and RNN
    with every norm in bf16 at T=100, the LSTM in fp32 at T=100 and 1000, the bf16 LSTM projecting
    to P=128 at T=100, then the bf16 LSTM with batch norm and with layer norm at H=128, 1024 and
    2048 (B=64, T=100). The compiled reference of QUICK_COMPILED_REFERENCE is timed after all of
    them (``cli.run_gpu``)."""
    hidden = QUICK_HIDDEN_SIZE
    cases = [Case("lstm", norm, "bfloat16", 64, hidden, steps) for steps in LENGTHS for norm in NORMS]
    cases += [Case(cell, norm, "bfloat16", 64, hidden, 100) for cell in ("gru", "rnn") for norm in NORMS]
    cases += [Case("lstm", norm, "float32", 64, hidden, steps) for steps in LENGTHS for norm in NORMS]
    cases += projecting_cases(("bfloat16",), (hidden,))
    return cases + [Case("lstm", norm, "bfloat16", 64, size, 100) for norm in ("batch", "layer")
                    for size in QUICK_HIDDEN_SWEEP]


# what --quick times only for the bf16 LSTM at T=100 (every norm), and how its skips name them
QUICK_HEADLINE_ONLY = {"normrnn-graphs": "CUDA graphs",
                       "normrnn-triton-rebinding": "the launches rebound at every step"}


def quick_skip(implementation: str, case: Case) -> Optional[str]:
    """Why ``--quick`` leaves ``implementation`` out at ``case`` in its pass over the grid (None: it
    is timed), so that the quick grid stays within five minutes on an H100: compiling the unrolled
    reference takes about a minute per case (--quick compiles it once, for QUICK_COMPILED_REFERENCE,
    after the grid), the eager reference about 2 s per step at T=1000, normrnn-graphs a compile
    and a capture per case, normrnn-triton-rebinding differs from normrnn-triton only in host time
    per launch, and FlashRNN compiles a CUDA kernel per configuration (cell, dtype, batch, hidden
    size; not T). The last three and the first at H=512 only: the other hidden sizes are for the
    plot against H. The full grid times all of them everywhere."""
    if implementation == COMPILED_REFERENCE:
        return ("--quick compiles the reference for one case only (LSTM, batch norm, bf16, B=64, H=512, "
                "T=100), after every other case: a compile takes about a minute; the full grid times it everywhere")
    if implementation == "normrnn-reference" and case.steps > 100:
        return "--quick times the eager reference at T=100 only; the full grid times it at T=1000"
    if implementation in QUICK_HEADLINE_ONLY and (case.cell != "lstm" or case.steps > 100
                                                  or case.dtype != "bfloat16" or case.hidden_size != QUICK_HIDDEN_SIZE):
        return (f"--quick times {QUICK_HEADLINE_ONLY[implementation]} for the bf16 LSTM at H=512, T=100 only; the "
                "full grid times them everywhere")
    if implementation == "flashrnn" and (case.cell != "lstm" or case.dtype != "bfloat16"
                                         or case.hidden_size != QUICK_HIDDEN_SIZE):
        return ("--quick times FlashRNN for the bf16 LSTM at H=512 only (one compiled kernel serves T=100 and "
                "1000): it compiles its CUDA kernels with nvcc at the first call of each configuration; the full "
                "grid times it everywhere")
    return None


CPU_PROJ_SIZE = 128


def cpu_grid(tiny: bool = False) -> List[Case]:
    """The CPU section: B=32, I=H=256, T=100 in float32 (the C++ backend's target shape), every
    cell and norm; the LSTM with an output projection to P=128 (``proj_size``) with every norm; and
    the LSTM at the GPU targets' B=64, I=H=512 with every norm."""
    if tiny:
        return [Case("lstm", None, "float32", 2, 8, 5), Case("lstm", "batch", "float32", 2, 8, 5),
                Case("lstm", None, "float32", 2, 8, 5, proj_size=4)]
    return ([Case(cell, norm, "float32", 32, 256, 100) for cell in CELLS for norm in NORMS]
            + [Case("lstm", norm, "float32", 32, 256, 100, proj_size=CPU_PROJ_SIZE) for norm in NORMS]
            + [Case("lstm", norm, "float32", 64, 512, 100) for norm in NORMS])
