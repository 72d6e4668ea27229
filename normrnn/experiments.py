"""``python -m normrnn experiment NAME``: the studies behind ``docs/findings.md``.

    rnn-gradient-flow   vanilla RNN: tanh, batch norm in place of tanh and bias (BN(W_ih x) +
                        BN(W_hh h), no activation, no bias), batch norm with tanh, layer norm with
                        tanh. Gradient flow ||dL/dh_1|| / ||dL/dh_T|| at initialization and after
                        training, and success (test MSE below 0.05; predicting the mean scores
                        0.167) on the adding problem as T grows.
    gated-gradient-flow the same for the gated cells: LSTM, BN-LSTM, LN-LSTM, GRU, BN-GRU,
                        LN-GRU (batch norm per timestep, gamma 0.1), and the LSTM with its
                        forget gates' bias at 1, the remedy that needs no normalization.
    digits              LSTM, BN-LSTM (gamma 0.1 and 1.0), LN-LSTM and sequence-wise BN-LSTM on
                        sequential and permuted digits: test accuracy after every epoch.
    longer-sequences    LSTM, BN-LSTM and LN-LSTM trained on the adding problem at T_train, then
                        tested at 2 T_train and 4 T_train (batch norm uses the population
                        statistics of its last step beyond max_steps = T_train).
    bn-eps              batch norm's eps on sequential digits: BN-LSTM (gamma 0.1 and 1.0) and
                        the RNN with BN in place of tanh and bias, eps 1e-5, 1e-3, 1e-1. Gradient
                        flow at initialization and after training, test accuracy per epoch, and
                        the batch variance of the recurrent pre-activations h_(t-1) W_hh^T against
                        eps: BN(a) = gamma (a - mean) / sqrt(var + eps) is a gain of
                        gamma / sqrt(var + eps), which normalizes where var >> eps and only scales
                        by gamma / sqrt(eps) where var << eps.
    truncated-bptt      a character model of Python's docstrings trained by truncated
                        backpropagation through time (streams read in pieces, the state carried):
                        BN-LSTM whose per-timestep statistics restart at every piece or continue
                        through the stream (``first_step``), each with its population statistics
                        an exponential average in training or re-estimated after every epoch
                        (``momentum=None``, one pass), against LSTM and LN-LSTM; test bits per
                        character read in pieces and one character at a time.

Each run takes ``--seeds`` seeds, shows a progress bar and writes ``results.json``, plots and a
short ``report.md`` to ``--out`` (default ``normrnn-experiments/NAME``). ``--quick`` shrinks
everything to a check that runs in well under a minute.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

import normrnn
from normrnn import diagnostics, tasks
from normrnn.demo import SequenceClassifier, accuracy, flow_at

ADDING_SUCCESS_MSE = 0.05


class Regressor(nn.Module):
    """A recurrent layer and a linear readout of its last output to one number."""

    def __init__(self, recurrent: nn.Module):
        super().__init__()
        self.recurrent = recurrent
        self.readout = nn.Linear(recurrent.hidden_size, 1)

    def forward(self, inputs):
        output, _ = self.recurrent(inputs)
        return self.readout(output[-1]).squeeze(-1)


def _progress(total: int, quiet: bool, description: str):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or quiet:
        state = {"done": 0}

        def step(label: str = "") -> None:
            state["done"] += 1
            if not quiet:
                print(f"  {description} {state['done']}/{total} {label}", flush=True)
        return step, (lambda: None)
    bar = tqdm(total=total, desc=description, unit="run")

    def step(label: str = "") -> None:
        bar.set_postfix_str(label)
        bar.update(1)
    return step, bar.close


def _train_adding(model: nn.Module, steps: int, iterations: int, batch: int, seed: int, learning_rate: float
                  ) -> List[float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    losses = []
    for iteration in range(iterations):
        inputs, targets = tasks.adding_problem(batch, steps, seed=seed * 1_000_003 + iteration)
        loss = nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


def _adding_mse(model: nn.Module, steps: int, seed: int, samples: int = 1000) -> float:
    inputs, targets = tasks.adding_problem(samples, steps, seed=10_000_000 + seed)
    model.eval()
    with torch.no_grad():
        error = float(nn.functional.mse_loss(model(inputs), targets))
    model.train()
    return error


def _adding_flow(model: nn.Module, steps: int, seed: int) -> List[float]:
    inputs, targets = tasks.adding_problem(128, steps, seed=20_000_000 + seed)
    flow = diagnostics.gradient_flow(model, inputs, lambda out: nn.functional.mse_loss(out, targets))
    return flow[-1].tolist()


RNN_VARIANTS: Dict[str, Callable[[int, int], nn.Module]] = {
    "RNN tanh": lambda hidden, steps: normrnn.RNN(2, hidden, nonlinearity="tanh"),
    "RNN BN in place of tanh": lambda hidden, steps: normrnn.RNN(2, hidden, norm="batch", nonlinearity=None,
                                                                 bias=False, max_steps=steps),
    "RNN BN + tanh": lambda hidden, steps: normrnn.RNN(2, hidden, norm="batch", nonlinearity="tanh",
                                                       max_steps=steps),
    "RNN LN + tanh": lambda hidden, steps: normrnn.RNN(2, hidden, norm="layer", nonlinearity="tanh"),
}

def _forget_bias_one(layer: normrnn.LSTM) -> normrnn.LSTM:
    """``layer`` with its forget gates' bias set to 1 (b_ih 1, b_hh 0), the standard remedy for an
    LSTM whose gradient vanishes through time at init (Gers et al. 2000, Jozefowicz et al. 2015)."""
    hidden = layer.hidden_size
    with torch.no_grad():
        layer.bias_ih_l0[hidden:2 * hidden] = 1.0
        layer.bias_hh_l0[hidden:2 * hidden] = 0.0
    return layer


# the gated cells with the same normalizations (batch norm with the paper's gamma 0.1), and the
# plain LSTM with the remedy that needs no normalization
GATED_VARIANTS: Dict[str, Callable[[int, int], nn.Module]] = {
    "LSTM": lambda hidden, steps: normrnn.LSTM(2, hidden),
    "LSTM forget bias 1": lambda hidden, steps: _forget_bias_one(normrnn.LSTM(2, hidden)),
    "BN-LSTM": lambda hidden, steps: normrnn.LSTM(2, hidden, norm="batch", max_steps=steps),
    "LN-LSTM": lambda hidden, steps: normrnn.LSTM(2, hidden, norm="layer"),
    "GRU": lambda hidden, steps: normrnn.GRU(2, hidden),
    "BN-GRU": lambda hidden, steps: normrnn.GRU(2, hidden, norm="batch", max_steps=steps),
    "LN-GRU": lambda hidden, steps: normrnn.GRU(2, hidden, norm="layer"),
}


def _adding_gradient_flow(args, variants: Dict[str, Callable[[int, int], nn.Module]], description: str) -> Dict:
    """The adding problem with each of ``variants`` at several T: test MSE and
    ||dL/dh_1|| / ||dL/dh_T|| at initialization and after training, per seed."""
    lengths = [20, 50] if args.quick else [25, 50, 100]
    iterations = args.iterations or (30 if args.quick else 800)
    hidden = 16 if args.quick else 48
    runs = []
    step, close = _progress(len(variants) * len(lengths) * args.seeds, args.quiet, description)
    for name, build in variants.items():
        for steps in lengths:
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                model = Regressor(build(hidden, steps))
                flow_initial = _adding_flow(model, steps, seed)
                started = time.perf_counter()
                losses = _train_adding(model, steps, iterations, 64, seed, args.lr)
                mse = _adding_mse(model, steps, seed)
                runs.append({"model": name, "steps": steps, "seed": seed, "test_mse": mse,
                             "solved": mse < ADDING_SUCCESS_MSE, "seconds": time.perf_counter() - started,
                             "flow_initial": flow_initial, "flow_final": _adding_flow(model, steps, seed),
                             "losses": losses})
                step(f"{name} T={steps}: mse {mse:.3f}")
    close()
    return {"lengths": lengths, "iterations": iterations, "hidden_size": hidden, "runs": runs}


def rnn_gradient_flow(args) -> Dict:
    """The adding problem with the vanilla RNN variants of ``RNN_VARIANTS``."""
    return _adding_gradient_flow(args, RNN_VARIANTS, "rnn-gradient-flow")


def gated_gradient_flow(args) -> Dict:
    """The adding problem with the LSTM and GRU variants of ``GATED_VARIANTS``."""
    return _adding_gradient_flow(args, GATED_VARIANTS, "gated-gradient-flow")


def _digits_models(hidden: int) -> Dict[str, Callable[[], nn.Module]]:
    return {
        "LSTM": lambda: normrnn.LSTM(1, hidden),
        "BN-LSTM gamma 0.1": lambda: normrnn.LSTM(1, hidden, norm="batch", max_steps=64),
        "BN-LSTM gamma 1.0": lambda: normrnn.LSTM(1, hidden, norm="batch", max_steps=64, gamma_init=1.0),
        "LN-LSTM": lambda: normrnn.LSTM(1, hidden, norm="layer"),
        "seqbatch-LSTM": lambda: normrnn.LSTM(1, hidden, norm="seqbatch"),
    }


def _digits_splits(permuted: bool, quick: bool):
    """The digits' train and test splits (``--quick``: the first 256 training images)."""
    train_split, test_split, _ = tasks.digits(permuted=permuted, seed=0)
    if quick:
        train_split = tasks.DigitsSplit(train_split.inputs[:, :256], train_split.targets[:256])
    return train_split, test_split


def _train_digits(model: nn.Module, train_split: tasks.DigitsSplit, test_split: tasks.DigitsSplit, epochs: int,
                  seed: int, learning_rate: float, batch: int = 64) -> Dict:
    """Adam on the cross-entropy (gradient norm clipped at 1) over ``epochs`` passes of
    ``train_split`` in batches shuffled by ``seed``, the last partial batch dropped (batch norm's
    statistics need a full batch); test accuracy after every epoch and the seconds it took."""
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    curve = []
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(train_split.targets.shape[0], generator=generator)
        for start in range(0, len(order) - batch + 1, batch):
            rows = order[start:start + batch]
            loss = loss_fn(model(train_split.inputs[:, rows]), train_split.targets[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        curve.append(accuracy(model, test_split, "cpu"))
    return {"accuracy_by_epoch": curve, "final_accuracy": curve[-1], "seconds": time.perf_counter() - started}


def digits_study(args) -> Dict:
    """Pixel-by-pixel 8x8 digits, plain and permuted, with the LSTM variants of ``_digits_models``:
    test accuracy per epoch, per seed."""
    epochs = args.epochs or (1 if args.quick else 8)
    hidden = 16 if args.quick else 48
    models = _digits_models(hidden)
    runs = []
    step, close = _progress(len(models) * 2 * args.seeds, args.quiet, "digits")
    for permuted in (False, True):
        train_split, test_split = _digits_splits(permuted, args.quick)
        for name, build in models.items():
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                model = SequenceClassifier(build(), 10)
                trained = _train_digits(model, train_split, test_split, epochs, seed, args.lr)
                runs.append({"model": name, "permuted": permuted, "seed": seed, **trained})
                step(f"{'p' if permuted else 's'}MNIST-digits {name}: {trained['final_accuracy']:.3f}")
    close()
    return {"epochs": epochs, "hidden_size": hidden, "runs": runs}


def longer_sequences(args) -> Dict:
    """Adding problem trained at one length and tested at 1x, 2x and 4x it (batch norm past
    ``max_steps`` uses the statistics of its last step): test MSE per length, per seed."""
    train_steps = 20 if args.quick else 50
    iterations = args.iterations or (30 if args.quick else 800)
    hidden = 16 if args.quick else 48
    builders = {
        "LSTM": lambda: normrnn.LSTM(2, hidden),
        "BN-LSTM": lambda: normrnn.LSTM(2, hidden, norm="batch", max_steps=train_steps),
        "LN-LSTM": lambda: normrnn.LSTM(2, hidden, norm="layer"),
    }
    runs = []
    step, close = _progress(len(builders) * args.seeds, args.quiet, "longer-sequences")
    for name, build in builders.items():
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = Regressor(build())
            _train_adding(model, train_steps, iterations, 64, seed, args.lr)
            errors = {str(factor * train_steps): _adding_mse(model, factor * train_steps, seed) for factor in (1, 2, 4)}
            runs.append({"model": name, "seed": seed, "test_mse_by_length": errors})
            step(f"{name}: " + ", ".join(f"T={k} {v:.3f}" for k, v in errors.items()))
    close()
    return {"train_steps": train_steps, "iterations": iterations, "hidden_size": hidden, "runs": runs}


BN_EPS_VALUES = (1e-5, 1e-3, 1e-1)


def _bn_eps_models(hidden: int, eps: float) -> Dict[str, Callable[[], nn.Module]]:
    return {
        "BN-LSTM gamma 0.1": lambda: normrnn.LSTM(1, hidden, norm="batch", max_steps=64, eps=eps),
        "BN-LSTM gamma 1.0": lambda: normrnn.LSTM(1, hidden, norm="batch", max_steps=64, eps=eps, gamma_init=1.0),
        "RNN BN in place of tanh": lambda: normrnn.RNN(1, hidden, norm="batch", nonlinearity=None, bias=False,
                                                       max_steps=64, eps=eps),
    }


def recurrent_variance(layer: nn.Module, inputs: torch.Tensor) -> float:
    """Median over timesteps t >= 2 and features of Var_batch[(h_(t-1) W_hh^T)_j]: the batch
    variance that the horizontal batch norm of a one-layer, one-direction ``layer`` divides by
    (the population form, as the normalization uses; t = 1 is left out, h_0 = 0 has none)."""
    with torch.no_grad():
        output, _ = layer(inputs)
        preactivations = output[:-1] @ layer.weight_hh_l0.T
        return float(preactivations[1:].var(dim=1, unbiased=False).median())


def bn_eps_study(args) -> Dict:
    """Sequential digits with the models of ``_bn_eps_models`` at every eps of ``BN_EPS_VALUES``:
    gradient flow and the recurrent pre-activations' batch variance at initialization and after
    training, and test accuracy per epoch, per seed."""
    epochs = args.epochs or (1 if args.quick else 25)
    hidden = 16 if args.quick else 48
    train_split, test_split = _digits_splits(False, args.quick)
    probe = train_split.inputs[:, :128]
    builders = {eps: _bn_eps_models(hidden, eps) for eps in BN_EPS_VALUES}
    runs = []
    step, close = _progress(sum(map(len, builders.values())) * args.seeds, args.quiet, "bn-eps")
    for eps, models in builders.items():
        for name, build in models.items():
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                model = SequenceClassifier(build(), 10)
                flow_initial = flow_at(model, train_split, "cpu").tolist()
                variance_initial = recurrent_variance(model.recurrent, probe)
                trained = _train_digits(model, train_split, test_split, epochs, seed, args.lr)
                runs.append({"model": name, "eps": eps, "seed": seed, **trained,
                             "flow_initial": flow_initial, "flow_final": flow_at(model, train_split, "cpu").tolist(),
                             "recurrent_variance_initial": variance_initial,
                             "recurrent_variance_final": recurrent_variance(model.recurrent, probe)})
                step(f"{name} eps={eps:g}: {trained['final_accuracy']:.3f}")
    close()
    return {"epochs": epochs, "hidden_size": hidden, "eps_values": list(BN_EPS_VALUES), "runs": runs}


class CharacterModel(nn.Module):
    """Next-character logits: one-hot characters -> ``recurrent`` -> a linear readout. The
    recurrent state and ``first_step`` pass through, for reading a stream in pieces."""

    def __init__(self, recurrent: nn.Module, vocabulary_size: int):
        super().__init__()
        self.recurrent = recurrent
        self.vocabulary_size = vocabulary_size
        self.readout = nn.Linear(recurrent.hidden_size, vocabulary_size)

    def forward(self, characters: torch.Tensor, state=None, first_step: int = 0):
        inputs = nn.functional.one_hot(characters, self.vocabulary_size).float()
        output, state = self.recurrent(inputs, state, first_step=first_step)
        return self.readout(output), state


# how a BN-LSTM read in pieces numbers its steps for the per-timestep statistics
PIECE_STATISTICS = ("restart", "continue")


def _read_streams(model: CharacterModel, streams: torch.Tensor, piece: int, statistics_mode: str,
                  optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, float]:
    """One pass over ``streams`` (L, B) in pieces of ``piece`` characters, the state carried from
    piece to piece and detached (truncated backpropagation through time), each piece told that it
    starts at step 0 (``statistics_mode`` "restart") or at its position in the stream
    ("continue"); with ``optimizer`` a training step per piece (Adam, gradient norm clipped at 1).
    Returns bits per character over the pass, over its first piece and over the rest."""
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    state = None
    total = first = 0.0
    characters = first_characters = 0
    for start in range(0, streams.shape[0] - piece, piece):
        inputs, targets = streams[start:start + piece], streams[start + 1:start + piece + 1]
        with torch.set_grad_enabled(optimizer is not None):
            logits, state = model(inputs, state, first_step=start if statistics_mode == "continue" else 0)
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            (loss / targets.numel()).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        state = tuple(value.detach() for value in state) if isinstance(state, tuple) else state.detach()
        total += float(loss.detach())
        characters += targets.numel()
        if start == 0:
            first, first_characters = float(loss.detach()), targets.numel()
    bits = 1.0 / math.log(2.0)
    rest = characters - first_characters
    return {"bpc": total / characters * bits, "bpc_first_piece": first / first_characters * bits,
            "bpc_rest": (total - first) / rest * bits if rest else float("nan")}


def truncated_bptt_study(args) -> Dict:
    """A character-level language model of ``tasks.text_corpus`` (the first 90% to train on, the
    rest to test) trained by truncated backpropagation through time: 32 streams read in pieces of
    50 characters with the state carried. The BN-LSTM's per-timestep statistics restart at every
    piece (``first_step=0``, what a layer without ``first_step`` does) or continue through the
    stream (``first_step`` = the piece's position; with ``max_steps`` = the piece length every
    piece after the first takes the last slot); LSTM and LN-LSTM, which have no per-step
    statistics, for comparison; and both BN-LSTMs with their population statistics re-estimated
    after every epoch, as the cumulative average (``momentum=None``) of one pass over the training
    streams with the epoch's final weights. Test bits per character after every epoch; after
    training, the test stream read both ways, in pieces and one character at a time (as when
    generating)."""
    quick = args.quick
    epochs = args.epochs or (1 if quick else 20)
    hidden, piece, batch = (16, 10, 8) if quick else (128, 50, 32)
    text = tasks.text_corpus(20_000 if quick else None)
    vocabulary = "".join(sorted(set(text)))
    split = int(0.9 * len(text))
    train_streams = tasks.character_streams(text[:split], batch, vocabulary)
    test_streams = tasks.character_streams(text[split:], batch, vocabulary)
    # whole pieces only, so that read in pieces and one character at a time it is the same characters
    test_streams = test_streams[:(test_streams.shape[0] - 1) // piece * piece + 1]
    size = len(vocabulary)
    def batch_norm(momentum: Optional[float] = 0.1) -> Callable[[], nn.Module]:
        return lambda: normrnn.LSTM(size, hidden, norm="batch", max_steps=piece, momentum=momentum)
    # model: (builder, how its pieces number their steps, whether its population statistics are
    # re-estimated after every epoch)
    builders = {
        "LSTM": (lambda: normrnn.LSTM(size, hidden), "restart", False),
        "LN-LSTM": (lambda: normrnn.LSTM(size, hidden, norm="layer"), "restart", False),
        "BN-LSTM, statistics restart": (batch_norm(), "restart", False),
        "BN-LSTM, statistics continue": (batch_norm(), "continue", False),
        "BN-LSTM, statistics restart, re-estimated": (batch_norm(None), "restart", True),
        "BN-LSTM, statistics continue, re-estimated": (batch_norm(None), "continue", True),
    }
    runs = []
    step, close = _progress(len(builders) * args.seeds, args.quiet, "truncated-bptt")
    for name, (build, trained_mode, reestimate) in builders.items():
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = CharacterModel(build(), size)
            optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
            started = time.perf_counter()
            curve = []
            for _ in range(epochs):
                model.train()
                _read_streams(model, train_streams, piece, trained_mode, optimizer)
                if reestimate:
                    # the cumulative average of one pass with the epoch's final weights (still in
                    # training mode, so that the statistics update; no optimizer, no weight changes)
                    model.recurrent.reset_running_stats()
                    _read_streams(model, train_streams, piece, trained_mode)
                model.eval()
                curve.append(_read_streams(model, test_streams, piece, trained_mode)["bpc"])
            # in pieces as in training, and one character at a time as when generating text
            tested = {mode: _read_streams(model, test_streams, piece, mode) for mode in PIECE_STATISTICS}
            stepwise = {mode: _read_streams(model, test_streams, 1, mode) for mode in PIECE_STATISTICS}
            runs.append({"model": name, "seed": seed, "trained_with": trained_mode, "reestimated": reestimate,
                         "test_bpc_by_epoch": curve,
                         "test": tested, "test_one_at_a_time": stepwise, "seconds": time.perf_counter() - started})
            step(f"{name}: {curve[-1]:.3f} bpc")
    close()
    return {"epochs": epochs, "hidden_size": hidden, "piece": piece, "batch": batch, "vocabulary": size,
            "train_characters": split, "test_characters": len(text) - split, "runs": runs}


STUDIES = {"rnn-gradient-flow": rnn_gradient_flow, "gated-gradient-flow": gated_gradient_flow, "digits": digits_study,
           "longer-sequences": longer_sequences,
           "bn-eps": bn_eps_study, "truncated-bptt": truncated_bptt_study}

# the studies whose results are those of _adding_gradient_flow
ADDING_FLOW_STUDIES = ("rnn-gradient-flow", "gated-gradient-flow")


def _mean(values: List[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def report(name: str, results: Dict) -> str:
    """A markdown summary of one study's results (means over seeds)."""
    lines = [f"# {name}", "", f"seeds: {results['seeds']}, settings: " +
             ", ".join(f"{k}={v}" for k, v in results.items() if k not in ("runs", "seeds", "study")), ""]
    runs = results["runs"]
    if name in ADDING_FLOW_STUDIES:
        lines += ["| model | T | solved (of seeds) | test MSE | dL/dh_1 / dL/dh_T init | after training |",
                  "|---|---|---|---|---|---|"]
        for model in dict.fromkeys(run["model"] for run in runs):
            for steps in results["lengths"]:
                chosen = [run for run in runs if run["model"] == model and run["steps"] == steps]
                lines.append(
                    f"| {model} | {steps} | {sum(run['solved'] for run in chosen)}/{len(chosen)} | "
                    f"{_mean([run['test_mse'] for run in chosen]):.3f} | "
                    f"{_mean([diagnostics.flow_ratio(run['flow_initial']) for run in chosen]):.2e} | "
                    f"{_mean([diagnostics.flow_ratio(run['flow_final']) for run in chosen]):.2e} |")
    elif name == "digits":
        lines += ["| model | sequential digits accuracy | permuted | epochs to 80% (sequential) |", "|---|---|---|---|"]
        for model in dict.fromkeys(run["model"] for run in runs):
            plain = [run for run in runs if run["model"] == model and not run["permuted"]]
            permuted = [run for run in runs if run["model"] == model and run["permuted"]]
            reach = [next((i + 1 for i, a in enumerate(run["accuracy_by_epoch"]) if a >= 0.8), None) for run in plain]
            reach_text = ", ".join("-" if r is None else str(r) for r in reach)
            lines.append(f"| {model} | {_mean([r['final_accuracy'] for r in plain]):.3f} | "
                         f"{_mean([r['final_accuracy'] for r in permuted]):.3f} | {reach_text} |")
    elif name == "bn-eps":
        lines += ["| model | eps | test accuracy | dL/dh_1 / dL/dh_T init | after training | "
                  "var(h W_hh) / eps init | after training |", "|---|---|---|---|---|---|---|"]
        for model in dict.fromkeys(run["model"] for run in runs):
            for eps in results["eps_values"]:
                chosen = [run for run in runs if run["model"] == model and run["eps"] == eps]
                lines.append(
                    f"| {model} | {eps:g} | {_mean([run['final_accuracy'] for run in chosen]):.3f} | "
                    f"{_mean([diagnostics.flow_ratio(run['flow_initial']) for run in chosen]):.2e} | "
                    f"{_mean([diagnostics.flow_ratio(run['flow_final']) for run in chosen]):.2e} | "
                    f"{_mean([run['recurrent_variance_initial'] / eps for run in chosen]):.2e} | "
                    f"{_mean([run['recurrent_variance_final'] / eps for run in chosen]):.2e} |")
    elif name == "truncated-bptt":
        lines += ["Test bits per character (lower is better), the state carried through the stream; each BN-LSTM read "
                  "with its statistics restarting at every piece (first_step=0) or continuing (first_step = position).",
                  "", f"| model | statistics in training | best epoch: bpc (epoch) | last epoch, pieces of "
                  f"{results['piece']}: restart | continue | as trained: first piece / the rest | one character at a "
                  "time: restart | continue |", "|---|---|---|---|---|---|---|---|"]
        for model in dict.fromkeys(run["model"] for run in runs):
            chosen = [run for run in runs if run["model"] == model]

            def mean_of(key, mode, value="bpc"):
                return _mean([run[key][mode][value] for run in chosen])
            trained_with = chosen[0]["trained_with"] if model.startswith("BN") else "-"
            # read as in training, after every epoch: where the curve turns up, the model overfits
            curve = torch.tensor([run["test_bpc_by_epoch"] for run in chosen]).mean(0)
            lines.append(f"| {model} | {trained_with} | {float(curve.min()):.3f} ({int(curve.argmin()) + 1}) | "
                         f"{mean_of('test', 'restart'):.3f} | "
                         f"{mean_of('test', 'continue'):.3f} | "
                         f"{mean_of('test', chosen[0]['trained_with'], 'bpc_first_piece'):.3f} / "
                         f"{mean_of('test', chosen[0]['trained_with'], 'bpc_rest'):.3f} | "
                         f"{mean_of('test_one_at_a_time', 'restart'):.3f} | "
                         f"{mean_of('test_one_at_a_time', 'continue'):.3f} |")
    else:
        lengths = list(runs[0]["test_mse_by_length"]) if runs else []
        lines += ["| model | " + " | ".join(f"test MSE at T={length}" for length in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for model in dict.fromkeys(run["model"] for run in runs):
            chosen = [run for run in runs if run["model"] == model]
            lines.append(f"| {model} | " + " | ".join(
                f"{_mean([run['test_mse_by_length'][length] for run in chosen]):.3f}" for length in lengths) + " |")
    return "\n".join(lines) + "\n"


def plots(name: str, results: Dict, out: str) -> List[str]:
    """Draws the figures of experiment ``name`` from its ``results`` into ``out``; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    runs = results["runs"]
    if name in ADDING_FLOW_STUDIES:
        steps = results["lengths"][-1]
        for key in ("flow_initial", "flow_final"):
            curves = {}
            for model in dict.fromkeys(run["model"] for run in runs):
                chosen = [torch.tensor(run[key]) for run in runs if run["model"] == model and run["steps"] == steps]
                curves[model] = torch.stack(chosen).mean(0)
            path = os.path.join(out, f"{key}.png")
            diagnostics.plot_gradient_flow(curves, path, title=f"Adding problem, T={steps}: ||dL/dh_t|| "
                                           f"({'init' if key == 'flow_initial' else 'trained'})")
            paths.append(path)
    elif name == "digits":
        for permuted in (False, True):
            figure, axes = plt.subplots(figsize=(7, 4))
            for model in dict.fromkeys(run["model"] for run in runs):
                curves = torch.tensor([run["accuracy_by_epoch"] for run in runs
                                       if run["model"] == model and run["permuted"] == permuted])
                axes.plot(range(1, curves.shape[1] + 1), curves.mean(0).numpy(), marker="o", label=model)
            axes.set_xlabel("epoch")
            axes.set_ylabel("test accuracy")
            axes.set_title(f"{'Permuted' if permuted else 'Sequential'} digits (mean over seeds)")
            axes.legend(fontsize=8)
            name_of_plot = f"{'permuted' if permuted else 'sequential'}_digits.png"
            paths.append(diagnostics.save_figure(figure, os.path.join(out, name_of_plot)))
    elif name == "bn-eps":
        models = list(dict.fromkeys(run["model"] for run in runs))
        figure, grid = plt.subplots(2, len(models), figsize=(4 * len(models), 6.5), sharey=True, squeeze=False)
        for row, key in enumerate(("flow_initial", "flow_final")):
            for column, model in enumerate(models):
                axes = grid[row][column]
                for eps in results["eps_values"]:
                    # relative to the last step, so that models and eps with different loss scales
                    # compare; a step whose gradient underflowed to zero is left out (a gap)
                    flows = torch.stack([torch.tensor(run[key]) / run[key][-1] for run in runs
                                         if run["model"] == model and run["eps"] == eps]).mean(0)
                    flows = torch.where(flows > 0, flows, torch.full_like(flows, float("nan")))
                    axes.plot(range(1, len(flows) + 1), flows.numpy(), label=f"eps {eps:g}")
                axes.set_yscale("log")
                axes.set_ylim(1e-25, 1e8)
                axes.set_title(f"{model} ({'init' if row == 0 else 'trained'})", fontsize=9)
                axes.set_xlabel("timestep t")
                if column == 0:
                    axes.set_ylabel("||dL/dh_t|| / ||dL/dh_T||")
                axes.legend(fontsize=7)
        figure.suptitle("Sequential digits: gradient flow by batch norm eps (mean over seeds)")
        paths.append(diagnostics.save_figure(figure, os.path.join(out, "flow_by_eps.png"), dpi=110))
    elif name == "truncated-bptt":
        figure, axes = plt.subplots(figsize=(7, 4))
        for model in dict.fromkeys(run["model"] for run in runs):
            curves = torch.tensor([run["test_bpc_by_epoch"] for run in runs if run["model"] == model])
            axes.plot(range(1, curves.shape[1] + 1), curves.mean(0).numpy(), marker="o", markersize=3, label=model)
        axes.set_xlabel("epoch")
        axes.set_ylabel("test bits per character")
        axes.set_title(f"Character model, truncated BPTT in pieces of {results['piece']} (mean over seeds)")
        axes.legend(fontsize=8)
        paths.append(diagnostics.save_figure(figure, os.path.join(out, "test_bpc.png")))
    else:
        figure, axes = plt.subplots(figsize=(7, 4))
        for model in dict.fromkeys(run["model"] for run in runs):
            chosen = [run for run in runs if run["model"] == model]
            lengths = [int(length) for length in chosen[0]["test_mse_by_length"]]
            axes.plot(lengths, [_mean([run["test_mse_by_length"][str(length)] for run in chosen])
                                for length in lengths], marker="o", label=model)
        axes.axhline(1 / 6, color="gray", linestyle=":", label="predicting the mean")
        axes.set_xscale("log")
        axes.set_xlabel("test sequence length T")
        axes.set_ylabel("test MSE")
        axes.set_title(f"Adding problem trained at T={results['train_steps']}")
        axes.legend(fontsize=8)
        paths.append(diagnostics.save_figure(figure, os.path.join(out, "longer_sequences.png")))
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m normrnn experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(STUDIES))
    parser.add_argument("--seeds", type=int, default=None, help="default 2 (1 with --quick)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--epochs", type=int, default=None,
                        help="digits, bn-eps and truncated-bptt: training epochs (default 8, 25 and 20)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="adding-problem studies: training iterations (default 800)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 2)
    out = args.out or os.path.join("normrnn-experiments", args.name)
    os.makedirs(out, exist_ok=True)
    results = STUDIES[args.name](args)
    results.update(study=args.name, seeds=args.seeds)
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump(results, handle)
    text = report(args.name, results)
    paths = plots(args.name, results, out)
    with open(os.path.join(out, "report.md"), "w") as handle:
        handle.write(text + "\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in paths) + "\n")
    print(text)
    print(f"saved to {out}: results.json, report.md, " + ", ".join(os.path.basename(p) for p in paths))
    return 0
