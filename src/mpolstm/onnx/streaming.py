"""The streaming form of an imported graph (``save(..., step=True)``): recurrent states in and out,
the time axes fixed to one frame.

Which axes of the graph's inputs are time is found by running the model once on example inputs
whose named axes have distinct sizes: an input axis is a time axis when its size is the length
the recurrent nodes see. Graph outputs whose axes carry the same names get length 1 too.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .frames import state_pairs
from .layers import RecurrentSpec
from .model import OnnxModel, Step
from .registry import LAYER_OPS

__all__ = ["make_streaming", "time_axes"]


def _recurrent(model: OnnxModel) -> dict[str, Step]:
    steps = {name: s for name, s in model.layers.items() if LAYER_OPS[s.op].recurrent}
    if not steps:
        raise ValueError("a streaming step needs a recurrent (LSTM or GRU) node; the graph has none")
    for step in steps.values():
        if step.spec.directions == 2 or step.spec.reverse:
            raise ValueError(f"node {step.name!r} runs backwards in time (direction reverse or bidirectional); "
                             "a streaming step needs forward recurrent nodes only")
    return steps


def time_axes(model: OnnxModel) -> tuple[dict[str, list[int]], set[str]]:
    """({graph input: its time axes}, the size keys of those axes for ``example_inputs``)."""
    examples = model.example_inputs()
    with torch.no_grad():
        values = model.values(*examples)
    lengths = {values[s.inputs[0]].shape[s.spec.layout] for s in _recurrent(model).values()}
    if len(lengths) != 1:
        raise ValueError(f"the recurrent nodes see sequences of different lengths {sorted(lengths)}; a streaming "
                         "step needs one time axis")
    length = lengths.pop()
    axes: dict[str, list[int]] = {}
    keys: set[str] = set()
    for spec, x in zip(model.inputs, examples):
        for k, dim in enumerate(spec.dims):
            if not isinstance(dim, int) and x.shape[k] == length:
                axes.setdefault(spec.name, []).append(k)
                keys.add(dim or f"{spec.name}:{k}")
    if not axes:
        raise ValueError("the recurrent nodes' time axis is no axis of a graph input (e.g. it is resampled); "
                         "cannot make a one-frame step")
    return axes, keys


def _fix_dims(values, names: dict[str, list[int]] | None, params: set[str]) -> None:
    """Set the listed axes (``names``: value -> axes) or the axes named in ``params`` to length 1."""
    for value in values:
        for k, dim in enumerate(value.type.tensor_type.shape.dim):
            if (names is not None and k in names.get(value.name, ())) or (names is None and dim.dim_param in params):
                dim.Clear()
                dim.dim_value = 1


SHAPE_ONLY = ("Shape", "Size", "ConstantOfShape")  # their outputs do not depend on their inputs' values


def _flows(graph) -> tuple[set[str], set[str]]:
    """(the tensors whose values depend on a graph input, the tensors some graph output depends on)."""
    dependent = {i.name for i in graph.input}
    for node in graph.node:
        if node.op_type not in SHAPE_ONLY and dependent & set(node.input):
            dependent.update(node.output)
    reaching = {o.name for o in graph.output}
    for node in reversed(list(graph.node)):
        if reaching & set(node.output):
            reaching.update(node.input)
    return dependent, reaching


def _state_io(graph, node, slot_in: int, slot_out: int, key: str, spec: RecurrentSpec, batch: str
              ) -> tuple[str, str, bool]:
    """Make the node's initial state ``slot_in`` a graph input and its final state ``slot_out`` a
    graph output (new names ``<node>.<key>0`` / ``<node>.<key>_n``), unless the state already
    comes from the graph's inputs and reaches its outputs (the graph carries it itself).
    ``batch`` names the batch axis of a new state. Returns (state input name, state output name,
    whether the input is a new graph input)."""
    from onnx import TensorProto, helper

    shape: list[str | int] = ([spec.directions, batch, spec.hidden] if spec.layout == 0
                             else [batch, spec.directions, spec.hidden])
    inputs, outputs = _flows(graph)
    while len(node.input) <= slot_in:
        node.input.append("")
    created = node.input[slot_in] not in inputs
    if created:
        node.input[slot_in] = f"{node.name}.{key}0"
        graph.input.append(helper.make_tensor_value_info(node.input[slot_in], TensorProto.FLOAT, shape))
    while len(node.output) <= slot_out:
        node.output.append("")
    old = node.output[slot_out]
    if not old or old not in outputs:
        new = f"{node.name}.{key}_n"
        for other in graph.node:
            for k, name in enumerate(other.input):
                if old and name == old:
                    other.input[k] = new
        node.output[slot_out] = new
        graph.output.append(helper.make_tensor_value_info(new, TensorProto.FLOAT, shape))
    return node.input[slot_in], node.output[slot_out], created


def make_streaming(graph, model: OnnxModel) -> tuple[dict[str, Step], dict[str, Step], dict[str, int]]:
    """Rewire ``graph`` (the model's original graph) for streaming in place. Returns ({layer:
    its step with the new state names}, {new state input: its step}, sizes {time axis key: 1} for
    ``model.example_inputs``)."""
    try:
        steps = _recurrent(model)
        axes, keys = time_axes(model)
    except ValueError:
        pairs = state_pairs(model)  # a per-frame graph: no time axis to fix, the states already in and out
        if pairs:
            carried = ", ".join(f"{model.input_names[i]} -> {model.output_names[j]}" for i, j in pairs)
            raise ValueError(f"the graph already is a one-frame step (states carried: {carried}); write it "
                             "without step=True") from None
        raise
    _fix_dims(graph.input, axes, set())
    _fix_dims(graph.output, None, {k for k in keys if ":" not in k})
    nodes = {n.name: n for n in graph.node}
    named = [d for d in (model.inputs[0].dims if model.inputs else ()) if isinstance(d, str) and d not in keys]
    batch = named[0] if named else "batch"  # the first input's first named axis that is not time
    rewired, states = {}, {}
    for name, step in steps.items():
        node, spec = nodes[step.name], step.spec
        slots = ((5, 1, "h"), (6, 2, "c")) if spec.mode == "LSTM" else ((5, 1, "h"),)
        wired = [_state_io(graph, node, s_in, s_out, key, spec, batch) for s_in, s_out, key in slots]
        inputs = (step.inputs[0], *(w[0] for w in wired)) + (("",) if spec.mode == "GRU" else ())
        outputs = (step.outputs[0] or "", *(w[1] for w in wired)) + (("",) if spec.mode == "GRU" else ())
        rewired[name] = replace(step, inputs=inputs, outputs=outputs,
                                spec=replace(spec, inputs=tuple(n or None for n in inputs),
                                             outputs=tuple(n or None for n in outputs)))
        states.update({w[0]: rewired[name] for w in wired if w[2]})
    return rewired, states, {k: 1 for k in keys}
