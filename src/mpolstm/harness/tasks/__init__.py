"""The paper's tasks, one module each, registered in :mod:`.registry` (see there how to add one).

Every task model can be rebuilt without its data from a JSON architecture spec
``{"name": ..., "kwargs": {...}}`` (:func:`build_architecture`); saved models carry it in
``architecture.json`` beside the weights, so ``mpolstm inspect/compress/enhance/export`` can
load them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .registry import BUILTIN_TASKS, PRESETS, TaskType, get_task, register_task, task_names

__all__ = ["ARCHITECTURE_FILE", "PRESETS", "BUILTIN_TASKS", "TaskType", "register_task", "get_task", "task_names",
           "build_architecture", "save_model", "load_model", "example_inputs", "export_task_model"]

ARCHITECTURE_FILE = "architecture.json"


def _task_of(spec: Mapping[str, Any]) -> TaskType:
    """The registered task of an architecture spec; ValueError unless it is ``{"name", "kwargs"}``."""
    names = sorted(task_names())
    if not isinstance(spec, Mapping) or spec.get("name") not in names or not isinstance(spec.get("kwargs"), Mapping):
        raise ValueError(f"architecture spec must be {{'name': one of {names}, 'kwargs': {{...}}}}, got {spec!r}")
    return get_task(spec["name"])


def build_architecture(spec: Mapping[str, Any]) -> nn.Module:
    """A freshly initialised dense task model from its spec."""
    return _task_of(spec).build_model(spec["kwargs"])


def save_model(model: nn.Module, spec: Mapping[str, Any], path: str | Path, *, overwrite: bool = False,
               files: Mapping[str, bytes] | None = None) -> Path:
    """Save a (compressed or dense) task model with :func:`mpolstm.io.save` plus its architecture (and
    ``files``), as one folder; ``overwrite`` as for :func:`mpolstm.io.save`."""
    from ...io import save

    architecture = {ARCHITECTURE_FILE: json.dumps(dict(spec), indent=2).encode()}
    return save(model, path, overwrite=overwrite, files={**architecture, **(files or {})})


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model written by :func:`save_model`: (model, architecture spec)."""
    from ...io import load

    folder = Path(path)
    spec_file = folder / ARCHITECTURE_FILE
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a saved model folder (expected a directory from mpolstm train/reproduce)")
    if not spec_file.is_file():
        from ..usermodels import STORED_WEIGHTS

        if (folder / STORED_WEIGHTS).is_file() and not (folder / "config.json").exists():
            raise ValueError(f"{folder} holds only a protocol row's stored LSTM weights ({STORED_WEIGHTS}; torch's int8 "
                             "model cannot be saved as a model): nothing to load. Compress the dense model of the same "
                             "run (models/dense) instead, with --int8 for int8 cores")
        raise ValueError(f"{folder} has no {ARCHITECTURE_FILE}; it was not saved by mpolstm's task commands")
    try:
        spec = json.loads(spec_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{spec_file} is not valid JSON: {exc}") from None
    return load(folder, build_architecture(spec)), spec


def example_inputs(spec: Mapping[str, Any], batch: int = 2, steps: int = 5) -> tuple[Tensor, ...]:
    """Example inputs for a task architecture spec, from its task's ``example_inputs`` (seqcls
    (N, T, F) features or (N, T) token ids, ptb (T, N) token ids, speech (N, T, 257) log-magnitudes)."""
    name = spec.get("name") if isinstance(spec, Mapping) else None
    if name not in task_names():
        raise ValueError(f"no example inputs for architecture {name!r}; expected one of {task_names()}")
    return get_task(name).example_inputs(spec.get("kwargs", {}), batch, steps)


def export_task_model(model: nn.Module, spec: Mapping[str, Any], fmt: str, path: str | Path,
                      runtime: str = "factorized", overwrite: bool = False, int8: bool | None = None) -> Path:
    """Export a task model: traced formats from :func:`example_inputs` of its ``spec`` in ``runtime``
    (mpolstm.export.RUNTIMES); the dense format as a task model folder (with ``architecture.json``)
    that :func:`load_model` reads. ``overwrite`` and ``int8`` as for :func:`mpolstm.export.export_model`."""
    from ...export import export_dense, export_model

    if fmt != "dense":
        return export_model(model, path, fmt, example_inputs(spec), runtime=runtime, overwrite=overwrite, int8=int8)

    def write(dense: nn.Module, folder: Path, overwrite: bool) -> None:
        with torch.device("meta"):
            reference = build_architecture(spec)
        expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in dense.state_dict().items()}
        if expected != got:
            diff = sorted(set(expected.items()) ^ set(got.items()))
            raise ValueError(f"the dense model does not match its architecture {dict(spec)}: "
                             f"parameters differ in {diff[:6]}")
        save_model(dense, spec, folder, overwrite=overwrite)

    return export_dense(model, path, write, overwrite=overwrite, int8=int8)
