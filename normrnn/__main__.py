"""``python -m normrnn [info | demo | ...]``.

Without a subcommand (or with ``info``): the version, the backends usable on this machine, and a
short self-check of every cell with norm=None against torch's own modules. ``demo`` trains
normalized and plain recurrent networks on sequential digits and reports their gradient flow.
"""
from __future__ import annotations

import argparse
import importlib
import sys

import torch

import normrnn

# Subcommands live in their own modules, imported only when asked for.
SUBCOMMANDS = {
    "demo": ("normrnn.demo", "train LSTM, BN-LSTM, LN-LSTM and RNNs on sequential digits, report gradient flow"),
    "experiment": ("normrnn.experiments", "run a study: rnn-gradient-flow, digits, longer-sequences, bn-eps"),
    "bench": ("normrnn.bench.cli", "time normrnn against cuDNN, Haste, FlashRNN, eager and compiled PyTorch"),
}


def self_check() -> bool:
    """norm=None layers against torch.nn.LSTM/GRU/RNN with the same weights, in float64."""
    ok = True
    torch.manual_seed(0)
    x = torch.randn(7, 3, 5, dtype=torch.float64)
    for name, torch_class in (("LSTM", torch.nn.LSTM), ("GRU", torch.nn.GRU), ("RNN", torch.nn.RNN)):
        theirs = torch_class(5, 6, num_layers=2, bidirectional=True).double()
        ours = getattr(normrnn, name).from_torch(theirs, backend="reference")
        expected, _ = theirs(x)
        got, _ = ours(x)
        error = (expected - got).abs().max().item()
        passed = error < 1e-10
        ok &= passed
        print(f"  {name:4s} norm=None vs torch.nn.{name}: max |diff| = {error:.1e}  {'ok' if passed else 'FAILED'}")
    for name in ("LSTM", "GRU", "RNN"):
        for norm in ("layer", "batch", "seqbatch"):
            layer = getattr(normrnn, name)(5, 6, norm=norm, backend="reference").double()
            out, _ = layer(x, lengths=[7, 4, 2])
            finite = bool(torch.isfinite(out).all()) and bool((out[4:, 1] == 0).all())
            ok &= finite
            print(f"  {name:4s} norm={norm:9s} with padding: {'ok' if finite else 'FAILED'}")
    return ok


def info() -> int:
    print(f"normrnn {normrnn.__version__} (torch {torch.__version__})")
    print("backends:")
    for backend, status in normrnn.available_backends().items():
        print(f"  {backend:9s} {status}")
    print("self-check:")
    return 0 if self_check() else 1


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("info",):
        return info()
    if argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser = argparse.ArgumentParser(prog="python -m normrnn", description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        sub = parser.add_subparsers(dest="command")
        sub.add_parser("info", help="version, backends and a self-check (the default)")
        for name, (_, help_text) in SUBCOMMANDS.items():
            sub.add_parser(name, help=help_text)
        parser.parse_args(argv)
        return 0
    module_name, _ = SUBCOMMANDS[argv[0]]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        print(f"python -m normrnn {argv[0]}: not available ({error})", file=sys.stderr)
        return 2
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
