"""The traced formats, by name: ``WRITERS`` maps each to its writer ``(ExportJob, path) -> path``.

Adding a format is one writer module (see ``torchscript.py``: it receives the export copy, the
example inputs and the graph's names in an :class:`~mpolstm.export.trace.ExportJob`) and one entry
here (a writer that can store int8 factors sets ``supports_int8 = True`` and honours ``job.int8``; any
other refuses an int8 model, see ``trace.int8_factors``); :func:`mpolstm.export.export_model`, :func:`mpolstm.export.export_step` and the CLI's
``--format`` read this table.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from torch import Tensor, nn

from .onnx import write_onnx
from .pt2 import write_aoti, write_executorch
from .torchscript import write_torchscript
from .trace import RUNTIMES, Writer, export_with

__all__ = ["RUNTIMES", "WRITERS", "export_traced", "writer"]

# torchscript is the legacy format (TorchScript is deprecated in PyTorch 2): executorch / aoti replace it
WRITERS: dict[str, Writer] = {"torchscript": write_torchscript, "onnx": write_onnx, "executorch": write_executorch,
                              "aoti": write_aoti}


def writer(fmt: str) -> Writer:
    """The writer of the traced format ``fmt``; ValueError naming the known ones otherwise."""
    if fmt not in WRITERS:
        raise ValueError(f"unknown traced format {fmt!r}; expected one of {', '.join(WRITERS)}")
    return WRITERS[fmt]


def export_traced(fmt: str, model: nn.Module, example_inputs: Tensor | Sequence[Tensor], path: str | os.PathLike,
                  runtime: str = "factorized", opset: int = 17, overwrite: bool = False,
                  int8: bool | None = None) -> Path:
    """Export ``model`` on ``example_inputs`` in ``runtime`` to the file ``path`` as ``fmt`` (an existing
    ``path`` refused unless ``overwrite``; ``int8`` as :func:`~.trace.int8_factors`)."""
    return export_with(writer(fmt), model, example_inputs, path, runtime, opset, overwrite, int8)
