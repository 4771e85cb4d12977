"""``compress_file``: ONNX file in, compressed ONNX file out, in one call (what ``mpolstm compress
model.onnx out.onnx`` runs): load, check the calibration inputs against the graph's inputs,
compress, optionally distil from the original (label-free, on the calibration inputs), write the
whole-sequence file and optionally the streaming step file, int8 weights on request.
Nothing is written unless every step succeeded.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import Tensor

from ..atomic import atomic_write_bytes, check_target
from ..compression import CompressionConfig, CompressionReport, compress
from ..distill import distill
from ..errors import ConfigError, must_be
from .layers import RecurrentSpec
from .model import OnnxModel, load
from .reader import DTYPES, FLOAT
from .writer import to_bytes

__all__ = ["as_batches", "compress_file", "layer_names", "recurrent_layers"]


def recurrent_layers(model: OnnxModel) -> list[str]:
    """The names of the model's recurrent (LSTM / GRU) layers, in graph order."""
    return [name for name, step in model.layers.items() if isinstance(step.spec, RecurrentSpec)]


def layer_names(model: OnnxModel, names: list[str] | tuple[str, ...]) -> list[str]:
    """``names`` as the model's layer attributes: each given as the attribute (``rnn_LSTM``), as its
    ONNX node name (``/rnn/LSTM``) or as the node name with every character other than a letter, a
    digit or _ written as _ (``_rnn_LSTM``); a name that is none of these is kept (compress says so)."""
    aliases = {}
    for attribute, step in model.layers.items():
        aliases.update({step.name: attribute, re.sub(r"\W", "_", step.name): attribute})
    return [name if name in model.layers else aliases.get(name, name) for name in names]


def _check_batch(model: OnnxModel, batch: tuple[Tensor, ...], where: str) -> None:
    """``where`` names the batch after the field: "" (one batch) or " batch <k>"."""
    if len(batch) != len(model.inputs):
        raise ConfigError("calibration", lambda n: f"{n('calibration')}{where} has {len(batch)} tensor(s); the graph "
                                                   f"takes {len(model.inputs)} input(s) {model.input_names}")
    for k, (x, spec) in enumerate(zip(batch, model.inputs)):
        dims = ["?" if d is None else d for d in spec.dims]
        fixed_ok = all(not isinstance(d, int) or d == s for d, s in zip(spec.dims, x.shape))
        if not isinstance(x, Tensor) or x.dim() != len(spec.dims) or not fixed_ok or \
                x.is_floating_point() != (spec.elem_type in (FLOAT, 10, 11, 16)):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            kind = str(x.dtype).removeprefix("torch.") if isinstance(x, Tensor) else ""
            elem = DTYPES.get(spec.elem_type)
            expected = "float" if spec.elem_type == FLOAT else \
                str(elem).removeprefix("torch.") if elem else f"ONNX element type {spec.elem_type}"
            got = f"input{k} ({spec.name!r}) is {shape} {kind}; the graph expects {dims} ({expected})"
            raise ConfigError("calibration", lambda n, got=got: f"{n('calibration')}{where}: {got}")


def as_batches(model: OnnxModel, calibration: Any) -> list[tuple[Tensor, ...]]:
    """``calibration`` (a tensor or tuple of the graph's inputs, or a list of them) as a list of
    input tuples, each checked against the graph's declared inputs (count, rank, fixed sizes, kind)."""
    if isinstance(calibration, Tensor) or (isinstance(calibration, tuple) and calibration and
                                           all(isinstance(x, Tensor) for x in calibration)):
        calibration = [calibration]
    if not isinstance(calibration, (list, tuple)) or not calibration:
        raise must_be("calibration", "a non-empty list of batches (each a tuple of the graph's inputs)", calibration)
    batches = [(b,) if isinstance(b, Tensor) else tuple(b) for b in calibration]
    for k, batch in enumerate(batches):
        _check_batch(model, batch, f" batch {k}" if len(batches) > 1 else "")
    return batches


def _batch_axes(model: OnnxModel) -> list[int | None]:
    """Per graph input, its batch axis: the first input's axis 0, and in the others the axis of the
    same name (None: not split, e.g. an input without that axis)."""
    name = model.inputs[0].dims[0] if model.inputs[0].dims else None
    axes: list[int | None] = [0]
    for spec in model.inputs[1:]:
        axes.append(spec.dims.index(name) if isinstance(name, str) and name in spec.dims else None)
    return axes


def _rows(model: OnnxModel, batches: list[tuple[Tensor, ...]], size: int) -> list[tuple[Tensor, ...]]:
    """The batches split along their batch axes into batches of ``size`` rows."""
    axes = _batch_axes(model)
    return [tuple(x if axis is None else x.narrow(axis, i, min(size, x.shape[axis] - i))
                  for x, axis in zip(batch, axes))
            for batch in batches for i in range(0, batch[0].shape[0], size)]


def compress_file(source: str | os.PathLike, target: str | os.PathLike, config: CompressionConfig, *,
                  calibration: Any = None, distill_steps: int = 0, batch_size: int = 32, loss: str = "mse",
                  int8: bool = False, step: str | os.PathLike | None = None, progress: bool = False,
                  overwrite: bool = False) -> tuple[CompressionReport, OnnxModel]:
    """Compress the ONNX model ``source`` under ``config`` (its ``target_modules`` name the
    layers, see :func:`layer_names`, or are a regex over the layer attributes; None
    selects the recurrent layers, or every layer of a graph without one) and write it to
    ``target`` (``mpolstm.onnx.save``: the original's inputs and outputs, the compressed layers
    factorized). ``calibration``: inputs of the graph
    (see :func:`as_batches`) for calibrated compression and distillation; ``distill_steps``:
    then distil from the original for that many steps (``loss`` on the outputs, batches of
    ``batch_size`` rows of the calibration inputs); ``int8``: int8 MatMul weights; ``step``: also
    write the streaming step file there. An existing ``target`` (or ``step``) is refused before any
    work unless ``overwrite``; missing parents are created; nothing is written on failure.
    Returns (the report, the compressed model)."""
    outputs = [Path(target)] + ([] if step is None else [Path(step)])
    for path in outputs:
        check_target(path, overwrite, folder=False)
    model = load(source)
    if not model.layers:
        raise ValueError(f"{source}: no LSTM, GRU, MatMul / Gemm with a constant weight or Conv node to compress")
    if distill_steps < 0 or batch_size < 1:
        raise ValueError(f"distill_steps must be >= 0 and batch_size >= 1, got {distill_steps} and {batch_size}")
    if config.target_modules is None:
        config = replace(config, target_modules=recurrent_layers(model) or None)
    elif isinstance(config.target_modules, (list, tuple)):
        config = replace(config, target_modules=layer_names(model, config.target_modules))
    batches = None if calibration is None else as_batches(model, calibration)
    if distill_steps and batches is None:
        raise ValueError("distill_steps needs calibration inputs to distil on")
    teacher = copy.deepcopy(model) if distill_steps else None
    model, report = compress(model, config, calibration=batches)
    if teacher is not None:
        distill(model, teacher, _rows(model, batches, batch_size), steps=distill_steps, loss=loss, progress=progress)
        model.eval()
    record = {"source": Path(source).name, "report": report.to_dict(), "distill_steps": distill_steps}
    files = {Path(target): to_bytes(model, int8=int8, record=record)}
    if step is not None:
        files[Path(step)] = to_bytes(model, step=True, int8=int8, record=record)
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    return report, model
