"""Any user's model on the command line: build it from a factory and a weights file, read example
inputs, and describe any folder written by ``mpolstm.save`` without its architecture.

- ``--factory package.module:function`` names a function returning the dense architecture
  (an nn.Module; called without arguments). The module is imported as ``python -m`` would: the
  current directory comes first on the import path.
- ``--weights FILE`` is a safetensors file or a torch state dict (read with
  ``torch.load(weights_only=True)``: nothing is unpickled); a training checkpoint that holds the
  state dict under ``"model"`` or ``"state_dict"`` is accepted, with a note.
- ``--inputs FILE`` (``--calibrate FILE``) is a safetensors file holding one batch of the model's
  positional inputs as tensors ``input0``, ``input1``, ... (used for calibration, distillation
  and tracing).

Every bad input is a ValueError naming the flag, what is wrong and what was expected.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, cast

import torch
from torch import Tensor, nn

from ..compression.report import measured_lines
from ..io import CONFIG_FILE, WEIGHTS_FILE, dequantize_cores, read_verified
from ..mpo import MPO
from ..nn.base import MPOWeights
from ..nn.registry import MPOModule, layer_type_of_mpo, mpo_class
from ..nn.sparse import SUFFIX as SPARSE_SUFFIX
from ..nn.sparse import index_parts, sparse_of
from ..storage import file_data_bytes

__all__ = ["load_factory", "build_model", "read_inputs", "describe_folder", "describe_stored", "inspect_folder",
           "compression_files", "COMPRESSION_FILE", "FACTORY_FILE", "STORED_WEIGHTS"]

COMPRESSION_FILE = "compression.json"
"""Written by ``mpolstm compress`` beside the model: its report and the distillation steps run after it."""

FACTORY_FILE = "factory.json"
"""Written by ``mpolstm compress --factory`` beside the model: the factory of its dense architecture."""

STORED_WEIGHTS = "recurrent-weights.safetensors"
"""In every saved protocol row: its LSTM weights in their stored form (:func:`mpolstm.storage.pack_weights`)."""

_WRAPPERS = ("model", "state_dict")


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """The callable named by ``package.module:function``; the module is looked up first in the
    current directory, as ``python -m`` does."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--factory must look like package.module:function, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--factory {spec!r}: cannot import {module_name!r} ({exc}; looked in the current "
                         "directory and on the import path)") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"--factory {spec!r}: {module_name} has no callable {attr!r}")
    return factory


def _is_state(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, Tensor) for v in value.values())


def _read_state(path: Path, flag: str) -> tuple[dict[str, Tensor], str | None]:
    """(state dict, a note when it was unwrapped from a checkpoint) of a weights file."""
    if not path.is_file():
        raise ValueError(f"{flag} {path}: does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), None
        except Exception as exc:  # safetensors raises its own error type for malformed files
            raise ValueError(f"{flag} {path}: not a readable safetensors file ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or unsafe files
        raise ValueError(f"{flag} {path}: not a state dict readable with weights_only=True "
                         f"({type(exc).__name__})") from None
    if _is_state(state):
        return state, None
    key = next((k for k in _WRAPPERS if isinstance(state, dict) and _is_state(state.get(k))), None)
    if key is None:
        keys = f" with keys {sorted(map(str, state))[:8]}" if isinstance(state, dict) else ""
        raise ValueError(f"{flag} {path}: expected a state dict (name -> tensor), or a checkpoint holding one "
                         f"under {' or '.join(repr(k) for k in _WRAPPERS)}; got a {type(state).__name__}{keys}")
    others = sorted(str(k) for k in state if k != key)
    return state[key], f"{flag} {path}: using the state dict under {key!r}" + (
        f" (ignoring {', '.join(others[:8])})" if others else "")


def _load_error(exc: RuntimeError) -> str:
    """torch's load_state_dict error on one line: its missing and unexpected keys and size mismatches."""
    lines = [line.strip().rstrip(".") for line in str(exc).strip().splitlines()[1:] if line.strip()]
    more = f"; ({len(lines) - 8} more)" if len(lines) > 8 else ""
    return "; ".join(lines[:8]) + more if lines else str(exc).strip()


def build_model(factory: str, weights: Path | None) -> tuple[nn.Module, str | None]:
    """``factory()`` with ``weights`` loaded strictly (when given), and a note when the weights
    were unwrapped from a checkpoint."""
    model = load_factory(factory)()
    if not isinstance(model, nn.Module):
        raise ValueError(f"--factory {factory!r} returned a {type(model).__name__}, expected an nn.Module")
    if weights is None:
        return model, None
    state, note = _read_state(Path(weights), "--weights")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"--weights {weights} does not fit the model from --factory {factory}: "
                         f"{_load_error(exc)}") from None
    return model, note


def read_inputs(path: Path, flag: str = "--inputs") -> tuple[Tensor, ...]:
    """The tensors ``input0``, ``input1``, ... of a safetensors file, in order; errors name ``flag``."""
    if Path(path).suffix != ".safetensors":
        raise ValueError(f"{flag} {path}: expected a .safetensors file holding input0, input1, ...")
    tensors, _ = _read_state(Path(path), flag)
    names = [f"input{k}" for k in range(len(tensors))]
    if sorted(tensors) != sorted(names):
        raise ValueError(f"{flag} {path}: expected tensors named {names}, got {sorted(tensors)}")
    return tuple(tensors[n] for n in names)


def _compression_record(folder: Path) -> dict[str, Any] | None:
    """``compression.json`` of a folder written by ``mpolstm compress`` (None when absent)."""
    file = folder / COMPRESSION_FILE
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
        errors = {f"{m['name']}.{w}" if m["name"] else w: (r["rel_error"], r["output_error"])
                  for m in record["report"]["modules"] for w, r in m["weights"].items()}
        return {"errors": errors, "distill_steps": int(record.get("distill_steps", 0)),
                "measured": measured_lines(record["report"])}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not a report written by mpolstm compress ({exc})") from None


def _torch_shapes(probe: MPOModule) -> dict[str, tuple[int, ...]]:
    """Each MPO weight's shape as torch holds it (e.g. (out, in) for nn.Linear, (out, in, k) for
    nn.Conv1d), from a meta-device module; empty for a module without MPO weights."""
    entry = layer_type_of_mpo(probe)
    if entry is None or not probe.mpo_weights():
        return {}
    dense = entry.to_torch(probe)
    return {w: tuple(getattr(dense, w).shape) for w in probe.mpo_weights()}


def _stored_keys(probe: MPOWeights, name: str, weight: str) -> dict[str, list[str]]:
    """The state_dict keys (under module ``name``) one MPO weight is stored in: "cores", "scales"
    (int8 cores) and "sparse" (its sparse residual's values, scale and index parts)."""
    prefix, int8 = f"{name}." if name else "", getattr(probe, "int8", False)
    count = len(probe.mpo_weights()[weight])
    keys = {"cores": [f"{prefix}{probe._cores_attr(weight)}.{k}" for k in range(count)],
            "scales": [f"{prefix}{probe._scales_attr(weight)}.{k}" for k in range(count)] if int8 else [],
            "sparse": []}
    part = sparse_of(probe, weight)
    if part is not None:
        stored = [*index_parts(part.index_format, part.nnz, part.shape), "values", *(["scale"] if part.int8 else [])]
        keys["sparse"] = [f"{prefix}{weight}{SPARSE_SUFFIX}.{key}" for key in stored]
    return keys


def describe_folder(folder: Path) -> list[dict[str, Any]]:
    """One entry per MPO weight of a folder written by ``mpolstm.save``, checked as ``load``
    checks it (:func:`mpolstm.io.read_verified`), from its files alone: name, torch's shape of
    the weight, factors, bonds, params (core entries plus the sparse residual's, layout
    "lowrank+sparse"), ratio, entanglement entropy per bond, and the errors: ``weight_error`` and
    ``output_error`` from ``mpolstm compress``'s report when the folder has one, else
    ``recorded_error`` (what config.json recorded when the MPO was made); ``sparse`` (entries) and
    ``index`` (their index format, or None); ``stored`` ("float32", or "int8" for cores with scales)
    and ``bytes``: every tensor of the weight in the file (cores, scales, sparse values and index)."""
    folder = Path(folder)
    verified = read_verified(folder)
    tensors, record = verified.tensors(), _compression_record(folder)
    rows = []
    for name, entry in verified.config["modules"].items():
        cls = mpo_class(entry["config"].get("class"))
        if cls is None:
            raise ValueError(f"{folder / CONFIG_FILE}: module {name!r} has unknown class {entry['config'].get('class')!r}")
        with torch.device("meta"):
            probe = cast(type[MPOModule], cls).from_config(entry["config"])  # registered: an MPO module
            shapes = _torch_shapes(probe)
        prefix, int8 = f"{name}." if name else "", getattr(probe, "int8", False)  # shared layers have no cores
        parts = {w: _stored_keys(cast(MPOWeights, probe), name, w) for w in probe.mpo_weights()}  # (weights: MPOWeights)
        missing = [k for keys in parts.values() for group in keys.values() for k in group if k not in tensors]
        if missing:
            raise ValueError(f"{verified.weights_file}: missing cores, scales or sparse parts {missing[:3]} of "
                             f"module {name!r}")
        values = dequantize_cores(tensors, [(name, probe)], verified.weights_file) if int8 else tensors
        for wname, keys in parts.items():
            mpo = MPO([values[k].double() for k in keys["cores"]])
            part = sparse_of(probe, wname)
            sparse = 0 if part is None else part.nnz
            weight = f"{prefix}{wname}"
            errors = record["errors"].get(weight, (None, None)) if record else None
            rows.append({
                "weight": weight, "shape": shapes[wname], "in_factors": mpo.in_factors,
                "out_factors": mpo.out_factors, "bonds": mpo.bond_dims, "params": mpo.num_params + sparse,
                "ratio": math.prod(shapes[wname]) / (mpo.num_params + sparse),
                **({"weight_error": errors[0], "output_error": errors[1]} if errors else
                   {"recorded_error": entry.get("errors", {}).get(wname)}),
                "entropy": [float(e) for e in mpo.entanglement_entropy()],
                "distill_steps": record["distill_steps"] if record else 0,
                "measured": record["measured"] if record else [],
                "sparse": sparse, "index": None if part is None else part.index_format,
                "stored": "int8" if int8 else str(tensors[keys["cores"][0]].dtype).removeprefix("torch."),
                "bytes": sum(_tensor_bytes(tensors[k]) for group in keys.values() for k in group),
            })
    return rows


def _tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _error(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _unlayered(folder: Path) -> str:
    """What inspect says of a saved folder without MPO layers: dense, or pruned (its zeros counted; a
    live torch.nn.utils.prune mask, ``<w>_orig`` and ``<w>_mask``, counts as ``orig * mask``)."""
    tensors = read_verified(folder).tensors()
    matrices = [tensors[k] * tensors[k.removesuffix("_orig") + "_mask"] if k.endswith("_orig") else tensors[k]
                for k in tensors if "weight" in k and not k.endswith("_mask")]
    matrices = [t for t in matrices if t.dim() >= 2 and t.is_floating_point()]
    entries = sum(t.numel() for t in matrices)
    nonzero = sum(int(torch.count_nonzero(t)) for t in matrices)
    if entries and nonzero < entries:
        return (f"{folder} has no MPO layers: a pruned model, its weight matrices {nonzero:,} non-zero of "
                f"{entries:,} entries ({100 * nonzero / entries:.1f}%), stored dense in {WEIGHTS_FILE} "
                f"({sum(map(_tensor_bytes, tensors.values())):,} bytes of tensors)")
    return f"{folder} has no MPO layers (a dense model: {entries:,} weight entries)"


def describe_stored(file: Path) -> str:
    """A weights file of :func:`mpolstm.storage.save_packed` (a protocol row's stored LSTM weights): each
    weight's format and bytes."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as fh:
            formats = json.loads((fh.metadata() or {}).get("formats", "{}"))
            sizes = {k: _tensor_bytes(fh.get_tensor(k)) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{file}: not a stored-weights file ({exc})") from None
    rows = [(w, fmt, sum(b for k, b in sizes.items() if k.startswith(w + "."))) for w, fmt in sorted(formats.items())]
    width = max([len(w) for w, _, _ in rows] + [6])
    lines = [f"{file.parent}: no model to load (no {CONFIG_FILE}); {file.name} holds a protocol row's weights in their "
             f"stored form, {sum(sizes.values()):,} bytes (mpolstm.storage):"]
    lines += [f"{w.ljust(width)}  {fmt.ljust(14)}  {b:,}" for w, fmt, b in rows]
    return "\n".join(lines)


def inspect_folder(folder: Path, rows: list[dict[str, Any]] | None = None) -> str:
    """``describe_folder`` (or its ``rows``) as a plain-text table (what ``mpolstm inspect`` prints)."""
    rows = describe_folder(folder) if rows is None else rows
    if not rows:
        return _unlayered(Path(folder))
    reported = "weight_error" in rows[0]
    errors = ("weight error", "output error") if reported else ("error when made",)
    header = ("weight", "shape", "in factors", "out factors", "bonds", "sparse", "params", "ratio", *errors, "stored",
              "bytes", "entropy per bond")
    table = [header] + [
        (r["weight"], "x".join(map(str, r["shape"])), str(r["in_factors"]), str(r["out_factors"]), str(r["bonds"]),
         f"{r['sparse']:,} ({r['index']})" if r["sparse"] else "-", f"{r['params']:,}", f"{r['ratio']:.1f}x",
         *((_error(r["weight_error"]), _error(r["output_error"])) if reported else (_error(r["recorded_error"]),)),
         r["stored"], f"{r['bytes']:,}", " ".join(f"{e:.2f}" for e in r["entropy"]))
        for r in rows]
    widths = [max(len(r[c]) for r in table) for c in range(len(header))]
    total = sum(r["params"] for r in rows)
    dense = sum(math.prod(r["shape"]) for r in rows)
    stored = sum(r["bytes"] for r in rows)
    data = file_data_bytes(Path(folder) / WEIGHTS_FILE)
    lines = [f"{folder}: {len(rows)} MPO weights, {dense:,} -> {total:,} entries ({dense / total:.1f}x), "
             f"{stored:,} bytes as stored ({4 * dense / stored:.1f}x fewer than float32 dense); shapes as torch "
             "holds the weights, in factors over their input side",
             f"{WEIGHTS_FILE}: {data:,} bytes of tensors: {stored:,} of these weights (cores, scales, sparse values "
             f"and their index) and {data - stored:,} of the rest (biases, layers left dense)"]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in table]
    if reported:
        lines.append("weight error: ||W - W'|| / ||W||; output error: the same on the --calibrate inputs (- without)")
    else:
        lines.append("error when made: as config.json recorded it when the MPO was made, before any fine-tuning (the "
                     "output error if it was compressed with calibration, else the weight error)")
    lines += rows[0].get("measured", [])
    if rows[0]["distill_steps"]:
        lines.append(f"note: distilled for {rows[0]['distill_steps']} steps after these errors were measured; "
                     "the weights have changed since")
    return "\n".join(lines)


def compression_files(report: Any, distill_steps: int, factory: str | None) -> dict[str, bytes]:
    """The files ``mpolstm compress`` writes beside the model: ``compression.json`` (its report, the
    distillation steps after it) and, for a model from ``--factory``, ``factory.json`` (the factory its
    dense architecture comes from)."""
    record = {"report": report.to_dict(), "distill_steps": distill_steps}
    files = {COMPRESSION_FILE: json.dumps(record, indent=1, allow_nan=False).encode()}
    if factory is not None:
        files[FACTORY_FILE] = json.dumps({"factory": factory}).encode()
    return files
