"""Distillation: train a compressed student to reproduce its dense teacher's outputs.

    student, _ = compress(copy.deepcopy(teacher), CompressionConfig(target_ratio=10), calibration=batches)
    result = distill(student, teacher, batches, steps=1000, checkpoint="distill.safetensors")

The loss is KL(teacher || student) of the softened output distributions (``loss="kl"``, for
classifiers and language models: outputs are logits over the last axis, scaled by T^2 as in
Hinton et al.), the mean squared error of the outputs (``loss="mse"``, for regression) or the
cross-entropy against the teacher's argmax (``loss="ce"``). No labels are needed: any inputs
the model sees in use will do. For a decoder, feeding the teacher's own decoded outputs as the
decoder inputs makes this sequence-level distillation (Kim & Rush 2016; "ce" is their hard-label
form, "kl" adds the teacher's full distribution at every position).

Recurrent students: ``hidden=["encoder", "decoder"]`` also matches the outputs (hidden states)
of those submodules, whose errors otherwise compound over the steps; ``schedule="cosine"``
decays the learning rate to 0 over the run (resumed runs continue the same schedule).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence

from .checkpoint import load_checkpoint, prepare_dir, restore, save_checkpoint

__all__ = ["DistillResult", "distill", "distillation_loss", "hidden_state_loss"]

LOSSES = ("kl", "mse", "ce")
SCHEDULES = ("constant", "cosine")


@dataclass
class DistillResult:
    """steps: optimiser steps done in total; losses: the loss of every step; seconds: wall time of
    this call (a resumed run counts only what it ran); hidden_losses: the hidden-state term of
    every step this call ran (empty without ``hidden``)."""

    steps: int
    losses: list[float]
    seconds: float
    hidden_losses: list[float] = field(default_factory=list)


def distillation_loss(student: Tensor, teacher: Tensor, loss: str = "kl", temperature: float = 1.0) -> Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) * T^2 averaged over all but the last axis,
    the mean squared error of the outputs ("mse"), or the cross-entropy of the student against
    the teacher's argmax ("ce": hard labels; on the teacher's own decoded sequences this is
    sequence-level distillation, Kim & Rush 2016). Half-precision outputs are compared in float32.
    The one distillation loss: :func:`distill` and the trainer's ``Distillation`` callback use it."""
    if student.shape != teacher.shape:
        raise ValueError(f"student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} differ")
    student, teacher = _at_least_float32(student), _at_least_float32(teacher)
    if loss == "mse":
        return F.mse_loss(student, teacher)
    if loss == "ce":
        return F.cross_entropy(student.reshape(-1, student.shape[-1]) / temperature,
                               teacher.reshape(-1, teacher.shape[-1]).argmax(-1))
    s = F.log_softmax(student.reshape(-1, student.shape[-1]) / temperature, -1)
    t = F.log_softmax(teacher.reshape(-1, teacher.shape[-1]) / temperature, -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def _at_least_float32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


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


def _check(steps: int, loss: str, lr: float, temperature: float, checkpoint_every: int, schedule: str,
           hidden_weight: float, clip_grad_norm: Any, batches: Iterable[Any]) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    for name, value in (("lr", lr), ("temperature", temperature)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if isinstance(hidden_weight, bool) or not isinstance(hidden_weight, (int, float)) \
            or not math.isfinite(hidden_weight) or hidden_weight < 0:
        raise ValueError(f"hidden_weight must be a number >= 0, got {hidden_weight!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    if clip_grad_norm is not None and (isinstance(clip_grad_norm, bool) or not isinstance(clip_grad_norm, (int, float))
                                       or not math.isfinite(clip_grad_norm) or clip_grad_norm <= 0):
        raise ValueError(f"clip_grad_norm must be a positive number or None, got {clip_grad_norm!r}")
    if isinstance(batches, Tensor):
        raise ValueError(f"distill: batches is one tensor {tuple(batches.shape)}: pass a list of batches, e.g. [x] "
                         "for one batch (iterating a tensor would feed its rows as unbatched inputs)")
    if iter(batches) is batches:
        raise ValueError("distill: batches must be re-iterable (a list or a DataLoader), not an iterator: "
                         "they are cycled until `steps` steps are done")


class _Hidden:
    """Forward hooks keeping what the named submodules of a model output during one step (the
    first output of a tuple, a PackedSequence's data; every call when a module runs step by step)."""

    def __init__(self, model: nn.Module, names: Sequence[str], role: str) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules or not n]
        if missing:
            raise ValueError(f"hidden: the {role} has no submodule(s) {missing} (names look like "
                             f"{[n for n in modules if n][:5]})")
        self.seen: dict[str, list[Tensor]] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            first = output[0] if isinstance(output, (tuple, list)) else output
            first = first.data if isinstance(first, PackedSequence) else first
            self.seen.setdefault(name, []).append(first.reshape(-1))
        return hook

    def take(self) -> dict[str, Tensor]:
        seen, self.seen = self.seen, {}
        return {name: torch.cat(parts) for name, parts in seen.items()}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def hidden_state_loss(student: dict[str, Tensor], teacher: dict[str, Tensor]) -> Tensor:
    """Mean over modules of ||h_s - h_t||^2 / ||h_t||^2 (each module's outputs over the step)."""
    terms = []
    for name, target in teacher.items():
        got = student.get(name)
        if got is None or got.shape != target.shape:
            raise ValueError(f"hidden: module {name!r} gave {None if got is None else tuple(got.shape)} in the "
                             f"student and {tuple(target.shape)} in the teacher")
        terms.append((got - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


def _matched(hooks: tuple[_Hidden, _Hidden], record: list[float]) -> Tensor:
    """The hidden-state term of this step (student vs teacher hooks), its value appended to ``record``."""
    matched = hidden_state_loss(hooks[0].take(), hooks[1].take())
    record.append(float(matched.detach()))
    return matched


def _optimizer_step(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], value: Tensor, lr: float,
                    clip: float | None) -> None:
    """Backpropagate ``value`` and take one step at learning rate ``lr``, the gradients' global norm
    clipped to ``clip`` (None: not clipped)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()


def _lr_factor(schedule: str, step: int, steps: int) -> float:
    return 1.0 if schedule == "constant" else 0.5 * (1 + math.cos(math.pi * step / steps))


class _Progress:
    """A rich progress bar on a terminal when rich is installed (the harness extra); else (a log file, a
    pipe) a line on stderr every 10% of the steps."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.total, self.bar = total, None
        self.enabled = enabled
        if not enabled or not sys.stderr.isatty():
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
        elif self.enabled and (step % max(self.total // 10, 1) == 0 or step == self.total):
            print(f"distill step {step}/{self.total} loss {loss:.4f}", file=sys.stderr, flush=True)

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
    schedule: str = "constant",
    hidden: Sequence[str] = (),
    hidden_weight: float = 1.0,
    clip_grad_norm: float | None = None,
) -> DistillResult:
    """Train ``student`` (in place, Adam on its trainable parameters) for ``steps`` steps to match
    ``teacher``'s outputs on ``batches``; see the module docstring. ``schedule``: "constant" lr
    or "cosine" decay to 0. ``hidden``: names of submodules (e.g. recurrent layers) present in
    both models whose outputs are matched too: ``hidden_weight`` times the mean relative squared
    error :func:`hidden_state_loss` is added to the loss. ``clip_grad_norm``: clip the gradients'
    global norm to it before each step. Returns a DistillResult."""
    _check(steps, loss, lr, temperature, checkpoint_every, schedule, hidden_weight, clip_grad_norm, batches)
    hidden = [hidden] if isinstance(hidden, str) else hidden
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("distill: the student has no trainable parameter")
    optimizer = torch.optim.Adam(params, lr=lr)
    path = None if checkpoint is None else Path(checkpoint)
    done, losses = _resume(path, student, optimizer, seed)
    hooks = (_Hidden(student, hidden, "student"), _Hidden(teacher, hidden, "teacher")) if hidden else None
    modes = (student.training, teacher.training)
    student.train()
    teacher.eval()
    bar = _Progress(progress, steps, done)
    start = time.perf_counter()
    hidden_losses: list[float] = []
    try:
        for step, batch in zip(range(done, steps), _cycle(batches, done)):
            with torch.no_grad():
                target = forward(teacher, batch)
            value = distillation_loss(forward(student, batch), target, loss, temperature)
            if hooks is not None:
                value = value + hidden_weight * _matched(hooks, hidden_losses)
            _optimizer_step(optimizer, params, value, lr * _lr_factor(schedule, step, steps), clip_grad_norm)
            losses.append(float(value.detach()))
            bar.update(step + 1, losses[-1])
            if path is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                save_checkpoint(path, student, optimizer, {"step": step + 1, "losses": losses})
    finally:
        bar.close()
        for hook in hooks or ():
            hook.remove()
        student.train(modes[0])
        teacher.train(modes[1])
    return DistillResult(steps, losses, time.perf_counter() - start, hidden_losses)


def _resume(path: Path | None, student: nn.Module, optimizer: torch.optim.Optimizer, seed: int
            ) -> tuple[int, list[float]]:
    """(steps done, losses so far) from the checkpoint at ``path`` if it exists (restoring the
    student, the optimizer and the RNG states), else (0, []) after seeding."""
    if path is not None:
        prepare_dir(path.parent, [path.name], label="checkpoint directory")
    if path is not None and path.exists():
        tensors, state = load_checkpoint(path, fields={"step": int, "losses": list})
        restore(path, tensors, state, student, optimizer)
        return state["step"], list(state["losses"])
    torch.manual_seed(seed)
    return 0, []
