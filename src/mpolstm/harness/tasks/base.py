"""What the protocol needs to know about a task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..training import ForwardFn, Metric

__all__ = ["Task", "lstm_cell_step"]


@dataclass
class Task:
    """A trainable task: model factory, data, loss, metric and training budget.

    build_model: returns a fresh dense model whose recurrent layer is the attribute ``lstm``
        (an nn.LSTM); the protocol compresses or prunes ``recurrent`` modules only.
    example_batch: model input used to time batched inference.
    test_report: optional ``model -> {name: value}`` of extra test metrics (e.g. PESQ, STOI).
    architecture: JSON spec that rebuilds the model without data (see ``tasks.build_architecture``).
    distill_loss: how a student matches the dense teacher's outputs: "kl" (logits) or "mse" (regression).
    resize: ``h -> (model, architecture)``: a fresh dense model whose ``recurrent`` layers have hidden
        size h (the layers around them follow), and its spec; the ``small-dense`` row needs it.
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
    grad_clip: float | None = None
    optimizer: str = "adam"
    forward_fn: ForwardFn | None = None
    recurrent: tuple[str, ...] = ("lstm",)
    test_report: Callable[[nn.Module], dict[str, float]] | None = None
    architecture: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    distill_loss: str = "kl"
    resize: Callable[[int], tuple[nn.Module, dict[str, Any]]] | None = None


def lstm_cell_step(lstm: nn.LSTM, x: Tensor, state: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One time step of a unidirectional nn.LSTM without projection via ``torch.lstm_cell``:
    x (B, I) -> (h of the top layer (B, H), (h, c) each (layers, B, H)).

    On CPU this is the fast dense streaming path: calling nn.LSTM on a length-1 sequence
    re-lays out its weights on every call (about 10x slower at 2x256)."""
    if state is None:
        zeros = x.new_zeros(lstm.num_layers, x.shape[0], lstm.hidden_size)
        state = (zeros, zeros)
    hs, cs = [], []
    for k in range(lstm.num_layers):
        bias = (getattr(lstm, f"bias_ih_l{k}"), getattr(lstm, f"bias_hh_l{k}")) if lstm.bias else (None, None)
        h, c = torch.lstm_cell(x, (state[0][k], state[1][k]), getattr(lstm, f"weight_ih_l{k}"),
                               getattr(lstm, f"weight_hh_l{k}"), *bias)
        hs.append(h)
        cs.append(c)
        x = h
    return x, (torch.stack(hs), torch.stack(cs))
