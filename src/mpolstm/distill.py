"""Distillation: train a compressed student to reproduce its dense teacher's outputs.

    student, _ = compress(copy.deepcopy(teacher), CompressionConfig(target_ratio=10), calibration=batches)
    result = distill(student, teacher, batches, steps=1000, checkpoint="distill.safetensors")

The loss is KL(teacher || student) of the softened output distributions (``loss="kl"``, for
classifiers and language models: outputs are logits over the last axis, scaled by T^2 as in
Hinton et al.) or the mean squared error of the outputs (``loss="mse"``, for regression). No
labels are needed: any inputs the model sees in use will do.

``batches`` is cycled until ``steps`` optimiser steps are done; each batch is a tensor or a
tuple/list of the model's positional inputs, and ``forward(model, batch)`` (default: call the
model, take the first output if it returns a tuple) gives the outputs compared. With
``checkpoint`` a resumable checkpoint (mpolstm.checkpoint: weights, Adam state, RNG states,
step, losses) is written atomically every ``checkpoint_every`` steps and at the end; a rerun
with the same arguments continues from it, to the same weights as an uninterrupted run when
``batches`` yields the same batches in the same order on every pass.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .checkpoint import load_checkpoint, prepare_dir, restore, save_checkpoint

__all__ = ["DistillResult", "distill", "distillation_loss"]

LOSSES = ("kl", "mse")


@dataclass
class DistillResult:
    """steps: optimiser steps done in total; losses: the loss of every step; seconds: wall time of
    this call (a resumed run counts only what it ran)."""

    steps: int
    losses: list[float]
    seconds: float


def distillation_loss(student: Tensor, teacher: Tensor, loss: str = "kl", temperature: float = 1.0) -> Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) * T^2 averaged over all but the last axis,
    or the mean squared error of the outputs."""
    if student.shape != teacher.shape:
        raise ValueError(f"student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} differ")
    if loss == "mse":
        return F.mse_loss(student, teacher)
    s = F.log_softmax(student.reshape(-1, student.shape[-1]) / temperature, -1)
    t = F.log_softmax(teacher.reshape(-1, teacher.shape[-1]) / temperature, -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def _call(model: nn.Module, batch: Any) -> Tensor:
    inputs = batch if isinstance(batch, (tuple, list)) else (batch,)
    out = model(*inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _cycle(batches: Iterable[Any], skip: int) -> Iterator[Any]:
    """Pass over ``batches`` again and again, starting ``skip`` batches in."""
    seen = 0
    while True:
        empty = True
        for batch in batches:
            empty = False
            if seen >= skip:
                yield batch
            seen += 1
        if empty:
            raise ValueError("distill: batches yielded nothing; give at least one batch")


def _check(steps: int, loss: str, lr: float, temperature: float, checkpoint_every: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    for name, value in (("lr", lr), ("temperature", temperature)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")


class _Progress:
    """A rich progress bar when rich is installed (the harness extra), else a line every 10%."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.total, self.bar = total, None
        self.enabled = enabled
        if not enabled:
            return
        try:
            from rich.progress import Progress
        except ModuleNotFoundError:
            return
        self.bar = Progress(transient=True)
        self.task = self.bar.add_task("distill", total=total, completed=done)
        self.bar.start()

    def update(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description=f"distill loss {loss:.4f}")
        elif self.enabled and step % max(self.total // 10, 1) == 0:
            print(f"distill step {step}/{self.total} loss {loss:.4f}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Any],
    *,
    steps: int,
    loss: str = "kl",
    lr: float = 1e-3,
    temperature: float = 1.0,
    forward: Callable[[nn.Module, Any], Tensor] = _call,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    seed: int = 0,
    progress: bool = False,
) -> DistillResult:
    """Train ``student`` (in place, Adam on its trainable parameters) for ``steps`` steps to match
    ``teacher``'s outputs on ``batches``; see the module docstring. Returns a DistillResult."""
    _check(steps, loss, lr, temperature, checkpoint_every)
    if iter(batches) is batches:
        raise ValueError("distill: batches must be re-iterable (a list or a DataLoader), not an iterator: "
                         "they are cycled until `steps` steps are done")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("distill: the student has no trainable parameter")
    optimizer = torch.optim.Adam(params, lr=lr)
    path = None if checkpoint is None else Path(checkpoint)
    done, losses = 0, []
    if path is not None:
        prepare_dir(path.parent, [path.name], label="checkpoint directory")
    if path is not None and path.exists():
        tensors, state = load_checkpoint(path, fields={"step": int, "losses": list})
        restore(path, tensors, state, student, optimizer)
        done, losses = state["step"], list(state["losses"])
    else:
        torch.manual_seed(seed)
    modes = (student.training, teacher.training)
    student.train()
    teacher.eval()
    bar = _Progress(progress, steps, done)
    start = time.perf_counter()
    try:
        for step, batch in zip(range(done, steps), _cycle(batches, done)):
            with torch.no_grad():
                target = forward(teacher, batch)
            value = distillation_loss(forward(student, batch), target, loss, temperature)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            losses.append(float(value.detach()))
            bar.update(step + 1, losses[-1])
            if path is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                save_checkpoint(path, student, optimizer, {"step": step + 1, "losses": losses})
    finally:
        bar.close()
        student.train(modes[0])
        teacher.train(modes[1])
    return DistillResult(steps, losses, time.perf_counter() - start)
