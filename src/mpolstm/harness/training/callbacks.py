"""What :func:`~mpolstm.harness.training.fit` shows the outside world each epoch and step: the
:class:`TrainState` callbacks see, the :class:`Callback` hooks, :class:`Distillation` from a teacher,
best-metric tracking with early stopping (:func:`track_best`) and the progress bar."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence, Sized

import torch
from torch import Tensor, nn

from ...distill import distillation_loss
from .metrics import Metric

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

__all__ = ["TrainState", "Callback", "Distillation", "call_hooks", "all_ready", "track_best", "ProgressBar"]


@dataclass
class TrainState:
    """What callbacks see. ``epoch``: index of the current epoch (0-based); in ``on_fit_start`` the
    number of completed epochs. ``step``: optimizer steps so far. ``record``: this epoch's metrics
    (callbacks may add JSON-serialisable entries in ``on_epoch_end``). Set ``stop = True`` to end
    training after the current epoch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    epoch: int = 0
    step: int = 0
    epochs: int = 0
    resumed: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
    best_metric: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    stop: bool = False
    out_dir: Path | None = None


class Callback:
    """Per-epoch/per-step hooks for :func:`fit`. Override what you need; any object with some of
    these methods works too (fit calls only the methods an object has, with these defaults).

    - ``on_fit_start``: before the optimizer is built and before a checkpoint is loaded; rebuild any
      structure the model had at ``state.epoch`` (completed epochs) when ``state.resumed``.
    - ``on_epoch_start`` / ``on_batch_end`` (after each optimizer step) / ``on_epoch_end`` (after
      validation, before the checkpoint). If a hook changes the set or shapes of trainable
      parameters, fit rebuilds the optimizer (fresh state, same settings).
    - ``ready``: False while the model is not in its final form (e.g. pruning not yet at its
      target); best-weight tracking and early stopping ignore epochs where any callback is not ready.
    - ``state_dict`` / ``load_state_dict``: JSON-serialisable callback state stored in checkpoints.
    """

    def on_fit_start(self, state: TrainState) -> None: ...

    def on_epoch_start(self, state: TrainState) -> None: ...

    def on_batch_end(self, state: TrainState) -> None: ...

    def on_epoch_end(self, state: TrainState) -> None: ...

    def ready(self, state: TrainState) -> bool:
        return True

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def call_hooks(callbacks: Sequence[Any], hook: str, state: TrainState) -> None:
    """Call ``hook(state)`` on every callback that has it, in order."""
    for cb in callbacks:
        if hasattr(cb, hook):
            getattr(cb, hook)(state)


def all_ready(callbacks: Sequence[Any], state: TrainState) -> bool:
    """Whether the epoch counts for best weights and early stopping (every callback is ready)."""
    return all(cb.ready(state) for cb in callbacks if hasattr(cb, "ready"))


def track_best(state: TrainState, metric: Metric, value: float, *, eligible: bool, min_delta: float,
               patience: int | None) -> bool:
    """Early stopping: record ``value`` of the epoch ``state.epoch`` (0-based) as the best if it
    improves by more than ``min_delta``, else count an epoch without improvement (eligible epochs
    only); set ``state.stop`` after ``patience`` of them. Returns whether the epoch is the new best."""
    improved = eligible and metric.better(value, state.best_metric, min_delta)
    if improved:
        state.best_metric, state.best_epoch, state.bad_epochs = value, state.epoch + 1, 0
    elif eligible:
        state.bad_epochs += 1
    if patience is not None and state.bad_epochs >= patience:
        state.stop = True
    return improved


@dataclass
class Distillation:
    """Knowledge distillation from a teacher: loss = (1 - alpha) * task + alpha * T^2 * KL.

    The KL divergence is between softmax(teacher / T) and softmax(student / T) over the last
    dimension, averaged over all other positions. The teacher runs in eval mode without gradients,
    through the same ``forward_fn`` as the student."""

    teacher: nn.Module
    alpha: float = 0.5
    temperature: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"Distillation.alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ValueError(f"Distillation.temperature must be > 0, got {self.temperature}")

    def loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        """T^2 KL(softmax(teacher / T) || softmax(student / T)): :func:`mpolstm.distill.distillation_loss`."""
        return distillation_loss(student, teacher, "kl", self.temperature)

    def blend(self, task_loss: Tensor, student: Tensor, teacher: Tensor) -> Tensor:
        """The training loss: ``(1 - alpha) * task_loss + alpha * loss(student, teacher)``."""
        return (1 - self.alpha) * task_loss + self.alpha * self.loss(student, teacher)


class ProgressBar:
    """fit's rich progress bar, one task reset every epoch (``enabled=None``: when stderr is a TTY and
    $CI is unset; else, as in a log file, a plain line on stderr per finished epoch); ``enabled=False``:
    silent."""

    def __init__(self, enabled: bool | None) -> None:
        self._lines = enabled is None  # the epoch lines where the bar is not shown
        if enabled is None:
            enabled = sys.stderr.isatty() and not os.environ.get("CI")
        self._bar: Progress | None = None
        self._task: TaskID | None = None  # set in __enter__
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[info]}"), transient=True)

    def __enter__(self) -> ProgressBar:
        if self._bar is not None:
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=None, info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def start_epoch(self, epoch: int, epochs: int, loader: Iterable[Any]) -> None:
        if self._bar is not None:
            assert self._task is not None
            total = len(loader) if isinstance(loader, Sized) else None
            self._bar.reset(self._task, total=total, description=f"epoch {epoch + 1}/{epochs}", info="")

    def advance(self, mean_loss: float) -> None:
        if self._bar is not None:
            assert self._task is not None
            self._bar.update(self._task, advance=1, info=f"loss {mean_loss:.4f}")

    def end_epoch(self, epoch: int, epochs: int, train_loss: float, metric: Metric, value: float) -> None:
        line = f"epoch {epoch + 1}/{epochs}  loss {train_loss:.4f}  val {metric.name} {value:.4f}"
        if self._bar is not None:
            self._bar.console.print(line)
        elif self._lines:
            print(line, file=sys.stderr, flush=True)
