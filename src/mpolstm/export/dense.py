"""The dense export: every MPO module replaced by its rebuilt torch module (:func:`densify`), and
that model written as a folder (:func:`export_dense`)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable, cast

from torch import nn

from ..atomic import check_target
from ..io import save
from ..nn.registry import is_mpo_module, layer_type_of_mpo, replace_module
from ..nn.shared import SharedLayer
from .trace import has_int8_cores

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
    shared: list[tuple[str, SharedLayer]] = []
    for name, module in list(out.named_modules()):
        if isinstance(module, SharedLayer):  # uses another layer's MPO: tied again below
            shared.append((name, module))
            continue
        dense = _dense_module(module) if name else None
        if dense is not None:
            replace_module(out, name, dense)
    for name, layer in shared:
        weight = cast(nn.Parameter, out.get_submodule(layer.owner_name).weight)  # the owner's, dense by now
        replace_module(out, name, layer.dense(weight))
    return out


def export_dense(model: nn.Module, path: str | os.PathLike, write: Callable[..., Any] = save,
                 overwrite: bool = False, int8: bool | None = None) -> Path:
    """Write ``densify(model)`` to the folder ``path`` with ``write(dense_model, path, overwrite=overwrite)``
    (default :func:`mpolstm.io.save`, which fills a folder beside ``path`` and swaps it in whole): an
    existing folder (but an empty one) is refused unless ``overwrite``; missing parents are created.
    The dense model is float32: a model with int8 cores is refused unless ``int8=False``."""
    path = Path(path)
    if int8 or (int8 is None and has_int8_cores(model)):
        what = "int8=True" if int8 else f"{type(model).__name__} has int8 cores (mpolstm.quantize)"
        raise ValueError(f"{what}, but the dense format writes float32 weights: export to onnx or executorch for "
                         "int8 factors, or pass int8=False for a float32 dense model")
    check_target(path, overwrite)
    write(densify(model), path, overwrite=overwrite)
    return path
