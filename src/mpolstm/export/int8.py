"""int8 factors in an ONNX file: what an int8 model (``mpolstm.quantize``) exports as.

The factorized runtime's graph holds each MPO weight as its factors (the chain merged into two halves,
products of the int8 cores that are no longer on an int8 grid themselves). :func:`int8_onnx` rewrites
the file with onnxruntime's dynamic quantization (``onnxruntime.quantization.quantize_dynamic``, int8
weights with one scale each, activations quantized per call: MatMulInteger) of the products of the
int8 MPO modules only (other layers stay as the model has them), inside a recurrent layer's Loop too
(its constants become initializers first). Dynamic quantization was measured faster than onnxruntime's
QDQ format on the streaming step (benchmarks/bench_int8_export.py, docs/benchmarks.md).

onnxruntime quantizes a MatMul whose *second* input is the weight; the first half of an interleaved
chain multiplies from the left and stays float32. So the file records what it holds, in its metadata
(:func:`int8_report`): the int8 and float32 bytes of the factors, and the relative error of the file's
outputs against the model on random inputs (``||y_onnx - y|| / ||y||``). The step of a low-rank layout
(``compress --max-macs``) quantizes whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..nn.base import MPOWeights
from ..onnxgraph import constants_as_initializers, dynamic_int8, graphs, onnx_modules, relative_error, run_onnxruntime
from .trace import flatten

__all__ = ["constants_as_initializers", "int8_onnx", "int8_report"]

_META = "mpolstm.int8"


def _factors(module: nn.Module) -> list:
    """The merged halves of every int8 MPO module of ``module`` (its eval cache after the export ran it:
    what the graph holds as constants), as numpy arrays."""
    arrays = []
    for m in module.modules():
        if isinstance(m, MPOWeights) and m.int8 and m._cache is not None:
            for prepared in m._cache[2].get("halves", {}).values():
                arrays += [t.detach().cpu().float().numpy() for t in prepared[:2]]
    return arrays


def _is_factor(array, factors: list) -> bool:
    """Whether ``array`` is one of ``factors`` (or its transpose, as a rank-D product holds it)."""
    import numpy as np

    return any((array.shape == f.shape and np.array_equal(array, f)) or
               (array.ndim == 2 and array.shape == f.T.shape and np.array_equal(array, f.T)) for f in factors)


def _gemms_as_matmuls(graph, names: set[str]) -> None:
    """Rewrite, in place, each bias-free Gemm of ``graph`` whose weight is a factor (``names``) as the
    MatMul it is (torch.mm exports as Gemm, which onnxruntime's dynamic quantization leaves float)."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in graph.initializer}
    for node in graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type != "Gemm" or len(node.input) != 2 or node.input[1] not in names or \
                attrs.get("transA") and attrs["transA"].i or attrs.get("alpha") and attrs["alpha"].f != 1.0:
            continue
        if attrs.get("transB") and attrs["transB"].i:
            if node.input[1] not in initializers:  # held by an outer graph: left as it is
                continue
            weight = initializers[node.input[1]]
            weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), weight.name))
        node.op_type = "MatMul"
        del node.attribute[:]


def _factor_bytes(model, names: set[str]) -> dict[str, int]:
    """Bytes of the factors (the initializers ``names``, or their ``_quantized`` int8 form) by dtype:
    {"int8": ..., "float32": ...}."""
    from onnx import numpy_helper

    counts = {"int8": 0, "float32": 0}
    for graph in graphs(model.graph):
        tensors = [*graph.initializer, *(a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute
                                         if a.type == a.TENSOR and n.output[0] in names)]
        for tensor in tensors:
            name = tensor.name or ""
            if tensor in graph.initializer and not (name in names or name.removesuffix("_quantized") in names):
                continue
            array = numpy_helper.to_array(tensor)
            if array.dtype.name in counts:
                counts[array.dtype.name] += array.nbytes
    return counts


def _relative_error(data: bytes, module: nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str]) -> float:
    """||y_onnx - y|| / ||y|| over every output, on random inputs shaped as ``inputs`` (float ones)."""
    gen = torch.Generator().manual_seed(0)
    probe = tuple(torch.randn(x.shape, generator=gen, dtype=x.dtype) if x.is_floating_point() else x for x in inputs)
    with torch.no_grad():
        expected = [e.numpy() for e in flatten(module(*probe))]
    return relative_error(run_onnxruntime(data, dict(zip(names, (x.numpy() for x in probe)))), expected)


def int8_onnx(data: bytes, module: nn.Module, inputs: tuple[torch.Tensor, ...], input_names: list[str]) -> bytes:
    """The ONNX file ``data`` (exported from ``module``, the export copy, on ``inputs``) with the factors
    of its int8 MPO modules stored and multiplied in int8 (module docstring), and its metadata
    recording the bytes and the error (:func:`int8_report`)."""
    onnx, numpy_helper = onnx_modules("int8 ONNX exports")
    model = onnx.load_from_string(data)
    for graph in reversed(graphs(model.graph)):  # subgraphs first: lifting a graph rewrites its nodes
        constants_as_initializers(graph)
    factors = _factors(module)
    names = {t.name for g in graphs(model.graph) for t in g.initializer if _is_factor(numpy_helper.to_array(t), factors)}
    for graph in graphs(model.graph):
        _gemms_as_matmuls(graph, names)
    products = [n for g in graphs(model.graph) for n in g.node if n.op_type in ("MatMul", "Gemm")]
    others = [n.name for n in products if not names & set(n.input)]  # layers the model keeps in float
    if len(others) == len(products):
        kinds = sorted({type(m).__name__ for m in module.modules() if isinstance(m, MPOWeights) and m.int8})
        raise ValueError(f"found no product of an int8 MPO module ({', '.join(kinds)}) in the exported graph to "
                         "quantize (a convolution's factors run as Conv nodes, which stay float32); pass "
                         "int8=False for float32 factors, or export to executorch for int8 ones")
    quantized = onnx.load_from_string(dynamic_int8(model.SerializeToString(), others, subgraphs=True))
    sizes = _factor_bytes(quantized, names)
    error = _relative_error(quantized.SerializeToString(), module, inputs, input_names)
    onnx.helper.set_model_props(quantized, {_META: "dynamic", f"{_META}.factor_bytes": str(sizes["int8"]),
                                            f"{_META}.float_factor_bytes": str(sizes["float32"]),
                                            f"{_META}.relative_error": f"{error:.3g}"})
    return quantized.SerializeToString()


def int8_report(path: str | Path) -> dict[str, Any] | None:
    """What :func:`int8_onnx` recorded in the ONNX file ``path``: {"method", "factor_bytes" (int8),
    "float_factor_bytes" (factors onnxruntime left float32), "relative_error"}; None for a float file."""
    onnx, _ = onnx_modules()
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if _META not in props:
        return None
    return {"method": props[_META], "factor_bytes": int(props[f"{_META}.factor_bytes"]),
            "float_factor_bytes": int(props[f"{_META}.float_factor_bytes"]),
            "relative_error": float(props[f"{_META}.relative_error"])}
