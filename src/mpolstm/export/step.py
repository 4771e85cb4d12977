"""The streaming step export: a model's ``step(frame, state) -> (output, state)`` as a graph of flat
tensors (inputs ``frame, state0, ...``; outputs ``output, new_state0, ...``), in any traced format."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, cast

import torch
from torch import Tensor, nn

from ..nn.base import set_factorized
from ..nn.registry import layer_type_of_mpo
from .formats import WRITERS
from .trace import ExportJob, check_file_target, export_copy, flatten, int8_factors, int8_model

# frames the step export is checked on (random, never zeros: a zero frame hides wrong input products)
CHECK_FRAMES = 4

__all__ = ["export_step"]


def _step(model: nn.Module) -> Callable[[Tensor, Any], tuple[Tensor, Any]]:
    """``model.step``: (frame, state) -> (output, new state) (nn.Module.__getattr__ types it Tensor | Module)."""
    return cast(Callable[[Tensor, Any], tuple[Tensor, Any]], model.step)


class _Step(nn.Module):
    """``forward(frame, *state) -> (output, *new_state)``: a model's ``step`` with flat tensors."""

    def __init__(self, model: nn.Module, single_state: bool) -> None:
        super().__init__()
        self.model, self.single_state = model, single_state

    def forward(self, frame: Tensor, *state: Tensor):
        output, new = _step(self.model)(frame, state[0] if self.single_state else tuple(state))
        return (output, *flatten(new, "new state"))


def _random_step_inputs(work: nn.Module, frame: Tensor) -> tuple[Tensor, object]:
    """A random frame shaped like ``frame`` (an integer frame is kept) and the state after
    ``CHECK_FRAMES`` random frames from zeros: the example the graph is traced and checked on."""
    generator = torch.Generator().manual_seed(0)

    def draw() -> Tensor:
        if not frame.is_floating_point():
            return frame
        return torch.randn(frame.shape, generator=generator, dtype=torch.float64).to(frame)

    frames = [draw() for _ in range(CHECK_FRAMES + 1)]
    state, outputs = None, []
    with torch.no_grad():
        for x in frames[:-1]:
            out, state = _step(work)(x, state)
            outputs.append(out)
        entry = layer_type_of_mpo(work)
        if entry is not None and entry.kind == "rnn":
            _check_step_equals_forward(work, frames[:-1], outputs)
    return frames[-1], state


def _check_step_equals_forward(rnn: nn.Module, frames: list[Tensor], outputs: list[Tensor]) -> None:
    """ValueError unless ``outputs`` (the step's, frame by frame) equal the dense runtime's forward
    (torch's fused kernel) on ``frames`` as one sequence."""
    axis = 1 if rnn.batch_first and frames[0].dim() == 2 else 0
    set_factorized(rnn, False)
    try:
        expected = rnn(torch.stack(frames, axis))[0]
    finally:
        set_factorized(rnn, True)
    got = torch.stack(outputs, axis)
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        error = float((got - expected).abs().max())
        raise ValueError(f"{type(rnn).__name__}.step frame by frame differs from its forward on the same "
                         f"random frames by {error:.3g}; the step cannot be exported")


def export_step(model: nn.Module, path: str | os.PathLike, fmt: str = "onnx", frame: Tensor | None = None,
                opset: int = 17, overwrite: bool = False, int8: bool | None = None) -> Path:
    """Export the streaming step of ``model`` (it must have ``step(frame, state) -> (output, state)``,
    state a tensor or a tuple of tensors, None meaning zeros) in the factorized runtime to ``path``
    in the traced format ``fmt`` (:data:`mpolstm.export.WRITERS`: "onnx", "executorch" (.pte,
    XNNPACK), "aoti" (an AOTInductor package), "torchscript" (legacy)). ``frame`` is an example frame
    (N, features); default: zeros (1, input_size) for a recurrent MPO layer; the PyTorch 2 formats keep
    its N. The file's inputs are the frame and the state tensors, its outputs the output and the new
    state (names and shapes in the package docstring). The graph is traced and checked against eager
    on a random frame and the state after a few random frames (never zeros, which would hide a wrong
    input product); for a recurrent MPO layer the step over those frames must also equal its forward
    on them as one sequence, else ValueError. An existing ``path`` is
    refused unless ``overwrite``; ``int8``: int8 factors (onnx: onnxruntime dynamic quantization,
    executorch: pt2e; default: when the model has int8 cores, which the other formats refuse unless
    ``int8=False``; :func:`~.trace.int8_factors`)."""
    if fmt not in WRITERS:
        raise ValueError(f"unknown step export format {fmt!r}; expected one of {', '.join(WRITERS)}")
    if not callable(getattr(model, "step", None)):
        raise ValueError(f"{type(model).__name__} has no step(frame, state) method to export")
    path = check_file_target(path, overwrite)
    quantized = int8_factors(model, int8, "factorized", WRITERS[fmt])
    work = export_copy(int8_model(model, int8), "factorized")
    if frame is None:
        input_size = getattr(work, "input_size", None)
        if not isinstance(input_size, int):
            raise ValueError(f"give an example frame: {type(model).__name__} has no input_size to make one")
        frame = next(work.parameters()).new_zeros(1, input_size)
    frame, state = _random_step_inputs(work, frame)
    states = flatten(state, "state")
    names = [f"state{i}" for i in range(len(states))]
    job = ExportJob(_Step(work, isinstance(state, Tensor)), (frame, *states), ["frame", *names],
                    ["output", *[f"new_{n}" for n in names]], opset, quantized)
    return WRITERS[fmt](job, path)
