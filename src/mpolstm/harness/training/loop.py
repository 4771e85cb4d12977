"""The training loop shared by every task: seeded, resumable, with atomic safetensors checkpoints.

:func:`fit` trains for a number of epochs, evaluates on the validation loader after each, keeps the
best weights, stops early after ``patience`` epochs without improvement, appends one JSON line per
epoch to ``out_dir/metrics.jsonl`` and writes ``out_dir/checkpoint.safetensors`` after every epoch
(files: :mod:`.rundir`; checkpoint format, never pickle: :mod:`mpolstm.checkpoint`).

``fit(..., resume=True)`` continues from ``checkpoint.safetensors`` so that the final weights equal
those of an uninterrupted run (bit-exact on CPU). Models whose structure changes during training
(pruning masks, shrinking MPO bonds) must be rebuilt before the weights are loaded: fit calls every
callback's ``on_fit_start`` with ``state.resumed = True`` and ``state.epoch`` = the number of
completed epochs *before* loading, so a callback re-applies its schedule deterministically up to
that epoch; any remaining mismatch of tensor names or shapes is a ValueError listing them.

Distributed training: under ``torchrun`` (``WORLD_SIZE`` > 1) fit initialises the process group
(:mod:`mpolstm.harness.distributed`; gloo on CPU, NCCL for CUDA on ``cuda:LOCAL_RANK``), wraps the
model in DistributedDataParallel and gives each rank its part of every global batch
(:func:`~mpolstm.harness.distributed.shard_loader`: the loader's batch size stays the global one).
The train loss and the validation metric's sums and counts are reduced over ranks; rank 0 alone
writes metrics.jsonl and checkpoints and shows the progress bar, and a failure there is raised on
every rank. Every rank reads the same checkpoint to resume (``out_dir`` must be shared between
nodes). Callbacks see the unwrapped model; when one replaces or freezes parameters (bond shrinking,
pruning), the optimizer and the DDP wrapper are rebuilt (DDP re-broadcasts rank 0's weights).
Every rank uses the same seed, so dropout masks repeat across ranks.

An ``out_dir`` that cannot be created or written is a ValueError before training starts; a failed
write later (disk full) is an OSError naming the file, with the previous checkpoint left intact.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ...checkpoint import cpu_copy
from .. import distributed
from . import rundir
from .callbacks import Distillation, ProgressBar, TrainState, all_ready, call_hooks, track_best
from .metrics import Metric

__all__ = ["FitResult", "fit", "evaluate", "count_parameters", "seed_everything", "make_optimizer", "OPTIMIZERS",
           "ForwardFn"]

Batch = Any
ForwardFn = Callable[[nn.Module, Batch], tuple[Tensor, Tensor]]
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")


@dataclass
class FitResult:
    """Outcome of :func:`fit`: per-epoch history, best validation metric and its epoch (1-based,
    None if no epoch was eligible), epochs completed, whether early stopping ended the run."""

    history: list[dict[str, Any]]
    best_metric: float | None
    best_epoch: int | None
    epochs_completed: int
    stopped_early: bool
    out_dir: Path | None


def fit(model: nn.Module, train_loader: Iterable[Batch], val_loader: Iterable[Batch],
        loss_fn: Callable[[Tensor, Tensor], Tensor], metric: Metric, *, epochs: int, lr: float,
        optimizer: str = "adam", weight_decay: float = 0.0, momentum: float = 0.0, grad_clip: float | None = None,
        lr_schedule: Callable[[int], float] | None = None, seed: int = 0, out_dir: str | os.PathLike | None = None,
        patience: int | None = None, min_delta: float = 0.0, resume: bool = False,
        device: str | torch.device | None = None, amp: bool = False, callbacks: Sequence[Any] = (),
        forward_fn: ForwardFn | None = None, distill: Distillation | None = None, restore_best: bool = True,
        progress: bool | None = None) -> FitResult:
    """Train ``model`` and return the history and best validation metric.

    Args:
        model: any nn.Module; moved to ``device`` (default: the model's current device).
        train_loader, val_loader: re-iterable batch sources (DataLoader, BPTTLoader...).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (e.g. ``F.cross_entropy``).
        metric: :data:`ACCURACY`, :data:`PERPLEXITY` or your own; its ``mode`` decides what "better" means.
        epochs: total epochs (including those already done when resuming).
        lr, optimizer, weight_decay, momentum: the optimizer (:data:`OPTIMIZERS`) over the parameters with
            ``requires_grad``; ``lr_schedule``: ``epoch (0-based) -> factor``, epoch e trains at ``lr * factor``.
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        seed: seeds all RNGs at the start of a fresh run (seed model construction yourself, e.g. with
            :func:`seed_everything`, before building the model).
        out_dir: for metrics.jsonl, checkpoint.safetensors and best.safetensors (None: nothing written).
        patience: stop after this many eligible epochs without an improvement > ``min_delta`` (None: never).
        resume: continue from ``out_dir/checkpoint.safetensors`` if it exists (else start fresh).
        device: "cpu", "cuda", ... ; amp: bfloat16 autocast, CUDA only.
        callbacks: :class:`Callback` hooks (pruning schedules, bond shrinking, logging).
        forward_fn: ``forward_fn(model, batch) -> (outputs, targets)``, batch already on device
            (default: ``batch = (x, y)``, outputs ``model(x)``); distill: a :class:`Distillation` from a teacher.
        restore_best: load the best weights into ``model`` at the end (if any epoch was eligible).
        progress: rich progress bar; None = when stderr is a TTY and $CI is unset, else a plain line per
            epoch on stderr (a log file); False: nothing.

    The history has one record per epoch: ``epoch`` (1-based), ``train_loss`` (mean over batches),
    ``val_<metric name>``, ``lr``, ``time_s``, ``eligible`` and anything callbacks add."""
    _check_arguments(epochs=epochs, lr=lr, patience=patience, grad_clip=grad_clip, optimizer=optimizer,
                     resume=resume, out_dir=out_dir)
    ddp = distributed.setup()
    dev = _training_device(model, device, ddp, amp)
    out = _prepare_out_dir(out_dir)
    train_loader, val_loader = _place(model, distill, dev, ddp, seed, train_loader, val_loader)
    saved = rundir.find_checkpoint(out, optimizer, ddp) if resume and out is not None else None  # (resume needs out_dir)
    if saved is None:
        seed_everything(seed)

    # callbacks rebuild the model's structure first; then a resume loads weights, optimizer and RNGs
    state = TrainState(model=model, epochs=epochs, out_dir=out, resumed=saved is not None,
                       epoch=int(saved[1]["epoch"]) if saved is not None else 0)
    call_hooks(callbacks, "on_fit_start", state)
    new_optimizer = functools.partial(make_optimizer, optimizer, weight_decay=weight_decay, momentum=momentum)
    state.optimizer = new_optimizer(_trainable(model), lr)
    best_state = rundir.resume(saved, state, train_loader, callbacks) if saved is not None else None
    if out is not None:  # a fresh run starts empty; a resumed one from its history
        distributed.run_on_main(lambda: rundir.write_history(out, state.history))
    trainer = _Trainer(model, state, new_optimizer, ddp=ddp, device=dev, forward=forward_fn or default_forward,
                       loss_fn=loss_fn, distill=distill, amp=amp, grad_clip=grad_clip)

    with ProgressBar(progress if distributed.is_main() else False) as bar:
        for epoch in range(state.epoch, epochs):
            if state.stop:
                break
            t0 = time.perf_counter()
            state.epoch, state.record = epoch, {}
            trainer.set_lr(lr * (lr_schedule(epoch) if lr_schedule is not None else 1.0))
            call_hooks(callbacks, "on_epoch_start", state)
            trainer.sync()
            bar.start_epoch(epoch, epochs, train_loader)
            train_loss = trainer.train_epoch(train_loader, callbacks, bar)
            value = trainer.validate(val_loader, metric)
            state.record.update({"epoch": epoch + 1, "train_loss": train_loss, f"val_{metric.name}": value,
                                 "lr": trainer.lr})
            best_state = _end_epoch(state, metric, value, callbacks, best_state, t0, min_delta=min_delta,
                                    patience=patience, ddp=ddp, out=out, train_loader=train_loader)
            bar.end_epoch(epoch, epochs, train_loss, metric, value)
    if restore_best and best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(history=state.history, best_metric=state.best_metric, best_epoch=state.best_epoch,
                     epochs_completed=len(state.history), stopped_early=state.stop, out_dir=out)


def _end_epoch(state: TrainState, metric: Metric, value: float, callbacks: Sequence[Any], best_state: Any,
               started: float, *, min_delta: float, patience: int | None, ddp: bool, out: Path | None,
               train_loader: Iterable[Batch]) -> Any:
    """After validation: the callbacks' ``on_epoch_end``, best tracking and early stopping, the epoch's
    record in the history and the run folder's files. Returns the best weights so far."""
    call_hooks(callbacks, "on_epoch_end", state)
    eligible = all_ready(callbacks, state)
    improved = track_best(state, metric, value, eligible=eligible, min_delta=min_delta, patience=patience)
    if improved:
        best_state = cpu_copy(state.model.state_dict())
    if ddp:
        state.stop = distributed.any_rank(state.stop)
    state.record.update({"eligible": eligible, "best": state.best_metric,
                         "time_s": round(time.perf_counter() - started, 4)})
    state.history.append(dict(state.record))
    state.epoch += 1
    if out is not None:  # best weights only when they improved
        distributed.run_on_main(functools.partial(rundir.write_epoch, out, state, train_loader, callbacks,
                                                  metric, best_state if improved else None))
    return best_state


def _check_arguments(*, epochs: Any, lr: Any, patience: Any, grad_clip: Any, optimizer: str, resume: bool,
                     out_dir: Any) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be >= 1 or None, got {patience!r}")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir, where the checkpoint lives")


def _prepare_out_dir(out_dir: str | os.PathLike | None) -> Path | None:
    """``out_dir`` as a Path, created and checked writable by rank 0 (None stays None)."""
    if out_dir is None:
        return None
    out = Path(out_dir)
    distributed.run_on_main(lambda: rundir.prepare(out))
    return out


def _place(model: nn.Module, distill: Distillation | None, dev: torch.device, ddp: bool, seed: int,
           train_loader: Iterable[Batch], val_loader: Iterable[Batch]) -> tuple[Iterable[Batch], Iterable[Batch]]:
    """Move the model (and the teacher) to ``dev``; under DDP, this rank's shards of the loaders."""
    model.to(dev)
    if distill is not None:
        distill.teacher.to(dev).eval()
    if not ddp:
        return train_loader, val_loader
    return distributed.shard_loader(train_loader, seed), distributed.shard_loader(val_loader, seed, allow_empty=True)


def _training_device(model: nn.Module, device: str | torch.device | None, ddp: bool, amp: bool) -> torch.device:
    if ddp:
        dev = distributed.device_for_rank(device)
    else:
        dev = torch.device(device) if device is not None else _model_device(model)
    if amp and dev.type != "cuda":
        raise ValueError(f"amp (bfloat16 autocast) needs a CUDA device, got {dev}")
    return dev


# ------------------------------------------------------------------------------------ trainer
def _wrap(model: nn.Module, ddp: bool, dev: torch.device) -> nn.Module:
    """The module that trains: ``model``, or its DDP wrapper."""
    if not ddp:
        return model
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def _trainable(model: nn.Module) -> Iterator[nn.Parameter]:
    return (p for p in model.parameters() if p.requires_grad)


def _param_signature(model: nn.Module) -> tuple:
    return tuple((id(p), tuple(p.shape)) for p in model.parameters() if p.requires_grad)


class _Trainer:
    """The optimizer and the module that trains (``model`` or its DDP wrapper), and the epoch's
    training and validation passes. :meth:`sync` rebuilds both (fresh optimizer state, same settings
    and learning rate) when a callback changed the trainable parameters."""

    def __init__(self, model: nn.Module, state: TrainState, new_optimizer: Callable[..., torch.optim.Optimizer], *,
                 ddp: bool, device: torch.device, forward: ForwardFn, loss_fn: Callable[[Tensor, Tensor], Tensor],
                 distill: Distillation | None, amp: bool, grad_clip: float | None) -> None:
        optimizer = state.optimizer
        assert optimizer is not None  # fit builds it before the trainer
        self.model, self.state, self.new_optimizer, self.optimizer = model, state, new_optimizer, optimizer
        self.ddp, self.device, self.forward, self.loss_fn = ddp, device, forward, loss_fn
        self.distill, self.amp, self.grad_clip = distill, amp, grad_clip
        self.teacher_forward = torch.no_grad()(forward)
        self.net, self.signature = _wrap(model, ddp, device), _param_signature(model)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def sync(self) -> None:
        new = _param_signature(self.model)
        if new != self.signature:
            self.optimizer = self.new_optimizer(_trainable(self.model), self.lr)
            self.state.optimizer, self.signature = self.optimizer, new
            self.net = _wrap(self.model, self.ddp, self.device)

    def train_epoch(self, loader: Iterable[Batch], callbacks: Sequence[Any], bar: ProgressBar) -> float:
        """One pass over ``loader``; returns the mean train loss."""
        self.net.train()
        loss_sum, loss_n = 0.0, 0
        for batch in loader:
            loss_sum, loss_n = loss_sum + self.step(batch), loss_n + 1
            call_hooks(callbacks, "on_batch_end", self.state)
            self.sync()
            bar.advance(loss_sum / loss_n)
        if loss_n == 0:
            raise ValueError("the train loader yielded no batches")
        return loss_sum / loss_n

    def step(self, batch: Batch) -> float:
        """One optimizer step; returns the batch's loss (under DDP the mean over ranks, so that every
        rank sees the same value and stops together)."""
        batch = _to_device(batch, self.device)
        with _autocast(self.amp):
            outputs, targets = self.forward(self.net, batch)
            loss = self.loss_fn(outputs, targets)
            if self.distill is not None:
                teacher_out, _ = self.teacher_forward(self.distill.teacher, batch)
                loss = self.distill.blend(loss, outputs, teacher_out)
        step_loss = loss.item()
        if self.ddp:
            step_loss = distributed.all_reduce_sum([step_loss])[0] / distributed.world_size()
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"loss became {step_loss} at epoch {self.state.epoch + 1}, "
                                     f"step {self.state.step + 1}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], self.grad_clip)
        self.optimizer.step()
        self.state.step += 1
        return step_loss

    def validate(self, loader: Iterable[Batch], metric: Metric) -> float:
        """The metric over ``loader`` (sums and counts reduced over ranks)."""
        count: float  # an int, a float once summed over ranks
        total, count = _metric_sums(self.model, loader, metric, self.forward, self.device, self.amp)
        if self.ddp:
            total, count = distributed.all_reduce_sum([total, count])
        if count == 0:
            raise ValueError("the validation loader yielded no batches")
        return metric.finalize(total / count)


# ------------------------------------------------------------------------------------ helpers
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter entries (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def make_optimizer(
    name: str, params: Iterable[nn.Parameter], lr: float, *, weight_decay: float = 0.0, momentum: float = 0.0
) -> torch.optim.Optimizer:
    """Build one of :data:`OPTIMIZERS` over ``params``."""
    params = list(params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    metric: Metric,
    *,
    forward_fn: ForwardFn | None = None,
    device: str | torch.device | None = None,
    amp: bool = False,
) -> float:
    """The metric of ``model`` over ``loader`` (eval mode, no gradients; training mode restored)."""
    dev = torch.device(device) if device is not None else _model_device(model)
    total, count = _metric_sums(model, loader, metric, forward_fn or default_forward, dev, amp)
    if count == 0:
        raise ValueError("evaluate() got an empty loader")
    return metric.finalize(total / count)


@torch.no_grad()
def _metric_sums(model: nn.Module, loader: Iterable[Batch], metric: Metric, forward: ForwardFn,
                 dev: torch.device, amp: bool) -> tuple[float, int]:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in loader:
            with _autocast(amp):
                outputs, targets = forward(model, _to_device(batch, dev))
            s, n = metric.batch(outputs, targets)
            total, count = total + s, count + n
    finally:
        model.train(was_training)
    return total, count


def default_forward(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError("the default forward_fn expects batches (inputs, targets); pass forward_fn for others")
    return model(batch[0]), batch[1]


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _autocast(amp: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")
