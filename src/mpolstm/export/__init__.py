"""Export a (compressed or dense) model for serving: ONNX, ExecuTorch, AOTInductor, a plain dense torch
model, or TorchScript (legacy: deprecated in PyTorch 2, kept while torch ships it).

One function per format (``mpolstm export MODEL --format ... --out PATH`` calls :func:`export_model`):

- ``"executorch"`` / ``"aoti"`` (``export_model`` / ``export_step`` with ``fmt=``; ``pt2.py``): the
  model (or its step) through ``torch.export`` in eval mode, the merged halves folded into
  constants: a ``.pte`` program for ExecuTorch with the XNNPACK delegate (``export_step(...,
  int8=True)``: int8 factors), or an AOTInductor package (``torch._inductor.aoti_load_package``).
  The example inputs' shapes are the program's. Checked against eager mode.
- ``export_torchscript(model, example_inputs, path, runtime="factorized") -> Path``: one TorchScript
  file (``torch.jit.load``; legacy), the model traced in eval mode. Outputs are checked against eager
  mode on the example inputs.
- ``export_onnx(model, example_inputs, path, opset=17, runtime="factorized") -> Path``: one ONNX file
  (TorchScript-based exporter). The axes eager mode runs at other sizes (batch, time) are dynamic,
  the others fixed (``verify.py``); likewise the outputs' axes that vary with them. Inputs
  are named ``input0, input1, ...`` and the flattened outputs ``output0, output1, ...`` (for the
  speech MaskEstimator: mask, h_n, c_n). Needs the ``onnx`` package.
- ``export_dense(model, path) -> Path``: the :func:`densify`'d model written by :func:`mpolstm.io.save`
  (a folder with no MPO module inside). ``densify(model)`` alone gives the dense nn.Module.
- ``export_step(model, path, fmt="onnx", frame=None) -> Path``: the streaming step of a model with
  ``step(frame, state) -> (output, state)`` (MPOLSTM / MPOGRU / MPORNN, or a model built on them):
  inputs ``frame`` and ``state0, state1, ...``, outputs ``output`` and ``new_state0, ...``; what a
  real-time application calls per frame. Always the factorized runtime. Shapes, for the recurrent
  layers (N streams, any N): ``frame`` (N, input_size); MPOLSTM ``state0`` = h (num_layers, N, H_out)
  and ``state1`` = c (num_layers, N, hidden_size), MPOGRU / MPORNN ``state0`` = h (num_layers, N,
  hidden_size); ``output`` (N, H_out) and the new states shaped as the old. Start from zeros and feed
  each call's new state to the next.
- ``export_model(model, path, fmt, example_inputs=None, runtime="factorized")``: the dispatcher;
  the traced formats need the example inputs from the caller (the task commands build them).

Every export takes ``overwrite=False``: as ``mpolstm.save`` (``mpolstm.atomic``), an existing file or
folder (but an empty folder) is refused unless ``overwrite``, which replaces it whole, and missing
parent folders are created.

int8 survives export: a model with int8 cores (``mpolstm.quantize``) exports to ONNX with its factors
stored and multiplied in int8 (``int8.py``: onnxruntime's dynamic quantization of the int8 modules'
products; the file's metadata records the int8 and float32 factor bytes and the output error,
``int8_report``), and the formats that hold float32 (TorchScript, dense) or the dense runtime refuse it
unless ``int8=False``. ``int8=True`` gives a float model int8 factors the same way (a copy quantized
by :func:`mpolstm.quantize`, then exported: int8 always means the factors).

Runtimes of the traced formats (``RUNTIMES``):

- ``"factorized"`` (the default): every MPO product runs through the cores, or through the chain
  merged into two halves once at export (graph constants): no dense weight of an MPO layer is ever
  formed, so the run-time weight memory is that of the factors, and a recurrent layer computes the
  input products of all time steps in one batched product, then loops over time (an ONNX ``Loop``,
  dynamic length) with the factorized W_hh. Convolutions keep their (small) rebuilt kernel, and
  recurrent layers with ``proj_size`` or PackedSequence input need ``"dense"``. A sparse part
  (layout "lowrank+sparse") is the exception: the graph multiplies it as a dense matrix (ONNX has
  no sparse product; onnxruntime runs that fastest), stored in an ONNX file as a sparse
  initializer that onnxruntime makes dense when it loads it.
- ``"dense"``: the graph holds the cores and rebuilds every dense weight from them on each call,
  then runs torch's fused kernels (ONNX's LSTM/GRU/RNN ops): the smallest file (the cores alone),
  dense weight memory and dense speed at run time. Better for long sequences at large batch with
  mild compression, where the fused dense kernel beats a loop of small products
  (docs/benchmarks.md).

Traced exports (TorchScript, ONNX) record one run on the example inputs: what they serve is the
eval-mode forward from a zero initial state (every module's ``clear_cache()`` runs first: MPO
RNNs drop their cached weights, a model that carries state across calls drops it), and input
checks that read tensor values (MPOEmbedding's index range) are not in the graph. The model is
traced once (``torch.jit.trace``), checked against eager mode, and that trace is what each format
writes.
Every traced file is run in its own runtime at every shape it declares before it is written
(``verify.py``: batch 1 and 3+, lengths 1, the example's and a longer one; a fixed axis must refuse
other sizes), and is not written when it differs from eager mode.
Every file or folder is written to a temporary name beside ``path`` and renamed into place, so a
failure leaves no partial output. Bad arguments (unknown format, an existing target without
``overwrite``, a model that cannot be traced or exported) raise ValueError.

The package, by concern:

- ``dense.py``: :func:`densify`, :func:`export_dense`.
- ``trace.py``: the export copy (eval mode, runtime, caches), the one checked trace, ``ExportJob``.
- ``torchscript.py``, ``onnx.py``: one writer per traced format (``onnx.py`` also turns the
  factorized runtime's constants into initializers and counts an ONNX file's weight bytes).
- ``pt2.py``: the writers of the PyTorch 2 formats (executorch, aoti), from ``torch.export``.
- ``formats.py``: ``WRITERS``, the table of traced formats (name -> writer), and the export of a
  whole model through it. **A new format is one writer ``(job, path) -> path`` and one entry
  there**; :func:`export_model`, :func:`export_step` and the CLI's ``--format`` then offer it.
- ``step.py``: :func:`export_step`, a model's one-frame ``step`` through any writer.
- ``verify.py``: the dynamic axes a model allows, and the check of a written file at every shape.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from .dense import densify, export_dense
from .formats import RUNTIMES, WRITERS, export_traced
from .int8 import int8_report
from .onnx import export_onnx, onnx_weight_bytes
from .sizes import file_weight_bytes, runtime_weight_bytes
from .step import export_step
from .torchscript import export_torchscript
from .trace import as_tuple

__all__ = ["FORMATS", "RUNTIMES", "WRITERS", "densify", "export_dense", "export_model", "export_onnx",
           "export_step", "export_torchscript", "file_weight_bytes", "int8_report", "onnx_weight_bytes",
           "runtime_weight_bytes"]

FORMATS = (*WRITERS, "dense")


def export_model(model: nn.Module, path: str | os.PathLike, fmt: str,
                 example_inputs: Tensor | Sequence[Tensor] | None = None, runtime: str = "factorized",
                 overwrite: bool = False, int8: bool | None = None) -> Path:
    """Export ``model`` to ``path`` (a file for the traced formats, a folder for dense) in format ``fmt``
    (one of :data:`FORMATS`); the traced formats need ``example_inputs`` (floating ones are cast to the
    model's dtype) and take ``runtime`` (:data:`RUNTIMES`). An existing ``path`` is refused unless
    ``overwrite``, which replaces it whole. ``int8``: store the MPO factors in int8 (ONNX only; the
    default: when the model has int8 cores, which the other formats then refuse unless
    ``int8=False``; :mod:`mpolstm.export.int8`). Returns ``path``. (Arguments in the order of
    :func:`export_step`; the older ``export_model(model, fmt, path, ...)`` still works, with a
    DeprecationWarning.)"""
    if isinstance(path, str) and path in FORMATS and not (isinstance(fmt, str) and fmt in FORMATS):
        warnings.warn("export_model(model, fmt, path) is deprecated: call export_model(model, path, fmt), the "
                      "order of export_step", DeprecationWarning, stacklevel=2)
        path, fmt = fmt, path
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "dense":
        return export_dense(model, path, overwrite=overwrite, int8=int8)
    if example_inputs is None:
        raise ValueError(f"the {fmt} export traces the model: pass example_inputs (a tensor or a tuple of tensors)")
    first = next(model.parameters(), None)
    dtype = torch.float32 if first is None else first.dtype
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in as_tuple(example_inputs))
    return export_traced(fmt, model, inputs, path, runtime=runtime, overwrite=overwrite, int8=int8)
