"""Validation metrics for :func:`~mpolstm.harness.training.fit`: sums and counts per batch, finalised once."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from torch import Tensor
from torch.nn import functional as F

__all__ = ["Metric", "ACCURACY", "PERPLEXITY"]


@dataclass(frozen=True)
class Metric:
    """A validation metric accumulated over batches.

    ``batch(outputs, targets) -> (sum, count)`` per batch; the value is ``finalize(total / count)``.
    ``mode`` is "max" if larger is better, else "min"."""

    name: str
    mode: str
    batch: Callable[[Tensor, Tensor], tuple[float, int]]
    finalize: Callable[[float], float] = float

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"Metric.mode must be 'min' or 'max', got {self.mode!r}")

    def better(self, value: float, best: float | None, min_delta: float = 0.0) -> bool:
        """Whether ``value`` improves on ``best`` by more than ``min_delta``."""
        if best is None:
            return True
        return value > best + min_delta if self.mode == "max" else value < best - min_delta


def _accuracy_batch(logits: Tensor, targets: Tensor) -> tuple[float, int]:
    return float((logits.argmax(-1) == targets).sum()), targets.numel()


def _nll_batch(logits: Tensor, targets: Tensor) -> tuple[float, int]:
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum")
    return float(loss), targets.numel()


ACCURACY = Metric("accuracy", "max", _accuracy_batch)
"""Accuracy of logits (..., C) against class ids (...)."""
PERPLEXITY = Metric("perplexity", "min", _nll_batch, math.exp)
"""exp(mean token cross-entropy) of logits (..., V) against token ids (...)."""
