"""``save(model, path)``: an imported (and compressed, pruned or fine-tuned) model back to ONNX.

The written file is the original graph with only the layers' nodes changed, so its input and
output names, shapes and every other node stay as they were:

- a layer that is now an MPO module: its node (a fused MatMul + Add: both) is replaced by the
  graph ``mpolstm.export.export_onnx`` writes for the layer in the factorized runtime (products
  through the factors; a recurrent layer's loop over time as an ONNX Loop), or, with
  ``step=True``, by ``export_step``'s one-frame graph; a layer with a sparse residual (layout
  "lowrank+sparse") uses the dense runtime (the graph rebuilds its weight);
- a layer that is still its torch type (pruned, fine-tuned or untouched): its node keeps its op and
  gets the layer's current weights.

``step=True`` writes the streaming step instead: every recurrent node's initial state becomes a
graph input ``<node>.h0`` (``<node>.c0``) and its final state a graph output ``<node>.h_n``
(``<node>.c_n``), unless the graph already has them; the time axes of the graph's inputs and
outputs (found by running the model) are fixed to 1. Feed each frame with the states the last
call returned (zeros at the start).

The graph is checked by the ONNX checker and, when onnxruntime is installed, run against the torch
model (``check=True``): the whole-sequence graph at batch 1, 3+ and every length its inputs declare
dynamic (1, the example's, a longer one), the step graph on its example. ``int8=True`` means the
factors, as in every export: the MPO cores quantized (``mpolstm.quantize``, unless they are int8
already) and the compressed layers' MatMul weights stored as int8
(``onnxruntime.quantization.quantize_dynamic``: int8 factors and int8 products at run time);
``int8_dense=True`` stores every MatMul weight as int8, dense layers included (a model with no
compressed layer can only take this one). The file's metadata records which.
The file is written atomically; its metadata ``mpolstm`` (JSON) describes the MPO layers for
``mpolstm inspect``.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..atomic import atomic_write_bytes, check_target
from ..export import export_onnx, export_step
from ..export.trace import int8_model
from ..export.verify import INT8_RTOL, Axes, check_shapes
from ..mpo import MPO
from ..nn import is_mpo_module
from ..nn.sparse import sparse_parts
from ..onnxgraph import dedupe_tensors, graphs, onnx_modules, record_weight_bytes, referenced, subgraphs
from ..onnxgraph import dynamic_int8 as quantize_dynamic_int8
from .layers import step_recurrent
from .model import OnnxModel, Step
from .reader import name_nodes, walk_nodes
from .registry import LAYER_OPS
from .streaming import make_streaming

__all__ = ["METADATA_KEY", "dynamic_int8", "save", "to_bytes"]

METADATA_KEY = "mpolstm"
EXPORT_OPSET = (11, 20)  # the factorized graphs need Loop with scan outputs (11); torch writes up to 20


class _NodeForward(nn.Module):
    """``forward(*present inputs) -> present outputs`` of one node, computed by its layer."""

    def __init__(self, layer: nn.Module, step: Step) -> None:
        super().__init__()
        self.layer, self.spec, self.run = layer, step.spec, LAYER_OPS[step.op].run
        self.slots, self.count = [k for k, n in enumerate(step.inputs) if n], len(step.inputs)
        self.wanted = [k for k, n in enumerate(step.outputs) if n]

    def forward(self, *xs: Tensor):
        args: list[Tensor | None] = [None] * self.count
        for slot, x in zip(self.slots, xs):
            args[slot] = x
        outs = self.run(self.layer, self.spec, args)
        return outs[0] if self.wanted == [0] else tuple(outs[k] for k in self.wanted)


class _NodeStep(nn.Module):
    """``step(X, state) -> (Y, new state)``: one frame of a recurrent node (``export_step``'s contract)."""

    def __init__(self, layer: nn.Module, step: Step) -> None:
        super().__init__()
        self.layer, self.spec = layer, step.spec

    def step(self, frame: Tensor, state=None):
        return step_recurrent(self.layer, self.spec, frame, state)


def _rename(graph, rename, prefix: str) -> None:
    """Apply ``rename`` to every tensor name of ``graph`` and its subgraphs; prefix node names."""
    for node in graph.node:
        names = [rename(n) for n in node.input]
        del node.input[:]
        node.input.extend(names)
        names = [rename(n) for n in node.output]
        del node.output[:]
        node.output.extend(names)
        node.name = prefix + node.name
        for sub in subgraphs(node):
            _rename(sub, rename, prefix)
    for item in [*graph.initializer, *graph.input, *graph.output, *graph.value_info]:
        item.name = rename(item.name)


def _splice(graph, step: Step, sub, inputs: dict[str, str], outputs: dict[str, str]) -> None:
    """Replace the nodes of ``step`` by the graph ``sub`` whose inputs / outputs are wired to
    ``inputs`` / ``outputs`` ({sub name: outer name}); its other names get the node's prefix."""
    prefix = f"{step.name}/"
    wired = {**inputs, **outputs}
    _rename(sub.graph, lambda n: wired.get(n, f"{prefix}{n}") if n else "", prefix)
    nodes = list(graph.node)
    at = next(k for k, n in enumerate(nodes) if n.name in step.nodes)
    kept = [n for n in nodes if n.name not in step.nodes]
    del graph.node[:]
    graph.node.extend(kept[:at] + list(sub.graph.node) + kept[at:])
    graph.initializer.extend(sub.graph.initializer)


def _export_layer(layer: nn.Module, step: Step, values: dict[str, Tensor], opset: int, streaming: bool, folder: Path):
    """(the layer's graph, {its input name: outer}, {its output name: outer}) for a spliced node."""
    onnx, _ = onnx_modules()
    path = folder / f"{len(list(folder.iterdir()))}.onnx"
    present = [n for n in step.inputs if n]
    if streaming and LAYER_OPS[step.op].recurrent:
        states = [n for n in step.inputs[1:] if n]
        export_step(_NodeStep(layer, step), path, frame=values[step.inputs[0]], opset=opset)
        inputs = {"frame": step.inputs[0], **{f"state{k}": n for k, n in enumerate(states)}}
        outs = {"output": step.outputs[0], **{f"new_state{k}": n for k, n in enumerate(step.outputs[1:])}}
        return onnx.load(str(path)), inputs, {k: v for k, v in outs.items() if v}
    runtime = "dense" if sparse_parts(layer) else "factorized"
    export_onnx(_NodeForward(layer, step), tuple(values[n] for n in present), path, opset=opset, runtime=runtime)
    wanted = [n for n in step.outputs if n]
    return (onnx.load(str(path)), {f"input{k}": n for k, n in enumerate(present)},
            {f"output{k}": n for k, n in enumerate(wanted)})


def _initializer(graph, name: str, value: Tensor, like: str | None) -> str:
    """Add ``value`` as the initializer ``name`` (in the dtype of the initializer ``like``, else float32)."""
    _, numpy_helper = onnx_modules()
    dtype = np.float32
    for t in graph.initializer:
        if t.name == like:
            dtype = numpy_helper.to_array(t).dtype
    graph.initializer.append(numpy_helper.from_array(value.detach().cpu().numpy().astype(dtype), name))
    return name


def _write_dense(graph, step: Step, layer: nn.Module) -> None:
    """Point the step's nodes at the dense layer's current weights (new initializers)."""
    nodes = {n.name: n for n in graph.node if n.name in step.nodes}
    LAYER_OPS[step.op].write(nodes, step, layer, lambda key, value, like: _initializer(graph, f"{step.name}/{key}",
                                                                                    value, like))


def _prune(graph) -> None:
    """Drop the nodes whose outputs nobody reads, the initializers nobody reads and value_info."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed |= referenced(node)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    del graph.value_info[:]


def _describe(model: OnnxModel) -> list[dict[str, Any]]:
    """One entry per MPO weight of the model's layers (what ``mpolstm inspect`` shows)."""
    rows = []
    for name, step in model.layers.items():
        layer = getattr(model, name)
        if not is_mpo_module(layer):
            continue
        sparse = sparse_parts(layer)
        for weight, cores in layer.mpo_weights().items():
            mpo = MPO([c.detach().double() for c in cores])
            rows.append({"node": step.name, "layer": name, "class": type(layer).__name__, "weight": weight,
                         "in_factors": list(mpo.in_factors), "out_factors": list(mpo.out_factors),
                         "bonds": list(mpo.bond_dims), "params": mpo.num_params,
                         "sparse": sparse[weight].nnz if weight in sparse else 0,
                         "entropy": [round(float(e), 4) for e in mpo.entanglement_entropy()]})
    return rows


def _state_shapes(states: dict[str, Step], values: dict[str, Tensor]) -> dict[str, tuple[int, int, int]]:
    """{state input: its shape} on the example inputs (the batch size read from the node's input)."""
    shapes = {}
    for name, step in states.items():
        spec = step.spec
        batch = values[step.inputs[0]].shape[1 - spec.layout]
        shapes[name] = (spec.directions, batch, spec.hidden) if spec.layout == 0 else (batch, spec.directions,
                                                                                       spec.hidden)
    return shapes


def _declared_axes(model: OnnxModel, examples: tuple[Tensor, ...]) -> Axes:
    """The graph inputs' dynamic axes (a named dimension is one group across inputs, an unnamed one its own)."""
    groups: dict = {}
    for i, spec in enumerate(model.inputs):
        for d, dim in enumerate(spec.dims[:examples[i].dim()]):
            if not isinstance(dim, int):
                groups.setdefault(dim if dim else (i, d), []).append((i, d))
    return Axes({members[0]: members for members in groups.values()}, [], [])


def _check(data: bytes, model: OnnxModel, examples: tuple[Tensor, ...], states: dict[str, tuple], axes: Axes,
           rtol: float) -> None:
    """Run the written graph in onnxruntime (when installed) against the torch model at every shape of
    ``axes`` (:func:`~mpolstm.export.verify.check_shapes`; a step graph: none, its example only);
    ``states``: the shapes of the state inputs the graph adds (fed zeros, as the model starts)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    zeros = {n: np.zeros(shape, np.float32) for n, shape in states.items()}

    def run(inputs: tuple[Tensor, ...]) -> list[Tensor]:
        feeds = {**{n: x.numpy() for n, x in zip(model.input_names, inputs)}, **zeros}
        return [torch.from_numpy(y) for y in session.run(model.output_names, feeds)]

    _, problems = check_shapes(run, model, examples, axes, rtol)
    if problems:
        raise ValueError(f"the written graph does not reproduce the model in onnxruntime: {problems[0]}")


def dynamic_int8(data: bytes, weights: set[str] | None = None) -> bytes:
    """The ONNX model ``data`` with the weights of its MatMuls as int8 (onnxruntime's dynamic
    quantization: int8 weights, activations quantized per call, int8 products): those reading one of
    ``weights`` (initializer names; None: every MatMul)."""
    onnx, _ = onnx_modules()
    graph = onnx.load_from_string(data).graph
    skip = [] if weights is None else [n.name for n in graph.node if not weights & set(n.input)]
    return quantize_dynamic_int8(data, skip)


def _check_layers(model: OnnxModel) -> None:
    for name, step in model.layers.items():
        layer = getattr(model, name)
        if not is_mpo_module(layer) and not isinstance(layer, LAYER_OPS[step.op].torch_types):
            raise ValueError(f"layer {name!r} (node {step.name!r}) is a {type(layer).__name__}; ONNX writing "
                             "takes MPO layers and torch layers of the node's own type")


def _layers_into(graph, work: OnnxModel, values: dict[str, Tensor], opset: int, rewired: dict[str, Step] | None
                 ) -> set[str]:
    """Splice every MPO layer's graph in, write every dense layer's weights; ``rewired``: the
    recurrent steps of a streaming graph (None for the whole-sequence graph). Returns the names of
    the MPO layers' initializers (their factors)."""
    factors: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        for name, step in work.layers.items():
            step = (rewired or {}).get(name, step)
            layer, owner = getattr(work, name), _owner(graph, step.nodes[0])
            if is_mpo_module(layer):
                sub, inputs, outputs = _export_layer(layer, step, values, opset, rewired is not None, Path(tmp))
                _splice(owner, step, sub, inputs, outputs)
                factors |= {t.name for t in sub.graph.initializer}
            else:
                _write_dense(owner, step, layer)
    return factors


def _owner(graph, name: str):
    """The graph (``graph`` or one of its subgraphs) that holds the node ``name``."""
    return next((g for g in graphs(graph) if any(n.name == name for n in g.node)), None)


def _int8_work(work: OnnxModel, int8: bool) -> OnnxModel:
    """``work`` with int8 MPO cores when ``int8`` (:func:`mpolstm.quantize`, unless it has them already);
    ValueError, naming what works, when no layer is compressed."""
    if not int8:
        return work
    if not any(is_mpo_module(getattr(work, name)) for name in work.layers):
        raise ValueError("int8=True stores the MPO factors in int8, but no layer of the model is compressed: "
                         "compress it first, or pass int8_dense=True (--int8-dense) for int8 weights of its "
                         "dense MatMuls")
    quantized = int8_model(work, True)
    assert isinstance(quantized, OnnxModel)  # a quantized copy keeps its type
    return quantized


def to_bytes(model: OnnxModel, *, step: bool = False, int8: bool = False, check: bool = True,
             record: dict[str, Any] | None = None, int8_dense: bool = False) -> bytes:
    """The ONNX file :func:`save` writes, as bytes."""
    if not isinstance(model, OnnxModel):
        raise ValueError(f"mpolstm.onnx writes a model read by mpolstm.onnx.load, got {type(model).__name__}")
    _check_layers(model)
    onnx, _ = onnx_modules()
    with torch.no_grad():  # weights a forward pre-hook made with grad (pruning in training) cannot be copied
        model(*model.example_inputs())
    work = _int8_work(copy.deepcopy(model).float().eval(), int8)
    proto = onnx.load_from_string(work.source)
    originals = name_nodes(proto.graph)  # the names load gave; the file's come back below
    opset = min(max(work.opset, EXPORT_OPSET[0]), EXPORT_OPSET[1])
    if work.opset < EXPORT_OPSET[0]:
        proto = onnx.version_converter.convert_version(proto, EXPORT_OPSET[0])
    inner = [s.name for s in work.layers.values() if _owner(proto.graph, s.nodes[0]) is not proto.graph]
    if step and inner:
        raise ValueError(f"node {inner[0]!r} is inside a subgraph (If / Loop / Scan); the streaming step "
                         "(step=True) takes the layers of the main graph only")
    rewired, states, sizes = make_streaming(proto.graph, work) if step else (None, {}, {})
    examples = work.example_inputs(sizes)
    with torch.no_grad():
        values = work.values(*examples, explore=True)
    factors = _layers_into(proto.graph, work, values, opset, rewired)
    _prune(proto.graph)
    dedupe_tensors(proto)  # layers exported one by one: a tied or shared weight, once
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = max(entry.version, opset)
    proto.ir_version = max(proto.ir_version, 7)
    facts = {"step": step, "int8": int8, "int8_dense": int8_dense, "layers": _describe(work),
             "source": model.source_name, **(record or {})}
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(facts))
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ValueError(f"the written graph fails the ONNX checker ({str(exc).strip().splitlines()[0]})") from exc
    data = proto.SerializeToString()
    if int8 or int8_dense:
        data = dynamic_int8(data, None if int8_dense else factors)
    if check:  # with mpolstm's unique node names: onnxruntime refuses repeated ones, which ONNX allows
        _check(data, work, examples, _state_shapes(states, values), Axes() if step else _declared_axes(work, examples),
               INT8_RTOL if int8 or int8_dense else 1e-3)
    proto = onnx.load_from_string(data)
    for node in walk_nodes(proto.graph):
        node.name = originals.get(node.name, node.name)
    return record_weight_bytes(proto.SerializeToString())


def with_record(data: bytes, facts: dict[str, Any]) -> bytes:
    """The ONNX file ``data`` (from :func:`to_bytes`) with ``facts`` added to its mpolstm metadata."""
    onnx, _ = onnx_modules()
    proto = onnx.load_from_string(data)
    entry = next(p for p in proto.metadata_props if p.key == METADATA_KEY)
    entry.value = json.dumps({**json.loads(entry.value), **facts})
    return proto.SerializeToString()


def save(model: OnnxModel, path: str | os.PathLike, *, step: bool = False, int8: bool = False,
         check: bool = True, record: dict[str, Any] | None = None, overwrite: bool = False,
         int8_dense: bool = False) -> Path:
    """Write ``model`` (from :func:`mpolstm.onnx.load`, then compressed, pruned or fine-tuned) as
    an ONNX file at ``path``; see the module docstring. ``record``: extra JSON-able facts stored in
    the metadata beside the layer descriptions (``mpolstm compress`` stores its report). As every
    output of mpolstm: an existing file is refused unless ``overwrite``, missing parents are created,
    the file is written atomically. Returns ``path``."""
    path = Path(path)
    check_target(path, overwrite, folder=False)
    data = to_bytes(model, step=step, int8=int8, check=check, record=record, int8_dense=int8_dense)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path
