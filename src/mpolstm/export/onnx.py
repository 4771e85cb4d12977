"""The ONNX format: the checked trace exported by torch's TorchScript-based exporter, its large
constants turned into initializers, and the byte count of an ONNX file's weights. Needs ``onnx``."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from ..atomic import atomic_write_bytes
from ..nn.base import MPOWeights
from .int8 import constants_as_initializers, int8_onnx
from .trace import ExportJob, export_with, first_line, quiet, trace

__all__ = ["export_onnx", "onnx_weight_bytes", "write_onnx"]


def _dynamic_axes(inputs: Sequence[Tensor], outputs: Sequence[Tensor], input_names: Sequence[str],
                  output_names: Sequence[str]) -> dict[str, dict[int, str]]:
    """Every axis of an integer input, every axis but the last of a float input or of an output."""
    axes: dict[str, dict[int, str]] = {}
    for kind, tensors, names in (("input", inputs, input_names), ("output", outputs, output_names)):
        for name, t in zip(names, tensors):
            fixed_last = t.is_floating_point() or kind == "output"
            dims = range(t.dim() - 1 if fixed_last else t.dim())
            if dims:
                axes[name] = {d: f"{name}_dim{d}" for d in dims}
    return axes


def write_onnx(job: ExportJob, path: Path) -> Path:
    """Export the trace of ``job`` to the ONNX file ``path`` (names and dynamic axes as in the package
    docstring); with ``job.int8`` the factors are int8 (:func:`mpolstm.export.int8.int8_onnx`). A
    rank-D product with a bias is traced as MatMul + Add, not a Gemm with a bias (onnxruntime's int8
    tools quantize MatMul)."""
    for module in job.module.modules():
        if isinstance(module, MPOWeights):
            module.separate_bias = True
    traced = trace(job)
    input_names, output_names = job.names(traced.outputs)
    buffer = io.BytesIO()
    try:
        with quiet(), (torch.enable_grad() if traced.with_grad else torch.no_grad()):
            torch.onnx.export(traced.module, job.inputs, buffer, dynamo=False, opset_version=job.opset,
                              input_names=input_names, output_names=output_names,
                              dynamic_axes=_dynamic_axes(job.inputs, traced.outputs, input_names, output_names))
    except Exception as exc:
        raise ValueError(f"cannot export {type(job.module).__name__} to ONNX (opset {job.opset}): "
                         f"{first_line(exc)}") from exc
    data = _constants_as_initializers(buffer.getvalue())
    if job.int8:
        data = int8_onnx(data, job.module, job.inputs, input_names)
    atomic_write_bytes(path, data)
    return path


write_onnx.supports_int8 = True  # int8 factors: export.int8


def export_onnx(model: nn.Module, example_inputs: Tensor | Sequence[Tensor], path: str | os.PathLike,
                opset: int = 17, runtime: str = "factorized", overwrite: bool = False,
                int8: bool | None = None) -> Path:
    """Export ``model`` (eval mode, ``runtime`` as in the package docstring) to the ONNX file ``path``
    with the TorchScript exporter at ``opset``; names and dynamic axes as in the package docstring.
    ``int8``: int8 factors (default: when the model has int8 cores; :func:`~.trace.int8_factors`)."""
    return export_with(write_onnx, model, example_inputs, path, runtime, opset, overwrite, int8)


def _constants_as_initializers(model_bytes: bytes) -> bytes:
    """The ONNX model with its mostly-zero matrices as sparse initializers (:func:`_sparse_constants`)
    and its top-level large constants as initializers (:func:`constants_as_initializers`)."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    _sparse_constants(model.graph, model.graph)
    constants_as_initializers(model.graph)
    return model.SerializeToString()


def _sparse_constants(graph, main) -> None:
    """Move every Constant matrix of ``graph`` and its subgraphs (a Loop's body) that is mostly zeros
    (a sparse part, layout "lowrank+sparse": values plus int64 positions are smaller) into ``main``'s
    sparse initializers, which onnxruntime makes dense when it loads the file."""
    import onnx
    from onnx import numpy_helper

    kept = []
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _sparse_constants(attr.g, main)
        value = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        array = numpy_helper.to_array(value.t) if value is not None and value.type == value.TENSOR else None
        nonzero = None if array is None or array.ndim != 2 or array.dtype.kind != "f" else array.reshape(-1).nonzero()[0]
        if nonzero is None or nonzero.size * (array.itemsize + 8) >= array.nbytes:
            kept.append(node)
            continue
        main.sparse_initializer.append(onnx.helper.make_sparse_tensor(
            numpy_helper.from_array(array.reshape(-1)[nonzero], node.output[0]),
            numpy_helper.from_array(nonzero.astype("int64"), node.output[0] + "_index"), array.shape))
    del graph.node[:]
    graph.node.extend(kept)


def onnx_weight_bytes(path: str | os.PathLike) -> int:
    """Bytes of the initializers (the weights held at run time) of the ONNX file ``path``; a sparse
    initializer counts as the dense tensor onnxruntime makes of it."""
    import math

    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    sparse = sum(math.prod(t.dims) * numpy_helper.to_array(t.values).itemsize for t in graph.sparse_initializer)
    return sum(numpy_helper.to_array(t).nbytes for t in graph.initializer) + sparse + _constant_bytes(graph)


def _constant_bytes(graph) -> int:
    """Bytes of the tensors held by Constant nodes, in ``graph`` and its subgraphs (a Loop's body)."""
    from onnx import numpy_helper

    total = 0
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == attr.TENSOR:
                total += numpy_helper.to_array(attr.t).nbytes
            elif attr.type == attr.GRAPH:
                total += sum(numpy_helper.to_array(t).nbytes for t in attr.g.initializer) + _constant_bytes(attr.g)
    return total
