"""What :func:`~mpolstm.harness.training.fit` keeps in ``out_dir``, and how it resumes from it.

- ``checkpoint.safetensors``: an :mod:`mpolstm.checkpoint` checkpoint (format
  :data:`CHECKPOINT_FORMAT`) of the model, optimizer and RNG states (the train loader's generators
  included) after the last completed epoch; its state also holds fit's own fields (:data:`FIT_FIELDS`:
  epoch, global step, best metric and epoch, early-stopping counter, stopped, history, callback
  states) and the metric's name and mode.
- ``best.safetensors``: the best weights, an :mod:`mpolstm.checkpoint` weights file (format
  :data:`BEST_FORMAT`; state ``epoch`` (1-based) and ``metric``).
- ``metrics.jsonl``: one JSON line per completed epoch.

Each epoch writes the checkpoint first (the commit point), then the best weights if they improved,
then the metrics line. A resume rewrites ``metrics.jsonl`` from the checkpoint's history, so a crash
between the writes never leaves a line without its checkpoint. Rank 0 alone writes (fit runs these
writers through :func:`mpolstm.harness.distributed.run_on_main`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import Tensor

from ... import checkpoint
from ...atomic import atomic_open
from ...checkpoint import BEST_FORMAT, CHECKPOINT_FORMAT
from .. import distributed
from .callbacks import TrainState
from .metrics import Metric

__all__ = ["CHECKPOINT_NAME", "BEST_NAME", "METRICS_NAME", "FIT_FIELDS", "BEST_FIELDS", "load_checkpoint",
           "prepare", "write_history", "write_epoch", "find_checkpoint", "resume"]

CHECKPOINT_NAME, BEST_NAME, METRICS_NAME = "checkpoint.safetensors", "best.safetensors", "metrics.jsonl"
_NUMBER, _INT, _NONE = (int, float), (int,), (type(None),)
FIT_FIELDS: dict[str, tuple[type, ...]] = {
    "epoch": _INT, "step": _INT, "best_metric": _NUMBER + _NONE, "best_epoch": _INT + _NONE, "bad_epochs": _INT,
    "stopped": (bool,), "history": (list,), "callbacks": (list,)}
"""fit's fields in a checkpoint's state, besides those of :mod:`mpolstm.checkpoint`."""
BEST_FIELDS: dict[str, tuple[type, ...]] = {"epoch": _INT, "metric": _NUMBER}
"""The state fields of ``best.safetensors``."""


def load_checkpoint(path: str | os.PathLike, fmt: str = CHECKPOINT_FORMAT) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint written by fit (or its ``best.safetensors`` with ``fmt=BEST_FORMAT``): (tensors, state).

    Raises ValueError for a missing, truncated, foreign or malformed file: the safetensors header
    (whose declared size is checked against the file before anything is read), the tensor names and
    the state's fields and their types are validated; tensors are read from a memory map, so a file
    never costs more memory than its size. Nothing is unpickled."""
    if fmt == BEST_FORMAT:
        return checkpoint.load_weights(path, fmt, fields=BEST_FIELDS)
    return checkpoint.load_checkpoint(path, fmt, fields=FIT_FIELDS)


def prepare(out: Path) -> None:
    """Create ``out``, clear temporary files a crash left there and check that it is writable
    (a ValueError before training starts if not)."""
    checkpoint.prepare_dir(out, (CHECKPOINT_NAME, BEST_NAME, METRICS_NAME), label="out_dir")


def write_history(out: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` atomically: empty for a fresh run, the history for a resumed one."""
    path = out / METRICS_NAME
    with checkpoint.name_write_errors(path), atomic_open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in history)


def write_epoch(out: Path, state: TrainState, loader: Any, callbacks: Sequence[Any], metric: Metric,
                best: Mapping[str, Tensor] | None) -> None:
    """Checkpoint first (the commit point), then ``best`` weights (if the epoch improved), then the metrics line."""
    fit_state = {
        "epoch": state.epoch,
        "step": state.step,
        "best_metric": state.best_metric,
        "best_epoch": state.best_epoch,
        "bad_epochs": state.bad_epochs,
        "stopped": state.stop,
        "metric": {"name": metric.name, "mode": metric.mode},
        "history": state.history,
        "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else {} for cb in callbacks],
    }
    assert state.optimizer is not None  # built before the first epoch
    checkpoint.save_checkpoint(out / CHECKPOINT_NAME, state.model, state.optimizer, fit_state, loader)
    if best is not None:
        checkpoint.save_weights(out / BEST_NAME, best, {"epoch": state.best_epoch, "metric": state.best_metric},
                                fmt=BEST_FORMAT)
    with checkpoint.name_write_errors(out / METRICS_NAME):
        _append_line(out / METRICS_NAME, json.dumps(state.history[-1]))


def _append_line(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def find_checkpoint(out: Path, optimizer: str, ddp: bool) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The checkpoint in ``out`` to resume from (None if there is none), written with ``optimizer``.
    Under DDP every rank must see it (``out`` on a shared file system)."""
    path = out / CHECKPOINT_NAME
    found = path.exists()
    if ddp and 0 < distributed.all_reduce_sum([found])[0] < distributed.world_size():
        raise ValueError(f"checkpoint {path} exists on some ranks only; out_dir must be on a file system "
                         "shared by every node to resume")
    if not found:
        return None
    saved = load_checkpoint(path)
    if saved[1]["optimizer"]["name"] != optimizer:
        raise ValueError(f"checkpoint {path} was written with optimizer {saved[1]['optimizer']['name']!r}, "
                         f"not {optimizer!r}")
    return saved


def resume(saved: tuple[dict[str, Tensor], dict[str, Any]], state: TrainState, loader: Any,
           callbacks: Sequence[Any]) -> dict[str, Tensor] | None:
    """Restore the model, optimizer, RNGs, fit's counters and history and the callbacks' states
    from ``saved`` (read from ``state.out_dir``); returns the best weights (None before any eligible epoch)."""
    tensors, meta = saved
    assert state.out_dir is not None  # saved was read from it
    path = state.out_dir / CHECKPOINT_NAME
    checkpoint.restore(path, tensors, meta, state.model, state.optimizer, loader=loader)
    state.step, state.history = int(meta["step"]), list(meta["history"])
    state.best_metric, state.best_epoch = meta["best_metric"], meta["best_epoch"]
    state.bad_epochs, state.stop = int(meta["bad_epochs"]), bool(meta["stopped"])
    if len(meta["callbacks"]) != len(callbacks):
        raise ValueError(f"checkpoint {path} holds {len(meta['callbacks'])} callback states but fit got "
                         f"{len(callbacks)} callbacks")
    for cb, cb_state in zip(callbacks, meta["callbacks"]):
        if hasattr(cb, "load_state_dict"):
            cb.load_state_dict(cb_state)
    if state.best_epoch is None:
        return None
    return _recover_best(state.out_dir, state, checkpoint.model_state(tensors))


def _recover_best(out: Path, state: TrainState, checkpoint_model: dict[str, Tensor]) -> dict[str, Tensor]:
    """Best weights after a resume: best.safetensors if it matches the checkpoint's best epoch, or the
    checkpoint's own weights when the best epoch is the checkpoint's epoch (a crash hit between the
    checkpoint and the best-weights write)."""
    path = out / BEST_NAME
    if path.exists():
        tensors, meta = load_checkpoint(path, BEST_FORMAT)
        if meta.get("epoch") == state.best_epoch:
            return checkpoint.model_state(tensors)
    if state.best_epoch == state.epoch:
        return dict(checkpoint_model)
    raise ValueError(f"{path} is missing or does not hold the best epoch ({state.best_epoch}) recorded in "
                     f"{out / CHECKPOINT_NAME}; cannot restore the best weights")

