"""The ONNX format: the checked trace exported by torch's TorchScript-based exporter, its large
constants turned into initializers, and the byte count of an ONNX file's weights. Needs ``onnx``."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Sequence, cast

import torch
from torch import Tensor, nn

from ..nn.base import MPOWeights
from ..onnxgraph import (
    constants_as_initializers,
    dedupe_tensors,
    onnx_modules,
    record_weight_bytes,
    subgraphs,
    weight_bytes,
)
from .int8 import int8_onnx
from .trace import ExportJob, export_with, first_line, quiet, trace
from .verify import FLOAT_RTOL, INT8_RTOL, Axes, Runner, declared, write_verified

__all__ = ["export_onnx", "onnx_runner", "onnx_weight_bytes", "write_onnx"]


def _build_onnx(job: ExportJob, axes: Axes) -> tuple[bytes, Axes]:
    """The ONNX file of ``job``'s trace with ``axes`` declared dynamic (every other axis fixed)."""
    traced = trace(job)
    input_names, output_names = job.names(traced.outputs)
    buffer = io.BytesIO()
    try:
        with quiet(), (torch.enable_grad() if traced.with_grad else torch.no_grad()):
            torch.onnx.export(traced.module, job.inputs, cast(Any, buffer), dynamo=False, opset_version=job.opset,
                              input_names=input_names, output_names=output_names,
                              dynamic_axes=declared(axes, input_names, output_names))
    except Exception as exc:
        raise ValueError(f"cannot export {type(job.module).__name__} to ONNX (opset {job.opset}): "
                         f"{first_line(exc)}") from exc
    data = _constants_as_initializers(buffer.getvalue())
    if job.int8:
        data = int8_onnx(data, job.module, job.inputs, input_names)
    return record_weight_bytes(data), axes


def onnx_runner(data: bytes, job: ExportJob) -> Runner:
    """The ONNX file ``data`` in onnxruntime, as a function of the job's inputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda inputs: [torch.from_numpy(y) for y in session.run(None, {n: x.numpy() for n, x in
                                                                              zip(names, inputs)})]


def write_onnx(job: ExportJob, path: Path) -> Path:
    """Export the trace of ``job`` to the ONNX file ``path`` (names as in the package docstring, the
    dynamic axes of :mod:`~.verify`, checked in onnxruntime at every shape they allow); with
    ``job.int8`` the factors are int8 (:func:`mpolstm.export.int8.int8_onnx`). A rank-D product
    with a bias is traced as MatMul + Add, not a Gemm with a bias (onnxruntime's int8 tools quantize
    MatMul)."""
    for module in job.module.modules():
        if isinstance(module, MPOWeights):
            module.separate_bias = True
    return write_verified(job, path, _build_onnx, onnx_runner, "ONNX", INT8_RTOL if job.int8 else FLOAT_RTOL)


write_onnx.supports_int8 = True  # type: ignore[attr-defined]  # int8 factors: export.int8 (mypy#2087)


def export_onnx(model: nn.Module, example_inputs: Tensor | Sequence[Tensor], path: str | os.PathLike,
                opset: int = 17, runtime: str = "factorized", overwrite: bool = False,
                int8: bool | None = None) -> Path:
    """Export ``model`` (eval mode, ``runtime`` as in the package docstring) to the ONNX file ``path``
    with the TorchScript exporter at ``opset``; names and dynamic axes as in the package docstring.
    ``int8``: int8 factors (default: when the model has int8 cores; :func:`~.trace.int8_factors`)."""
    return export_with(write_onnx, model, example_inputs, path, runtime, opset, overwrite, int8)


def _constants_as_initializers(model_bytes: bytes) -> bytes:
    """The ONNX model with its mostly-zero matrices as sparse initializers (:func:`_sparse_constants`),
    its top-level large constants as initializers (``onnxgraph.constants_as_initializers``) and each
    weight once (``onnxgraph.dedupe_tensors``: a step unrolled by the trace reads the same constants)."""
    onnx, _ = onnx_modules()
    model = onnx.load_from_string(model_bytes)
    _sparse_constants(model.graph, model.graph)
    constants_as_initializers(model.graph)
    dedupe_tensors(model)
    return model.SerializeToString()


def _sparse_constants(graph, main) -> None:
    """Move every Constant matrix of ``graph`` and its subgraphs (a Loop's body) that is mostly zeros
    (a sparse part, layout "lowrank+sparse": values plus int64 positions are smaller) into ``main``'s
    sparse initializers, which onnxruntime makes dense when it loads the file."""
    onnx, numpy_helper = onnx_modules()
    kept = []
    for node in graph.node:
        for sub in subgraphs(node):
            _sparse_constants(sub, main)
        value = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        array = numpy_helper.to_array(value.t) if value is not None and value.type == value.TENSOR else None
        nonzero = None if array is None or array.ndim != 2 or array.dtype.kind != "f" else array.reshape(-1).nonzero()[0]
        if array is None or nonzero is None or nonzero.size * (array.itemsize + 8) >= array.nbytes:
            kept.append(node)
            continue
        main.sparse_initializer.append(onnx.helper.make_sparse_tensor(
            numpy_helper.from_array(array.reshape(-1)[nonzero], node.output[0]),
            numpy_helper.from_array(nonzero.astype("int64"), node.output[0] + "_index"), array.shape))
    del graph.node[:]
    graph.node.extend(kept)


def onnx_weight_bytes(path: str | os.PathLike) -> int:
    """Bytes of the weights (initializers and constants, subgraphs' too: what is held at run time) of the
    ONNX file ``path``; a sparse initializer counts as the dense tensor onnxruntime makes of it."""
    onnx, _ = onnx_modules()
    return weight_bytes(onnx.load(str(path)))
