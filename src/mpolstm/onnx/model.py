"""``load(path) -> OnnxModel``: an ONNX graph as an nn.Module whose recurrent, linear and conv
nodes are torch layers (``layers.py``) and whose other nodes run in a small interpreter
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
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from . import shapes  # noqa: F401  (registers the shape operators)
from .layers import (ConvSpec, LinearSpec, RecurrentSpec, conv_layer, recurrent_layer, run_conv,
                     run_recurrent)
from .ops import OPS, Ctx
from .reader import attributes, graph_inputs, node_label, opset_of, read_model, to_tensor

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
        return {s.layer: s for s in self.steps if s.layer is not None}

    def float_dtype(self) -> torch.dtype:
        tensor = next((t for t in [*self.parameters(), *self.buffers()] if t.is_floating_point()), None)
        return torch.float32 if tensor is None else tensor.dtype

    def values(self, *inputs: Tensor) -> dict[str, Tensor]:
        """Every tensor of the graph, by name, on ``inputs``."""
        if len(inputs) != len(self.inputs):
            raise ValueError(f"the model takes {len(self.inputs)} input(s) {self.input_names}, got {len(inputs)}")
        env: dict[str, Tensor] = {name: getattr(self.constants, f"c{k}") for k, name in enumerate(self.constant_names)}
        env.update(zip(self.input_names, inputs))
        ctx = Ctx(self.opset, self.float_dtype())
        for step in self.steps:
            args = [env[n] if n else None for n in step.inputs]
            try:
                results = self._run(step, args, ctx)
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                raise ValueError(f"node {step.name!r} ({step.op}): {str(exc).strip().splitlines()[0]}") from exc
            env.update((n, r) for n, r in zip(step.outputs, results) if n and r is not None)
        return env

    def _run(self, step: Step, args: list[Tensor | None], ctx: Ctx) -> list[Tensor | None]:
        if step.layer is None:
            out = OPS[step.op](ctx, args, step.attrs)
            return list(out) if isinstance(out, (list, tuple)) else [out]
        layer = getattr(self, step.layer)
        if isinstance(step.spec, RecurrentSpec):
            return list(run_recurrent(layer, step.spec, *args))
        if isinstance(step.spec, ConvSpec):
            return [run_conv(layer, step.spec, args[0])]
        return [layer(args[0])]

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


def _dtype(elem_type: int) -> torch.dtype:
    from .reader import DTYPES

    if elem_type not in DTYPES:
        raise ValueError(f"graph input element type {elem_type} is not supported")
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


def _fused_bias(graph, index: int, node, consts: dict[str, Tensor], outputs: set[str]) -> tuple[int, Any] | None:
    """(index, Add node) when the MatMul at ``index`` feeds only an Add of a constant (N,) bias."""
    name = node.output[0]
    users = [(k, n) for k, n in enumerate(graph.node) if name in n.input]
    if name in outputs or len(users) != 1 or users[0][1].op_type != "Add":
        return None
    k, add = users[0]
    other = add.input[1] if add.input[0] == name else add.input[0]
    n_out = consts[node.input[1]].shape[1]
    bias = consts.get(other)
    return (k, add) if bias is not None and tuple(bias.shape) == (n_out,) and k > index else None


def _linear(node, attrs: dict, consts: dict[str, Tensor], fused) -> tuple[nn.Linear, LinearSpec] | None:
    """The nn.Linear of a MatMul (+ fused Add) or Gemm node, or None when it is not one."""
    weight = consts.get(node.input[1]) if len(node.input) > 1 else None
    if weight is None or weight.dim() != 2 or node.input[0] in consts or not weight.is_floating_point():
        return None
    bias, bias_name, transposed = None, None, False
    if node.op_type == "Gemm":
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return None
        transposed = bool(attrs.get("transB", 0))
        if len(node.input) > 2 and node.input[2]:
            bias_name, bias = node.input[2], consts.get(node.input[2])
            if bias is None or bias.numel() != (weight.shape[0] if transposed else weight.shape[1]) or bias.dim() > 2:
                return None
    elif fused is not None:
        add = fused[1]
        bias_name = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        bias = consts[bias_name]
    w = weight if transposed else weight.T
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=w.dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(bias.reshape(-1))
    spec = LinearSpec(node.input[1], transposed, bias_name, () if bias is None else tuple(bias.shape))
    return layer.eval(), spec


def _layer_step(node, attrs, consts, fused) -> tuple[nn.Module, Step] | None:
    """The torch layer and its step (``layer`` still the node's name) for a node that becomes
    one, None for an interpreted node."""
    name = node.name
    op, inputs, outputs = node.op_type, list(node.input), list(node.output)
    if op in ("LSTM", "GRU"):
        layer, spec = recurrent_layer(op, attrs, consts.get, inputs, outputs)
        return layer, Step(node.name, op, tuple(n or "" for n in spec.inputs), tuple(n or "" for n in spec.outputs),
                           layer=name, spec=spec, nodes=(node.name,))
    if op == "Conv":
        weight = consts.get(inputs[1])
        bias = consts.get(inputs[2]) if len(inputs) > 2 and inputs[2] else None
        if weight is None or (len(inputs) > 2 and inputs[2] and bias is None):
            raise ValueError("a Conv runs as a torch layer and needs constant weights")
        layer, spec = conv_layer(attrs, weight, bias)
        return layer, Step(node.name, op, (inputs[0],), (outputs[0],), layer=name, spec=spec, nodes=(node.name,))
    if op in ("MatMul", "Gemm"):
        found = _linear(node, attrs, consts, fused if op == "MatMul" else None)
        if found is None:
            return None
        layer, spec = found
        last = fused[1] if op == "MatMul" and spec.bias_input is not None else node
        nodes = (node.name,) + ((last.name,) if last is not node else ())
        return layer, Step(node.name, op, (inputs[0],), (last.output[0],), layer=name, spec=spec, nodes=nodes)
    return None


def load(path: str | os.PathLike) -> OnnxModel:
    """Read the ONNX file ``path`` into an :class:`OnnxModel` (see the module docstring). Raises
    ValueError, one line naming the file and, where one is at fault, the node and its op: not ONNX,
    truncated, an operator the interpreter does not have, an LSTM / GRU torch cannot compute."""
    model = read_model(path)
    graph, opset = model.graph, opset_of(model)
    for k, node in enumerate(graph.node):  # every node needs a name: the writer and the layers use it
        node.name = node.name or f"{node.op_type}_{k}"
    if len({n.name for n in graph.node}) != len(graph.node):
        raise ValueError(f"{path}: node names are not unique")
    consts = {t.name: to_tensor(t) for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    steps, layers, skipped, taken = [], {}, set(), set()
    for k, node in enumerate(graph.node):
        if k in skipped:
            continue
        try:
            attrs = attributes(node)
            if node.op_type == "Constant":
                consts[node.output[0]] = OPS["Constant"](Ctx(opset), [], attrs)
                continue
            fused = _fused_bias(graph, k, node, consts, outputs) if node.op_type == "MatMul" and \
                node.input[1] in consts and consts[node.input[1]].dim() == 2 else None
            found = _layer_step(node, attrs, consts, fused)
            if found is not None:
                layer, step = found
                step = replace(step, layer=_attribute_name(node.name, taken))
                layers[step.layer] = layer
                skipped.update(i for i, n in enumerate(graph.node) if n.name in step.nodes[1:])
            elif node.op_type in OPS:
                if node.op_type == "Split":
                    attrs.setdefault("num_outputs", len(node.output))
                step = Step(node.name, node.op_type, tuple(node.input), tuple(node.output), attrs)
            else:
                raise ValueError("no mapping for this operator (the interpreter knows "
                                 f"{len(OPS)} operators, LSTM, GRU and Conv; see mpolstm.onnx)")
        except ValueError as exc:
            raise ValueError(f"{path}: {node_label(node)}: {exc}") from None
        steps.append(step)
    read = {n for s in steps for n in s.inputs} | outputs
    kept = {name: t for name, t in consts.items() if name in read}
    specs = [InputSpec(i.name, i.type.tensor_type.elem_type,
                       tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                             for d in i.type.tensor_type.shape.dim)) for i in graph_inputs(graph)]
    loaded = OnnxModel(steps, layers, kept, specs, [o.name for o in graph.output], opset, model.SerializeToString())
    loaded.source_name = os.path.basename(os.fspath(path))
    return loaded.eval()
