"""Long-range tasks for recurrent networks, generated or read from installed packages: nothing is
downloaded.

- ``adding_problem`` (Hochreiter & Schmidhuber 1997): two channels, T random numbers and a marker
  on two of them; the target is the sum of the two marked numbers. Predicting 1.0 (the mean)
  scores a mean squared error of about 0.167; solving it needs memory across T steps.
- ``copy_task``: ``copy_length`` symbols, T blanks with a delimiter at the end, then the symbols
  must be reproduced; predicting blanks then random symbols scores a cross-entropy of
  copy_length * log(symbols) / (T + 2 copy_length).
- ``digits``: the 8x8 handwritten digits that scikit-learn ships (1797 images), read pixel by
  pixel (T = 64, one input): the small sibling of sequential MNIST; ``permuted=True`` applies one
  fixed permutation of the pixels, which spreads the dependencies over the whole sequence.
- ``text_corpus``: a character corpus made of the docstrings of Python's standard library
  modules (present wherever Python is; its exact text follows the Python version):
  ``character_batches`` takes random windows of it, ``character_streams`` cuts it into contiguous
  streams for truncated backpropagation through time.
"""
from __future__ import annotations

import importlib
import types
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor


def _generator(seed: Optional[int]) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(0 if seed is None else seed)
    return generator


def adding_problem(samples: int, steps: int, seed: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Inputs (T, samples, 2): channel 0 uniform in [0, 1), channel 1 a marker that is 1 at one
    position in the first half and one in the second half; targets (samples,) the sum of the two
    marked numbers."""
    if steps < 2:
        raise ValueError(f"steps: expected at least 2, got {steps}")
    generator = _generator(seed)
    values = torch.rand(steps, samples, generator=generator)
    half = steps // 2
    first = torch.randint(0, half, (samples,), generator=generator)
    second = torch.randint(half, steps, (samples,), generator=generator)
    markers = torch.zeros(steps, samples)
    columns = torch.arange(samples)
    markers[first, columns] = 1.0
    markers[second, columns] = 1.0
    targets = values[first, columns] + values[second, columns]
    return torch.stack([values, markers], dim=-1), targets


def copy_task(samples: int, steps: int, symbols: int = 8, copy_length: int = 10,
              seed: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Inputs (T + 2 copy_length, samples, symbols + 2) one-hot, targets (same length, samples)
    class indices. Classes 0..symbols-1 are the symbols, ``symbols`` the blank, ``symbols + 1``
    the delimiter. The sequence: copy_length symbols, then T - 1 blanks and one delimiter, then
    copy_length blanks during which the targets are the symbols in order (blank elsewhere)."""
    if steps < 1 or copy_length < 1 or symbols < 1:
        raise ValueError(f"steps, copy_length, symbols: expected positive values, got {steps}, {copy_length}, "
                         f"{symbols}")
    generator = _generator(seed)
    blank, delimiter = symbols, symbols + 1
    total = steps + 2 * copy_length
    sequence = torch.randint(0, symbols, (copy_length, samples), generator=generator)
    inputs = torch.full((total, samples), blank, dtype=torch.long)
    inputs[:copy_length] = sequence
    inputs[copy_length + steps - 1] = delimiter
    targets = torch.full((total, samples), blank, dtype=torch.long)
    targets[-copy_length:] = sequence
    return torch.nn.functional.one_hot(inputs, symbols + 2).float(), targets


@dataclass
class DigitsSplit:
    """Sequential digits: ``inputs`` (64, N, 1) in [0, 1], ``targets`` (N,) in 0..9."""
    inputs: Tensor
    targets: Tensor


def digits(permuted: bool = False, seed: int = 0, test_fraction: float = 0.25
           ) -> Tuple[DigitsSplit, DigitsSplit, Optional[Tensor]]:
    """(train, test, permutation) of scikit-learn's 8x8 digits read pixel by pixel, scaled to
    [0, 1]; the split and the permutation (None unless ``permuted``) are fixed by ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("digits() needs scikit-learn (pip install 'normrnn[demo]')") from error
    data = load_digits()
    images = torch.tensor(data.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    generator = _generator(seed)
    order = torch.randperm(len(labels), generator=generator)
    permutation = torch.randperm(64, generator=generator) if permuted else None
    if permutation is not None:
        images = images[:, permutation]
    test_size = int(round(len(labels) * test_fraction))
    test_rows, train_rows = order[:test_size], order[test_size:]

    def split(rows: Tensor) -> DigitsSplit:
        return DigitsSplit(images[rows].t().unsqueeze(-1).contiguous(), labels[rows])

    return split(train_rows), split(test_rows), permutation


# Stable, documented modules whose docstrings make the corpus (all part of the standard library).
_CORPUS_MODULES = ("argparse", "collections", "contextlib", "dataclasses", "functools", "heapq", "inspect", "json",
                   "logging", "pathlib", "pickle", "random", "re", "string", "textwrap", "threading", "typing",
                   "unittest", "zipfile")


def text_corpus(max_characters: Optional[int] = None) -> str:
    """The docstrings (module, classes and functions) of a fixed list of standard-library modules,
    joined: English prose with code fragments, about 150,000 characters."""
    parts = []
    for name in _CORPUS_MODULES:
        module = importlib.import_module(name)
        parts.append(module.__doc__ or "")
        for attribute, value in sorted(vars(module).items()):
            if isinstance(value, types.ModuleType):  # typing.io and typing.re warn when touched
                continue
            if not attribute.startswith("_") and getattr(value, "__module__", None) == name and value.__doc__:
                parts.append(value.__doc__)
    text = "\n\n".join(part.strip() for part in parts if part.strip())
    return text if max_characters is None else text[:max_characters]


def character_batches(text: str, steps: int, batch: int, seed: Optional[int] = None
                      ) -> Tuple[Tensor, Tensor, str]:
    """Random windows of ``text`` for a character-level language model: inputs (T, batch) and
    targets (T, batch) (the next character), as indices into the returned vocabulary string."""
    vocabulary = "".join(sorted(set(text)))
    index = {character: position for position, character in enumerate(vocabulary)}
    encoded = torch.tensor([index[character] for character in text], dtype=torch.long)
    if len(encoded) <= steps + 1:
        raise ValueError(f"text: expected more than {steps + 1} characters, got {len(encoded)}")
    starts = torch.randint(0, len(encoded) - steps - 1, (batch,), generator=_generator(seed))
    windows = torch.stack([encoded[start:start + steps + 1] for start in starts.tolist()], dim=1)
    return windows[:-1], windows[1:], vocabulary


def character_streams(text: str, batch: int, vocabulary: str) -> Tensor:
    """``text`` as ``batch`` contiguous streams for truncated backpropagation through time, which
    reads them in pieces and carries the state from piece to piece: (L, batch) indices into
    ``vocabulary``, stream b the b-th of ``batch`` consecutive equal parts of the text (the
    remainder of ``len(text) / batch`` left off its end)."""
    index = {character: position for position, character in enumerate(vocabulary)}
    missing = sorted(set(text) - set(index))
    if missing:
        raise ValueError(f"text: characters {missing[:5]!r} are not in the vocabulary")
    length = len(text) // batch
    if length < 2:
        raise ValueError(f"text: expected at least {2 * batch} characters for {batch} streams, got {len(text)}")
    encoded = torch.tensor([index[character] for character in text[:length * batch]], dtype=torch.long)
    return encoded.view(batch, length).t().contiguous()
