"""The dense export: every MPO module replaced by its rebuilt torch module (:func:`densify`), and
that model written as a folder (:func:`export_dense`)."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..atomic import make_temp_dir
from ..io import save
from ..nn.registry import is_mpo_module, layer_type_of_mpo, replace_module
from ..nn.shared import SharedLayer

__all__ = ["densify", "export_dense"]


def _dense_module(module: nn.Module) -> nn.Module | None:
    """The plain torch counterpart of an MPO module, None for any other module."""
    entry = layer_type_of_mpo(module)
    if entry is not None:
        dense = entry.to_torch(module)
        dense.train(module.training)
        return dense
    if is_mpo_module(module):
        raise ValueError(f"{type(module).__name__} is an MPO module that is not registered in "
                         "mpolstm.nn.registry, so it has no known dense counterpart")
    return None


def densify(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every MPO module replaced by its rebuilt torch module
    (the registered torch type: nn.Linear, nn.Embedding, nn.LSTM, nn.GRU, nn.RNN, the cells, nn.Conv1d /
    nn.Conv2d); ``model`` itself is left unchanged."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"densify expects an nn.Module, got {type(model).__name__}")
    root = _dense_module(model)
    if root is not None:
        return root
    out = copy.deepcopy(model)
    shared = []
    for name, module in list(out.named_modules()):
        if isinstance(module, SharedLayer):  # uses another layer's MPO: tied again below
            shared.append((name, module))
            continue
        dense = _dense_module(module) if name else None
        if dense is not None:
            replace_module(out, name, dense)
    for name, module in shared:
        replace_module(out, name, module.dense(out.get_submodule(module.owner_name).weight))
    return out


def _check_folder_target(path: Path) -> None:
    if not path.parent.is_dir():
        raise ValueError(f"{path}: the parent directory {path.parent} does not exist")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory; the dense export writes a model folder")


def export_dense(model: nn.Module, path: str | os.PathLike, write: Callable[[nn.Module, Path], Any] = save) -> Path:
    """Write ``densify(model)`` to the folder ``path`` (created, or its files replaced) with
    ``write(dense_model, folder)`` (default :func:`mpolstm.io.save`). The folder is filled under
    a temporary name beside ``path`` and its files are then renamed into place."""
    path = Path(path)
    _check_folder_target(path)
    dense = densify(model)
    tmp = make_temp_dir(path)
    try:
        write(dense, tmp)
        if path.is_dir():
            for name in sorted(p.name for p in tmp.iterdir()):
                os.replace(tmp / name, path / name)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
