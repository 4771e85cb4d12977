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
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..atomic import atomic_write_bytes, check_target
from ..calibration import batch_axis
from ..compression import CompressionConfig, CompressionReport, compress
from ..compression.checks import batch_errors, batch_outputs, synthetic_batches, total_error
from ..distill import distill
from ..errors import ConfigError, must_be
from .frames import FrameSequence, state_pairs
from .model import InputSpec, OnnxModel, load
from .reader import DTYPES, FLOAT
from .registry import LAYER_OPS
from .writer import to_bytes, with_record

__all__ = ["as_batches", "compress_file", "layer_names", "recurrent_layers"]

HELD_OUT = 5  # distillation holds out every 5th piece of the calibration data to check on


def recurrent_layers(model: OnnxModel) -> list[str]:
    """The names of the model's recurrent (LSTM / GRU) layers, in graph order."""
    return [name for name, step in model.layers.items() if LAYER_OPS[step.op].recurrent]


def layer_names(model: OnnxModel, names: list[str] | tuple[str, ...]) -> list[str]:
    """``names`` as the model's layer attributes: each given as the attribute (``rnn_LSTM``), as its
    ONNX node name (``/rnn/LSTM``) or as the node name with every character other than a letter, a
    digit or _ written as _ (``_rnn_LSTM``); a name that is none of these is kept (compress says so)."""
    aliases = {}
    for attribute, step in model.layers.items():
        aliases.update({step.name: attribute, re.sub(r"\W", "_", step.name): attribute})
    return [name if name in model.layers else aliases.get(name, name) for name in names]


def _check_input(x: Any, k: int, spec: InputSpec, where: str, hint: str = "", field: str = "calibration") -> None:
    """``x`` against the graph input ``k``'s declared rank, fixed sizes and kind (``field``: what gave it)."""
    dims = ["?" if d is None else d for d in spec.dims]
    fixed_ok = isinstance(x, Tensor) and all(not isinstance(d, int) or d == s for d, s in zip(spec.dims, x.shape))
    if not fixed_ok or x.dim() != len(spec.dims) or x.is_floating_point() != (spec.elem_type in (FLOAT, 10, 11, 16)):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        kind = str(x.dtype).removeprefix("torch.") if isinstance(x, Tensor) else ""
        elem = DTYPES.get(spec.elem_type)
        expected = "float" if spec.elem_type == FLOAT else \
            str(elem).removeprefix("torch.") if elem else f"ONNX element type {spec.elem_type}"
        got = f"input{k} ({spec.name!r}) is {shape} {kind}; the graph expects {dims} ({expected}){hint}"
        raise ConfigError(field, lambda n, got=got: f"{n(field)}{where}: {got}")


def _check_batch(model: OnnxModel, batch: tuple[Tensor, ...], where: str, pairs: list[tuple[int, int]],
                 field: str = "calibration") -> tuple[Tensor, ...] | FrameSequence:
    """The batch checked: the graph's inputs, or for a per-frame graph (``pairs``) also a sequence
    of frames (its non-state inputs with a leading time axis). ``where`` names the batch: "" or " batch <k>"."""
    states = {i for i, _ in pairs}
    data = [k for k in range(len(model.inputs)) if k not in states]
    shapes = ", ".join(str(["T", *("?" if d is None else d for d in model.inputs[k].dims)]) for k in data)
    hint = f", or a sequence of frames {shapes} (states from zero)" if pairs else ""
    if pairs and batch and isinstance(batch[0], Tensor) and batch[0].dim() == len(model.inputs[data[0]].dims) + 1:
        if len(batch) != len(data) or len({x.shape[0] if isinstance(x, Tensor) else -1 for x in batch}) != 1:
            raise ConfigError(field, lambda n: f"{n(field)}{where}: a sequence of frames gives the "
                                               f"graph's non-state inputs {shapes} with one length T")
        for k, x in zip(data, batch):
            _check_input(x[0], k, model.inputs[k], where, hint, field)
        return FrameSequence(tuple(_declared_float(model, k, x) for k, x in zip(data, batch)), pairs)
    if len(batch) != len(model.inputs):
        raise ConfigError(field, lambda n: f"{n(field)}{where} has {len(batch)} tensor(s); the graph "
                                           f"takes {len(model.inputs)} input(s) {model.input_names}{hint}")
    for k, (x, spec) in enumerate(zip(batch, model.inputs)):
        _check_input(x, k, spec, where, hint, field)
    return tuple(_declared_float(model, k, x) for k, x in enumerate(batch))


def _declared_float(model: OnnxModel, k: int, x: Tensor) -> Tensor:
    """A float tensor for graph input ``k`` in the float type the graph computes it in (a float64
    calibration file for a float32 input is converted, not refused)."""
    elem = model.inputs[k].elem_type
    if not x.is_floating_point():
        return x
    return x.to(model.float_dtype() if elem == FLOAT else DTYPES[elem])


def as_batches(model: OnnxModel, calibration: Any, field: str = "calibration"
               ) -> list[tuple[Tensor, ...] | FrameSequence]:
    """``calibration`` (a tensor or tuple of the graph's inputs, or a list of them) as a list of
    input tuples, each checked against the graph's declared inputs (count, rank, fixed sizes, kind).
    For a per-frame graph (``mpolstm.onnx.frames``) a batch may be a sequence of frames: its non-state
    inputs, each with a leading time axis; it becomes a :class:`FrameSequence` (states carried from zero).
    ``field``: the argument that gave the batches ("calibration" or "validation"), named in errors."""
    if isinstance(calibration, Tensor) or (isinstance(calibration, tuple) and calibration and
                                           all(isinstance(x, Tensor) for x in calibration)):
        calibration = [calibration]
    if not isinstance(calibration, (list, tuple)) or not calibration:
        raise must_be(field, "a non-empty list of batches (each a tuple of the graph's inputs)", calibration)
    batches = [(b,) if isinstance(b, Tensor) else tuple(b) for b in calibration]
    pairs = state_pairs(model)
    return [_check_batch(model, batch, f" batch {k}" if len(batches) > 1 else "", pairs, field)
            for k, batch in enumerate(batches)]


def _batch_axes(model: OnnxModel, batch: tuple[Tensor, ...]) -> list[int | None]:
    """Per graph input, its batch axis: the first input's (``calibration.batch_axis``: axis 1 of a
    time-first graph, found by running it on ``batch``), and in the others the axis of the same name
    (None: not split, e.g. an input without that axis)."""
    first = batch_axis(model, batch)
    dims = model.inputs[0].dims
    name = dims[first] if len(dims) > first else None
    axes: list[int | None] = [first]
    for spec in model.inputs[1:]:
        axes.append(spec.dims.index(name) if isinstance(name, str) and name in spec.dims else None)
    return axes


def _rows(batches: list[tuple[Tensor, ...]], axes: list[int | None], size: int) -> list[tuple[Tensor, ...]]:
    """The batches split along their batch ``axes`` (``_batch_axes``) into batches of ``size`` rows."""
    count = lambda batch: batch[0].shape[axes[0]]  # noqa: E731
    return [tuple(x if axis is None else x.narrow(axis, i, min(size, x.shape[axis] - i))
                  for x, axis in zip(batch, axes))
            for batch in batches for i in range(0, count(batch), size)]


def _outputs(model: OnnxModel, batch: tuple[Tensor, ...] | FrameSequence) -> Tensor:
    """What distillation matches: a sequence's outputs through time, else the first output."""
    if isinstance(batch, FrameSequence):
        return batch.run(model)
    out = model(*batch)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _held_out_error(model: OnnxModel, teacher: OnnxModel, batches: list) -> float:
    """The model output error ||y' - y|| / ||y|| (the report's) of the student against the teacher over ``batches``."""
    pairs = [(_outputs(model, b), _outputs(teacher, b)) for b in batches]
    return float(sum((s - t).pow(2).sum() for s, t in pairs) / sum(t.pow(2).sum() for _, t in pairs).clamp_min(1e-30)
                 ) ** 0.5


def _distill(model: OnnxModel, teacher: OnnxModel, batches: list, steps: int, batch_size: int, loss: str,
             progress: bool) -> dict[str, Any]:
    """Distil from ``teacher`` on the calibration batches cut into pieces (``batch_size`` rows, or
    frames of a sequence); every HELD_OUT-th piece is held out and its output error reported
    before and after ({"held_out": pieces, "before": error, "after": error}, errors None without one)."""
    tensors = next((b for b in batches if not isinstance(b, FrameSequence)), None)
    axes = _batch_axes(model, tensors) if tensors is not None else []
    pieces = [piece for b in batches for piece in (b.crops(batch_size) if isinstance(b, FrameSequence)
                                                   else _rows([b], axes, batch_size))]
    held = pieces[HELD_OUT - 1::HELD_OUT] if len(pieces) >= HELD_OUT else pieces[-1:] if len(pieces) > 1 else []
    train = [p for k, p in enumerate(pieces) if not any(p is h for h in held)]
    before = _held_out_error(model, teacher, held) if held else None
    distill(model, teacher, train, steps=steps, loss=loss, progress=progress, forward=_outputs)
    model.eval()
    after = _held_out_error(model, teacher, held) if held else None
    if progress and held:
        print(f"model output error ||y' - y|| / ||y|| on {len(held)} of {len(pieces)} pieces held out of "
              f"distillation: {before:.4g} before distillation, {after:.4g} after", file=sys.stderr)
    return {"held_out": len(held), "before": before, "after": after}


@torch.no_grad()
def _file_check(data: bytes, compressed: OnnxModel, original: OnnxModel, batches: list) -> dict[str, Any] | None:
    """{"error", "float_error", "batches"}: the output error of the written file ``data`` (read back by
    mpolstm.onnx.load: its int8 weights) and of ``compressed`` (float weights) against ``original`` on
    ``batches``."""
    if not batches:
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "written.onnx"
        path.write_bytes(data)
        written = load(path)
    reference = batch_outputs(original, batches)
    return {"error": total_error(batch_errors(written, batches, reference)),
            "float_error": total_error(batch_errors(compressed.eval(), batches, reference)), "batches": len(batches)}


def _sliced(model: OnnxModel, batches: list, pieces: int) -> list:
    """One batch cut into ``pieces`` so that held-out batches can decide: a sequence of frames into
    consecutive crops (each from zero states), else along a dynamic batch axis (axis 1 of a time-first
    graph); several batches as given."""
    if len(batches) != 1:
        return batches
    if isinstance(batches[0], FrameSequence):
        return batches[0].crops(-(-len(batches[0]) // pieces)) if len(batches[0]) >= 2 * pieces else batches
    axes = _batch_axes(model, batches[0])
    dims = model.inputs[0].dims
    if axes[0] is not None and len(dims) > axes[0] and isinstance(dims[axes[0]], str):
        return _rows(batches, axes, -(-batches[0][0].shape[axes[0]] // pieces))
    return batches


def _default_targets(model: OnnxModel, source) -> list[str]:
    """The recurrent layers; a graph without one has nothing to compress unless layers are named."""
    names = recurrent_layers(model)
    if not names:
        raise ValueError(f"{source}: nothing to compress: no LSTM or GRU node (an exporter may have unrolled them); "
                         f"name the layers to compress with --target / target_modules ({', '.join(model.layers)})")
    return names


def compress_file(source: str | os.PathLike, target: str | os.PathLike, config: CompressionConfig, *,
                  calibration: Any = None, distill_steps: int = 0, batch_size: int = 32, loss: str = "mse",
                  int8: bool = False, step: str | os.PathLike | None = None, progress: bool = False,
                  overwrite: bool = False, int8_dense: bool = False,
                  validation: Any = None) -> tuple[CompressionReport, OnnxModel]:
    """Compress the ONNX model ``source`` under ``config`` (its ``target_modules`` name the
    layers: node names with other characters than letters, digits and _ replaced by _; None
    selects the recurrent layers: a graph without one has nothing to compress unless they are named)
    and write it to ``target`` (``mpolstm.onnx.save``: the original's inputs and outputs, the
    compressed layers factorized). ``calibration``: inputs of the graph (see :func:`as_batches`;
    sequences of frames for a per-frame graph) for calibrated compression and distillation;
    ``distill_steps``: then distil from the original for that many steps (``loss`` on the outputs,
    batches of ``batch_size`` rows of the calibration inputs, or crops of ``batch_size`` frames of a
    sequence; every HELD_OUT-th batch held out, its error before and after stored in the file's
    record); ``int8``: int8 factors (``int8_dense``: every MatMul
    weight int8); ``step``: also write the streaming step file there; ``validation``: held-out inputs (as
    ``calibration``) the model's output error is measured and the allocation decided on (default: one
    batch of calibration inputs is cut into 8, every second held out: along a dynamic batch axis, or a
    sequence of frames into consecutive crops; one validation batch is cut into 4 alike). An
    existing ``target`` (or ``step``) is refused before any work unless ``overwrite``; missing parents
    are created; nothing is written on failure. Returns (the report, the compressed model)."""
    outputs = [Path(target)] + ([] if step is None else [Path(step)])
    for path in outputs:
        check_target(path, overwrite, folder=False)
    model = load(source)
    if not model.layers:
        raise ValueError(f"{source}: no LSTM, GRU, MatMul / Gemm with a constant weight or Conv node to compress")
    if distill_steps < 0 or batch_size < 1:
        raise ValueError(f"distill_steps must be >= 0 and batch_size >= 1, got {distill_steps} and {batch_size}")
    if config.target_modules is None:
        config = replace(config, target_modules=_default_targets(model, source))
    elif isinstance(config.target_modules, (list, tuple)):
        config = replace(config, target_modules=layer_names(model, config.target_modules))
    batches = None if calibration is None else as_batches(model, calibration)
    if distill_steps and batches is None:
        raise ValueError("distill_steps needs calibration inputs to distil on")
    teacher = copy.deepcopy(model) if distill_steps else None
    held_out = None if validation is None else _sliced(model, as_batches(model, validation, "validation"), 4)
    sliced = batches if batches is None or held_out is not None else _sliced(model, batches, 8)
    model, report = compress(model, config, calibration=sliced, validation=held_out)
    record = {"source": Path(source).name, "report": report.to_dict(), "distill_steps": distill_steps}
    if teacher is not None:
        record["distill_check"] = _distill(model, teacher, batches, distill_steps, batch_size, loss, progress)
    files = {Path(target): to_bytes(model, int8=int8, record=record, int8_dense=int8_dense)}
    if int8 or int8_dense:  # the file's own error, int8 weights and all, on the batches the report measured on
        measured_on = held_out or (sliced[1::2] if sliced and len(sliced) > 1 else sliced) or \
            synthetic_batches(load(source))
        report.int8_check = _file_check(files[Path(target)], model, load(source), measured_on)
        record["report"] = report.to_dict()
        files[Path(target)] = with_record(files[Path(target)], {"report": record["report"]})
    if step is not None:
        files[Path(step)] = to_bytes(model, step=True, int8=int8, record=record, int8_dense=int8_dense)
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    return report, model
