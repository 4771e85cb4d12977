"""What the protocol needs to know about a task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from torch import Tensor, nn

from ..train import ForwardFn, Metric

__all__ = ["Task"]


@dataclass
class Task:
    """A trainable task: model factory, data, loss, metric and training budget.

    build_model: returns a fresh dense model whose recurrent layer is the attribute ``lstm``
        (an nn.LSTM); the protocol compresses or prunes ``recurrent`` modules only.
    example_batch: model input used to time batched inference.
    step_input: (1, lstm input size) frame used to time one streaming step of the LSTM.
    """

    name: str
    metric: Metric
    build_model: Callable[[], nn.Module]
    train_loader: Iterable
    val_loader: Iterable
    test_loader: Iterable
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    dense_epochs: int
    finetune_epochs: int
    lr: float
    example_batch: Tensor
    step_input: Tensor
    grad_clip: float | None = None
    optimizer: str = "adam"
    forward_fn: ForwardFn | None = None
    recurrent: tuple[str, ...] = ("lstm",)
    meta: dict[str, Any] = field(default_factory=dict)
