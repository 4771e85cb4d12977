"""``load(path) -> OnnxModel``: an ONNX graph as an nn.Module whose recurrent, linear and conv
nodes are torch layers (the table ``registry.LAYER_OPS``, the math in ``layers.py``) and whose other nodes run in a small interpreter
(``ops.py``, ``shapes.py``).

The layers are submodules named after their nodes (``model.GRU_14``: an nn.GRU), so
``mpolstm.compress``, ``mpolstm.prune`` and ``mpolstm.distill`` work on the model as on any torch
model; ``mpolstm.onnx.save`` writes it back. Initializers that are not a layer's weights are
buffers (they follow ``model.double()``); ONNX FLOAT tensors the graph makes (Constant,
ConstantOfShape, Cast) take the model's float dtype.
"""

from __future__ import annotations

import keyword
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..onnxgraph import subgraphs
from . import indexing, quantized, sequences, shapes  # noqa: F401  (register their operators)
from .control import Subgraph, outer_names
from .ops import OPS, Ctx
from .reader import attributes, graph_inputs, name_nodes, node_label, opset_of, read_model, to_tensor
from .registry import LAYER_OPS, Site

__all__ = ["InputSpec", "OnnxModel", "Step", "load"]

# sizes given to the graph's named (dynamic) axes in example inputs: distinct, so a time axis can be told apart
EXAMPLE_SIZES = (5, 7, 11, 13, 17, 19, 23, 29)


@dataclass(frozen=True)
class Step:
    """One step of the program: an interpreted ONNX node (``layer`` None) or a torch layer that
    computes the nodes ``nodes`` (a MatMul and its fused Add, or one node)."""

    name: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    layer: str | None = None
    spec: Any = None
    nodes: tuple[str, ...] = ()


@dataclass(frozen=True)
class InputSpec:
    """A graph input: its name, ONNX element type and dims (int, a named axis str, or None)."""

    name: str
    elem_type: int
    dims: tuple[int | str | None, ...]


class OnnxModel(nn.Module):
    """The imported graph. ``forward(*inputs)`` takes the graph's inputs in order and returns its
    output (one) or outputs (a tuple), in order. ``layers`` maps each torch layer's attribute
    name to its node; ``input_names`` / ``output_names`` are the graph's."""

    def __init__(self, steps: list[Step], layers: dict[str, nn.Module], constants: dict[str, Tensor],
                 inputs: list[InputSpec], output_names: list[str], opset: int, source: bytes) -> None:
        super().__init__()
        self.steps, self.inputs, self.output_names, self.opset = steps, inputs, output_names, opset
        self.source = source  # the original file's bytes: the writer starts from them
        self.source_name: str | None = None  # the file's name (load sets it; the writer records it)
        for name, layer in layers.items():
            self.add_module(name, layer)
        self.constants = nn.Module()
        self.constant_names = list(constants)
        for k, value in enumerate(constants.values()):
            self.constants.register_buffer(f"c{k}", value)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def layers(self) -> dict[str, Step]:
        """{attribute name of a torch layer: its step}."""
        return {s.layer: s for s in _all_steps(self.steps) if s.layer is not None}

    def float_dtype(self) -> torch.dtype:
        tensor = next((t for t in [*self.parameters(), *self.buffers()] if t.is_floating_point()), None)
        return torch.float32 if tensor is None else tensor.dtype

    def values(self, *inputs: Tensor, explore: bool = False) -> dict[str, Tensor]:
        """Every tensor of the graph, by name, on ``inputs`` (``explore``: those of its subgraphs
        too, the branches an If does not take included: the writer exports the layers inside them)."""
        if len(inputs) != len(self.inputs):
            raise ValueError(f"the model takes {len(self.inputs)} input(s) {self.input_names}, got {len(inputs)}")
        env: dict[str, Tensor] = {name: getattr(self.constants, f"c{k}") for k, name in enumerate(self.constant_names)}
        env.update(zip(self.input_names, inputs))
        ctx = Ctx(self.opset, self.float_dtype(), self._run, env if explore else None, explore)
        for step in self.steps:
            args = [env[n] if n else None for n in step.inputs]
            try:
                results = self._run(step, args, ctx)
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                raise ValueError(f"node {step.name!r} ({step.op}): {str(exc).strip().splitlines()[0]}") from exc
            missing = [n for n in step.outputs[len(results):] if n]
            if missing:
                raise ValueError(f"node {step.name!r} ({step.op}): output {missing[0]!r} is not supported")
            env.update((n, r) for n, r in zip(step.outputs, results) if n and r is not None)
        return env

    def _run(self, step: Step, args: list[Tensor | None], ctx: Ctx) -> list[Tensor | None]:
        if step.layer is None:
            out = OPS[step.op](ctx, args, step.attrs)
            return list(out) if isinstance(out, (list, tuple)) else [out]
        return LAYER_OPS[step.op].run(getattr(self, step.layer), step.spec, args)

    def forward(self, *inputs: Tensor):
        env = self.values(*inputs)
        outputs = tuple(env[n] for n in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs

    def example_inputs(self, sizes: dict[str, int] | None = None, seed: int = 0) -> tuple[Tensor, ...]:
        """Inputs of the declared shapes: named axes get ``sizes[name]`` or distinct sizes from
        EXAMPLE_SIZES; floats are standard normal, integers and booleans zero."""
        sizes = dict(sizes or {})
        free = iter(s for s in EXAMPLE_SIZES if s not in sizes.values())
        gen = torch.Generator().manual_seed(seed)
        out = []
        for spec in self.inputs:
            dims = []
            for d in spec.dims:
                if isinstance(d, int):
                    dims.append(d)
                else:
                    key = d or f"{spec.name}:{len(dims)}"
                    sizes.setdefault(key, next(free))
                    dims.append(sizes[key])
            dtype = self.float_dtype() if spec.elem_type == 1 else _dtype(spec.elem_type)
            out.append(torch.randn(dims, generator=gen, dtype=dtype) if dtype.is_floating_point
                       else torch.zeros(dims, dtype=dtype))
        return tuple(out)

    def synthetic_batch(self, gen: torch.Generator, frames: int = 32) -> Any:
        """Random inputs for the output-error estimate without the user's data (compression.checks):
        ``example_inputs``, or for a per-frame graph a FrameSequence of ``frames`` random frames, the
        states carried from zero (one frame with random states says little about a recurrence)."""
        from .frames import FrameSequence, state_pairs  # frames imports this module

        seed = int(torch.randint(0, 2 ** 31 - frames, (1,), generator=gen))
        pairs = state_pairs(self)
        if not pairs:
            return self.example_inputs(seed=seed)
        steps = [self.example_inputs(seed=seed + t) for t in range(frames)]
        states = {i for i, _ in pairs}
        data = [k for k in range(len(self.inputs)) if k not in states]
        return FrameSequence(tuple(torch.stack([step[k] for step in steps]) for k in data), pairs)


def _all_steps(steps: list[Step]):
    """The steps and those of their subgraphs (control flow), depth first."""
    for step in steps:
        yield step
        for value in step.attrs.values():
            if isinstance(value, Subgraph):
                yield from _all_steps(value.steps)


def _dtype(elem_type: int) -> torch.dtype:
    from .reader import DTYPES

    if elem_type not in DTYPES:
        raise ValueError(f"graph input element type {elem_type} is not supported (numbers and booleans that "
                         "torch computes on: float, double, float16, bfloat16, int8-64, uint8, bool)")
    return DTYPES[elem_type]


def _attribute_name(node_name: str, taken: set[str]) -> str:
    """A Python identifier for a node's layer, unique and not an nn.Module attribute."""
    base = re.sub(r"\W+", "_", node_name).strip("_") or "layer"
    if base[0].isdigit() or keyword.iskeyword(base):
        base = f"n_{base}"
    name, k = base, 2
    while name in taken or hasattr(nn.Module, name) or name in ("steps", "inputs", "constants", "source", "opset"):
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def _subgraphs(node, attrs: dict, opset: int, build: dict) -> tuple[str, ...]:
    """Compile the node's graph attributes (in ``attrs``) into control.Subgraph; returns the outer
    names they read, which the node's step takes after its own inputs (``attrs["outer"]``)."""
    outer: list[str] = []
    for key, value in list(attrs.items()):
        if hasattr(value, "node") and hasattr(value, "output"):  # an onnx.GraphProto
            sub = Subgraph(tuple(i.name for i in value.input), tuple(o.name for o in value.output),
                           _compile(value, opset, build))
            attrs[key] = sub
            outer += [n for n in outer_names(sub) if n not in outer]
    attrs["outer"] = tuple(outer)
    return tuple(outer)


def _node_step(graph, k: int, node, opset: int, build: dict) -> Step | None:
    """The step of ``graph.node[k]``; None when it is a constant or computed from constants only
    (folded into ``build["consts"]``: an LSTM's W computed by Slice / Concat of initializers)."""
    consts, attrs = build["consts"], attributes(node)
    outer = _subgraphs(node, attrs, opset, build) if subgraphs(node) else ()
    if node.op_type == "Constant":
        consts[node.output[0]] = OPS["Constant"](Ctx(opset), [], attrs)
        return None
    entry = LAYER_OPS.get(node.op_type)
    site = Site(graph, k, consts, {o.name for o in graph.output})
    built = entry.build(node, attrs, site) if entry is not None else None
    if built is not None:
        step = Step(node.name, node.op_type, built.inputs, built.outputs, layer=_attribute_name(node.name, build["taken"]),
                    spec=built.spec, nodes=built.nodes)
        build["layers"][step.layer] = built.layer
        return step
    if node.op_type not in OPS:
        raise ValueError(f"no mapping for this operator (the interpreter knows {len(OPS)} operators, "
                         f"{', '.join(LAYER_OPS)} become layers: docs/onnx.md lists them)")
    if node.op_type == "Split":
        attrs.setdefault("num_outputs", len(node.output))
    inputs = tuple(node.input) + outer
    if "outer" not in attrs and all(n in consts for n in inputs if n):  # control flow runs, never folds
        try:
            out = OPS[node.op_type](Ctx(opset), [consts[n] if n else None for n in inputs], attrs)
        except (RuntimeError, IndexError, TypeError) as exc:  # torch's words, on one line
            raise ValueError(str(exc).strip().splitlines()[0]) from None
        results = out if isinstance(out, (list, tuple)) else [out]
        if not any(isinstance(r, list) for r in results):  # a sequence is no buffer: made when the model runs
            consts.update((n, r) for n, r in zip(node.output, results) if n)
            return None
    return Step(node.name, node.op_type, inputs, tuple(node.output), attrs)


def _compile(graph, opset: int, build: dict) -> list[Step]:
    """The steps of ``graph`` (the main graph or a subgraph); ``build`` holds what they share:
    consts (initializers, subgraphs' included), layers, taken attribute names, the file, the
    names the file gives the nodes."""
    build["consts"].update((t.name, to_tensor(t)) for t in graph.initializer)
    steps: list[Step] = []
    skipped: set[int] = set()
    for k, node in enumerate(graph.node):
        if k in skipped:
            continue
        try:
            step = _node_step(graph, k, node, opset, build)
        except ValueError as exc:
            if str(exc).startswith(f"{build['path']}: "):  # from a subgraph: already says where
                raise
            raise ValueError(f"{build['path']}: {node_label(node, build['originals'].get(node.name))}: {exc}") from None
        if step is not None:
            skipped.update(i for i, n in enumerate(graph.node) if n.name in step.nodes[1:])
            steps.append(step)
    return steps


def load(path: str | os.PathLike) -> OnnxModel:
    """Read the ONNX file ``path`` into an :class:`OnnxModel` (see the module docstring). Raises
    ValueError, one line naming the file and, where one is at fault, the node and its op: not ONNX,
    truncated, an operator the interpreter does not have, an LSTM / GRU torch cannot compute.
    Nodes computed from constants alone (parameter-only subgraphs) are folded into constants; a
    layer's weights computed from shapes as well (torch's exporter without its optimizer slices
    them by ``Shape`` of a state) are folded by onnxscript's optimizer when it is installed (the
    result checked against onnxruntime on the original file)."""
    model = read_model(path)
    try:
        return _load(model, path)
    except ValueError as exc:
        if "must be constant" not in str(exc):
            raise
        folded = _folded(model)
        if folded is None:
            raise ValueError(f"{exc} (they are computed in the graph: pip install onnxscript, and mpolstm.onnx "
                             "folds them)") from None
    loaded = _load(folded, path)
    _check_folding(loaded, model.SerializeToString(), path)
    return loaded


def _folded(model):
    """``model`` with its constant subexpressions folded by onnxscript's optimizer (None when
    onnxscript is not installed); its input and output names must stay."""
    try:
        import onnx_ir
        from onnxscript.optimizer import fold_constants
    except ImportError:
        return None
    graph = onnx_ir.serde.deserialize_model(model)
    fold_constants(graph)
    folded = onnx_ir.serde.serialize_model(graph)
    names = lambda m: ([i.name for i in graph_inputs(m.graph)], [o.name for o in m.graph.output])  # noqa: E731
    return folded if names(folded) == names(model) else None


def _check_folding(loaded: OnnxModel, original: bytes, path) -> None:
    """ValueError unless ``loaded`` (the folded graph) equals onnxruntime on the original file."""
    try:
        from ..onnxgraph import run_onnxruntime
        examples = loaded.example_inputs()
        want = run_onnxruntime(original, {n: x.numpy() for n, x in zip(loaded.input_names, examples)})
    except ModuleNotFoundError:  # no onnxruntime: nothing to check against
        return
    with torch.no_grad():
        got = loaded(*examples)
    for name, g, w in zip(loaded.output_names, got if isinstance(got, tuple) else (got,), want):
        if tuple(g.shape) != w.shape or not torch.allclose(g, torch.from_numpy(w), rtol=1e-4, atol=1e-5):
            raise ValueError(f"{path}: the graph with its constants folded by onnxscript differs from the "
                             f"original in onnxruntime (output {name!r})")


def _load(model, path) -> OnnxModel:
    graph, opset = model.graph, opset_of(model)
    source = model.SerializeToString()
    build = {"consts": {}, "layers": {}, "taken": set(), "path": path, "originals": name_nodes(graph)}
    steps = _compile(graph, opset, build)
    outputs = {o.name for o in graph.output}
    read = {n for s in steps for n in s.inputs} | outputs
    kept = {name: t for name, t in build["consts"].items() if name in read}
    for kind, values in (("input", graph_inputs(graph)), ("output", graph.output)):
        for value in values:
            if not value.type.HasField("tensor_type"):
                raise ValueError(f"{path}: {kind} {value.name!r} is a {value.type.WhichOneof('value').removesuffix('_type')}, not a "
                                 "tensor (sequences and optional values are supported inside a graph only)")
    for i in graph_inputs(graph):
        try:
            _dtype(i.type.tensor_type.elem_type)
        except ValueError as exc:
            raise ValueError(f"{path}: input {i.name!r}: {exc}") from None
    specs = [InputSpec(i.name, i.type.tensor_type.elem_type,
                       tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                             for d in i.type.tensor_type.shape.dim)) for i in graph_inputs(graph)]
    loaded = OnnxModel(steps, build["layers"], kept, specs, [o.name for o in graph.output], opset, source)
    loaded.source_name = os.path.basename(os.fspath(path))
    return loaded.eval()
