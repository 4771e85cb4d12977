"""ONNX graph helpers that ``mpolstm.export`` and ``mpolstm.onnx`` share (below both; imports ``onnx``
and ``onnxruntime`` inside the functions): the lazy imports, walking a graph with its subgraphs (the
bodies of Loop / If / Scan), large constants to initializers, the weight bytes of a file, running a
file in onnxruntime against torch outputs and onnxruntime's dynamic int8 quantization."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["WEIGHT_BYTES_KEY", "check_outputs", "constants_as_initializers", "dedupe_tensors", "dynamic_int8",
           "graphs", "onnx_modules", "record_weight_bytes", "referenced", "relative_error", "run_onnxruntime",
           "subgraphs", "weight_bytes"]


def onnx_modules(what: str = "ONNX files"):
    """``(onnx, onnx.numpy_helper)``; ImportError naming the install when onnx is missing."""
    try:
        import onnx
        from onnx import numpy_helper
    except ModuleNotFoundError as exc:
        raise ImportError(f"{what} need the onnx package: pip install 'mpolstm[export]'") from exc
    return onnx, numpy_helper


def subgraphs(node) -> list:
    """The graphs held by ``node``'s attributes (a Loop's or Scan's body, an If's branches)."""
    out = []
    for attr in node.attribute:
        out += ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
    return out


def graphs(graph) -> list:
    """``graph`` and every subgraph in it, depth first (parents before their subgraphs)."""
    out = [graph]
    for node in graph.node:
        for sub in subgraphs(node):
            out += graphs(sub)
    return out


def referenced(node) -> set[str]:
    """Every name ``node`` reads, its subgraphs' reads (outer-scope names included) too."""
    names = set(node.input)
    for sub in subgraphs(node):
        for inner in sub.node:
            names |= referenced(inner)
    return names


def constants_as_initializers(graph, min_size: int = 16) -> None:
    """Turn every Constant tensor of at least ``min_size`` entries of ``graph`` (the factorized runtime's
    merged halves) into an initializer, in place: the same graph, but weights where tools look for them
    (``onnxruntime.quantization.quantize_dynamic`` quantizes initializers only)."""
    onnx, numpy_helper = onnx_modules()
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


def weight_bytes(model) -> int:
    """Bytes of the weights the ONNX ``model`` (a ModelProto) holds: initializers and Constant tensors
    of every graph; a sparse initializer counts as the dense tensor onnxruntime makes of it."""
    import math

    _, numpy_helper = onnx_modules()
    total = 0
    for graph in graphs(model.graph):
        total += sum(numpy_helper.to_array(t).nbytes for t in graph.initializer)
        total += sum(math.prod(t.dims) * numpy_helper.to_array(t.values).itemsize for t in graph.sparse_initializer)
        total += sum(numpy_helper.to_array(a.t).nbytes for n in graph.node for a in n.attribute if a.type == a.TENSOR)
    return total


WEIGHT_BYTES_KEY = "mpolstm.weight_bytes"


def record_weight_bytes(data: bytes) -> bytes:
    """The ONNX file ``data`` with its weight bytes (:func:`weight_bytes`) in its metadata under
    ``mpolstm.weight_bytes`` (replacing an earlier record)."""
    onnx, _ = onnx_modules()
    model = onnx.load_from_string(data)
    props = {p.key: p.value for p in model.metadata_props if p.key != WEIGHT_BYTES_KEY}
    onnx.helper.set_model_props(model, {**props, WEIGHT_BYTES_KEY: str(weight_bytes(model))})
    return model.SerializeToString()


def run_onnxruntime(data: bytes, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None
                    ) -> list[np.ndarray]:
    """The outputs of the ONNX file ``data`` run by onnxruntime's CPU provider on ``feeds``
    (ModuleNotFoundError when onnxruntime is not installed)."""
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None if outputs is None else list(outputs), feeds)


def relative_error(got: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> float:
    """||got - expected|| / ||expected|| over every output together (the absolute norm when it is 0)."""
    diff = sum(float(np.sum((np.asarray(g, np.float64) - e) ** 2)) for g, e in zip(got, expected))
    norm = sum(float(np.sum(np.asarray(e, np.float64) ** 2)) for e in expected)
    return (diff / norm) ** 0.5 if norm > 0 else diff ** 0.5


def check_outputs(got: Sequence[np.ndarray], expected: Sequence[np.ndarray], names: Sequence[str],
                  rtol: float = 1e-3, atol: float = 1e-4) -> None:
    """ValueError naming the first output of onnxruntime's ``got`` that differs from torch's ``expected``."""
    for name, g, w in zip(names, got, expected, strict=True):
        if g.shape != w.shape or not np.allclose(g, w, rtol=rtol, atol=atol):
            diff = float(np.abs(g - w).max()) if g.shape == w.shape else f"shape {g.shape} vs {w.shape}"
            raise ValueError(f"the written graph does not reproduce the model's output {name!r} in onnxruntime "
                             f"(max difference {diff})")


def dynamic_int8(data: bytes, exclude: Sequence[str] = (), subgraphs: bool = False) -> bytes:
    """The ONNX model ``data`` with its MatMul weights as int8 by onnxruntime's dynamic quantization (int8
    weights with one scale each, activations quantized per call, int8 products); ``exclude``: node names
    left float; ``subgraphs``: inside Loop bodies too."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ModuleNotFoundError as exc:
        raise ValueError(f"int8 ONNX weights need {exc.name}: pip install 'mpolstm[export]' (or write float32 "
                         "weights: int8=False)") from None
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        source.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)  # onnxruntime logs a pre-processing hint per call
            try:
                quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude),
                                 extra_options={"EnableSubgraph": subgraphs})
            finally:
                logging.disable(logging.NOTSET)
        return target.read_bytes()



def _held(tree: list, min_size: int) -> list[tuple[int, str, np.ndarray]]:
    """(graph index in ``tree``, name, values) of every initializer and Constant node tensor of at least
    ``min_size`` entries in the graphs ``tree``."""
    _, numpy_helper = onnx_modules()
    out = []
    for k, graph in enumerate(tree):
        tensors = [(t.name, t) for t in graph.initializer]
        tensors += [(n.output[0], n.attribute[0].t) for n in graph.node if n.op_type == "Constant" and
                    len(n.attribute) == 1 and n.attribute[0].type == n.attribute[0].TENSOR]
        out += [(k, name, numpy_helper.to_array(t)) for name, t in tensors if np.prod(t.dims) >= min_size]
    return out


def _drop(graph, names: set[str]) -> None:
    """Delete the initializers and Constant nodes named ``names`` from ``graph``."""
    kept = [t for t in graph.initializer if t.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] in names)]
    del graph.node[:]
    graph.node.extend(nodes)


def _drop_all(model, drop: dict[int, set[str]]) -> None:
    """:func:`_drop` ``drop[k]`` from the k-th graph of ``graphs(model.graph)``, the graphs looked up
    afresh each time: rewriting a graph's nodes copies them, so a subgraph found before is stale after."""
    for k, names in drop.items():
        _drop(graphs(model.graph)[k], names)


def dedupe_tensors(model, min_size: int = 16) -> int:
    """Store every weight once, in place: initializers and Constant tensors (of at least ``min_size``
    entries, in any graph, a Loop's body too) with the same dtype and values become one initializer of
    the main graph that every reader reads (copies deleted, readers rewired; a copy of another shape
    becomes a Reshape of it). Returns the bytes saved."""
    onnx, numpy_helper = onnx_modules()
    tree = graphs(model.graph)
    interface = {v.name for g in tree for v in [*g.input, *g.output]}
    groups: dict[tuple, list] = {}
    seen: set[tuple[int, str]] = set()
    for k, name, array in _held(tree, min_size):
        if name not in interface and (k, name) not in seen:  # a name held twice in one graph: one entry
            seen.add((k, name))
            groups.setdefault((array.dtype.str, array.tobytes()), []).append((k, name, array))
    top = {t.name for t in model.graph.initializer}
    drop: dict[int, set[str]] = {}
    renames, hoisted, saved = {}, [], 0
    for copies in (c for c in groups.values() if len(c) > 1):
        keep = next((c for c in copies if c[0] == 0 and c[1] in top), copies[0])
        if keep[0] != 0 or keep[1] not in top:  # the kept copy becomes an initializer of the main graph
            drop.setdefault(keep[0], set()).add(keep[1])
            hoisted.append(numpy_helper.from_array(keep[2], keep[1]))
        for k, name, array in (c for c in copies if c is not keep):
            drop.setdefault(k, set()).add(name)
            saved += array.nbytes
            if array.shape == keep[2].shape:
                renames[name] = keep[1]
                continue
            shape = numpy_helper.from_array(np.asarray(array.shape, np.int64), f"{name}_shape")
            tree[k].initializer.append(shape)
            tree[k].node.insert(0, onnx.helper.make_node("Reshape", [keep[1], shape.name], [name]))
    _drop_all(model, drop)
    model.graph.initializer.extend(hoisted)
    for graph in graphs(model.graph):
        for node in graph.node:
            for slot, name in enumerate(node.input):
                node.input[slot] = renames.get(name, name)
    return saved + _transposed_copies(model, min_size)


def _transposed_copies(model, min_size: int) -> int:
    """Replace every matrix that is another held tensor (a main-graph initializer, read as a matrix)
    transposed, as a traced product reads a factor, by a Transpose of that one, in place; returns the
    bytes saved."""
    onnx, numpy_helper = onnx_modules()
    tree = graphs(model.graph)
    interface = {v.name for g in tree for v in [*g.input, *g.output]}
    held = [(k, name, a) for k, name, a in _held(tree, min_size) if name not in interface]
    top = {t.name for t in model.graph.initializer}
    originals = {}
    for k, name, a in held:
        matrix = a.squeeze() if a.ndim > 2 else a
        if k == 0 and name in top and matrix.ndim == 2:
            originals[(a.dtype.str, matrix.shape, matrix.tobytes())] = (name, a.shape)
    saved: int = 0
    drop: dict[int, set[str]] = {}
    sources: set[str] = set()
    for k, name, array in held:
        found = None if array.ndim != 2 else originals.get((array.dtype.str, array.shape[::-1], array.T.tobytes()))
        if found is None or found[0] == name or name in sources or found[0] in drop.get(0, set()):
            continue  # (a pair of mutual transposes keeps one of the two)
        source, nodes = found[0], []
        sources.add(source)
        if len(found[1]) != 2:  # read the original as the matrix it holds
            shape = numpy_helper.from_array(np.asarray(array.shape[::-1], np.int64), f"{name}_matrix_shape")
            tree[k].initializer.append(shape)
            nodes.append(onnx.helper.make_node("Reshape", [source, shape.name], [f"{name}_matrix"]))
            source = f"{name}_matrix"
        nodes.append(onnx.helper.make_node("Transpose", [source], [name], perm=[1, 0]))
        for node in reversed(nodes):
            tree[k].node.insert(0, node)
        drop.setdefault(k, set()).add(name)
        saved += array.nbytes
    _drop_all(model, drop)
    return saved
