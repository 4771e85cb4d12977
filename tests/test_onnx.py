"""mpolstm.onnx: ONNX files the tests write (torch exports, hand-written LSTM / GRU nodes) imported
exactly against onnxruntime, written back at full bond and compressed, streamed, and refused."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import mpolstm  # noqa: E402
import mpolstm.onnx as mo  # noqa: E402
from mpolstm.nn import layer_type, replace_module  # noqa: E402
from mpolstm.prune import num_weights, prunable_weights, prune_global  # noqa: E402
from onnx_models import Tagger, export_tagger, feeds, recurrent_graph, run_ort  # noqa: E402

CELLS = [nn.LSTM, nn.GRU]


def _run(model: mo.OnnxModel, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(*[torch.from_numpy(inputs[n]) for n in model.input_names])
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def _assert_close(got: list[np.ndarray], want: list[np.ndarray], atol: float = 1e-5) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert np.abs(g - w).max() <= atol + 1e-4 * np.abs(w).max(), np.abs(g - w).max()


def _full_bond(model: mo.OnnxModel) -> mo.OnnxModel:
    """Every recurrent and linear layer replaced by its exact MPO (decomposed in float64)."""
    out = copy.deepcopy(model)
    for name in out.layers:
        layer = getattr(out, name)
        if isinstance(layer, (nn.LSTM, nn.GRU, nn.Linear)):
            exact = layer_type(layer).from_torch(copy.deepcopy(layer).double())
            replace_module(out, name, exact.float().eval())
    return out


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("cell", CELLS)
def test_torch_exported_models_import_exactly(tmp_path, cell, bidirectional):
    torch_model, _ = export_tagger(tmp_path / "m.onnx", cell, bidirectional)
    model = mo.load(tmp_path / "m.onnx")
    recurrent = [getattr(model, n) for n in model.layers if isinstance(getattr(model, n), cell)]
    assert len(recurrent) == 2 and all(r.bidirectional == bidirectional for r in recurrent)
    assert sum(isinstance(getattr(model, n), nn.Linear) for n in model.layers) == 2
    # the gates come back in torch's order: the first node is torch's layer 0, bit for bit
    for name, value in recurrent[0].named_parameters():
        assert torch.equal(value, getattr(torch_model.rnn, name)), name
    inputs = feeds(onnx.load(tmp_path / "m.onnx"))
    _assert_close(_run(model, inputs), run_ort(tmp_path / "m.onnx", inputs))


@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_hand_written_nodes_import_exactly(tmp_path, op, direction, layout):
    onnx.save(recurrent_graph(op, direction, layout), tmp_path / "m.onnx")
    model = mo.load(tmp_path / "m.onnx")
    assert [type(getattr(model, n)) for n in model.layers] == [getattr(nn, op)]
    inputs = feeds(onnx.load(tmp_path / "m.onnx"))
    want = run_ort(recurrent_graph(op, direction, layout, reference=True), inputs)  # ORT has no layout 1
    _assert_close(_run(model, inputs), want)


def _graph(nodes, inputs, outputs, initializers=(), opset=14):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
                              list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


class _Ops(nn.Module):
    """Convolutions, norms, pooling, padding and the shape operators torch's exporter emits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 6, 3, stride=2, dilation=2, padding=2)
        self.conv2 = nn.Conv2d(6, 6, (3, 2), groups=3, padding=(1, 0))
        self.norm = nn.BatchNorm1d(6).eval()
        self.ln = nn.LayerNorm(5)
        self.fc = nn.Linear(30, 7)
        with torch.no_grad():
            self.norm.running_mean.uniform_(-1, 1)
            self.norm.running_var.uniform_(0.5, 2)

    def forward(self, x):  # x (N, 4, L)
        y = self.norm(self.conv1(nn.functional.pad(x, (1, 2))))
        y = nn.functional.max_pool1d(torch.clamp(y, -1.5, 2.0), 2)
        z = self.conv2(y.unsqueeze(-1).repeat(1, 1, 1, 2))
        a, b = z.chunk(2, dim=1)
        w = torch.cat([torch.where(a > 0, a ** 2, b.exp()), b.abs().sqrt()], dim=1)
        w = self.ln(nn.functional.gelu(w.mean(-1)[..., :5]))
        flat = torch.softmax(w.flatten(1)[:, :30], -1)
        return self.fc(flat), w.transpose(1, 2).reshape(x.shape[0], -1).sum(-1, keepdim=True)


@pytest.mark.parametrize("opset", [11, 17])
def test_interpreter_and_conv_layers_match_onnxruntime(tmp_path, opset):
    torch.manual_seed(0)
    module = _Ops().eval()
    path = tmp_path / "ops.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, 4, 23),), str(path), dynamo=False, opset_version=opset,
                          input_names=["x"], output_names=["p", "s"], dynamic_axes={"x": {0: "n"}})
    model = mo.load(path)
    kinds = sorted(type(getattr(model, n)).__name__ for n in model.layers)
    assert kinds == ["Conv1d", "Conv2d", "Linear"]
    inputs = {"x": np.random.default_rng(3).standard_normal((3, 4, 23)).astype(np.float32)}
    _assert_close(_run(model, inputs), run_ort(path, inputs))
    with torch.no_grad():
        _assert_close(_run(model, inputs), [t.numpy() for t in module(torch.from_numpy(inputs["x"]))])


@pytest.mark.parametrize("cell", CELLS)
def test_full_bond_writes_back_equal_to_the_original_in_onnxruntime(tmp_path, cell):
    export_tagger(tmp_path / "m.onnx", cell, bidirectional=True)
    model = _full_bond(mo.load(tmp_path / "m.onnx"))
    assert all(type(getattr(model, n)).__name__.startswith("MPO") for n in model.layers)
    mo.save(model, tmp_path / "out.onnx")
    written = onnx.load(tmp_path / "out.onnx")
    original = onnx.load(tmp_path / "m.onnx")
    assert [i.name for i in written.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in written.graph.output] == [o.name for o in original.graph.output]
    assert [i.type for i in written.graph.input] == [i.type for i in original.graph.input]
    assert not {"LSTM", "GRU"} & {n.op_type for n in written.graph.node}  # the layers run factorized
    inputs = feeds(original, sizes={"time": 9, "batch": 3})
    _assert_close(run_ort(tmp_path / "out.onnx", inputs), run_ort(tmp_path / "m.onnx", inputs), atol=1e-5)


def test_layout_1_graph_runs_in_onnxruntime_once_written(tmp_path):
    """onnxruntime cannot run layout 1; the written graph (the node now factorized) can, and agrees."""
    onnx.save(recurrent_graph("GRU", "reverse", 1), tmp_path / "m.onnx")
    mo.save(_full_bond(mo.load(tmp_path / "m.onnx")), tmp_path / "out.onnx")
    inputs = feeds(onnx.load(tmp_path / "m.onnx"))
    want = run_ort(recurrent_graph("GRU", "reverse", 1, reference=True), inputs)
    _assert_close(run_ort(tmp_path / "out.onnx", inputs), want, atol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_compressed_step_file_streams_like_the_whole_sequence(tmp_path, cell):
    export_tagger(tmp_path / "m.onnx", cell, bidirectional=False)
    model = mo.load(tmp_path / "m.onnx")
    inputs = feeds(onnx.load(tmp_path / "m.onnx"), sizes={"time": 6})
    calibration = [tuple(torch.from_numpy(inputs[n]) for n in model.input_names)]
    config = mpolstm.CompressionConfig(target_modules=r"\w*(LSTM|GRU)\w*", target_ratio=3)
    mpolstm.compress(model, config, calibration=calibration)
    mo.save(model, tmp_path / "full.onnx")
    mo.save(model, tmp_path / "step.onnx", step=True)
    step = onnx.load(tmp_path / "step.onnx")
    assert [d.dim_value for d in step.graph.input[0].type.tensor_type.shape.dim][1] == 1  # the time axis
    whole = run_ort(tmp_path / "full.onnx", inputs)
    state = {n: inputs[n] for n in model.input_names[1:]}  # the graph's own state inputs are the step's
    frames = []
    for t in range(6):
        out = run_ort(tmp_path / "step.onnx", {"x": inputs["x"][:, t:t + 1], **state})
        frames.append(out[0])
        state = dict(zip(model.input_names[1:], out[1:]))
    _assert_close([np.concatenate(frames, 1), *state.values()], whole)


def test_pruned_and_untouched_layers_are_written_back_dense(tmp_path):
    export_tagger(tmp_path / "m.onnx", nn.GRU, bidirectional=True)
    model = mo.load(tmp_path / "m.onnx")
    names = prunable_weights(model, ("rnn",))
    total = num_weights(model, names)
    prune_global(model, names, total // 4)
    mo.save(model, tmp_path / "out.onnx")
    written = onnx.load(tmp_path / "out.onnx")
    assert sum(n.op_type == "GRU" for n in written.graph.node) == 2  # dense layers keep their op
    zeros = sum(int((numpy_helper.to_array(t) == 0).sum()) for t in written.graph.initializer)
    assert zeros >= total - total // 4
    inputs = feeds(written)
    _assert_close(run_ort(tmp_path / "out.onnx", inputs), _run(model, inputs))


def test_float64_full_bond_equals_the_dense_import(tmp_path):
    export_tagger(tmp_path / "m.onnx", nn.LSTM, bidirectional=True)
    dense = mo.load(tmp_path / "m.onnx").double()
    exact = _full_bond(mo.load(tmp_path / "m.onnx")).double()
    for name in exact.layers:  # float64 MPOs of the float64 weights
        layer = getattr(dense, name)
        replace_module(exact, name, layer_type(layer).from_torch(layer).eval())
    inputs = {k: v.astype(np.float64) for k, v in feeds(onnx.load(tmp_path / "m.onnx")).items()}
    for got, want in zip(_run(exact, inputs), _run(dense, inputs)):
        assert got.dtype == np.float64 and np.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_distillation_trains_through_the_graph(tmp_path):
    export_tagger(tmp_path / "m.onnx", nn.GRU, bidirectional=False)
    teacher = mo.load(tmp_path / "m.onnx")
    student = copy.deepcopy(teacher)
    batch = tuple(torch.from_numpy(v) for v in feeds(onnx.load(tmp_path / "m.onnx")).values())
    mpolstm.compress(student, mpolstm.CompressionConfig(target_modules=r".*GRU.*", max_bond=2))
    before = [p.detach().clone() for p in student.parameters()]
    result = mpolstm.distill(student, teacher, [batch], steps=3, loss="mse", lr=1e-2)
    assert result.losses[-1] < result.losses[0]
    assert all(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def _refusal_models():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
    topk = _graph([helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
                   helper.make_node("RandomUniformLike", ["m"], ["y"], name="mix")],
                  [("x", [2, 4])], [("y", [2, 3])], [w])
    lengths = recurrent_graph("GRU")
    lengths.graph.node[0].input[4] = "lens"
    lengths.graph.input.append(helper.make_tensor_value_info("lens", TensorProto.INT32, ["batch"]))
    return {
        "linear_before_reset=0": recurrent_graph("GRU", linear_before_reset=0),
        "clip": recurrent_graph("LSTM", clip=3.0),
        "activations": recurrent_graph("GRU", activations=["Relu", "Tanh"]),
        "sequence_lens": lengths,
        "no mapping": topk,
    }


@pytest.mark.parametrize("expected", list(_refusal_models()))
def test_unsupported_nodes_are_refused_naming_node_and_op(tmp_path, expected):
    onnx.save(_refusal_models()[expected], tmp_path / "m.onnx")
    with pytest.raises(ValueError) as info:
        mo.load(tmp_path / "m.onnx")
    message = str(info.value)
    assert "\n" not in message and expected in message
    assert "node 'rnn' (GRU)" in message or "node 'rnn' (LSTM)" in message or "node 'mix' (RandomUniformLike)" in message


def test_files_that_are_not_onnx_are_refused(tmp_path):
    export_tagger(tmp_path / "m.onnx", nn.GRU, bidirectional=False)
    data = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.onnx").write_text("hello, not a model")
    for name, expected in (("cut.onnx", "ONNX"), ("text.onnx", "ONNX"), ("missing.onnx", "no such file")):
        with pytest.raises(ValueError, match=expected) as info:
            mo.load(tmp_path / name)
        assert "\n" not in str(info.value)


def test_save_refuses_foreign_layers_and_writes_nothing(tmp_path):
    export_tagger(tmp_path / "m.onnx", nn.GRU, bidirectional=False)
    model = mo.load(tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="OnnxModel|mpolstm.onnx.load"):
        mo.save(Tagger(nn.GRU, False), tmp_path / "a.onnx")
    name = next(n for n in model.layers if isinstance(getattr(model, n), nn.Linear))
    replace_module(model, name, nn.Identity())
    with pytest.raises(ValueError, match="Identity"):
        mo.save(model, tmp_path / "b.onnx")
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()


def test_save_refuses_an_existing_file_unless_overwrite(tmp_path):
    export_tagger(tmp_path / "m.onnx", nn.GRU, bidirectional=False)
    model = mo.load(tmp_path / "m.onnx")
    (tmp_path / "out.onnx").write_bytes(b"old")
    with pytest.raises(ValueError, match="already exists"):
        mo.save(model, tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").read_bytes() == b"old"
    mo.save(model, tmp_path / "out.onnx", overwrite=True)
    assert onnx.load(str(tmp_path / "out.onnx")).graph.node
    with pytest.raises(ValueError, match="already exists"):
        mo.compress_file(tmp_path / "m.onnx", tmp_path / "out.onnx", mpolstm.CompressionConfig(target_ratio=2))
    assert mo.save(model, tmp_path / "new" / "out.onnx").is_file()  # missing parents are created


def test_step_file_adds_the_states_a_graph_keeps_inside(tmp_path):
    """An LSTM whose initial states are not graph inputs: the step file makes them inputs (h and c)."""
    graph = recurrent_graph("LSTM", hidden=4)
    node = graph.graph.node[0]
    node.input[5], node.input[6] = "", ""
    kept = [i for i in graph.graph.input if i.name == "X"]
    del graph.graph.input[:]
    graph.graph.input.extend(kept)
    onnx.save(graph, tmp_path / "m.onnx")
    model = _full_bond(mo.load(tmp_path / "m.onnx"))
    mo.save(model, tmp_path / "step.onnx", step=True)
    step = onnx.load(tmp_path / "step.onnx")
    assert [i.name for i in step.graph.input] == ["X", "rnn.h0", "rnn.c0"]
    assert [o.name for o in step.graph.output] == ["Y", "Y_h", "Y_c"]
    inputs = feeds(graph, sizes={"time": 5})
    whole = run_ort(graph, inputs)
    state = {"rnn.h0": np.zeros((1, 2, 4), np.float32), "rnn.c0": np.zeros((1, 2, 4), np.float32)}
    frames = []
    for t in range(5):
        y, h, c = run_ort(tmp_path / "step.onnx", {"X": inputs["X"][t:t + 1], **state})
        frames.append(y)
        state = {"rnn.h0": h, "rnn.c0": c}
    _assert_close([np.concatenate(frames), h, c], whole)


def test_calibration_of_the_wrong_kind_names_the_dtypes(tmp_path):
    """A graph of int64 token ids given float calibration inputs: the error names int64, not ONNX's
    element-type number."""
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["f", "w"], ["y"])],
        "ids", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], initializer=[w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "ids.onnx")
    model = mo.load(tmp_path / "ids.onnx")
    with pytest.raises(ValueError, match=r"input0 \('ids'\) is \(2, 4\) float32; the graph expects \['N', 4\] "
                                         r"\(int64\)"):
        mo.as_batches(model, torch.zeros(2, 4))
    assert mo.as_batches(model, torch.zeros(2, 4, dtype=torch.int64))[0][0].dtype == torch.int64


def test_a_time_first_graph_is_calibrated_on_batch_slices_and_its_report_is_their_error(tmp_path):
    """One (T, N, F) calibration tensor of a time-first graph is cut along N (axis 1, found by running
    the graph): cut along T, the held-out figure would describe a few steps run from zero states."""
    from mpolstm.onnx.pipeline import _sliced

    class TimeFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.out = nn.GRU(6, 20, bidirectional=True), nn.Linear(40, 3)  # (T, N, 6) -> (T, N, 3)

        def forward(self, x):
            return self.out(self.rnn(x)[0])

    torch.manual_seed(3)
    torch_model = TimeFirst().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch_model, (torch.randn(7, 2, 6),), str(tmp_path / "tf.onnx"), dynamo=False,
                          opset_version=14, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "time", 1: "batch"}, "y": {0: "time", 1: "batch"}})
    x = torch.randn(24, 16, 6)
    assert [b[0].shape for b in _sliced(mo.load(tmp_path / "tf.onnx"), [(x,)], 8)] == [(24, 2, 6)] * 8
    report, small = mo.compress_file(tmp_path / "tf.onnx", tmp_path / "small.onnx",
                                     mpolstm.CompressionConfig(target_ratio=4), calibration=[x])
    check = report.output_check
    assert check.batches == 4 and "held-out" in check.source
    held = [x[:, k * 2:k * 2 + 2] for k in (1, 3, 5, 7)]  # the odd-numbered of 8 slices along N
    with torch.no_grad():
        num = sum(float((small(h) - torch_model(h)).pow(2).sum()) for h in held)
        den = sum(float(torch_model(h).pow(2).sum()) for h in held)
    # the written model is the fit redone on all 8 slices, so its error on the held-out ones is lower
    # than the out-of-sample figure, but of the same size (on 3-step time crops it would differ more)
    assert 0.5 * check.error < (num / den) ** 0.5 <= check.error * 1.05
