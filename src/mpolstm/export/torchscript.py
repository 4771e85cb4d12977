"""The TorchScript format: the checked trace, saved with ``torch.jit.save``."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from ..atomic import atomic_write_bytes
from .trace import ExportJob, export_with, trace

__all__ = ["export_torchscript", "write_torchscript"]


def write_torchscript(job: ExportJob, path: Path) -> Path:
    """Write the trace of ``job`` to the TorchScript file ``path`` (``torch.jit.load`` reads it). The
    factorized runtime's trace is frozen: it reads the merged halves as constants, so the cores it
    never reads are dropped and each weight is stored once (not as a parameter and a constant)."""
    traced = trace(job)
    module = traced.module if traced.with_grad else torch.jit.freeze(traced.module.eval(), optimize_numerics=False)
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def export_torchscript(model: nn.Module, example_inputs: Tensor | Sequence[Tensor],
                       path: str | os.PathLike, runtime: str = "factorized", overwrite: bool = False,
                       int8: bool | None = None) -> Path:
    """Trace ``model`` (eval mode, ``runtime`` as in the package docstring) on ``example_inputs`` and
    write the TorchScript file ``path``; ``torch.jit.load(path)(*inputs)`` equals ``model.eval()(*inputs)``.
    TorchScript holds float32 factors: a model with int8 cores is refused unless ``int8=False``."""
    return export_with(write_torchscript, model, example_inputs, path, runtime, overwrite=overwrite, int8=int8)
