"""Inputs that used to give a wrong answer without a word (issue 27, docs/robustness.md): each is
now refused in one line naming the flag or argument, or does what it says."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from mpolstm import CompressionConfig, compress, distill, io
from mpolstm.harness.cli import app
from mpolstm.harness.usermodels import COMPRESSION_FILE, STORED_WEIGHTS, describe_stored, inspect_folder
from mpolstm.prune import make_permanent, prune_layerwise
from mpolstm.storage import pack_weights, save_packed

runner = CliRunner()

USERNET = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(16, 32, batch_first=True)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        return self.out(self.rnn(x)[0])


def build():
    return Net()
'''

_USER_MODULE: dict = {"__name__": "silentnet"}
exec(USERNET, _USER_MODULE)
Net = _USER_MODULE["Net"]  # the user's class, for the tests that build it here


@pytest.fixture
def user(tmp_path, monkeypatch):
    """A folder with the user's module (silentnet.py) and its trained weights (w.pt), as the current directory."""
    (tmp_path / "silentnet.py").write_text(USERNET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "silentnet", raising=False)
    torch.manual_seed(0)
    torch.save(Net().state_dict(), tmp_path / "w.pt")
    yield tmp_path
    sys.modules.pop("silentnet", None)  # the next test's module of that name is its own


def one_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_factory_without_weights_is_refused_unless_random_init(user):
    line = one_line(runner.invoke(app, ["compress", "small", "--factory", "silentnet:build", "--target", "rnn",
                                        "--ratio", "4"]))
    assert "--factory silentnet:build without --weights" in line and "--random-init" in line
    assert not (user / "small").exists()
    line = one_line(runner.invoke(app, ["compress", "small", "--factory", "silentnet:build", "--weights", "w.pt",
                                        "--random-init", "--target", "rnn", "--ratio", "4"]))
    assert "--random-init and --weights" in line
    ok = runner.invoke(app, ["compress", "small", "--factory", "silentnet:build", "--random-init", "--target", "rnn",
                             "--ratio", "4"])
    assert ok.exit_code == 0, ok.output


def test_without_target_the_message_says_the_default_was_used(user):
    """The user passed no --target: the error says which default was used, not a flag they did not type."""
    line = one_line(runner.invoke(app, ["compress", "small", "--factory", "silentnet:build", "--random-init",
                                        "--ratio", "4"]))
    assert "without --target, the module named 'lstm' is compressed" in line and "rnn (LSTM)" in line, line
    assert "--target 'lstm'" not in line and not (user / "small").exists()
    line = one_line(runner.invoke(app, ["compress", "small", "--factory", "silentnet:build", "--random-init",
                                        "--ratio", "4", "--target", "lstm"]))
    assert "--target 'lstm' selects no module" in line  # typed: said with the flag


def test_num_cores_1_is_refused(user):
    with pytest.raises(ValueError, match="num_cores must be an integer >= 2"):
        CompressionConfig(target_ratio=4, num_cores=1)
    line = one_line(runner.invoke(app, ["compress", "small", "--factory", "silentnet:build", "--weights", "w.pt",
                                        "--target", "rnn", "--ratio", "4", "--num-cores", "1"]))
    assert "--num-cores must be an integer >= 2" in line and "num_cores" not in line.replace("--num-cores", "")


def test_sparse_share_without_the_hybrid_layout_is_refused():
    with pytest.raises(ValueError, match="sparse_share applies only to layout 'lowrank\\+sparse'.*'auto'.*"
                                         "layout='lowrank\\+sparse'"):
        CompressionConfig(target_ratio=4, sparse_share=0.5)
    with pytest.raises(ValueError, match="overrides\\['rnn'\\]: sparse_share applies only"):
        CompressionConfig(target_ratio=4, overrides={"rnn": {"sparse_share": 0.5}})
    CompressionConfig(target_ratio=4, sparse_share=0.5, layout="lowrank+sparse")  # what it is for
    CompressionConfig(target_ratio=4, sparse_share=0.5, overrides={"rnn": {"layout": "lowrank+sparse"}})


def test_a_bare_tensor_as_calibration_or_distillation_batches_is_refused():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(8, 5, 16)
    with pytest.raises(ValueError, match=r"calibration is one tensor \(8, 5, 16\): pass a list of batches"):
        compress(copy.deepcopy(model), CompressionConfig(target_modules=["rnn"], target_ratio=4), calibration=x)
    small, _ = compress(copy.deepcopy(model), CompressionConfig(target_modules=["rnn"], target_ratio=4),
                        calibration=[x])
    with pytest.raises(ValueError, match=r"distill: batches is one tensor \(8, 5, 16\)"):
        distill(small, model, x, steps=1)


def test_compress_over_an_existing_out_needs_overwrite_and_leaves_nothing_stale(user):
    args = ["compress", "small", "--factory", "silentnet:build", "--weights", "w.pt", "--target", "rnn", "--ratio", "4"]
    assert runner.invoke(app, args).exit_code == 0
    (user / "small" / "stale.txt").write_text("from an older run")
    before = (user / "small" / "model.safetensors").read_bytes()
    line = one_line(runner.invoke(app, [*args[:-1], "8"]))
    assert "OUT small already exists" in line and "--overwrite" in line
    assert (user / "small" / "model.safetensors").read_bytes() == before
    assert runner.invoke(app, [*args[:-1], "8", "--overwrite"]).exit_code == 0
    assert sorted(p.name for p in (user / "small").iterdir()) == [COMPRESSION_FILE, "config.json", "factory.json",
                                                                   "model.safetensors"]
    assert json.loads((user / "small" / COMPRESSION_FILE).read_text())["report"]["ratio"] >= 8
    assert [p.name for p in user.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    assert runner.invoke(app, ["compress", "a/b/c", *args[2:]]).exit_code == 0  # missing parents are created
    assert (user / "a" / "b" / "c" / "model.safetensors").is_file()


def test_inspect_calls_a_pruned_model_pruned(tmp_path):
    torch.manual_seed(0)
    model = Net()
    compress(model, CompressionConfig(target_modules=["rnn"], target_ratio=4))
    dense = Net()
    prune_layerwise(dense, ["rnn.weight_ih_l0", "rnn.weight_hh_l0"], 1000)
    make_permanent(dense)
    io.save(dense, tmp_path / "pruned")
    text = inspect_folder(tmp_path / "pruned")
    assert "a pruned model" in text and "dense model" not in text
    assert "1,000 non-zero" not in text  # the Linear is dense: counted with the LSTM's kept 1,000
    assert f"{1000 + 4 * 32:,} non-zero of {4 * 32 * 48 + 4 * 32:,} entries" in text
    io.save(Net(), tmp_path / "dense")
    assert "(a dense model" in inspect_folder(tmp_path / "dense")


def test_a_protocol_row_of_torchs_int8_model_is_inspected_and_refused_by_compress(tmp_path):
    torch.manual_seed(0)
    quantized = torch.ao.quantization.quantize_dynamic(Net(), {nn.LSTM}, dtype=torch.qint8)
    folder = tmp_path / "models" / "int8"
    folder.mkdir(parents=True)
    tensors, formats = pack_weights(quantized, ["rnn"])
    save_packed(tensors, formats, folder / STORED_WEIGHTS)
    result = runner.invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 0, result.output
    assert result.output == describe_stored(folder / STORED_WEIGHTS) + "\n"
    assert "rnn.weight_ih_l0" in result.output and "int8-affine" in result.output
    line = one_line(runner.invoke(app, ["compress", str(folder), str(tmp_path / "x"), "--ratio", "4"]))
    assert "only a protocol row's stored LSTM weights" in line and "models/dense" in line
    assert not (tmp_path / "x").exists()


def test_every_export_follows_the_output_rule_and_takes_its_arguments_in_one_order(tmp_path):
    from mpolstm.export import export_model, export_step
    from mpolstm.nn import MPOLSTM

    torch.manual_seed(0)
    lstm = MPOLSTM(8, 12, bond_dim=2)
    (tmp_path / "step.onnx").write_bytes(b"an older file")
    with pytest.raises(ValueError, match="step.onnx already exists; choose a new path, or pass overwrite=True"):
        export_step(lstm, tmp_path / "step.onnx")
    assert (tmp_path / "step.onnx").read_bytes() == b"an older file"
    export_step(lstm, tmp_path / "step.onnx", overwrite=True)
    assert (tmp_path / "step.onnx").read_bytes() != b"an older file"
    export_step(lstm, tmp_path / "new" / "folder" / "step.onnx")  # missing parents are created
    x = torch.randn(2, 3, 8)
    export_model(lstm, tmp_path / "m.pt", "torchscript", x)  # export_model(model, path, fmt), as export_step
    with pytest.warns(DeprecationWarning, match="export_model\\(model, path, fmt\\)"):
        old = export_model(lstm, "torchscript", tmp_path / "old.pt", x)
    assert old == tmp_path / "old.pt" and old.is_file()


def test_an_int8_model_exports_int8_factors_or_is_refused(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'mpolstm[export]')")
    from mpolstm import quantize
    from mpolstm.export import export_model, export_step, int8_report, onnx_weight_bytes

    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 7, 16)
    compress(model, CompressionConfig(target_modules=["rnn"], target_ratio=4, layout="lowrank"))
    export_model(model, tmp_path / "float.onnx", "onnx", x)
    assert int8_report(tmp_path / "float.onnx") is None
    quantize(model)
    path = export_model(model, tmp_path / "int8.onnx", "onnx", x)  # int8 survives: the factors are int8
    report = int8_report(path)
    assert report["factor_bytes"] > 0 and report["float_factor_bytes"] == 0  # low rank: every factor quantizes
    assert report["relative_error"] < 0.02
    assert onnx_weight_bytes(path) < onnx_weight_bytes(tmp_path / "float.onnx")
    step = int8_report(export_step(model.rnn, tmp_path / "step.onnx", frame=torch.zeros(1, 16)))
    assert step["factor_bytes"] > 0 and step["float_factor_bytes"] == 0
    for fmt, target in (("torchscript", "m.pt"), ("dense", "dense")):
        with pytest.raises(ValueError, match=f"has int8 cores .*but the {fmt} format .* pass int8=False"):
            export_model(model, tmp_path / target, fmt, x)
        assert not (tmp_path / target).exists()
    with pytest.raises(ValueError, match="'dense' runtime rebuilds float32 weights"):
        export_model(model, tmp_path / "rebuild.onnx", "onnx", x, runtime="dense")
    export_model(model, tmp_path / "m.pt", "torchscript", x, int8=False)  # float32 factors, asked for
    assert int8_report(export_model(model, tmp_path / "f.onnx", "onnx", x, int8=False)) is None


def test_a_hybrid_exports_with_the_dense_runtime_correctly_and_smaller_than_dense(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'mpolstm[export]')")
    import warnings

    from mpolstm.export import export_model, onnx_weight_bytes

    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 7, 16)
    dense_bytes = sum(p.numel() * 4 for p in model.parameters())
    compress(model, CompressionConfig(target_modules=["rnn"], target_ratio=4, layout="lowrank+sparse"),
             calibration=[x])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_model(model.eval(), tmp_path / "h.onnx", "onnx", x, runtime="dense")
    assert not [w for w in caught if "incorrect" in str(w.message)]  # torch's "the ONNX model will be incorrect"
    assert onnx_weight_bytes(path) < dense_bytes  # no (out, in) constant for the sparse part
    got = ort.InferenceSession(str(path)).run(None, {"input0": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-5)


def test_the_demo_prints_each_row_against_the_documented_seed_spread(tmp_path, monkeypatch):
    from mpolstm.harness.cli import experiments
    from mpolstm.harness.protocol.spread import SEQCLS_QUICK

    dense, ref = SEQCLS_QUICK[("dense", None)], SEQCLS_QUICK[("mpo-scratch", 30.0)]

    def fake_run(task, ratios, out, seed, distill, rows, resume=False):
        out.mkdir(parents=True)
        rows = [{"row": "dense", "target_ratio": None, "accuracy": dense.mean, "params": dense.params_min},
                {"row": "mpo-scratch", "target_ratio": 30.0, "accuracy": 0.5, "params": ref.params_min}]
        (out / "results.json").write_text(json.dumps({"metric": "accuracy", "rows": rows}))

    monkeypatch.setattr(experiments, "_run_protocol", fake_run)
    monkeypatch.setattr(experiments, "_make_task", lambda *args, **kwargs: None)
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert "Against the documented spread" in result.output
    assert "| dense | - |" in result.output and "1 of 2 rows within" in result.output
    assert f"| mpo-scratch | 30x | 0.5000 | {ref.mean:.4f} ± {ref.std:.4f} | {ref.params_min:,} |" in result.output
    assert f"| no: accuracy {0.5 - ref.mean:+.4f} |" in result.output
