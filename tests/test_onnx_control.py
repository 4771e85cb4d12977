"""mpolstm.onnx on the graphs shipped files hold: control flow (If / Loop / Scan) with LSTMs inside
the branches, empty and repeated node names, weights computed from constants, Pad in every mode, and
the one-line refusals that name the file, the node and its name in the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import mpolstm  # noqa: E402
import mpolstm.onnx as mo  # noqa: E402
from mpolstm.harness.cli import app  # noqa: E402
from onnx_models import run_ort  # noqa: E402

RNG = np.random.default_rng(0)


def _init(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.5).astype(np.float32), name)


def _lstm_branch(tag: str, weight: str, hidden: int = 6) -> onnx.GraphProto:
    """A branch: Pad (reflect, 2-D) of the outer x, an LSTM on it (W from ``weight``: outer or its own)."""
    nodes = [helper.make_node("Reshape", ["x", "shape2d"], [f"{tag}_2d"]),
             helper.make_node("Pad", [f"{tag}_2d", "pads"], [f"{tag}_pad"], mode="reflect"),
             helper.make_node("Reshape", [f"{tag}_pad", "shape3d"], [f"{tag}_x"]),
             helper.make_node("LSTM", [f"{tag}_x", weight, f"{tag}_R", f"{tag}_B"], [f"{tag}_y", f"{tag}_h"],
                              name="lstm", hidden_size=hidden),
             helper.make_node("Squeeze", [f"{tag}_h", "zero"], [f"{tag}_out"])]
    inits = [_init(f"{tag}_R", 1, 4 * hidden, hidden), _init(f"{tag}_B", 1, 8 * hidden)]
    if weight.startswith(tag):
        inits.append(_init(weight, 1, 4 * hidden, 4))
    return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(f"{tag}_out", TensorProto.FLOAT, None)],
                             inits)


def if_model() -> onnx.ModelProto:
    """x [time 5, batch 2, 4] and a bool: an If whose branches each run an LSTM named 'lstm' (the
    same name twice) on the reflect-padded input; the then branch reads its W from the main graph."""
    consts = [_init("W_outer", 1, 24, 4),
              numpy_helper.from_array(np.array([-1, 4], np.int64), "shape2d"),
              numpy_helper.from_array(np.array([1, 0, 1, 0], np.int64), "pads"),
              numpy_helper.from_array(np.array([6, 2, 4], np.int64), "shape3d"),
              numpy_helper.from_array(np.array([0], np.int64), "zero")]
    node = helper.make_node("If", ["flag"], ["h"], name="", then_branch=_lstm_branch("then", "W_outer"),
                            else_branch=_lstm_branch("else", "else_W"))
    graph = helper.make_graph([node, helper.make_node("Relu", ["h"], ["out"], name="")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, 4]),
                               helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 6])], consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(flag: bool) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((5, 2, 4)).astype(np.float32), "flag": np.array(flag)}


def _ours(model, feeds):
    with torch.no_grad():
        out = model(*[torch.from_numpy(feeds[n]) for n in model.input_names])
    return out.numpy()


def test_if_branches_with_lstms_load_equal_onnxruntime_compress_and_write_back(tmp_path):
    onnx.save(if_model(), tmp_path / "if.onnx")
    model = mo.load(tmp_path / "if.onnx")
    assert len(mo.recurrent_layers(model)) == 2  # one LSTM in each branch, both torch layers
    for flag in (True, False):
        assert np.abs(_ours(model, _feeds(flag)) - run_ort(tmp_path / "if.onnx", _feeds(flag))[0]).max() < 1e-5
    mpolstm.compress(model, mpolstm.CompressionConfig(target_modules=mo.recurrent_layers(model), max_bond=2))
    mo.save(model, tmp_path / "small.onnx")  # checks the file against the model on example inputs
    written = onnx.load(tmp_path / "small.onnx")
    for flag in (True, False):
        assert np.abs(_ours(model, _feeds(flag)) - run_ort(written, _feeds(flag))[0]).max() < 1e-5
    branch = next(a.g for a in written.graph.node[0].attribute if a.name == "then_branch")
    assert "LSTM" not in {n.op_type for n in branch.node}  # replaced inside the branch by the factorized graph
    assert [n.name for n in written.graph.node] == ["", ""]  # the file's names, empty ones kept empty
    with pytest.raises(ValueError, match="inside a subgraph"):
        mo.save(model, tmp_path / "step.onnx", step=True)


def test_loop_and_scan_bodies_read_outer_values(tmp_path):
    body = helper.make_graph(
        [helper.make_node("Add", ["acc", "x"], ["acc_out"]), helper.make_node("Identity", ["cond"], ["cond_out"]),
         helper.make_node("Mul", ["acc_out", "k"], ["scan"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in
         (("cond_out", TensorProto.BOOL, []), ("acc_out", TensorProto.FLOAT, [3]), ("scan", TensorProto.FLOAT, [3]))])
    scan_body = helper.make_graph(
        [helper.make_node("Add", ["s", "row"], ["s_out"]), helper.make_node("Mul", ["s_out", "k"], ["y"])], "sb",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3]) for n in ("s", "row")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3]) for n in ("s_out", "y")])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["final", "stacked"], name="loop", body=body),
         helper.make_node("Scan", ["x", "seq"], ["s_final", "ys"], name="scan", body=scan_body, num_scan_inputs=1,
                          scan_input_directions=[1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("seq", TensorProto.FLOAT, [4, 3])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in
         (("final", [3]), ("stacked", [4, 3]), ("s_final", [3]), ("ys", [4, 3]))],
        [numpy_helper.from_array(np.array(4, np.int64), "trips"), _init("k", 3)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "loop.onnx")
    model = mo.load(tmp_path / "loop.onnx")
    feeds = {"x": np.arange(3, dtype=np.float32), "seq": RNG.standard_normal((4, 3)).astype(np.float32)}
    with torch.no_grad():
        ours = model(*[torch.from_numpy(feeds[n]) for n in model.input_names])
    for got, want in zip(ours, run_ort(tmp_path / "loop.onnx", feeds)):
        assert got.shape == want.shape and np.abs(got.numpy() - want).max() < 1e-5


def _computed_weights_model(names: list[str]) -> onnx.ModelProto:
    """An LSTM whose W is Concat of two Slices of one initializer (torch's dynamo exporter's form),
    then Tanh and Relu nodes named ``names`` (repeated or empty names allowed)."""
    hidden = 5
    inits = [_init("Wall", 1, 8 * hidden, 3), _init("R", 1, 4 * hidden, hidden), _init("B", 1, 8 * hidden)] + \
        [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in
         (("s0", 0), ("s1", 2 * hidden), ("s2", 4 * hidden), ("s3", 6 * hidden), ("ax", 1))]
    nodes = [helper.make_node("Slice", ["Wall", "s0", "s1", "ax"], ["w_a"], name="slice"),
             helper.make_node("Slice", ["Wall", "s2", "s3", "ax"], ["w_b"], name="slice"),
             helper.make_node("Concat", ["w_a", "w_b"], ["W"], axis=1),
             helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], name="rnn", hidden_size=hidden),
             helper.make_node("Tanh", ["y"], ["t"], name=names[0]),
             helper.make_node("Relu", ["t"], ["out"], name=names[1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["time", 2, 3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["time", 1, 2, hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("names", [["act", "act"], ["", ""]])
def test_computed_weights_fold_and_node_names_repeat_or_are_empty(tmp_path, names):
    proto = _computed_weights_model(names)
    onnx.save(proto, tmp_path / "m.onnx")
    model = mo.load(tmp_path / "m.onnx")
    assert mo.recurrent_layers(model) == ["rnn"]
    for node in proto.graph.node:  # onnxruntime refuses repeated node names (ONNX allows them): the reference has none
        node.name = ""
    feeds = {"x": RNG.standard_normal((7, 2, 3)).astype(np.float32)}
    assert np.abs(_ours(model, feeds) - run_ort(proto, feeds)[0]).max() < 1e-5
    mpolstm.compress(model, mpolstm.CompressionConfig(target_modules=["rnn"], max_bond=2))
    mo.save(model, tmp_path / "small.onnx")
    written = onnx.load(tmp_path / "small.onnx")
    kept = [n.name for n in written.graph.node if n.op_type in ("Tanh", "Relu")]
    assert kept == names and not {"Slice", "Concat"} & {n.op_type for n in written.graph.node}


def test_a_refusal_names_the_file_the_node_and_its_name_in_the_file(tmp_path):
    proto = _computed_weights_model(["act", "act"])
    proto.graph.node[5].op_type = "RandomUniformLike"
    onnx.save(proto, tmp_path / "m.onnx")
    with pytest.raises(ValueError) as info:
        mo.load(tmp_path / "m.onnx")
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "m.onnx") in message
    assert "(RandomUniformLike; 'act' in the file, not unique)" in message


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
@pytest.mark.parametrize("shape", [(5, 4), (2, 5, 4), (2, 3, 5, 4, 3)])
def test_pad_every_mode_and_rank_equals_onnxruntime(tmp_path, mode, shape):
    rank = len(shape)
    pads = [(k % 3) for k in range(rank)] + [(k + 1) % 3 for k in range(rank)]
    graph = helper.make_graph([helper.make_node("Pad", ["x", "pads"], ["y"], mode=mode)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * rank)],
                              [numpy_helper.from_array(np.array(pads, np.int64), "pads")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), tmp_path / "pad.onnx")
    feeds = {"x": RNG.standard_normal(shape).astype(np.float32)}
    want = run_ort(tmp_path / "pad.onnx", feeds)[0]
    got = _ours(mo.load(tmp_path / "pad.onnx"), feeds)
    assert got.shape == want.shape and np.array_equal(got, want)


def test_the_cli_line_names_the_file_when_a_node_fails_at_the_first_run(tmp_path):
    proto = _computed_weights_model(["a", "b"])
    proto.graph.node.insert(4, helper.make_node("Reshape", ["y", "bad_shape"], ["y2"], name="reshape"))
    proto.graph.node[5].input[0] = "y2"
    proto.graph.initializer.append(numpy_helper.from_array(np.array([3, -1, 7], np.int64), "bad_shape"))
    onnx.save(proto, tmp_path / "m.onnx")
    result = CliRunner().invoke(app, ["compress", str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx"), "--ratio", "2"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {tmp_path / 'm.onnx'}: ") and "node 'reshape' (Reshape)" in lines[0]
    assert not (tmp_path / "o.onnx").exists()


def test_an_lstm_in_a_loop_body_is_compressed_and_written_back_inside_it(tmp_path):
    hidden = 6
    body = helper.make_graph(
        [helper.make_node("LSTM", ["x", "W", "R", "B"], ["y", "h"], name="lstm", hidden_size=hidden),
         helper.make_node("Squeeze", ["h", "zero"], ["h2"]), helper.make_node("Add", ["acc", "h2"], ["acc_out"]),
         helper.make_node("Identity", ["cond"], ["cond_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc", TensorProto.FLOAT, [2, hidden])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [2, hidden])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "acc0"], ["out"], name="loop", body=body)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["time", 2, 4]),
         helper.make_tensor_value_info("acc0", TensorProto.FLOAT, [2, hidden])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, hidden])],
        [numpy_helper.from_array(np.array(3, np.int64), "trips"), numpy_helper.from_array(np.array([0], np.int64), "zero"),
         _init("W", 1, 4 * hidden, 4), _init("R", 1, 4 * hidden, hidden), _init("B", 1, 8 * hidden)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "loop.onnx")
    model = mo.load(tmp_path / "loop.onnx")
    feeds = {"x": RNG.standard_normal((5, 2, 4)).astype(np.float32), "acc0": np.zeros((2, hidden), np.float32)}
    assert mo.recurrent_layers(model) == ["lstm"]
    assert np.abs(_ours(model, feeds) - run_ort(tmp_path / "loop.onnx", feeds)[0]).max() < 1e-5
    mpolstm.compress(model, mpolstm.CompressionConfig(target_modules=["lstm"], max_bond=2))
    mo.save(model, tmp_path / "small.onnx")
    written = onnx.load(tmp_path / "small.onnx")
    assert "LSTM" not in {n.op_type for n in written.graph.node[0].attribute[0].g.node}
    assert np.abs(_ours(model, feeds) - run_ort(written, feeds)[0]).max() < 1e-5


def test_a_loop_on_constants_alone_runs_rather_than_folds(tmp_path):
    body = helper.make_graph(
        [helper.make_node("Mul", ["acc", "acc"], ["acc_out"]), helper.make_node("Identity", ["cond"], ["cond_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("acc", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [2])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "start"], ["squared"], body=body),
         helper.make_node("Add", ["x", "squared"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array(3, np.int64), "trips"),
         numpy_helper.from_array(np.array([1.5, -0.5], np.float32), "start")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "loop.onnx")
    feeds = {"x": np.array([1.0, 2.0], np.float32)}
    got = _ours(mo.load(tmp_path / "loop.onnx"), feeds)
    assert np.allclose(got, run_ort(tmp_path / "loop.onnx", feeds)[0]) and np.allclose(got, [1 + 1.5 ** 8, 2 + 0.5 ** 8])


def test_a_node_on_constants_that_cannot_run_is_refused_in_one_line(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["w", "bad"], ["w2"], name="fold_me"), helper.make_node("Add", ["x", "w2"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6])],
        [_init("w", 6), numpy_helper.from_array(np.array([4, -1, 5], np.int64), "bad")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    with pytest.raises(ValueError) as info:
        mo.load(tmp_path / "m.onnx")
    assert "\n" not in str(info.value) and "node 'fold_me' (Reshape)" in str(info.value)


def _sequence_model() -> onnx.ModelProto:
    """x [6, 4] through every sequence operator to tensor outputs."""
    ints = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    node = helper.make_node
    graph = helper.make_graph(
        [node("SplitToSequence", ["x", "four"], ["rows"]),  # pieces of 4 rows: [4, 4], [2, 4]
         node("SequenceAt", ["rows", "minus_one"], ["last"]),
         node("ConcatFromSequence", ["rows"], ["joined"], axis=0),
         node("SplitToSequence", ["x"], ["columns"], axis=1, keepdims=0),  # 4 tensors [6]
         node("Gather", ["x", "zero"], ["first_row"], axis=1),
         node("SequenceInsert", ["columns", "first_row", "one"], ["inserted"]),
         node("SequenceErase", ["inserted", "minus_one"], ["erased"]),
         node("SequenceLength", ["erased"], ["length"]),
         node("ConcatFromSequence", ["erased"], ["stacked"], axis=-1, new_axis=1),
         node("SplitToSequence", ["x", "sizes"], ["pieces"]),
         node("SequenceAt", ["pieces", "one"], ["second"]),
         node("SequenceEmpty", [], ["empty"]),
         node("SequenceInsert", ["empty", "second"], ["one_piece"]),
         node("SequenceConstruct", ["last", "last"], ["pair"]),
         node("SequenceInsert", ["pair", "last", "zero"], ["three"]),
         node("ConcatFromSequence", ["three"], ["tripled"], axis=0),
         node("SequenceAt", ["one_piece", "zero"], ["again"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in
         (("last", [2, 4]), ("joined", [6, 4]), ("stacked", [6, 4]), ("again", [5, 4]), ("tripled", [6, 4]))]
        + [helper.make_tensor_value_info("length", TensorProto.INT64, [])],
        [ints("four", 4), ints("minus_one", -1), ints("zero", 0), ints("one", 1), ints("sizes", [1, 5])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_sequence_operators_inside_a_graph_equal_onnxruntime(tmp_path):
    onnx.save(_sequence_model(), tmp_path / "seq.onnx")
    model = mo.load(tmp_path / "seq.onnx")
    feeds = {"x": RNG.standard_normal((6, 4)).astype(np.float32)}
    with torch.no_grad():
        ours = model(torch.from_numpy(feeds["x"]))
    want = run_ort(tmp_path / "seq.onnx", feeds)
    assert [tuple(g.shape) for g in ours] == [w.shape for w in want] == [(2, 4), (6, 4), (6, 4), (5, 4), (6, 4), ()]
    for got, expected in zip(ours, want):
        assert np.array_equal(got.numpy(), expected)


def test_a_sequence_in_or_out_of_the_graph_is_refused_in_one_line(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("SplitToSequence", ["x"], ["parts"], axis=0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2])],
        [helper.make_value_info("parts", helper.make_sequence_type_proto(
            helper.make_tensor_type_proto(TensorProto.FLOAT, [None, 2])))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "out.onnx")
    with pytest.raises(ValueError, match=r"output 'parts' is a sequence, not a tensor") as info:
        mo.load(tmp_path / "out.onnx")
    assert "\n" not in str(info.value) and "out.onnx" in str(info.value)
