"""Reading an ONNX file: the checks every later step relies on, tensors and attributes as torch values.

Everything here imports ``onnx`` inside the functions (the library imports only torch, numpy and
safetensors at import time). Every refusal is a ValueError of one line that names the file, and
the node and op where there is one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..onnxgraph import onnx_modules

__all__ = ["DTYPES", "FLOAT", "attributes", "graph_inputs", "node_label", "opset_of", "read_model", "to_tensor"]

FLOAT = 1  # onnx.TensorProto.FLOAT: follows the module's float dtype (float64 after model.double())
DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
          9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}
"""ONNX element type -> torch dtype (the types the interpreter computes in)."""

# operator sets the interpreter reads (the default domain); newer ones may change an op's meaning
MIN_OPSET, MAX_OPSET = 7, 22


def _onnx():
    return onnx_modules("mpolstm.onnx's readers and writers")[0]


def read_model(path: str | os.PathLike):
    """The checked ``onnx.ModelProto`` of ``path`` (external data loaded beside it). Refuses a
    missing file, one that is not ONNX or is truncated, a graph the ONNX checker rejects or whose
    nodes read a tensor nobody makes, an operator set outside 7-22 and any domain but the default."""
    onnx = _onnx()
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file (expected an ONNX model)")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ValueError(f"{path}: not a readable ONNX model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    if not model.graph.node:
        raise ValueError(f"{path}: not an ONNX model with a graph (no node read; truncated or another format)")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ValueError(f"{path}: the ONNX checker rejects it ({str(exc).strip().splitlines()[0]})") from None
    opset = opset_of(model)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"{path}: operator set {opset}; mpolstm.onnx reads operator sets {MIN_OPSET}-{MAX_OPSET}")
    _check_wiring(model.graph, path)
    return model


def opset_of(model) -> int:
    """The model's version of the default ("" / "ai.onnx") operator set."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _check_wiring(graph, path: Path) -> None:
    """Every node input is a graph input, an initializer or an earlier node's output (the checker
    does not see truncated node lists); every graph output is made by someone; default domain only."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise ValueError(f"{path}: {node_label(node)}: operator domain {node.domain!r} is not supported "
                             "(only the default ONNX domain)")
        missing = [n for n in node.input if n not in known]
        if missing:
            raise ValueError(f"{path}: {node_label(node)} reads {missing[0]!r}, which no input, initializer or "
                             "earlier node provides (truncated or unsorted graph)")
        known.update(node.output)
    absent = [o.name for o in graph.output if o.name not in known]
    if absent:
        raise ValueError(f"{path}: graph output {absent[0]!r} is made by no node")


def node_label(node) -> str:
    """How messages name a node: ``node 'GRU_14' (GRU)``."""
    return f"node {node.name or '(unnamed)'!r} ({node.op_type})"


def graph_inputs(graph) -> list:
    """The graph's real inputs (ValueInfoProto), without initializers listed as inputs (IR < 4)."""
    initializers = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in initializers]


def to_tensor(proto) -> Tensor:
    """An ONNX TensorProto as a torch tensor (a copy, so it is writable)."""
    from onnx import numpy_helper

    array = numpy_helper.to_array(proto)
    if array.dtype == object or array.dtype.kind in "SUO":
        raise ValueError(f"tensor {proto.name!r} holds strings; mpolstm.onnx computes on numbers only")
    return torch.from_numpy(np.array(array, copy=True))


def attributes(node) -> dict[str, Any]:
    """A node's attributes as Python values (tensors as torch tensors). Graph attributes (control
    flow) are refused by the caller before this is reached."""
    onnx = _onnx()
    out = {}
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            out[attr.name] = to_tensor(attr.t)
        elif attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            raise ValueError(f"{node_label(node)}: control flow (a graph attribute) is not supported")
        else:
            value = onnx.helper.get_attribute_value(attr)
            out[attr.name] = value.decode() if isinstance(value, bytes) else \
                [v.decode() if isinstance(v, bytes) else v for v in value] if isinstance(value, list) else value
    return out
