"""Word-level language modelling on Penn Treebank (the paper's sequence-prediction task).

Model (Zaremba et al. 2014): Embedding -> 2-layer LSTM -> dropout -> Linear over the 10k vocabulary.
The hidden state is carried across consecutive BPTT windows of the same batch size (detached
at each window, reset whenever the batch size changes, e.g. between training and evaluation).
The whole task (model, presets, builder, export inputs) is declared here and registered as ``ptb``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..data import BPTTLoader, batchify, load_ptb
from ..training import PERPLEXITY
from .base import Task
from .registry import TaskType, register_task

__all__ = ["WordLM", "PTBSize", "SIZES", "make_task", "example_inputs", "TASK"]


class WordLM(nn.Module):
    """(T, N) token ids -> (T, N, vocab) logits; the LSTM is the attribute ``lstm``."""

    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.lstm = nn.LSTM(hidden_size, hidden_size, num_layers, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, vocab_size)
        self._state: tuple[Tensor, Tensor] | None = None
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)

    def forward(self, tokens: Tensor) -> Tensor:
        state = self._state
        if state is not None and state[0].shape[1] != tokens.shape[1]:
            state = None
        out, (h, c) = self.lstm(self.drop(self.embedding(tokens)), state)
        self._state = (h.detach(), c.detach())
        return self.head(self.drop(out))

    def clear_cache(self) -> None:
        """Drop the state carried from the previous window (export traces from a zero state)."""
        self._state = None


@dataclass(frozen=True)
class PTBSize:
    hidden_size: int
    train_tokens: int | None  # None: all 929,589
    eval_tokens: int | None
    batch_size: int
    bptt: int
    dropout: float
    dense_epochs: int
    finetune_epochs: int
    lr: float


SIZES = {
    # quick: a 20k-token slice, small model; the 10k-way softmax dominates (~0.2 s a window on 2 cores)
    "quick": PTBSize(128, 20_000, 5_000, 20, 35, 0.0, 3, 1, 3e-3),
    # standard: Zaremba "small" (2x200) on a 150k-token slice; <= 90 minutes on 2 cores (measured: 52 min, one thread)
    "standard": PTBSize(200, 150_000, 20_000, 20, 35, 0.0, 5, 2, 2e-3),
    # paper scale: Zaremba "medium" (2x650, dropout 0.5) on all of PTB; for a GPU
    "paper": PTBSize(650, None, None, 20, 35, 0.5, 39, 10, 1e-3),
}


def make_task(preset: str = "quick", *, seed: int = 0) -> Task:
    """The PTB task at a preset size (see :data:`SIZES`)."""
    size: PTBSize = TASK.size(preset)
    corpus = load_ptb()
    train = corpus.train[: size.train_tokens]
    valid, test = corpus.valid[: size.eval_tokens], corpus.test[: size.eval_tokens]

    def spec(hidden: int) -> dict[str, Any]:
        return {"name": "ptb", "kwargs": {"vocab_size": corpus.vocab_size, "hidden_size": hidden,
                                          "dropout": size.dropout}}

    def resize(hidden: int) -> tuple[nn.Module, dict[str, Any]]:
        return WordLM(**spec(hidden)["kwargs"]), spec(hidden)

    architecture = spec(size.hidden_size)

    def build() -> nn.Module:
        return WordLM(**architecture["kwargs"])

    def loss(logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    return Task(
        name="ptb",
        metric=PERPLEXITY,
        build_model=build,
        train_loader=BPTTLoader(batchify(train, size.batch_size), size.bptt),
        val_loader=BPTTLoader(batchify(valid, 10), size.bptt),
        test_loader=BPTTLoader(batchify(test, 10), size.bptt),
        loss_fn=loss,
        dense_epochs=size.dense_epochs,
        finetune_epochs=size.finetune_epochs,
        lr=size.lr,
        grad_clip=0.25 if size.dropout == 0 else 5.0,
        example_batch=batchify(test, 10)[: size.bptt],
        architecture=architecture,
        resize=resize,
        meta={"dataset": "ptb", "preset": preset, "seed": seed, "hidden_size": size.hidden_size,
              "train_tokens": len(train), "eval_tokens": len(valid), "batch_size": size.batch_size, "bptt": size.bptt},
    )


def example_inputs(kwargs: Mapping[str, Any], batch: int = 2, steps: int = 5) -> tuple[Tensor, ...]:
    """(steps, batch) token ids."""
    gen = torch.Generator().manual_seed(0)
    return (torch.randint(0, int(kwargs["vocab_size"]), (steps, batch), generator=gen),)


TASK = register_task(TaskType(name="ptb", model_class=WordLM, make_task=make_task, presets=SIZES,
                              example_inputs=example_inputs))
