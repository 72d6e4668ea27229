"""``python -m normrnn demo``: does normalization inside the recurrence help, on your machine?

Trains five classifiers on sequential digits (scikit-learn's 8x8 digits read pixel by pixel, T=64)
with the fastest backend present, each for the same time budget:

    LSTM, BN-LSTM (per-timestep batch norm, gamma 0.1), LN-LSTM (layer norm),
    RNN with tanh, and RNN with batch norm in place of tanh and the bias
    (h_t = BN(W_ih x_t) + BN(W_hh h_{t-1}), ``nonlinearity=None, bias=False``)

and prints a table of test accuracy and gradient flow ||dL/dh_1|| / ||dL/dh_T|| (the loss on
the last step; far below 1: the gradient vanishes on its way back to the first pixel), with plots
of the gradient flow and the training loss in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Dict, List, Optional

import torch
from torch import nn

import normrnn
from normrnn import diagnostics, tasks


class SequenceClassifier(nn.Module):
    """A recurrent layer over (T, B, input_size) and a linear readout of its last output."""

    def __init__(self, recurrent: nn.Module, classes: int):
        super().__init__()
        self.recurrent = recurrent
        self.readout = nn.Linear(recurrent.hidden_size * (2 if recurrent.bidirectional else 1), classes)

    def forward(self, inputs):
        output, _ = self.recurrent(inputs)
        return self.readout(output[-1])


def model_zoo(hidden_size: int, input_size: int = 1, steps: int = 64) -> Dict[str, nn.Module]:
    """The five recurrent layers the demo compares (fresh parameters)."""
    return {
        "LSTM": normrnn.LSTM(input_size, hidden_size),
        "BN-LSTM": normrnn.LSTM(input_size, hidden_size, norm="batch", max_steps=steps),
        "LN-LSTM": normrnn.LSTM(input_size, hidden_size, norm="layer"),
        "RNN tanh": normrnn.RNN(input_size, hidden_size, nonlinearity="tanh"),
        "RNN BN, no tanh": normrnn.RNN(input_size, hidden_size, norm="batch", nonlinearity=None, bias=False,
                                       max_steps=steps),
    }


def accuracy(model: nn.Module, split: tasks.DigitsSplit, device, batch: int = 512) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, split.targets.shape[0], batch):
            inputs = split.inputs[:, start:start + batch].to(device)
            predicted = model(inputs).argmax(-1).cpu()
            correct += int((predicted == split.targets[start:start + batch]).sum())
    model.train()
    return correct / split.targets.shape[0]


def flow_at(model: nn.Module, split: tasks.DigitsSplit, device, samples: int = 128) -> torch.Tensor:
    """||dL/dh_t|| of the recurrent layer for the cross-entropy of the last step's readout."""
    inputs = split.inputs[:, :samples].to(device)
    targets = split.targets[:samples].to(device)
    loss_fn = nn.CrossEntropyLoss()
    flow = diagnostics.gradient_flow(model, inputs, lambda logits: loss_fn(logits, targets))
    return flow[-1]


def train(name: str, model: nn.Module, train_split, test_split, device, seconds: float, batch: int,
          learning_rate: float, progress) -> Dict:
    """Adam on cross-entropy for ``seconds`` of wall time (whole epochs of shuffled batches)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    count = train_split.targets.shape[0]
    losses: List[float] = []
    flow_initial = flow_at(model, test_split, device)
    started = time.perf_counter()
    epochs = 0
    while time.perf_counter() - started < seconds:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - batch + 1, batch):
            rows = order[start:start + batch]
            inputs = train_split.inputs[:, rows].to(device)
            targets = train_split.targets[rows].to(device)
            loss = loss_fn(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            progress(name, losses[-1])
            if time.perf_counter() - started >= seconds:
                break
        epochs += 1
    flow_final = flow_at(model, test_split, device)
    return {"test_accuracy": accuracy(model, test_split, device), "epochs": epochs, "iterations": len(losses),
            "seconds": time.perf_counter() - started, "losses": losses,
            "flow_initial": flow_initial.tolist(), "flow_final": flow_final.tolist(),
            "flow_ratio_initial": diagnostics.flow_ratio(flow_initial),
            "flow_ratio_final": diagnostics.flow_ratio(flow_final)}


def _progress_bar(total_seconds: float, quiet: bool):
    """A tqdm bar over the time budget when tqdm is installed, else a line per 50 iterations."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    started = time.perf_counter()
    state = {"iterations": 0}
    bar = None if (tqdm is None or quiet) else tqdm(total=int(total_seconds), unit="s", desc="demo",
                                                     bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total}s "
                                                                "{postfix}")

    def update(name: str, loss: float) -> None:
        state["iterations"] += 1
        elapsed = int(min(time.perf_counter() - started, total_seconds))
        if bar is not None and (elapsed != bar.n or state.get("name") != name):
            # redrawn once a second (or when the model changes), not at every iteration
            state["name"] = name
            bar.n = elapsed
            bar.set_postfix_str(f"{name} loss {loss:.3f}", refresh=True)
        elif not quiet and state["iterations"] % 50 == 0:
            print(f"  [{elapsed:4d}s] {name}: loss {loss:.3f}", flush=True)

    def close() -> None:
        if bar is not None:
            bar.n = bar.total
            bar.close()

    return update, close


def save_plots(results: Dict[str, Dict], out: str) -> List[str]:
    """gradient_flow.png (before and after training) and loss.png; returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, label in (("flow_initial", "at initialization"), ("flow_final", "after training")):
        path = os.path.join(out, f"gradient_flow_{key.split('_')[1]}.png")
        diagnostics.plot_gradient_flow({name: torch.tensor(result[key]) for name, result in results.items()}, path,
                                       title=f"Sequential digits: ||dL/dh_t|| {label}")
        paths.append(path)
    figure, axes = plt.subplots(figsize=(7, 4))
    for name, result in results.items():
        losses = torch.tensor(result["losses"])
        window = max(1, len(losses) // 50)
        smooth = losses.unfold(0, window, window).mean(-1) if len(losses) >= window else losses
        axes.plot([window * (i + 1) for i in range(len(smooth))], smooth.numpy(), label=name)
    axes.set_xlabel("iteration")
    axes.set_ylabel("training cross-entropy")
    axes.set_title("Sequential digits: training loss (same wall-time budget)")
    axes.legend(fontsize=8)
    paths.append(diagnostics.save_figure(figure, os.path.join(out, "loss.png")))
    return paths


def format_table(results: Dict[str, Dict]) -> str:
    lines = ["| model | test accuracy | iterations | dL/dh_1 / dL/dh_T at init | after training |",
             "|---|---|---|---|---|"]
    for name, result in results.items():
        lines.append(f"| {name} | {result['test_accuracy']:.3f} | {result['iterations']} | "
                     f"{result['flow_ratio_initial']:.2e} | {result['flow_ratio_final']:.2e} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m normrnn demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=None,
                        help="total training time (default: 2.5 on a CPU, 1 on a GPU; --quick: 0.2)")
    parser.add_argument("--hidden-size", type=int, default=None, help="default 64 (32 with --quick)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--out", default="normrnn-demo", help="folder for the plots and results.json")
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds) that checks everything works")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    minutes = args.minutes if args.minutes is not None else (0.2 if args.quick else
                                                             (1.0 if device.type == "cuda" else 2.5))
    hidden_size = args.hidden_size or (32 if args.quick else 64)
    torch.manual_seed(args.seed)
    try:
        train_split, test_split, _ = tasks.digits(seed=args.seed)
    except ImportError as error:
        print(f"python -m normrnn demo: {error}")
        return 2
    os.makedirs(args.out, exist_ok=True)
    zoo = model_zoo(hidden_size)
    # backends are chosen (and the C++ one built, the first time) before any clock starts, so that
    # a build never eats into a model's training budget
    probe = train_split.inputs[:1, :1].to(device)
    backends = {name: normrnn.dispatch.resolve(layer.backend, layer.cell, layer.norm, probe, layer.nonlinearity)
                for name, layer in zoo.items()}
    seconds = 60.0 * minutes / len(zoo)
    print(f"normrnn {normrnn.__version__} demo: sequential digits (T=64, {train_split.targets.shape[0]} train / "
          f"{test_split.targets.shape[0]} test), hidden size {hidden_size}, {seconds:.0f} s per model on {device} "
          f"(backend {', '.join(sorted(set(backends.values())))})")
    progress, close = _progress_bar(60.0 * minutes, args.quiet)
    results = {}
    for name, recurrent in zoo.items():
        torch.manual_seed(args.seed)
        model = SequenceClassifier(recurrent, 10).to(device)
        results[name] = train(name, model, train_split, test_split, device, seconds, args.batch, args.lr, progress)
        results[name]["backend"] = backends[name]
    close()
    table = format_table(results)
    print(table)
    print("dL/dh_1 / dL/dh_T: the gradient of the loss (on the last step) with respect to the first hidden "
          "state, relative to the last; far below 1 = vanishing.")
    paths = save_plots(results, args.out)
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump({"device": str(device), "hidden_size": hidden_size, "minutes": minutes, "models": results}, handle)
    print("saved: " + ", ".join(paths + [os.path.join(args.out, "results.json")]))
    return 0 if all(math.isfinite(result["losses"][-1]) for result in results.values() if result["losses"]) else 1
