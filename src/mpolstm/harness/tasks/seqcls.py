"""Sequence classification (the paper's IMDB task; sequential MNIST offline by default).

Model: [Embedding (token inputs)] -> LSTM -> Linear on the last hidden state. The whole task
(model, presets, builder, export inputs) is declared here and registered as ``seqcls``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from ..data import load_seqcls
from ..training import ACCURACY
from .base import Task
from .registry import TaskType, register_task

__all__ = ["SeqClassifier", "SeqClsSize", "SIZES", "IMDB_VOCABULARY", "make_task", "example_inputs", "TASK"]


class SeqClassifier(nn.Module):
    """(N, T, F) features or (N, T) token ids -> (N, num_classes) logits.

    The LSTM is the attribute ``lstm`` (what compression and pruning target); the optional
    embedding is ``embedding`` and the classifier ``head``."""

    def __init__(self, num_classes: int, hidden_size: int, *, input_size: int | None = None,
                 vocab_size: int | None = None, embedding_dim: int = 128, num_layers: int = 1) -> None:
        super().__init__()
        if (input_size is None) == (vocab_size is None):
            raise ValueError("SeqClassifier needs exactly one of input_size (features) or vocab_size (tokens)")
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0) if vocab_size else None
        self.lstm = nn.LSTM(embedding_dim if vocab_size else input_size, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.embedding is not None:
            x = self.embedding(x)
        _, (h_n, _) = self.lstm(x)
        return self.head(h_n[-1])


@dataclass(frozen=True)
class SeqClsSize:
    """Model size and training budget of one preset."""

    hidden_size: int
    train_examples: int | None  # None: the whole training split
    batch_size: int
    dense_epochs: int
    finetune_epochs: int
    lr: float


SIZES = {
    # quick: the demo; ~6 minutes for the whole 15-row table on 2 CPU cores (5 min 55 s with the 8 paper rows)
    "quick": SeqClsSize(hidden_size=128, train_examples=None, batch_size=50, dense_epochs=10, finetune_epochs=6, lr=3e-3),
    # standard: <= 90 minutes for the whole table on 2 CPU cores (measured: 9 min with 2 threads)
    "standard": SeqClsSize(hidden_size=256, train_examples=None, batch_size=50, dense_epochs=20, finetune_epochs=8, lr=2e-3),
    # paper: the authors' IMDB configuration scale (embedding 128, LSTM 256); for a GPU
    "paper": SeqClsSize(hidden_size=256, train_examples=None, batch_size=300, dense_epochs=40, finetune_epochs=15, lr=1e-3),
}


IMDB_VOCABULARY = 25_000
"""The paper's IMDB vocabulary: the 25,000 most frequent training words (plus <pad> and <unk>)."""


def make_task(preset: str = "quick", *, dataset: str = "mnist", data_dir: str | Path | None = None, seed: int = 0,
              max_len: int = 800, embedding_dim: int = 128, hidden_size: int | None = None) -> Task:
    """The sequence-classification task at a preset size (see :data:`SIZES`; ``hidden_size``
    overrides its LSTM's); IMDB uses the paper's vocabulary (:data:`IMDB_VOCABULARY`), sequences cut
    to ``max_len`` tokens and embedded in ``embedding_dim`` dimensions (the paper's LSTM input is 256)."""
    size: SeqClsSize = TASK.size(preset)
    if hidden_size is not None:
        size = replace(size, hidden_size=hidden_size)
    kwargs = {"seed": seed}
    if dataset == "imdb":
        kwargs.update(max_len=max_len, vocab_size=IMDB_VOCABULARY)
    data = load_seqcls(dataset, data_dir=data_dir, **kwargs)
    if size.train_examples is not None:
        data = data.head(train=min(size.train_examples, len(data.train)))
    gen = torch.Generator().manual_seed(seed)

    def spec(hidden: int) -> dict[str, Any]:
        kwargs = {"num_classes": data.num_classes, "hidden_size": hidden, "input_size": data.input_size,
                  "vocab_size": data.vocab_size}
        if data.vocab_size:
            kwargs["embedding_dim"] = embedding_dim
        return {"name": "seqcls", "kwargs": kwargs}

    def resize(hidden: int) -> tuple[nn.Module, dict[str, Any]]:
        return SeqClassifier(**spec(hidden)["kwargs"]), spec(hidden)

    architecture = spec(size.hidden_size)

    def build() -> nn.Module:
        return SeqClassifier(**architecture["kwargs"])

    example = data.test.tensors[0][: size.batch_size]
    return Task(
        name=f"seqcls-{dataset}",
        metric=ACCURACY,
        build_model=build,
        train_loader=DataLoader(data.train, batch_size=size.batch_size, shuffle=True, generator=gen),
        val_loader=DataLoader(data.val, batch_size=500),
        test_loader=DataLoader(data.test, batch_size=500),
        loss_fn=F.cross_entropy,
        dense_epochs=size.dense_epochs,
        finetune_epochs=size.finetune_epochs,
        lr=size.lr,
        grad_clip=1.0,
        example_batch=example,
        architecture=architecture,
        resize=resize,
        meta={"dataset": dataset, "preset": preset, "seed": seed, "hidden_size": size.hidden_size,
              "splits": data.meta.get("sizes"), "source": data.meta.get("source")},
    )


def example_inputs(kwargs: Mapping[str, Any], batch: int = 2, steps: int = 5) -> tuple[Tensor, ...]:
    """(batch, steps) token ids for a token model (``vocab_size``), else (batch, steps, input_size) features."""
    gen = torch.Generator().manual_seed(0)
    vocab = kwargs.get("vocab_size")
    if vocab:
        return (torch.randint(1, int(vocab), (batch, steps), generator=gen),)
    return (torch.randn(batch, steps, int(kwargs["input_size"]), generator=gen),)


TASK = register_task(TaskType(name="seqcls", model_class=SeqClassifier, make_task=make_task, presets=SIZES,
                              example_inputs=example_inputs))
