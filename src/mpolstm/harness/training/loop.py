"""The training loop shared by every task: seeded, resumable, with atomic safetensors checkpoints.

:func:`fit` trains for a number of epochs, evaluates on the validation loader after each, keeps the
best weights, stops early after ``patience`` epochs without improvement, appends one JSON line per
epoch to ``out_dir/metrics.jsonl`` and writes ``out_dir/checkpoint.safetensors`` after every epoch.

Checkpoint format (never pickle): one safetensors file, written to a temporary file in ``out_dir``,
flushed, fsync'ed and renamed over the previous one (a crash mid-write leaves the previous
checkpoint intact). Tensors: ``model/<state_dict key>`` and ``optim/<param index>/<state key>``.
Header metadata: ``format`` = :data:`CHECKPOINT_FORMAT` and ``state`` = a JSON document with the
epoch, global step, optimizer name/param groups/scalar state, RNG states (torch, CUDA, NumPy,
Python, loader generators; byte states base64), best metric and epoch, early-stopping counter,
history, callback states and the shape of every model tensor. ``best.safetensors`` holds the best
weights (``model/<key>``; metadata ``epoch`` and ``metric``).

``fit(..., resume=True)`` continues from ``checkpoint.safetensors`` so that the final weights equal
those of an uninterrupted run (bit-exact on CPU). Models whose structure changes during training
(pruning masks, shrinking MPO bonds) must be rebuilt before the weights are loaded: fit calls every
callback's ``on_fit_start`` with ``state.resumed = True`` and ``state.epoch`` = the number of
completed epochs *before* loading, so a callback re-applies its schedule deterministically up to
that epoch; any remaining mismatch of tensor names or shapes is a ValueError listing them.

Distributed training: under ``torchrun`` (``WORLD_SIZE`` > 1) fit initialises the process group
(:mod:`mpolstm.distributed`; gloo on CPU, NCCL for CUDA on ``cuda:LOCAL_RANK``), wraps the model in
DistributedDataParallel and gives each rank its part of every global batch
(:func:`mpolstm.distributed.shard_loader`: the loader's batch size stays the global one). The train
loss and the validation metric's sums and counts are reduced over ranks; rank 0 alone writes
metrics.jsonl and checkpoints and shows the progress bar, and a failure there is raised on every
rank. Every rank reads the same checkpoint to resume (``out_dir`` must be shared between nodes).
Callbacks see the unwrapped model; when one replaces or freezes parameters (bond shrinking,
pruning), the optimizer and the DDP wrapper are rebuilt (DDP re-broadcasts rank 0's weights).
Every rank uses the same seed, so dropout masks repeat across ranks.

An ``out_dir`` that cannot be created or written is a ValueError before training starts; a failed
write later (disk full) is an OSError naming the file, with the previous checkpoint left intact.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from .. import distributed
from ...atomic import atomic_open, atomic_write_bytes

__all__ = [
    "CHECKPOINT_FORMAT",
    "BEST_FORMAT",
    "Metric",
    "ACCURACY",
    "PERPLEXITY",
    "Callback",
    "TrainState",
    "Distillation",
    "FitResult",
    "fit",
    "evaluate",
    "count_parameters",
    "seed_everything",
    "make_optimizer",
    "load_checkpoint",
    "OPTIMIZERS",
    "ForwardFn",
]

CHECKPOINT_FORMAT = "mpolstm.train.checkpoint/1"
BEST_FORMAT = "mpolstm.train.best/1"
CHECKPOINT_NAME, BEST_NAME, METRICS_NAME = "checkpoint.safetensors", "best.safetensors", "metrics.jsonl"
_PROBE_NAME = ".write-probe"

Batch = Any
ForwardFn = Callable[[nn.Module, Batch], tuple[Tensor, Tensor]]


# ----------------------------------------------------------------------------------- metrics
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


# --------------------------------------------------------------------------------- callbacks
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
        t = self.temperature
        s = F.log_softmax(student.reshape(-1, student.shape[-1]).float() / t, dim=-1)
        p = F.log_softmax(teacher.reshape(-1, teacher.shape[-1]).float() / t, dim=-1)
        return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


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


# ----------------------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter entries (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _default_forward(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
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
    total, count = _metric_sums(model, loader, metric, forward_fn or _default_forward, dev, amp)
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


def _each(callbacks: Sequence[Any], hook: str, state: TrainState) -> None:
    for cb in callbacks:
        if hasattr(cb, hook):
            getattr(cb, hook)(state)


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")


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


def _param_signature(model: nn.Module) -> tuple:
    return tuple((id(p), tuple(p.shape)) for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------- RNG capture
def _b64(t: Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def _loader_generators(loader: Any) -> list[torch.Generator]:
    gens = [getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None),
            getattr(getattr(loader, "batch_sampler", None), "generator", None)]
    out: list[torch.Generator] = []
    for g in gens:
        if isinstance(g, torch.Generator) and all(g is not h for h in out):
            out.append(g)
    return out


def _rng_state(loader: Any) -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "loader": [_b64(g.get_state()) for g in _loader_generators(loader)],
    }


# what restoring hand-edited or corrupted (but well-typed at the top level) state can raise
_MALFORMED = (TypeError, KeyError, IndexError, AttributeError, OverflowError, RuntimeError, ValueError)


def _set_rng_state(state: Mapping[str, Any], loader: Any, where: Path) -> None:
    try:
        _restore_rngs(state)
    except _MALFORMED as e:
        raise ValueError(f"checkpoint {where} has malformed RNG states: {type(e).__name__}: {e}") from None
    gens = _loader_generators(loader)
    if len(gens) != len(state["loader"]):
        raise ValueError(f"the checkpoint saved {len(state['loader'])} loader generator state(s) but the "
                         f"train loader has {len(gens)}; resume with a loader built the same way")
    try:
        for g, s in zip(gens, state["loader"]):
            g.set_state(_unb64(s))
    except _MALFORMED as e:
        raise ValueError(f"checkpoint {where} has malformed loader generator states: {e}") from None


def _restore_rngs(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# ------------------------------------------------------------------------------ checkpoints
def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    raise ValueError(f"optimizer state value {v!r} of type {type(v).__name__} is not JSON-serialisable")


def _optimizer_payload(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim/{idx}/{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = _jsonable(v)
    groups = [{k: _jsonable(v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalar_state": scalars}


def _optimizer_state_dict(tensors: Mapping[str, Tensor], payload: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        _, idx, k = key.split("/", 2)
        state.setdefault(int(idx), {})[k] = t
    for idx, st in payload["scalar_state"].items():
        state.setdefault(int(idx), {}).update(st)
    groups = [{k: (v if k == "params" or not isinstance(v, list) else tuple(v)) for k, v in g.items()}
              for g in payload["param_groups"]]
    return {"state": state, "param_groups": groups}


def _cpu_copy(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # clone() also breaks storage sharing (tied weights), which safetensors refuses to save
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


def load_checkpoint(path: str | os.PathLike, fmt: str = CHECKPOINT_FORMAT) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint (or ``best.safetensors`` with ``fmt=BEST_FORMAT``): (tensors, state).

    Raises ValueError for a missing, truncated, foreign or malformed file: the safetensors header
    (whose declared size is checked against the file before anything is read), the tensor names and
    the state's fields and their types are validated; tensors are read from a memory map, so a file
    never costs more memory than its size. Nothing is unpickled."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != fmt:
                raise ValueError(f"{path} is not an mpolstm checkpoint (metadata format {meta.get('format')!r}, "
                                 f"expected {fmt!r})")
            if "state" not in meta:
                raise ValueError(f"checkpoint {path} has no 'state' metadata")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state = json.loads(meta["state"])
    except (SafetensorError, OSError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"checkpoint {path} is unreadable or corrupt: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} has a malformed state (expected a JSON object)")
    _validate(path, fmt, tensors, state)
    return tensors, state


_NUMBER, _INT, _NONE = (int, float), (int,), (type(None),)
_STATE_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    CHECKPOINT_FORMAT: {"epoch": _INT, "step": _INT, "optimizer": (dict,), "rng": (dict,),
                        "best_metric": _NUMBER + _NONE, "best_epoch": _INT + _NONE, "bad_epochs": _INT,
                        "stopped": (bool,), "history": (list,), "callbacks": (list,), "shapes": (dict,)},
    BEST_FORMAT: {"epoch": _INT, "metric": _NUMBER},
}
_NESTED_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "optimizer": {"name": (str,), "param_groups": (list,), "scalar_state": (dict,)},
    "rng": {"torch": (str,), "cuda": (list,), "numpy": (list,), "python": (list,), "loader": (list,)},
}


def _validate(path: Path, fmt: str, tensors: Mapping[str, Tensor], state: Mapping[str, Any]) -> None:
    """Tensor names and state fields of a checkpoint (``fmt``) are what :func:`fit` writes."""
    def check(fields: Mapping[str, tuple[type, ...]], doc: Mapping[str, Any], where: str) -> None:
        for name, kinds in fields.items():
            value = doc.get(name)
            if name not in doc or not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise ValueError(f"checkpoint {path} has a malformed state: {where}{name!r} should be "
                                 f"{' or '.join(k.__name__ for k in kinds)}, got {value!r:.60}")
    check(_STATE_FIELDS[fmt], state, "")
    for key, fields in _NESTED_FIELDS.items() if fmt == CHECKPOINT_FORMAT else ():
        check(fields, state[key], f"{key}.")
    for name in tensors:
        parts = name.split("/")
        ok = (parts[0] == "model" and len(parts) == 2 and parts[1]) or (
            fmt == CHECKPOINT_FORMAT and parts[0] == "optim" and len(parts) == 3 and parts[1].isdecimal() and parts[2])
        if not ok:
            raise ValueError(f"checkpoint {path} holds an unexpected tensor {name!r:.80}; expected 'model/<name>'"
                             + (" or 'optim/<index>/<key>'" if fmt == CHECKPOINT_FORMAT else ""))


def _save(path: Path, tensors: Mapping[str, Tensor], fmt: str, state: Mapping[str, Any]) -> None:
    data = st_save(dict(tensors), metadata={"format": fmt, "state": json.dumps(state)})
    _write_checked(path, lambda: atomic_write_bytes(path, data))


def _check_structure(model: nn.Module, saved: Mapping[str, Tensor], where: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    shapes = sorted(k for k in set(own) & set(saved) if tuple(own[k].shape) != tuple(saved[k].shape))
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{label}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
            for label, items in (("missing from checkpoint", missing), ("not in model", unexpected),
                                 ("shape differs", [f"{k} {tuple(own[k].shape)} vs {tuple(saved[k].shape)}"
                                                    for k in shapes]))
            if items
        )
        raise ValueError(f"checkpoint {where} does not match the model's structure ({detail}); a callback that "
                         "changes the model's structure must rebuild it in on_fit_start when resuming")


# ------------------------------------------------------------------------------------- fit
def _progress(enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty() and not os.environ.get("CI")
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[info]}"), transient=True)


def fit(
    model: nn.Module,
    train_loader: Iterable[Batch],
    val_loader: Iterable[Batch],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    metric: Metric,
    *,
    epochs: int,
    lr: float,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    grad_clip: float | None = None,
    lr_schedule: Callable[[int], float] | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    patience: int | None = None,
    min_delta: float = 0.0,
    resume: bool = False,
    device: str | torch.device | None = None,
    amp: bool = False,
    callbacks: Sequence[Any] = (),
    forward_fn: ForwardFn | None = None,
    distill: Distillation | None = None,
    restore_best: bool = True,
    progress: bool | None = None,
) -> FitResult:
    """Train ``model`` and return the history and best validation metric.

    Args:
        model: any nn.Module; moved to ``device`` (default: the model's current device).
        train_loader, val_loader: re-iterable batch sources (DataLoader, BPTTLoader...).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (e.g. ``F.cross_entropy``).
        metric: validation metric (:data:`ACCURACY`, :data:`PERPLEXITY` or your own); its ``mode``
            decides what "better" means for best weights and early stopping.
        epochs: total epochs (including those already done when resuming).
        lr, optimizer, weight_decay, momentum: optimizer settings (:data:`OPTIMIZERS`); only
            parameters with ``requires_grad`` are optimised.
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        lr_schedule: ``epoch (0-based) -> factor``; the learning rate of epoch e is ``lr * factor``.
        seed: seeds all RNGs at the start of a fresh run (seed model construction yourself,
            e.g. with :func:`seed_everything`, before building the model).
        out_dir: directory for metrics.jsonl, checkpoint.safetensors and best.safetensors
            (None: nothing written; ``resume`` then not allowed).
        patience: stop after this many eligible epochs without an improvement > ``min_delta``
            (None: never stop early).
        resume: continue from ``out_dir/checkpoint.safetensors`` if it exists (else start fresh).
        device: "cpu", "cuda", ... ; amp: bfloat16 autocast, CUDA only.
        callbacks: :class:`Callback` hooks (pruning schedules, bond shrinking, logging).
        forward_fn: ``forward_fn(model, batch) -> (outputs, targets)``, batch already on device
            (default: ``batch = (x, y)``, outputs ``model(x)``).
        distill: optional :class:`Distillation` from a teacher model.
        restore_best: load the best weights into ``model`` at the end (if any epoch was eligible).
        progress: rich progress bar; None = only when stderr is a TTY and $CI is unset.

    The history has one record per epoch: ``epoch`` (1-based), ``train_loss`` (mean over batches),
    ``val_<metric name>``, ``lr``, ``time_s``, ``eligible`` and anything callbacks add."""
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
    ddp = distributed.setup()
    if ddp:
        dev = distributed.device_for_rank(device)
    else:
        dev = torch.device(device) if device is not None else _model_device(model)
    if amp and dev.type != "cuda":
        raise ValueError(f"amp (bfloat16 autocast) needs a CUDA device, got {dev}")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        distributed.run_on_main(lambda: _prepare_out_dir(out))
    forward = forward_fn or _default_forward
    model.to(dev)
    if distill is not None:
        distill.teacher.to(dev).eval()
    teacher_forward = torch.no_grad()(forward)
    if ddp:
        train_loader = distributed.shard_loader(train_loader, seed)
        val_loader = distributed.shard_loader(val_loader, seed, allow_empty=True)

    ckpt_path = out / CHECKPOINT_NAME if out is not None else None
    saved: tuple[dict[str, Tensor], dict[str, Any]] | None = None
    found = resume and ckpt_path is not None and ckpt_path.exists()
    if ddp and 0 < distributed.all_reduce_sum([found])[0] < distributed.world_size():
        raise ValueError(f"checkpoint {ckpt_path} exists on some ranks only; out_dir must be on a file system "
                         "shared by every node to resume")
    if found:
        saved = load_checkpoint(ckpt_path)
        if saved[1].get("optimizer", {}).get("name") != optimizer:
            raise ValueError(f"checkpoint {ckpt_path} was written with optimizer "
                             f"{saved[1].get('optimizer', {}).get('name')!r}, not {optimizer!r}")
    else:
        seed_everything(seed)

    state = TrainState(model=model, epochs=epochs, out_dir=out, resumed=saved is not None)
    if saved is not None:
        state.epoch = int(saved[1]["epoch"])
    _each(callbacks, "on_fit_start", state)
    opt = make_optimizer(optimizer, (p for p in model.parameters() if p.requires_grad), lr,
                         weight_decay=weight_decay, momentum=momentum)
    state.optimizer = opt
    best_state: dict[str, Tensor] | None = None

    if saved is not None:
        tensors, meta = saved
        model_sd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        _check_structure(model, model_sd, ckpt_path)
        model.load_state_dict(model_sd)
        try:
            opt.load_state_dict(_optimizer_state_dict(
                {k: v for k, v in tensors.items() if k.startswith("optim/")}, meta["optimizer"]))
        except _MALFORMED as e:
            raise ValueError(f"checkpoint {ckpt_path} has an optimizer state that does not fit {optimizer!r} "
                             f"over this model: {e}") from None
        _set_rng_state(meta["rng"], train_loader, ckpt_path)
        state.step, state.history = int(meta["step"]), list(meta["history"])
        state.best_metric, state.best_epoch = meta["best_metric"], meta["best_epoch"]
        state.bad_epochs, state.stop = int(meta["bad_epochs"]), bool(meta["stopped"])
        if len(meta["callbacks"]) != len(callbacks):
            raise ValueError(f"checkpoint {ckpt_path} holds {len(meta['callbacks'])} callback states but fit got "
                             f"{len(callbacks)} callbacks")
        for cb, cb_state in zip(callbacks, meta["callbacks"]):
            if hasattr(cb, "load_state_dict"):
                cb.load_state_dict(cb_state)
        if state.best_epoch is not None:
            best_state = _recover_best(out, state, model_sd)
    if out is not None:  # a fresh run starts empty; a resumed one from its history
        distributed.run_on_main(lambda: _write_checked(out / METRICS_NAME, lambda: _write_metrics(out, state.history)))

    def wrap() -> nn.Module:
        """The module that trains: ``model``, or its DDP wrapper (rebuilt when the parameters change)."""
        if not ddp:
            return model
        return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    net, signature = wrap(), _param_signature(model)

    def sync_optimizer() -> None:
        nonlocal opt, signature, net
        new = _param_signature(model)
        if new != signature:
            current_lr = opt.param_groups[0]["lr"]
            opt = make_optimizer(optimizer, (p for p in model.parameters() if p.requires_grad), current_lr,
                                 weight_decay=weight_decay, momentum=momentum)
            state.optimizer, signature, net = opt, new, wrap()

    bar = _progress(progress) if distributed.is_main() else None
    with bar if bar is not None else contextlib.nullcontext():
        task = bar.add_task("train", total=None, info="") if bar is not None else None
        for epoch in range(state.epoch, epochs):
            if state.stop:
                break
            t0 = time.perf_counter()
            state.epoch, state.record = epoch, {}
            for g in opt.param_groups:
                g["lr"] = lr * (lr_schedule(epoch) if lr_schedule is not None else 1.0)
            _each(callbacks, "on_epoch_start", state)
            sync_optimizer()
            net.train()
            n_batches = len(train_loader) if hasattr(train_loader, "__len__") else None
            if bar is not None:
                bar.reset(task, total=n_batches, description=f"epoch {epoch + 1}/{epochs}", info="")
            loss_sum, loss_n = 0.0, 0
            for batch in train_loader:
                batch = _to_device(batch, dev)
                with _autocast(amp):
                    outputs, targets = forward(net, batch)
                    loss = loss_fn(outputs, targets)
                    if distill is not None:
                        teacher_out, _ = teacher_forward(distill.teacher, batch)
                        loss = (1 - distill.alpha) * loss + distill.alpha * distill.loss(outputs, teacher_out)
                # under DDP the mean over ranks: every rank sees the same value and stops together
                step_loss = loss.item()
                if ddp:
                    step_loss = distributed.all_reduce_sum([step_loss])[0] / distributed.world_size()
                if not math.isfinite(step_loss):
                    raise FloatingPointError(f"loss became {step_loss} at epoch {epoch + 1}, step {state.step + 1}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
                opt.step()
                state.step += 1
                loss_sum, loss_n = loss_sum + step_loss, loss_n + 1
                _each(callbacks, "on_batch_end", state)
                sync_optimizer()
                if bar is not None:
                    bar.update(task, advance=1, info=f"loss {loss_sum / loss_n:.4f}")
            if loss_n == 0:
                raise ValueError("the train loader yielded no batches")
            total, count = _metric_sums(model, val_loader, metric, forward, dev, amp)
            if ddp:
                total, count = distributed.all_reduce_sum([total, count])
            if count == 0:
                raise ValueError("the validation loader yielded no batches")
            value = metric.finalize(total / count)
            state.record.update({"epoch": epoch + 1, "train_loss": loss_sum / loss_n, f"val_{metric.name}": value,
                                 "lr": opt.param_groups[0]["lr"]})
            _each(callbacks, "on_epoch_end", state)
            eligible = all(cb.ready(state) for cb in callbacks if hasattr(cb, "ready"))
            improved = eligible and metric.better(value, state.best_metric, min_delta)
            if improved:
                state.best_metric, state.best_epoch, state.bad_epochs = value, epoch + 1, 0
                best_state = _cpu_copy(model.state_dict())
            elif eligible:
                state.bad_epochs += 1
            if patience is not None and state.bad_epochs >= patience:
                state.stop = True
            if ddp:
                state.stop = distributed.any_rank(state.stop)
            state.record.update({"eligible": eligible, "best": state.best_metric,
                                 "time_s": round(time.perf_counter() - t0, 4)})
            state.history.append(dict(state.record))
            state.epoch = epoch + 1
            if out is not None:
                distributed.run_on_main(lambda: _write_epoch(out, state, optimizer, train_loader, callbacks, improved,
                                                             best_state, metric))
            if bar is not None:
                bar.console.print(f"epoch {epoch + 1}/{epochs}  loss {loss_sum / loss_n:.4f}  "
                                  f"val {metric.name} {value:.4f}")
    if restore_best and best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(history=state.history, best_metric=state.best_metric, best_epoch=state.best_epoch,
                     epochs_completed=len(state.history), stopped_early=state.stop, out_dir=out)


def _prepare_out_dir(out: Path) -> None:
    """Create ``out``, remove temporary files left by a crash mid-write, and check that a file can be
    written there (so that an unwritable directory fails before training, not after an epoch)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in (CHECKPOINT_NAME, BEST_NAME, METRICS_NAME, _PROBE_NAME):
            for stale in out.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{_PROBE_NAME}.", suffix=".tmp", dir=out)
        try:
            os.write(fd, b"0")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise ValueError(f"out_dir {out} is not a writable directory: {e.strerror or e}") from e


def _write_checked(path: Path, write: Callable[[], None]) -> None:
    """Run ``write`` (which writes ``path``); an OSError (disk full, permissions) names the file."""
    try:
        write()
    except OSError as e:
        msg = f"could not write {path}: {e.strerror or e}; the files already in {path.parent} are kept"
        raise (OSError(e.errno, msg) if e.errno else OSError(msg)) from e


def _write_metrics(out: Path, history: Sequence[Mapping[str, Any]]) -> None:
    with atomic_open(out / METRICS_NAME, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in history)


def _write_epoch(out: Path, state: TrainState, optimizer: str, loader: Any, callbacks: Sequence[Any],
                 improved: bool, best_state: Mapping[str, Tensor] | None, metric: Metric) -> None:
    """Checkpoint first (the commit point), then best weights, then the metrics line."""
    model_sd = _cpu_copy(state.model.state_dict())
    opt_tensors, opt_payload = _optimizer_payload(state.optimizer)
    meta = {
        "epoch": state.epoch,
        "step": state.step,
        "optimizer": {"name": optimizer, **opt_payload},
        "rng": _rng_state(loader),
        "best_metric": state.best_metric,
        "best_epoch": state.best_epoch,
        "bad_epochs": state.bad_epochs,
        "stopped": state.stop,
        "metric": {"name": metric.name, "mode": metric.mode},
        "history": state.history,
        "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else {} for cb in callbacks],
        "shapes": {k: list(v.shape) for k, v in model_sd.items()},
    }
    tensors = {**{f"model/{k}": v for k, v in model_sd.items()}, **_cpu_copy(opt_tensors)}
    _save(out / CHECKPOINT_NAME, tensors, CHECKPOINT_FORMAT, meta)
    if improved and best_state is not None:
        _save(out / BEST_NAME, {f"model/{k}": v for k, v in best_state.items()}, BEST_FORMAT,
              {"epoch": state.best_epoch, "metric": state.best_metric})
    _write_checked(out / METRICS_NAME, lambda: _append_line(out / METRICS_NAME, json.dumps(state.history[-1])))


def _append_line(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _recover_best(out: Path, state: TrainState, checkpoint_model: dict[str, Tensor]) -> dict[str, Tensor]:
    """Best weights after a resume: best.safetensors if it matches the checkpoint's best epoch, or the
    checkpoint's own weights when the best epoch is the checkpoint's epoch (a crash hit between the
    checkpoint and the best-weights write)."""
    path = out / BEST_NAME
    if path.exists():
        tensors, meta = load_checkpoint(path, BEST_FORMAT)
        if meta.get("epoch") == state.best_epoch:
            return {k[len("model/"):]: v for k, v in tensors.items()}
    if state.best_epoch == state.epoch:
        return dict(checkpoint_model)
    raise ValueError(f"{path} is missing or does not hold the best epoch ({state.best_epoch}) recorded in "
                     f"{out / CHECKPOINT_NAME}; cannot restore the best weights")
