"""The one table of ONNX operators that become torch layers (as ``ops.OPS`` is the interpreter's):
``LAYER_OPS[op]`` is a :class:`LayerOp` saying how a node becomes a layer (``build``), how the layer
computes the node's outputs (``run``), how a dense layer's weights go back into the node
(``write``), which torch types the writer accepts for it besides MPO layers, and whether it is
recurrent (what ``compress`` targets by default and what a streaming step carries states for).
Model, writer, pipeline and streaming only look entries up here. ``register`` refuses a name
that is already registered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .layers import (
    LinearSpec,
    conv_layer,
    conv_tensors,
    grouped_layer,
    grouped_tensors,
    linear_tensors,
    recurrent_layer,
    recurrent_tensors,
    run_conv,
    run_grouped,
    run_recurrent,
)

__all__ = ["LAYER_OPS", "Built", "LayerOp", "Site", "register"]

# put(key, value, like): adds ``value`` as a new initializer "<node>/<key>" in the dtype of the
# initializer ``like`` and returns its name
Put = Callable[[str, Tensor, str | None], str]


@dataclass(frozen=True)
class Site:
    """Where a node sits: the graph, the node's index, the constants known so far, the graph's outputs."""

    graph: Any
    index: int
    consts: dict[str, Tensor]
    outputs: set[str]


@dataclass(frozen=True)
class Built:
    """A node as a layer: its spec, the tensor names it reads / writes, and the nodes it replaces."""

    layer: nn.Module
    spec: Any
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class LayerOp:
    """One layer-mapped operator; see the module docstring. ``build`` returns None for a node the
    interpreter runs instead (e.g. a MatMul of two activations); ``run(layer, spec, inputs)`` takes
    the step's inputs (None where absent) and returns its outputs."""

    name: str
    build: Callable[[Any, dict, Site], Built | None]
    run: Callable[[nn.Module, Any, list], list]
    write: Callable[[dict[str, Any], Any, nn.Module, Put], None]
    torch_types: tuple[type, ...]
    recurrent: bool = False


LAYER_OPS: dict[str, LayerOp] = {}


def register(entry: LayerOp) -> LayerOp:
    if entry.name in LAYER_OPS:
        raise ValueError(f"layer operator {entry.name!r} is already registered")
    LAYER_OPS[entry.name] = entry
    return entry


def _build_recurrent(node, attrs: dict, site: Site) -> Built:
    layer, spec = recurrent_layer(node.op_type, attrs, site.consts.get, list(node.input), list(node.output))
    return Built(layer, spec, tuple(n or "" for n in spec.inputs), tuple(n or "" for n in spec.outputs), (node.name,))


def _write_recurrent(nodes: dict, step, layer: nn.Module, put: Put) -> None:
    node = nodes[step.nodes[0]]
    for slot, (key, value) in enumerate(zip("WRB", recurrent_tensors(layer, step.spec)), start=1):
        if value is not None:
            node.input[slot] = put(key, value, node.input[slot])


def _fused_bias(node, site: Site):
    """The Add node when the MatMul feeds only an Add of a constant (N,) bias placed after it, else None."""
    name, graph = node.output[0], site.graph
    users = [(k, n) for k, n in enumerate(graph.node) if name in n.input]
    if name in site.outputs or len(users) != 1 or users[0][1].op_type != "Add":
        return None
    k, add = users[0]
    bias = site.consts.get(add.input[1] if add.input[0] == name else add.input[0])
    n_out = site.consts[node.input[1]].shape[1]
    return add if bias is not None and tuple(bias.shape) == (n_out,) and k > site.index else None


def _build_linear(node, attrs: dict, site: Site) -> Built | None:
    """nn.Linear of a MatMul (+ a fused Add of a constant bias) or Gemm with a constant 2-D weight."""
    consts = site.consts
    weight = consts.get(node.input[1]) if len(node.input) > 1 else None
    if weight is None or weight.dim() != 2 or node.input[0] in consts or not weight.is_floating_point():
        return None
    bias, bias_name, transposed, last = None, None, False, node
    if node.op_type == "Gemm":
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return None
        transposed = bool(attrs.get("transB", 0))
        if len(node.input) > 2 and node.input[2]:
            bias_name, bias = node.input[2], consts.get(node.input[2])
            if bias is None or bias.numel() != (weight.shape[0] if transposed else weight.shape[1]) or bias.dim() > 2:
                return None
    elif (add := _fused_bias(node, site)) is not None:
        bias_name, last = (add.input[1] if add.input[0] == node.output[0] else add.input[0]), add
        bias = consts[bias_name]
    w = weight if transposed else weight.T
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=w.dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(bias.reshape(-1))
    spec = LinearSpec(node.input[1], transposed, bias_name, () if bias is None else tuple(bias.shape))
    nodes = (node.name,) + ((last.name,) if last is not node else ())
    return Built(layer.eval(), spec, (node.input[0],), (last.output[0],), nodes)


def _write_linear(nodes: dict, step, layer: nn.Module, put: Put) -> None:
    assert isinstance(layer, nn.Linear)
    weight, bias = linear_tensors(layer, step.spec)
    node = nodes[step.nodes[0]]
    node.input[1] = put("W", weight, node.input[1])
    if bias is not None:
        holder = nodes[step.nodes[-1]]
        slot = list(holder.input).index(step.spec.bias_input)
        holder.input[slot] = put("bias", bias, step.spec.bias_input)


def _build_conv(node, attrs: dict, site: Site) -> Built:
    inputs = list(node.input)
    weight = site.consts.get(inputs[1])
    bias = site.consts.get(inputs[2]) if len(inputs) > 2 and inputs[2] else None
    if weight is None or (len(inputs) > 2 and inputs[2] and bias is None):
        raise ValueError("a Conv runs as a torch layer and needs constant weights")
    layer, spec = conv_layer(attrs, weight, bias)
    return Built(layer, spec, (inputs[0],), (node.output[0],), (node.name,))


def _write_conv(nodes: dict, step, layer: nn.Module, put: Put) -> None:
    weight, bias = conv_tensors(layer)
    node = nodes[step.nodes[0]]
    node.input[1] = put("W", weight, node.input[1])
    if bias is not None:
        node.input[2] = put("B", bias, node.input[2])


def _build_grouped(node, attrs: dict, site: Site) -> Built | None:
    """A grouped-linear Einsum with a constant weight as a grouped 1x1 convolution (None: the interpreter's)."""
    weight = site.consts.get(node.input[1]) if len(node.input) == 2 and node.input[0] not in site.consts else None
    found = None if weight is None else grouped_layer(attrs.get("equation", ""), weight)
    return None if found is None else Built(found[0], found[1], (node.input[0],), (node.output[0],), (node.name,))


def _write_grouped(nodes: dict, step, layer: nn.Module, put: Put) -> None:
    node = nodes[step.nodes[0]]
    node.input[1] = put("W", grouped_tensors(layer, step.spec), node.input[1])


def _run_recurrent(layer, spec, args: list) -> list:
    return list(run_recurrent(layer, spec, *args))


register(LayerOp("LSTM", _build_recurrent, _run_recurrent, _write_recurrent, (nn.LSTM,), recurrent=True))
register(LayerOp("GRU", _build_recurrent, _run_recurrent, _write_recurrent, (nn.GRU,), recurrent=True))
for _op in ("MatMul", "Gemm"):
    register(LayerOp(_op, _build_linear, lambda layer, spec, args: [layer(args[0])], _write_linear, (nn.Linear,)))
register(LayerOp("Conv", _build_conv, lambda layer, spec, args: [run_conv(layer, spec, args[0])], _write_conv,
                 (nn.Conv1d, nn.Conv2d)))
register(LayerOp("Einsum", _build_grouped, lambda layer, spec, args: [run_grouped(layer, args[0])], _write_grouped,
                 (nn.Conv1d,)))
