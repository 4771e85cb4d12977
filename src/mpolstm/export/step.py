"""The streaming step export: a model's ``step(frame, state) -> (output, state)`` as a graph of flat
tensors (inputs ``frame, state0, ...``; outputs ``output, new_state0, ...``), in any traced format."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .formats import WRITERS
from .trace import ExportJob, check_file_target, export_copy, flatten, int8_factors

__all__ = ["export_step"]


class _Step(nn.Module):
    """``forward(frame, *state) -> (output, *new_state)``: a model's ``step`` with flat tensors."""

    def __init__(self, model: nn.Module, single_state: bool) -> None:
        super().__init__()
        self.model, self.single_state = model, single_state

    def forward(self, frame: Tensor, *state: Tensor):
        output, new = self.model.step(frame, state[0] if self.single_state else tuple(state))
        return (output, *flatten(new, "new state"))


def export_step(model: nn.Module, path: str | os.PathLike, fmt: str = "onnx", frame: Tensor | None = None,
                opset: int = 17, overwrite: bool = False, int8: bool | None = None) -> Path:
    """Export the streaming step of ``model`` (it must have ``step(frame, state) -> (output, state)``,
    state a tensor or a tuple of tensors, None meaning zeros) in the factorized runtime to ``path``
    in the traced format ``fmt`` (:data:`mpolstm.export.WRITERS`: "onnx", "executorch" (.pte,
    XNNPACK), "aoti" (an AOTInductor package), "torchscript" (legacy)). ``frame`` is an example frame
    (N, features); default: zeros (1, input_size) for a recurrent MPO layer; the PyTorch 2 formats keep
    its N. The file's inputs are the frame and the state tensors, its outputs the output and the new
    state (names and shapes in the package docstring); checked against eager. An existing ``path`` is
    refused unless ``overwrite``; ``int8``: int8 factors (onnx: onnxruntime dynamic quantization,
    executorch: pt2e; default: when the model has int8 cores, which the other formats refuse unless
    ``int8=False``; :func:`~.trace.int8_factors`)."""
    if fmt not in WRITERS:
        raise ValueError(f"unknown step export format {fmt!r}; expected one of {', '.join(WRITERS)}")
    if not callable(getattr(model, "step", None)):
        raise ValueError(f"{type(model).__name__} has no step(frame, state) method to export")
    path = check_file_target(path, overwrite)
    quantized = int8_factors(model, int8, "factorized", WRITERS[fmt])
    work = export_copy(model, "factorized")
    if frame is None:
        if not isinstance(getattr(work, "input_size", None), int):
            raise ValueError(f"give an example frame: {type(model).__name__} has no input_size to make one")
        frame = next(work.parameters()).new_zeros(1, work.input_size)
    with torch.no_grad():
        _, state = work.step(frame, None)
    states = flatten(state, "state")
    names = [f"state{i}" for i in range(len(states))]
    job = ExportJob(_Step(work, isinstance(state, Tensor)), (frame, *states), ["frame", *names],
                    ["output", *[f"new_{n}" for n in names]], opset, quantized)
    return WRITERS[fmt](job, path)
