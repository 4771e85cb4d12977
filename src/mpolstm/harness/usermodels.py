"""Any user's model on the command line: build it from a factory and a weights file, read example
inputs, and describe any folder written by ``mpolstm.save`` without its architecture.

- ``--factory package.module:function`` names a function returning the dense architecture
  (an nn.Module; called without arguments).
- ``--weights FILE`` is a safetensors file or a torch state dict (read with
  ``torch.load(weights_only=True)``: nothing is unpickled).
- ``--inputs FILE`` is a safetensors file holding one batch of the model's positional inputs as
  tensors ``input0``, ``input1``, ... (used for calibration, distillation and tracing).

Every bad input is a ValueError naming what is wrong and what was expected.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..io import CONFIG_FILE, WEIGHTS_FILE, read_config
from ..mpo import MPO
from ..nn.base import dequantize_int8
from ..nn.registry import mpo_class

__all__ = ["load_factory", "build_model", "read_inputs", "describe_folder", "inspect_folder"]


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """The callable named by ``package.module:function``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--factory must look like package.module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--factory {spec!r}: cannot import {module_name!r} ({exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"--factory {spec!r}: {module_name} has no callable {attr!r}")
    return factory


def _read_state(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ValueError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error type for malformed files
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or unsafe files
        raise ValueError(f"{path}: not a state dict readable with weights_only=True ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return state


def build_model(factory: str, weights: Path | None) -> nn.Module:
    """``factory()`` with ``weights`` loaded strictly (when given)."""
    model = load_factory(factory)()
    if not isinstance(model, nn.Module):
        raise ValueError(f"--factory {factory!r} returned a {type(model).__name__}, expected an nn.Module")
    if weights is not None:
        try:
            model.load_state_dict(_read_state(Path(weights)), strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise ValueError(f"{weights} does not fit the model from {factory}: {first[0] if first else exc}") from None
    return model


def read_inputs(path: Path) -> tuple[Tensor, ...]:
    """The tensors ``input0``, ``input1``, ... of a safetensors file, in order."""
    tensors = _read_state(Path(path)) if Path(path).suffix == ".safetensors" else None
    if tensors is None:
        raise ValueError(f"--inputs {path}: expected a .safetensors file holding input0, input1, ...")
    names = [f"input{k}" for k in range(len(tensors))]
    if sorted(tensors) != sorted(names):
        raise ValueError(f"--inputs {path}: expected tensors named {names}, got {sorted(tensors)}")
    return tuple(tensors[n] for n in names)


def describe_folder(folder: Path) -> list[dict[str, Any]]:
    """One entry per MPO weight of a folder written by ``mpolstm.save``, from its config and
    safetensors alone: name, shape, factors, bonds, params, ratio, error (when recorded),
    entanglement entropy per bond, and its bytes as stored ("float32" cores, or "int8" with scales)."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder written by mpolstm.save")
    config = read_config(folder / CONFIG_FILE)
    weights_file = folder / WEIGHTS_FILE
    if not weights_file.is_file():
        raise ValueError(f"{weights_file}: missing")
    rows = []
    with safe_open(str(weights_file), framework="pt") as tensors:
        keys = set(tensors.keys())
        for name, entry in config["modules"].items():
            cls = mpo_class(entry["config"].get("class"))
            if cls is None:
                raise ValueError(f"{folder / CONFIG_FILE}: module {name!r} has unknown class {entry['config'].get('class')!r}")
            with torch.device("meta"):
                probe = cls.from_config(entry["config"])
            prefix = f"{name}." if name else ""
            for wname, cores in probe.mpo_weights().items():
                core_keys = [f"{prefix}{probe._cores_attr(wname)}.{k}" for k in range(len(cores))]
                scale_keys = ([f"{prefix}{probe._scales_attr(wname)}.{k}" for k in range(len(cores))]
                              if probe.int8 else [])
                missing = [k for k in core_keys + scale_keys if k not in keys]
                if missing:
                    raise ValueError(f"{weights_file}: missing cores or scales {missing[:3]} of {name}.{wname}")
                stored = [tensors.get_tensor(k) for k in core_keys + scale_keys]
                values = stored[:len(cores)]
                if probe.int8:
                    values = [dequantize_int8(q, s, torch.float64) for q, s in zip(values, stored[len(cores):])]
                mpo = MPO([v.double() for v in values])
                rows_, cols = mpo.shape
                rows.append({
                    "weight": f"{name}.{wname}" if name else wname, "shape": (cols, rows_),
                    "in_factors": mpo.in_factors, "out_factors": mpo.out_factors, "bonds": mpo.bond_dims,
                    "params": mpo.num_params, "ratio": rows_ * cols / mpo.num_params,
                    "error": entry.get("errors", {}).get(wname),
                    "entropy": [float(e) for e in mpo.entanglement_entropy()],
                    "stored": "int8" if probe.int8 else str(values[0].dtype).removeprefix("torch."),
                    "bytes": sum(t.numel() * t.element_size() for t in stored),
                })
    return rows


def inspect_folder(folder: Path) -> str:
    """``describe_folder`` as a plain-text table (what ``mpolstm inspect`` prints)."""
    rows = describe_folder(folder)
    if not rows:
        return f"{folder} has no MPO layers (a dense model)"
    header = ("weight", "shape", "in factors", "out factors", "bonds", "params", "ratio", "rel. error", "stored",
              "bytes", "entropy per bond")
    table = [header] + [
        (r["weight"], f"{r['shape'][0]}x{r['shape'][1]}", str(r["in_factors"]), str(r["out_factors"]), str(r["bonds"]),
         f"{r['params']:,}", f"{r['ratio']:.1f}x", "-" if r["error"] is None else f"{r['error']:.4f}", r["stored"],
         f"{r['bytes']:,}", " ".join(f"{e:.2f}" for e in r["entropy"]))
        for r in rows]
    widths = [max(len(r[c]) for r in table) for c in range(len(header))]
    total = sum(r["params"] for r in rows)
    dense = sum(math.prod(r["shape"]) for r in rows)
    stored = sum(r["bytes"] for r in rows)
    lines = [f"{folder}: {len(rows)} MPO weights, {dense:,} -> {total:,} entries ({dense / total:.1f}x); "
             f"{stored:,} bytes as stored ({4 * dense / stored:.1f}x fewer than float32 dense weights)"]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in table]
    return "\n".join(lines)


def write_factory_note(folder: Path, factory: str) -> None:
    """Record the factory a folder's dense architecture comes from (``factory.json``)."""
    from ..atomic import atomic_write_bytes

    atomic_write_bytes(Path(folder) / "factory.json", json.dumps({"factory": factory}).encode())
