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

from ..onnxgraph import graphs, onnx_modules, subgraphs

__all__ = ["DTYPES", "FLOAT", "attributes", "graph_inputs", "name_nodes", "node_label", "opset_of", "read_model",
           "to_tensor", "walk_nodes"]

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


def _check_wiring(graph, path: Path, outer: frozenset = frozenset()) -> None:
    """Every node input is a graph input, an initializer, an earlier node's output or (in a
    subgraph) an outer value (the checker does not see truncated node lists); every graph output
    is made by someone; default domain only."""
    known = set(outer) | {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise ValueError(f"{path}: {node_label(node)}: operator domain {node.domain!r} is not supported "
                             "(only the default ONNX domain)")
        missing = [n for n in node.input if n not in known]
        if missing:
            raise ValueError(f"{path}: {node_label(node)} reads {missing[0]!r}, which no input, initializer or "
                             "earlier node provides (truncated or unsorted graph)")
        for sub in subgraphs(node):
            _check_wiring(sub, path, frozenset(known))
        known.update(node.output)
    absent = [o.name for o in graph.output if o.name not in known]
    if absent:
        raise ValueError(f"{path}: graph output {absent[0]!r} is made by no node")


def walk_nodes(graph) -> list:
    """Every node of ``graph`` and its subgraphs (``onnxgraph.graphs``' order: parents first)."""
    return [node for g in graphs(graph) for node in g.node]


def name_nodes(graph) -> dict[str, str]:
    """Give every node of ``graph`` and its subgraphs the name it goes by in mpolstm (layers,
    messages, the writer), in place, and return {that name: the name in the file}. A node keeps
    its name when no other node has it; an empty or repeated name (ONNX allows both) becomes
    ``<name or op>_<k>`` (``k``: the node's place in ``walk_nodes``). Names restore the file's."""
    nodes = walk_nodes(graph)
    counts: dict[str, int] = {}
    for node in nodes:
        counts[node.name] = counts.get(node.name, 0) + 1
    taken = {n for n, c in counts.items() if n and c == 1}
    originals = {}
    for k, node in enumerate(nodes):
        name = node.name
        if not name or counts[name] > 1:
            base = name = f"{node.name or node.op_type}_{k}"
            while name in taken:
                name = f"{base}_{len(taken)}"
            taken.add(name)
        originals[name] = node.name
        node.name = name
    return originals


def node_label(node, original: str | None = None) -> str:
    """How messages name a node: ``node 'GRU_14' (GRU)``; ``original``: its name in the file
    when mpolstm named it otherwise (``node 'rnn_3' (LSTM; 'rnn' in the file, not unique)``)."""
    if original is None or original == node.name:
        return f"node {node.name or '(unnamed)'!r} ({node.op_type})"
    where = f"{original!r} in the file, not unique" if original else "unnamed in the file"
    return f"node {node.name!r} ({node.op_type}; {where})"


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
    """A node's attributes as Python values (tensors as torch tensors; graph attributes, control
    flow's, as the GraphProto: ``load`` compiles them)."""
    onnx = _onnx()
    out: dict[str, Any] = {}
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            out[attr.name] = to_tensor(attr.t)
        elif attr.type == onnx.AttributeProto.GRAPH:
            out[attr.name] = attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            raise ValueError(f"attribute {attr.name!r} holds several graphs (not supported)")
        else:
            value = onnx.helper.get_attribute_value(attr)
            out[attr.name] = value.decode() if isinstance(value, bytes) else \
                [v.decode() if isinstance(v, bytes) else v for v in value] if isinstance(value, list) else value
    return out
