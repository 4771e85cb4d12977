"""The TorchScript format: the checked trace, saved with ``torch.jit.save``; every fixed axis that
eager mode could vary (:mod:`~.verify`) guarded in the graph (a call at another size raises)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from .trace import ExportJob, export_with, flatten, quiet, trace
from .verify import Axes, Runner, write_verified

__all__ = ["export_torchscript", "write_torchscript"]


@torch.jit.script
def _require(x: Tensor, axis: int, size: int, name: str) -> Tensor:
    """``x``, or ValueError when its ``axis`` is not ``size`` long (scripted: kept in a trace)."""
    if x.size(axis) != size:
        raise ValueError(name + ": axis " + str(axis) + " is fixed at " + str(size) + " in this file, got "
                         + str(x.size(axis)))
    return x


class _Guarded(nn.Module):
    """The trace behind a check of every fixed axis ``free`` [(input, axis)] at the example's size."""

    def __init__(self, inner: torch.jit.ScriptModule, inputs: tuple[Tensor, ...], free: list) -> None:
        super().__init__()
        self.inner, self.checks = inner, [(i, d, inputs[i].shape[d]) for i, d in free]

    def forward(self, *inputs: Tensor):
        checked = list(inputs)
        for i, d, size in self.checks:
            checked[i] = _require(checked[i], d, size, f"input{i}")
        return self.inner(*checked)


def _frozen(module: torch.jit.ScriptModule, inputs: tuple[Tensor, ...], expected: list[Tensor]):
    """``module`` frozen, unless the frozen module does not reproduce ``expected`` on ``inputs`` (seen:
    torch.jit.freeze mixing up the constants of a cell unrolled by the trace); then as it is."""
    frozen = torch.jit.freeze(module.eval(), optimize_numerics=False)
    try:
        with torch.no_grad():
            got = flatten(frozen(*inputs))
    except Exception:
        return module
    same = all(g.shape == e.shape and torch.allclose(g, e, rtol=1e-4, atol=1e-5) for g, e in zip(got, expected))
    return frozen if same else module


def _build_torchscript(job: ExportJob, axes: Axes) -> tuple[bytes, Axes]:
    """The trace of ``job`` behind its guards; the factorized runtime's frozen (it reads the merged halves
    as constants, so the cores it never reads are dropped and each weight is stored once)."""
    traced = trace(job)
    module = traced.module
    if axes.free:
        with quiet(), torch.no_grad():
            module = torch.jit.trace(_Guarded(module, job.inputs, axes.free), job.inputs, check_trace=False)
    if not traced.with_grad:
        module = _frozen(module, job.inputs, traced.outputs)
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return buffer.getvalue(), axes


def _torchscript_runner(data: bytes, job: ExportJob) -> Runner:
    module = torch.jit.load(io.BytesIO(data))

    def run(inputs: tuple[Tensor, ...]) -> list[Tensor]:
        with torch.no_grad():
            return flatten(module(*inputs))
    return run


def write_torchscript(job: ExportJob, path: Path) -> Path:
    """Write the trace of ``job`` to the TorchScript file ``path`` (``torch.jit.load`` reads it),
    checked at every shape it accepts."""
    return write_verified(job, path, _build_torchscript, _torchscript_runner, "TorchScript")


def export_torchscript(model: nn.Module, example_inputs: Tensor | Sequence[Tensor],
                       path: str | os.PathLike, runtime: str = "factorized", overwrite: bool = False,
                       int8: bool | None = None) -> Path:
    """Trace ``model`` (eval mode, ``runtime`` as in the package docstring) on ``example_inputs`` and
    write the TorchScript file ``path``; ``torch.jit.load(path)(*inputs)`` equals ``model.eval()(*inputs)``.
    TorchScript holds float32 factors: a model with int8 cores is refused unless ``int8=False``."""
    return export_with(write_torchscript, model, example_inputs, path, runtime, overwrite=overwrite, int8=int8)
