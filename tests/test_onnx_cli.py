"""`mpolstm compress MODEL.onnx OUT.onnx` and `mpolstm inspect FILE.onnx`: a compressed file that
drops in for the original, and one error line, exit 2 and nothing written for every bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from mpolstm.harness.cli import app  # noqa: E402
from onnx_models import export_tagger, feeds, run_ort  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A GRU tagger as ONNX, its calibration inputs, and calibration inputs of the wrong width."""
    folder = tmp_path_factory.mktemp("onnx_cli")
    export_tagger(folder / "m.onnx", nn.GRU, bidirectional=False)
    torch.manual_seed(0)
    save_file({"input0": torch.randn(8, 12, 6), "input1": torch.zeros(2, 8, 8)}, folder / "cal.safetensors")
    save_file({"input0": torch.randn(8, 12, 5), "input1": torch.zeros(2, 8, 8)}, folder / "wide.safetensors")
    relu = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(relu, opset_imports=[helper.make_opsetid("", 14)]), folder / "relu.onnx")
    einsum = helper.make_graph([helper.make_node("RandomUniformLike", ["x"], ["y"], name="mix")], "g",
                               [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(einsum, opset_imports=[helper.make_opsetid("", 14)]), folder / "einsum.onnx")
    data = (folder / "m.onnx").read_bytes()
    (folder / "cut.onnx").write_bytes(data[: len(data) // 2])
    (folder / "text.onnx").write_text("not a model")
    return folder


def test_compress_writes_a_drop_in_file_that_inspect_reads(files, tmp_path):
    out = tmp_path / "small.onnx"
    result = runner.invoke(app, ["compress", str(files / "m.onnx"), str(out), "--ratio", "3", "--max-macs", "600",
                                 "--calibrate", str(files / "cal.safetensors"), "--distill-steps", "4",
                                 "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "rnn_GRU (MPOGRU)" in result.output and f"wrote {out}" in result.output
    original, written = onnx.load(files / "m.onnx"), onnx.load(out)
    for a, b in ((original.graph.input, written.graph.input), (original.graph.output, written.graph.output)):
        assert [(v.name, v.type) for v in a] == [(v.name, v.type) for v in b]
    inputs = feeds(original)
    got, want = run_ort(out, inputs), run_ort(files / "m.onnx", inputs)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert np.abs(got[0] - want[0]).mean() < np.abs(want[0]).mean()  # close to the original, not equal
    shown = runner.invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "written by mpolstm compress from m.onnx" in shown.output and "distilled 4 steps" in shown.output
    assert shown.output.count("weight_hh_l0") == 2 and "lowrank" in shown.output


def test_int8_file_is_smaller_measured_read_back_and_inspect_lists_what_an_original_can_compress(files, tmp_path):
    import re

    import mpolstm.onnx as mo

    out = tmp_path / "q.onnx"
    result = runner.invoke(app, ["compress", str(files / "m.onnx"), str(out), "--ratio", "2", "--int8"])
    assert result.exit_code == 0, result.output
    assert "the MPO factors as int8 (dense layers float32)" in result.output
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in onnx.load(out).graph.node)
    inputs = feeds(onnx.load(out))
    want = run_ort(out, inputs)
    assert len(want) == 2
    # the int8 file's own error is measured (on the report's batches) and stored; the file reads back
    line = next(x for x in result.output.splitlines() if x.startswith("int8 weights:"))
    int8, floats = (float(v) for v in re.findall(r"\d\.\d{4}", line)[:2])
    assert int8 > 0 and floats > 0 and line in runner.invoke(app, ["inspect", str(out)]).output
    back = mo.load(out)
    with torch.no_grad():
        got = back(*[torch.from_numpy(inputs[n]) for n in back.input_names])
    assert all(np.abs(g.numpy() - w).max() < 1e-4 for g, w in zip(got, want))
    shown = runner.invoke(app, ["inspect", str(files / "m.onnx")])
    assert shown.exit_code == 0 and "not written by mpolstm compress" in shown.output and "rnn_GRU_1" in shown.output


@pytest.mark.parametrize("model,extra,message", [
    ("text.onnx", [], "not a readable ONNX model"),
    ("cut.onnx", [], "ONNX"),
    ("missing.onnx", [], "does not exist"),
    ("einsum.onnx", [], "node 'mix' (RandomUniformLike)"),
    ("relu.onnx", [], "no LSTM, GRU, MatMul"),
    ("m.onnx", ["--calibrate", "wide.safetensors"], "input0 ('x') is (8, 12, 5)"),
    ("m.onnx", ["--distill-steps", "3"], "--distill-steps needs --calibrate"),
    ("m.onnx", ["--target", "nothing_here"], "nothing_here"),
    ("m.onnx", ["--ratio", "100000"], "m.onnx: the budget of"),  # the library's fields named by the flags
    ("m.onnx", ["--max-error", "0.05"], "--max-error is measured on your data: give --calibrate inputs"),
    ("m.onnx", ["--calibrate", "cal.safetensors", "--validate", "wide.safetensors"], "--validate: input0 ('x')"),
    ("m.onnx", ["--calibrate", "cal.safetensors", "--distill-steps", "3", "--batch-size", "0"], "--batch-size >= 1"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(files, tmp_path, model, extra, message):
    out = tmp_path / "out.onnx"
    extra = [str(files / e) if e.endswith(".safetensors") else e for e in extra]
    size = [] if "--max-error" in extra else ["--ratio", "2"]
    result = runner.invoke(app, ["compress", str(files / model), str(out), *size, *extra])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not out.exists()


def test_inspect_refuses_a_damaged_file_and_compress_an_existing_output(files, tmp_path):
    result = runner.invoke(app, ["inspect", str(files / "cut.onnx")])
    assert result.exit_code == 2 and result.output.startswith("error: ")
    (tmp_path / "taken.onnx").write_bytes(b"keep")
    result = runner.invoke(app, ["compress", str(files / "m.onnx"), str(tmp_path / "taken.onnx"), "--ratio", "2"])
    assert result.exit_code == 2 and "already exists" in result.output and "--overwrite" in result.output
    assert (tmp_path / "taken.onnx").read_bytes() == b"keep"


def test_overwrite_replaces_an_existing_output_and_parents_are_created(files, tmp_path):
    """The rule of every mpolstm output (issue 27) holds for ONNX files too."""
    (tmp_path / "taken.onnx").write_bytes(b"old")
    result = runner.invoke(app, ["compress", str(files / "m.onnx"), str(tmp_path / "taken.onnx"), "--ratio", "2",
                                 "--overwrite"])
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(onnx.load(str(tmp_path / "taken.onnx")))
    nested = tmp_path / "a" / "b" / "out.onnx"
    result = runner.invoke(app, ["compress", str(files / "m.onnx"), str(nested), "--ratio", "2"])
    assert result.exit_code == 0 and nested.is_file(), result.output


def test_export_of_an_onnx_file_says_that_compress_takes_it(files, tmp_path):
    """export takes a saved folder; an ONNX file is pointed to compress, not asked for --factory."""
    result = runner.invoke(app, ["export", str(files / "m.onnx"), "--format", "onnx", "--out", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "mpolstm compress" in lines[0] and "--factory" not in lines[0], result.output
    assert not (tmp_path / "o.onnx").exists()


def test_export_help_lists_every_format_it_accepts():
    output = runner.invoke(app, ["export", "--help"], env={"COLUMNS": "300"}).output
    text = " ".join(output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())  # rich's box drawn away
    assert "Output file (torchscript, onnx, executorch, aoti) or folder (dense)" in text, text
    assert "onnx, executorch: store and multiply the MPO factors in int8" in text, text
    assert "ONNX, ExecuTorch, AOTInductor, TorchScript" in text, text


def test_inspect_of_a_file_from_onnx_save_names_its_source(files, tmp_path):
    import mpolstm
    import mpolstm.onnx as mo

    model = mo.load(files / "m.onnx")
    mpolstm.compress(model, mpolstm.CompressionConfig(target_modules=mo.recurrent_layers(model), max_bond=2))
    mo.save(model, tmp_path / "s.onnx")
    shown = runner.invoke(app, ["inspect", str(tmp_path / "s.onnx")])
    assert shown.exit_code == 0, shown.output
    assert "written by mpolstm.onnx.save from m.onnx" in shown.output and "from ?" not in shown.output, shown.output


@pytest.mark.parametrize("target", ["/rnn/GRU_1", "_rnn_GRU_1", "rnn_GRU_1"])
def test_target_takes_the_node_name_as_readme_writes_it_and_the_layer_name(files, tmp_path, target):
    """README: --target names a layer by its node name (/rnn/GRU_1, or _rnn_GRU_1) or its layer name."""
    import mpolstm.onnx as mo

    assert {k: s.name for k, s in mo.load(files / "m.onnx").layers.items()}["rnn_GRU_1"] == "/rnn/GRU_1"
    out = tmp_path / "t.onnx"
    result = runner.invoke(app, ["compress", str(files / "m.onnx"), str(out), "--ratio", "2", "--target", target])
    assert result.exit_code == 0, result.output
    assert "rnn_GRU_1 (MPOGRU)" in result.output and "rnn_GRU (MPOGRU)" not in result.output and out.is_file()


def test_a_float64_calibration_file_is_computed_as_the_graph_declares(files, tmp_path):
    torch.manual_seed(1)
    save_file({"input0": torch.randn(8, 12, 6, dtype=torch.float64), "input1": torch.zeros(2, 8, 8, dtype=torch.float64)},
              tmp_path / "cal64.safetensors")
    result = runner.invoke(app, ["compress", str(files / "m.onnx"), str(tmp_path / "out.onnx"), "--ratio", "2",
                                 "--calibrate", str(tmp_path / "cal64.safetensors")])
    assert result.exit_code == 0, result.output
    assert "model output error" in result.output and "held-out calibration batches" in result.output


def test_an_existing_plot_is_refused_before_any_work_unless_overwrite(files, tmp_path):
    (tmp_path / "curve.png").write_bytes(b"mine")
    args = ["compress", str(files / "m.onnx"), str(tmp_path / "out.onnx"), "--max-error", "0.5", "--calibrate",
            str(files / "cal.safetensors"), "--plot", str(tmp_path / "curve.png")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--plot" in result.output and "already exists" in result.output
    assert (tmp_path / "curve.png").read_bytes() == b"mine" and not (tmp_path / "out.onnx").exists()
