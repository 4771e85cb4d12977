"""ONNX files the mpolstm.onnx tests write themselves: torch exports and hand-written LSTM / GRU nodes."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

TIME_BATCH = {0: ("time", "batch"), 1: ("batch", "time")}


class Tagger(nn.Module):
    """Linear -> recurrent (two layers, optionally bidirectional) -> Linear, states in and out."""

    def __init__(self, cell: type[nn.RNNBase], bidirectional: bool, features: int = 6, hidden: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(features, hidden)
        self.rnn = cell(hidden, hidden, num_layers=2, bidirectional=bidirectional, batch_first=True)
        self.out = nn.Linear(hidden * (2 if bidirectional else 1), 3)

    def forward(self, x, *state):
        y, new = self.rnn(torch.relu(self.inp(x)), state if len(state) > 1 else state[0])
        return (self.out(y), *new) if isinstance(new, tuple) else (self.out(y), new)


def export_tagger(path: Path, cell: type[nn.RNNBase], bidirectional: bool, seed: int = 0) -> tuple[Tagger, list]:
    """The torch model and its ONNX export at ``path`` (inputs x, h0 [, c0]; outputs y, h_n [, c_n];
    batch and time dynamic)."""
    torch.manual_seed(seed)
    model = Tagger(cell, bidirectional).eval()
    dirs = 2 if bidirectional else 1
    state = [torch.randn(2 * dirs, 3, 8)] * (2 if cell is nn.LSTM else 1)
    names = ["h0", "c0"][:len(state)]
    outs = ["y", "h_n", "c_n"][:1 + len(state)]
    axes = {"x": {0: "batch", 1: "time"}, "y": {0: "batch", 1: "time"},
            **{n: {1: "batch"} for n in names + outs[1:]}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(3, 5, 6), *state), str(path), dynamo=False, opset_version=14,
                          input_names=["x", *names], output_names=outs, dynamic_axes=axes)
    return model, names


def recurrent_graph(op: str, direction: str = "forward", layout: int = 0, *, reference: bool = False,
                    seed: int = 0, inputs: int = 6, hidden: int = 5, **attrs):
    """One hand-written ONNX LSTM / GRU node with initial states as graph inputs and every output as a
    graph output. ``reference``: the same node in layout 0 with Transposes around it (what onnxruntime,
    which has no layout 1, can run as the reference of a layout-1 graph)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    dirs, gates = (2 if direction == "bidirectional" else 1), (4 if op == "LSTM" else 3)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.5, name) for name, shape in
               (("W", (dirs, gates * hidden, inputs)), ("R", (dirs, gates * hidden, hidden)),
                ("B", (dirs, 2 * gates * hidden)))]
    states = ["h0", "c0"] if op == "LSTM" else ["h0"]
    outs = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]
    first, second = TIME_BATCH[layout]
    state_dims = ["batch", dirs] if layout else [dirs, "batch"]
    y_dims = ["batch", "time", dirs] if layout else ["time", dirs, "batch"]
    if op == "GRU":
        attrs.setdefault("linear_before_reset", 1)
    node_layout = 0 if reference else layout
    io_in = ["X", *states] if not (reference and layout) else ["X_t", *[f"{s}_t" for s in states]]
    io_out = outs if not (reference and layout) else [f"{o}_t" for o in outs]
    nodes = [helper.make_node(op, [io_in[0], "W", "R", "B", "", *io_in[1:]], io_out, name="rnn", hidden_size=hidden,
                              direction=direction, layout=node_layout, **attrs)]
    if reference and layout:
        nodes = [helper.make_node("Transpose", [n], [t], perm=[1, 0, 2]) for n, t in zip(["X", *states], io_in)] + \
            nodes + [helper.make_node("Transpose", [io_out[0]], ["Y"], perm=[2, 0, 1, 3])] + \
            [helper.make_node("Transpose", [t], [n], perm=[1, 0, 2]) for t, n in zip(io_out[1:], outs[1:])]
    graph = helper.make_graph(
        nodes, "recurrent",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [first, second, inputs])] +
        [helper.make_tensor_value_info(s, TensorProto.FLOAT, state_dims + [hidden]) for s in states],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_dims + [hidden])] +
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, state_dims + [hidden]) for o in outs[1:]],
        weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def feeds(model, seed: int = 1, sizes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Random inputs for every graph input (named axes from ``sizes``: time 7, batch 2 by default)."""
    sizes = {"time": 7, "batch": 2, **(sizes or {})}
    rng = np.random.default_rng(seed)
    out = {}
    for value in model.graph.input:
        dims = [d.dim_value or sizes[d.dim_param] for d in value.type.tensor_type.shape.dim]
        out[value.name] = rng.standard_normal(dims).astype(np.float32)
    return out


def run_ort(path_or_model, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    source = path_or_model.SerializeToString() if hasattr(path_or_model, "SerializeToString") else str(path_or_model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {k: v for k, v in inputs.items() if k in {i.name for i in session.get_inputs()}})
