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

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..nn.base import MPOWeights
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


def _graphs(graph) -> list:
    """``graph`` and every subgraph in it (a Loop's body), depth first."""
    out = [graph]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                out += _graphs(attr.g)
    return out


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
    for graph in _graphs(model.graph):
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
    import numpy as np
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(0)
    probe = tuple(torch.randn(x.shape, generator=gen, dtype=x.dtype) if x.is_floating_point() else x for x in inputs)
    with torch.no_grad():
        expected = module(*probe)
    expected = flatten(expected)
    got = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(
        None, dict(zip(names, (x.numpy() for x in probe))))
    diff = sum(float(np.sum((g - e.numpy()) ** 2)) for g, e in zip(got, expected))
    norm = sum(float(np.sum(e.numpy() ** 2)) for e in expected)
    return (diff / norm) ** 0.5 if norm > 0 else diff ** 0.5


def constants_as_initializers(graph, min_size: int = 16) -> None:
    """Turn every Constant tensor of at least ``min_size`` entries of ``graph`` (the factorized runtime's
    merged halves) into an initializer, in place: the same graph, but weights where tools look for them
    (``onnxruntime.quantization.quantize_dynamic`` quantizes initializers only)."""
    import onnx
    from onnx import numpy_helper

    kept = []
    for node in graph.node:
        value = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if value is not None and value.type == onnx.AttributeProto.TENSOR and \
                numpy_helper.to_array(value.t).size >= min_size:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def int8_onnx(data: bytes, module: nn.Module, inputs: tuple[torch.Tensor, ...], input_names: list[str]) -> bytes:
    """The ONNX file ``data`` (exported from ``module``, the export copy, on ``inputs``) with the factors
    of its int8 MPO modules stored and multiplied in int8 (module docstring), and its metadata
    recording the bytes and the error (:func:`int8_report`)."""
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ModuleNotFoundError as exc:
        raise ValueError(f"the int8 ONNX export needs {exc.name}: pip install 'mpolstm[export]' (or pass "
                         "int8=False for float32 factors)") from None
    from onnx import numpy_helper

    model = onnx.load_from_string(data)
    for graph in reversed(_graphs(model.graph)):  # subgraphs first: lifting a graph rewrites its nodes
        constants_as_initializers(graph)
    factors = _factors(module)
    names = {t.name for g in _graphs(model.graph) for t in g.initializer if _is_factor(numpy_helper.to_array(t), factors)}
    for graph in _graphs(model.graph):
        _gemms_as_matmuls(graph, names)
    products = [n for g in _graphs(model.graph) for n in g.node if n.op_type in ("MatMul", "Gemm")]
    others = [n.name for n in products if not names & set(n.input)]  # layers the model keeps in float
    if len(others) == len(products):
        raise ValueError("found no product of an int8 MPO module in the exported graph to quantize; pass int8=False "
                         "for float32 factors")
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        onnx.save(model, str(source))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)  # onnxruntime logs a pre-processing hint per call
            try:
                quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, nodes_to_exclude=others,
                                 extra_options={"EnableSubgraph": True})
            finally:
                logging.disable(logging.NOTSET)
        quantized = onnx.load(str(target))
    sizes = _factor_bytes(quantized, names)
    error = _relative_error(quantized.SerializeToString(), module, inputs, input_names)
    onnx.helper.set_model_props(quantized, {_META: "dynamic", f"{_META}.factor_bytes": str(sizes["int8"]),
                                            f"{_META}.float_factor_bytes": str(sizes["float32"]),
                                            f"{_META}.relative_error": f"{error:.3g}"})
    return quantized.SerializeToString()


def int8_report(path: str | Path) -> dict[str, Any] | None:
    """What :func:`int8_onnx` recorded in the ONNX file ``path``: {"method", "factor_bytes" (int8),
    "float_factor_bytes" (factors onnxruntime left float32), "relative_error"}; None for a float file."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if _META not in props:
        return None
    return {"method": props[_META], "factor_bytes": int(props[f"{_META}.factor_bytes"]),
            "float_factor_bytes": int(props[f"{_META}.float_factor_bytes"]),
            "relative_error": float(props[f"{_META}.relative_error"])}
