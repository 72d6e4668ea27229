"""Gradient flow through time, growth of the hidden state and the spectrum of the step Jacobian,
for models built from normrnn layers and for torch's own RNN modules.

Every quantity is measured on the reference path, which runs the recurrence one step at a time in
autograd (the fused backends are switched to it for the measurement and back; a torch
``nn.LSTM``/``GRU``/``RNN`` is converted with ``from_torch`` and the same weights). A state
observer (``normrnn.reference.common.STATE_OBSERVERS``) sees h_t after every step of every layer
and direction, in the order they run; each such sequence of steps is a *trace*, so the results
are tensors of shape (traces, T): one row per layer and direction (reverse directions in their
own processing order), ``result[-1]`` the last layer.

    gradient_flow:        g_t = || dL/dh_t ||_F over the batch and hidden units, where dL/dh_t is
                          the total derivative: through the output at t and through h_{t+1}, ...
    hidden_norm_growth:   n_t = mean over the batch of || h_t ||_2
    jacobian_spectrum:    singular values of J_t = d h_t[b] / d h_{t-1}[b] for one sample b
                          (the sample's diagonal block; batch norm also couples samples)

Vanishing gradients show as g_1 / g_T -> 0 over long T, exploding ones as g_1 / g_T -> inf, and
both as singular values of J_t far below or above 1.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Iterator, List, Sequence

import torch
from torch import Tensor, nn

from .modules import GRU, LSTM, RNN, _NormRNNBase
from .reference import common

_TORCH_TO_NORMRNN = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN}


def as_measurable(model: nn.Module) -> nn.Module:
    """``model`` itself, or for a torch ``nn.LSTM``/``GRU``/``RNN`` the normrnn layer with its
    configuration and weights (norm=None: the same function, to float rounding)."""
    for torch_class, ours in _TORCH_TO_NORMRNN.items():
        if type(model) is torch_class:
            converted = ours.from_torch(model, backend="reference")
            return converted.to(next(model.parameters()).device)
    return model


@contextlib.contextmanager
def reference_path(model: nn.Module) -> Iterator[None]:
    """Runs every normrnn layer in ``model`` on the reference backend inside the block."""
    layers = [module for module in model.modules() if isinstance(module, _NormRNNBase)]
    if not layers:
        raise TypeError("model: expected a normrnn layer, a model containing normrnn layers, or a torch "
                        f"nn.LSTM/GRU/RNN; found no recurrent layer in {type(model).__name__}")
    saved = [layer.backend for layer in layers]
    for layer in layers:
        layer.backend = "reference"
    try:
        yield
    finally:
        for layer, backend in zip(layers, saved):
            layer.backend = backend


@contextlib.contextmanager
def _observing(observer: Callable[[int, Tensor], Tensor]) -> Iterator[None]:
    common.STATE_OBSERVERS.append(observer)
    try:
        yield
    finally:
        common.STATE_OBSERVERS.remove(observer)


class _Traces:
    """Groups observed steps into traces: a step 0 starts a new layer or direction."""

    def __init__(self):
        self.rows: List[List] = []

    def add(self, step: int, value) -> None:
        if step == 0:
            self.rows.append([])
        self.rows[-1].append(value)


def _forward(model: nn.Module, inputs, forward_kwargs):
    inputs = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    return model(*inputs, **forward_kwargs)


def gradient_flow(model: nn.Module, inputs, loss_fn: Callable[..., Tensor], **forward_kwargs) -> Tensor:
    """|| dL/dh_t || for every step t of every layer and direction: a tensor (traces, T).

    ``loss_fn(model(*inputs, **forward_kwargs))`` is the scalar loss L. dL/dh_t is taken as the
    gradient of L with respect to a zero perturbation added to h_t inside the recurrence, which
    is the total derivative (through the output at t and through every later step). Parameter
    gradients are left as they were.
    """
    model = as_measurable(model)
    traces = _Traces()

    def perturb(step: int, h: Tensor) -> Tensor:
        delta = torch.zeros_like(h, requires_grad=True)
        traces.add(step, delta)
        return h + delta

    with reference_path(model), _observing(perturb), torch.enable_grad():
        loss = loss_fn(_forward(model, inputs, forward_kwargs))
    deltas = [delta for row in traces.rows for delta in row]
    grads = torch.autograd.grad(loss, deltas, allow_unused=True)
    norms = iter([0.0 if grad is None else float(grad.detach().double().norm()) for grad in grads])
    return torch.tensor([[next(norms) for _ in row] for row in traces.rows], dtype=torch.float64)


def hidden_norm_growth(model: nn.Module, inputs, **forward_kwargs) -> Tensor:
    """Mean over the batch of || h_t ||_2 for every step of every layer and direction (traces, T)."""
    model = as_measurable(model)
    traces = _Traces()

    def record(step: int, h: Tensor) -> Tensor:
        traces.add(step, float(h.detach().double().norm(dim=-1).mean()))
        return h

    with reference_path(model), _observing(record), torch.no_grad():
        _forward(model, inputs, forward_kwargs)
    return torch.tensor(traces.rows, dtype=torch.float64)


def jacobian_spectrum(model: nn.Module, inputs, steps: Sequence[int], sample: int = 0, trace: int = -1,
                      **forward_kwargs) -> Dict[int, Tensor]:
    """Singular values (descending) of J_t = d h_t[sample] / d h_{t-1}[sample] at each t in
    ``steps`` (1 <= t < T), for one layer and direction (``trace``, default the last).

    Computed by autograd, one backward pass per hidden unit, with a zero perturbation of h_{t-1}
    inside the recurrence; the model runs as it is (train or eval mode)."""
    model = as_measurable(model)
    wanted = sorted(set(int(step) for step in steps))
    if not wanted or wanted[0] < 1:
        raise ValueError(f"steps: expected timesteps t >= 1 (J_t needs h_(t-1)), got {list(steps)}")
    traces = _Traces()
    recorded: List[Dict[int, Tensor]] = []

    def perturb(step: int, h: Tensor) -> Tensor:
        if step == 0:
            recorded.append({})
        traces.add(step, None)
        if step + 1 in wanted or step in wanted:
            if step + 1 in wanted:
                delta = torch.zeros_like(h, requires_grad=True)
                h = h + delta
                recorded[-1][("delta", step + 1)] = delta
            if step in wanted:
                recorded[-1][("h", step)] = h
        return h

    with reference_path(model), _observing(perturb), torch.enable_grad():
        _forward(model, inputs, forward_kwargs)
    if not recorded:
        raise RuntimeError("model: no recurrent step was observed")
    chosen = recorded[trace]
    spectra = {}
    for step in wanted:
        if ("h", step) not in chosen:
            raise ValueError(f"steps: t={step} is beyond the sequence ({len(traces.rows[trace])} steps)")
        h, delta = chosen[("h", step)], chosen[("delta", step)]
        rows = []
        for unit in range(h.shape[-1]):
            (grad,) = torch.autograd.grad(h[sample, unit], delta, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(delta[sample]) if grad is None else grad[sample])
        jacobian = torch.stack(rows).detach().double()
        spectra[step] = torch.linalg.svdvals(jacobian)
    return spectra


def plot_gradient_flow(results: Dict[str, Tensor], path, title: str = "Gradient flow through time",
                       ylabel: str = "||dL/dh_t||") -> None:
    """One line per model of a (T,) tensor against t, log scale, saved as an image at ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for name, values in results.items():
        values = torch.as_tensor(values).double().flatten()
        axes.plot(range(1, len(values) + 1), values.clamp_min(1e-300).numpy(), label=name)
    axes.set_yscale("log")
    axes.set_xlabel("timestep t")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=8)
    save_figure(figure, path)


def save_figure(figure, path, dpi: int = 120) -> str:
    """Lays out ``figure``, saves it as an image at ``path`` and closes it (pyplot keeps every open
    figure alive); returns ``path``."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path


def flow_ratio(flow: Tensor) -> float:
    """g_1 / g_T of one trace: below 1 the gradient shrinks going back in time, above 1 it grows."""
    flow = torch.as_tensor(flow).double().flatten()
    return float(flow[0] / flow[-1].clamp_min(1e-300))


__all__: Iterable[str] = ("gradient_flow", "hidden_norm_growth", "jacobian_spectrum", "plot_gradient_flow",
                          "flow_ratio", "reference_path", "as_measurable")
