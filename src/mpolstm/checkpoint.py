"""Training checkpoints: model weights, optimizer state, RNG states and a JSON state in one safetensors file.

Nothing is pickled. Every file is written with :mod:`mpolstm.atomic` (a temporary file beside the
target, flushed, fsync'ed, renamed over it, directory fsync'ed), so a crash mid-write leaves the
previous file intact; a failed write (disk full) is an OSError naming the file, with its errno.

Checkpoint layout (:func:`save_checkpoint` / :func:`load_checkpoint`):

- tensors ``model/<state_dict key>`` (the model's weights, copied to CPU) and
  ``optim/<param index>/<state key>`` (the optimizer's tensor state);
- header metadata ``format`` (default :data:`CHECKPOINT_FORMAT`), ``sha256`` (the checksum, below) and
  ``state``: a JSON document
  holding the caller's ``state`` entries plus three that this module writes and validates:
  ``optimizer`` (``name`` = the optimizer's class name in lower case, ``param_groups``,
  ``scalar_state``), ``rng`` (``torch``, ``cuda``, ``numpy``, ``python`` and ``loader``: the global
  RNGs and the loader's generators; byte states base64) and ``shapes`` (every model tensor's shape).

Weights files (:func:`save_weights` / :func:`load_weights`; default format :data:`BEST_FORMAT`)
hold ``model/<key>`` tensors and the caller's state only.

Exact resume, as a training routine uses it::

    path = out_dir / "checkpoint.safetensors"
    prepare_dir(out_dir, [path.name])              # fails early if out_dir is not writable
    if path.exists():
        tensors, state = load_checkpoint(path, fields={"epoch": int})
        restore(path, tensors, state, model, optimizer, loader=train_loader)
        start = state["epoch"]
    else:
        torch.manual_seed(seed)
        start = 0
    for epoch in range(start, epochs):
        ...                                        # one epoch over train_loader
        save_checkpoint(path, model, optimizer, {"epoch": epoch + 1}, loader=train_loader)

Resuming this way gives the weights of an uninterrupted run (bit-exact on CPU): the weights, the
optimizer state, the Python/NumPy/torch (CPU and CUDA) RNG states and the state of the loader's
``torch.Generator`` (``loader.generator``, ``loader.sampler.generator``,
``loader.batch_sampler.generator``) are captured after an epoch and restored before the next.

Every file carries a checksum, as a saved model does (``mpolstm.io``): the SHA-256 of its content
(tensor entries, metadata and data; :func:`mpolstm.tensorfile.content_digest`), written in the
header in the same atomic write as the tensors. Reading verifies it before any tensor is used, so a
flipped byte, a partial copy or an edited file is refused instead of resuming with damaged weights.

Every problem with a file read back (missing, truncated, foreign, corrupt, damaged, a malformed
field, an unexpected tensor name, weights that do not fit the model, an optimizer state that does
not fit the optimizer) is a one-line ValueError whose message names the file. The safetensors
header's layout is checked against the file (:func:`mpolstm.tensorfile.read_header`) before any
tensor is read.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
from safetensors.torch import save as st_save
from torch import Tensor, nn

from .atomic import atomic_write_bytes
from .tensorfile import DamagedFile, content_digest, read_header, read_tensors

__all__ = [
    "CHECKPOINT_FORMAT",
    "BEST_FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "restore",
    "save_weights",
    "load_weights",
    "model_state",
    "check_structure",
    "cpu_copy",
    "optimizer_name",
    "capture_rng",
    "restore_rng",
    "prepare_dir",
    "name_write_errors",
    "write_file",
]

CHECKPOINT_FORMAT = "mpolstm.train.checkpoint/1"
"""Default ``format`` of a checkpoint (weights + optimizer + RNG states + state)."""
BEST_FORMAT = "mpolstm.train.best/1"
"""Default ``format`` of a weights file (the best weights of a training run)."""

Fields = Mapping[str, type | tuple[type, ...]]
_PROBE_NAME = ".write-probe"
_CHECKSUM = "sha256"  # the metadata entry holding the content digest
_RESERVED = ("optimizer", "rng", "shapes")
_ENVELOPE: dict[str, tuple[type, ...]] = {"optimizer": (dict,), "rng": (dict,), "shapes": (dict,)}
_NESTED: dict[str, dict[str, tuple[type, ...]]] = {
    "optimizer": {"name": (str,), "param_groups": (list,), "scalar_state": (dict,)},
    "rng": {"torch": (str,), "cuda": (list,), "numpy": (list,), "python": (list,), "loader": (list,)},
}
# what restoring hand-edited or corrupted (but well-typed at the top level) state can raise
_MALFORMED = (TypeError, KeyError, IndexError, AttributeError, OverflowError, RuntimeError, ValueError)


# ------------------------------------------------------------------------------------ writing
def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: Mapping[str, Any], loader: Any = None, *, fmt: str = CHECKPOINT_FORMAT) -> None:
    """Atomically write ``model``'s weights, ``optimizer``'s state, the RNG states (global ones and
    ``loader``'s generators) and ``state`` (JSON-serialisable; the keys ``optimizer``, ``rng`` and
    ``shapes`` are this module's) to ``path``."""
    reserved = [k for k in _RESERVED if k in state]
    if reserved:
        raise ValueError(f"checkpoint state keys {reserved} are reserved for mpolstm.checkpoint")
    weights = cpu_copy(model.state_dict())
    opt_tensors, opt_payload = _optimizer_payload(optimizer)
    doc = {**state, "optimizer": {"name": optimizer_name(optimizer), **opt_payload}, "rng": capture_rng(loader),
           "shapes": {k: list(v.shape) for k, v in weights.items()}}
    tensors = {**{f"model/{k}": v for k, v in weights.items()}, **cpu_copy(opt_tensors)}
    write_file(Path(path), tensors, fmt, doc)


def save_weights(path: str | os.PathLike, weights: Mapping[str, Tensor], state: Mapping[str, Any], *,
                 fmt: str = BEST_FORMAT) -> None:
    """Atomically write a state dict (``model/<key>`` tensors) and a JSON ``state`` to ``path``."""
    write_file(Path(path), {f"model/{k}": v for k, v in cpu_copy(weights).items()}, fmt, dict(state))


def write_file(path: str | os.PathLike, tensors: Mapping[str, Tensor], fmt: str, state: Mapping[str, Any]) -> None:
    """Atomically write ``tensors`` (CPU, contiguous) with the metadata ``format`` = ``fmt``, the JSON
    ``state`` and the checksum of it all (the one writer of checkpoints and weights files)."""
    path = Path(path)
    metadata = {"format": fmt, "state": json.dumps(state)}
    draft = st_save(dict(tensors), metadata=metadata)
    digest = content_digest(draft, read_header(draft, path), _CHECKSUM)
    data = st_save(dict(tensors), metadata={**metadata, _CHECKSUM: digest})
    with name_write_errors(path):
        atomic_write_bytes(path, data)


@contextlib.contextmanager
def name_write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an OSError from the body (disk full, permissions) with a message naming ``path``
    (its errno kept)."""
    try:
        yield
    except OSError as e:
        msg = f"could not write {path}: {e.strerror or e}; the files already in {Path(path).parent} are kept"
        raise (OSError(e.errno, msg) if e.errno else OSError(msg)) from e


def prepare_dir(directory: str | os.PathLike, names: Iterable[str] = (), *, label: str = "directory") -> None:
    """Create ``directory``, remove the temporary files a crash mid-write left beside the files
    ``names``, and check that a file can be written there, so that an unwritable directory is a
    ValueError (mentioning it as ``label``) before any work is done rather than after."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{label} {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in (*names, _PROBE_NAME):
            for stale in out.glob(f".{name}.*.tmp"):  # mpolstm.atomic's temporary files
                stale.unlink(missing_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{_PROBE_NAME}.", suffix=".tmp", dir=out)
        try:
            os.write(fd, b"0")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{label} {out} is not a writable directory: {e.strerror or e}") from e


def cpu_copy(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies of ``state_dict``'s tensors."""
    # clone() also breaks storage sharing (tied weights), which safetensors refuses to save
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """The name a checkpoint records for ``optimizer``: its class name in lower case ("adam", "sgd")."""
    return type(optimizer).__name__.lower()


# ------------------------------------------------------------------------------------ reading
def load_checkpoint(path: str | os.PathLike, fmt: str = CHECKPOINT_FORMAT, *,
                    fields: Fields | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(tensors, state)``.

    Validates the format, the tensor names, this module's state entries and the caller's
    ``fields`` (name -> type or tuple of types that the state must hold; ``bool`` passes only where
    listed). Any problem is a ValueError naming the file."""
    path = Path(path)
    tensors, state = _read(path, fmt)
    _check_fields(path, state, {**_ENVELOPE, **_normalise(fields)})
    for key, nested in _NESTED.items():
        _check_fields(path, state[key], nested, f"{key}.")
    _check_tensor_names(path, tensors, optimizer=True)
    return tensors, state


def load_weights(path: str | os.PathLike, fmt: str = BEST_FORMAT, *,
                 fields: Fields | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a weights file written by :func:`save_weights`: ``(tensors, state)``, validated as
    :func:`load_checkpoint` does (tensor names ``model/<key>`` only)."""
    path = Path(path)
    tensors, state = _read(path, fmt)
    _check_fields(path, state, _normalise(fields))
    _check_tensor_names(path, tensors, optimizer=False)
    return tensors, state


def _read(path: Path, fmt: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, state) of the file ``path``, its format, layout and checksum verified."""
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        data = path.read_bytes()
        header = read_header(data, path)
    except (DamagedFile, OSError) as e:
        raise ValueError(f"checkpoint {path} is unreadable or corrupt: {getattr(e, 'problem', e)}") from None
    meta = header.metadata
    if meta.get("format") != fmt:
        raise ValueError(f"{path} is not an mpolstm checkpoint (metadata format {meta.get('format')!r}, "
                         f"expected {fmt!r})")
    if "state" not in meta:
        raise ValueError(f"checkpoint {path} has no 'state' metadata")
    try:
        state = json.loads(meta["state"])
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"checkpoint {path} is unreadable or corrupt: {type(e).__name__}: {e}") from None
    if meta.get(_CHECKSUM) != content_digest(data, header, _CHECKSUM):
        raise ValueError(f"checkpoint {path} is damaged: its content does not match the checksum it was written "
                         "with (a changed byte, a partial copy or an edit; a file without one predates checksums); "
                         "refusing to resume from it")
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} has a malformed state (expected a JSON object)")
    try:
        return read_tensors(data, path), state
    except DamagedFile as e:
        raise ValueError(f"checkpoint {path} is unreadable or corrupt: {e.problem}") from None


def _normalise(fields: Fields | None) -> dict[str, tuple[type, ...]]:
    return {k: v if isinstance(v, tuple) else (v,) for k, v in (fields or {}).items()}


def _check_fields(path: Path, doc: Mapping[str, Any], fields: Mapping[str, tuple[type, ...]], where: str = "") -> None:
    for name, kinds in fields.items():
        value = doc.get(name)
        if name not in doc or not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ValueError(f"checkpoint {path} has a malformed state: {where}{name!r} should be "
                             f"{' or '.join(k.__name__ for k in kinds)}, got {value!r:.60}")


def _check_tensor_names(path: Path, tensors: Iterable[str], *, optimizer: bool) -> None:
    for name in tensors:
        parts = name.split("/")
        ok = (parts[0] == "model" and len(parts) == 2 and parts[1]) or (
            optimizer and parts[0] == "optim" and len(parts) == 3 and parts[1].isdecimal() and parts[2])
        if not ok:
            raise ValueError(f"checkpoint {path} holds an unexpected tensor {name!r:.80}; expected 'model/<name>'"
                             + (" or 'optim/<index>/<key>'" if optimizer else ""))


def model_state(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The model's state dict among a checkpoint's tensors (``model/`` prefix removed)."""
    return {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}


# ---------------------------------------------------------------------------------- restoring
def restore(path: str | os.PathLike, tensors: Mapping[str, Tensor], state: Mapping[str, Any], model: nn.Module,
            optimizer: torch.optim.Optimizer | None = None, *, loader: Any = None) -> None:
    """Load a checkpoint read by :func:`load_checkpoint` (from ``path``, named in errors): the
    weights into ``model`` (its structure must match, see :func:`check_structure`), the optimizer
    state into ``optimizer`` (same kind, same parameters) and the RNG states (global ones and
    ``loader``'s generators)."""
    path = Path(path)
    weights = model_state(tensors)
    check_structure(model, weights, path)
    model.load_state_dict(weights)
    if optimizer is not None:
        _restore_optimizer(path, tensors, state["optimizer"], optimizer)
    restore_rng(state["rng"], loader, path=path)


def check_structure(model: nn.Module, weights: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """ValueError listing the names missing, unexpected or of another shape in ``weights``."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = sorted(k for k in set(own) & set(weights) if tuple(own[k].shape) != tuple(weights[k].shape))
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{label}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
            for label, items in (("missing from checkpoint", missing), ("not in model", unexpected),
                                 ("shape differs", [f"{k} {tuple(own[k].shape)} vs {tuple(weights[k].shape)}"
                                                    for k in shapes]))
            if items
        )
        raise ValueError(f"checkpoint {path} does not match the model's structure ({detail}); a callback that "
                         "changes the model's structure must rebuild it in on_fit_start when resuming")


def _restore_optimizer(path: Path, tensors: Mapping[str, Tensor], payload: Mapping[str, Any],
                       optimizer: torch.optim.Optimizer) -> None:
    name = optimizer_name(optimizer)
    if payload["name"] != name:
        raise ValueError(f"checkpoint {path} was written with optimizer {payload['name']!r}, not {name!r}")
    optim = {k: v for k, v in tensors.items() if k.startswith("optim/")}
    try:
        optimizer.load_state_dict(_optimizer_state_dict(optim, payload))
    except _MALFORMED as e:
        raise ValueError(f"checkpoint {path} has an optimizer state that does not fit {name!r} "
                         f"over this model: {e}") from None


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


# -------------------------------------------------------------------------------- RNG states
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


def capture_rng(loader: Any = None) -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's (CPU, CUDA) global RNGs and of ``loader``'s
    generators, as a JSON-serialisable dict."""
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # the legacy MT19937 state of the global RandomState
    py_state = random.getstate()
    return {
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "loader": [_b64(g.get_state()) for g in _loader_generators(loader)],
    }


def restore_rng(rng: Mapping[str, Any], loader: Any = None, *, path: str | os.PathLike) -> None:
    """Restore states captured by :func:`capture_rng` (``path`` names the checkpoint in errors)."""
    try:
        _restore_global_rngs(rng)
    except _MALFORMED as e:
        raise ValueError(f"checkpoint {path} has malformed RNG states: {type(e).__name__}: {e}") from None
    gens = _loader_generators(loader)
    if len(gens) != len(rng["loader"]):
        raise ValueError(f"the checkpoint saved {len(rng['loader'])} loader generator state(s) but the "
                         f"train loader has {len(gens)}; resume with a loader built the same way")
    try:
        for g, s in zip(gens, rng["loader"]):
            g.set_state(_unb64(s))
    except _MALFORMED as e:
        raise ValueError(f"checkpoint {path} has malformed loader generator states: {e}") from None


def _restore_global_rngs(rng: Mapping[str, Any]) -> None:
    torch.set_rng_state(_unb64(rng["torch"]))
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in rng["cuda"]])
    n = rng["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = rng["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
