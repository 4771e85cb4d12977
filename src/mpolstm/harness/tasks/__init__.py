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

import torch
from torch import Tensor, nn

__all__ = ["ARCHITECTURE_FILE", "build_architecture", "save_model", "load_model", "example_inputs", "export_task_model"]

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
    from ...atomic import atomic_write_bytes
    from ...io import save

    out = save(model, path)
    atomic_write_bytes(out / ARCHITECTURE_FILE, json.dumps(dict(spec), indent=2).encode())
    return out


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model written by :func:`save_model`: (model, architecture spec)."""
    from ...io import load

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


def example_inputs(spec: Mapping[str, Any], batch: int = 2, steps: int = 5) -> tuple[Tensor, ...]:
    """Example inputs for a task architecture spec: seqcls (N, T, F) features or (N, T) token ids,
    ptb (T, N) token ids, speech (N, T, 257) log-magnitudes."""
    from ..audio import N_BINS

    name = spec.get("name") if isinstance(spec, Mapping) else None
    kwargs = spec.get("kwargs", {}) if isinstance(spec, Mapping) else {}
    gen = torch.Generator().manual_seed(0)
    if name == "seqcls":
        vocab = kwargs.get("vocab_size")
        if vocab:
            return (torch.randint(1, int(vocab), (batch, steps), generator=gen),)
        return (torch.randn(batch, steps, int(kwargs["input_size"]), generator=gen),)
    if name == "ptb":
        return (torch.randint(0, int(kwargs["vocab_size"]), (steps, batch), generator=gen),)
    if name == "speech":
        return (torch.randn(batch, steps, N_BINS, generator=gen),)
    raise ValueError(f"no example inputs for architecture {name!r}; expected seqcls, ptb or speech")


def export_task_model(model: nn.Module, spec: Mapping[str, Any], fmt: str, path: str | Path) -> Path:
    """Export a task model: traced formats from :func:`example_inputs` of its ``spec``; the dense
    format as a task model folder (with ``architecture.json``) that :func:`load_model` reads."""
    from ...export import export_dense, export_model

    if fmt != "dense":
        return export_model(model, fmt, path, example_inputs(spec))

    def write(dense: nn.Module, folder: Path) -> None:
        with torch.device("meta"):
            reference = build_architecture(spec)
        expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in dense.state_dict().items()}
        if expected != got:
            diff = sorted(set(expected.items()) ^ set(got.items()))
            raise ValueError(f"the dense model does not match its architecture {dict(spec)}: "
                             f"parameters differ in {diff[:6]}")
        save_model(dense, spec, folder)

    return export_dense(model, path, write)
