"""The paper's tasks (one module each) and the MPO-versus-pruning protocol that runs them.

Every task model can be rebuilt without its data from a JSON architecture spec
``{"name": ..., "kwargs": {...}}`` (:func:`build_architecture`); saved models carry it in
``architecture.json`` beside the weights, so ``mpolstm inspect/compress/enhance/export`` can
load them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from torch import nn

__all__ = ["ARCHITECTURE_FILE", "build_architecture", "save_model", "load_model"]

ARCHITECTURE_FILE = "architecture.json"


def build_architecture(spec: Mapping[str, Any]) -> nn.Module:
    """A freshly initialised dense task model from its spec."""
    from .ptb import WordLM
    from .seqcls import SeqClassifier
    from .speech import MaskEstimator

    classes = {"seqcls": SeqClassifier, "ptb": WordLM, "speech": MaskEstimator}
    if not isinstance(spec, Mapping) or spec.get("name") not in classes or not isinstance(spec.get("kwargs"), Mapping):
        raise ValueError(f"architecture spec must be {{'name': one of {sorted(classes)}, 'kwargs': {{...}}}}, got {spec!r}")
    try:
        return classes[spec["name"]](**spec["kwargs"])
    except TypeError as exc:
        raise ValueError(f"architecture {spec['name']!r}: bad kwargs {dict(spec['kwargs'])}: {exc}") from None


def save_model(model: nn.Module, spec: Mapping[str, Any], path: str | Path) -> Path:
    """Save a (compressed or dense) task model with :func:`mpolstm.io.save` plus its architecture."""
    from ..data.cache import atomic_write_bytes
    from ..io import save

    out = save(model, path)
    atomic_write_bytes(out / ARCHITECTURE_FILE, json.dumps(dict(spec), indent=2).encode())
    return out


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model written by :func:`save_model`: (model, architecture spec)."""
    from ..io import load

    folder = Path(path)
    spec_file = folder / ARCHITECTURE_FILE
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a saved model folder (expected a directory from mpolstm train/reproduce)")
    if not spec_file.is_file():
        raise ValueError(f"{folder} has no {ARCHITECTURE_FILE}; it was not saved by mpolstm's task commands")
    try:
        spec = json.loads(spec_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{spec_file} is not valid JSON: {exc}") from None
    return load(folder, build_architecture(spec)), spec
