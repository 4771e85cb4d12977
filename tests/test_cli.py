import json
import re

import pytest
from typer.testing import CliRunner

from mpolstm.harness.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "args,message",
    [
        (["demo", "--ratios", "0.5"], "--ratios must be comma-separated numbers > 1"),
        (["demo", "--ratios", "ten"], "--ratios must be comma-separated numbers > 1"),
        (["reproduce", "--task", "seqcls", "--rows", "dense,nonsense"], "unknown protocol --rows"),
        (["reproduce", "--task", "seqcls", "--dataset", "imdb"], "needs --data-dir"),
        (["reproduce", "--task", "seqcls", "--dataset", "imdb", "--data-dir", "/nonexistent/aclImdb"], "is not a folder"),
        (["reproduce", "--task", "seqcls", "--preset", "huge"], "huge"),
        (["decompose", "--size", "2"], "--size must be >= 4"),
        (["reproduce", "--task", "seqcls", "--seeds", "0,zero"], "--seeds must be distinct"),
        (["reproduce", "--task", "seqcls", "--seeds", "1,1"], "--seeds must be distinct"),
        (["paper-grid", "--rates", "7"], "not in the paper's Table 2"),
        (["paper-grid", "--rows", "dense,mpo-gradual"], "cannot run on the paper's layout"),
        (["paper-grid", "--task", "ptb"], "must be seqcls or speech"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message, tmp_path):
    result = runner.invoke(app, [*args] + (["--out", str(tmp_path / "o")] if args[0] != "decompose" and "--preset" not in args else []))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "o").exists()


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    result = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "refusing to replace it" in result.output
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_reproduce_quick_subset_writes_results(tmp_path, monkeypatch):
    from mpolstm.harness.tasks import seqcls

    monkeypatch.setitem(seqcls.SIZES, "quick", seqcls.SeqClsSize(16, 200, 50, 1, 1, 1e-2))
    out = tmp_path / "res"
    result = runner.invoke(app, ["reproduce", "--task", "seqcls", "--ratios", "10", "--rows",
                                 "dense,mpo-decomp,prune-oneshot", "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text())
    assert [r["row"] for r in doc["rows"]] == ["dense", "mpo-decomp", "prune-oneshot"]
    assert sorted(p.name for p in out.iterdir()) == ["models", "results-bytes.png", "results.json", "results.md",
                                                     "results.png"]
    assert sorted(p.name for p in (out / "models").iterdir()) == ["dense", "mpo-decomp-10x", "prune-oneshot-10x"]
    assert not any(p.name.startswith(".res.") for p in tmp_path.iterdir())  # no staging left behind


def test_console_entry_prints_one_line_for_usage_errors():
    import subprocess
    import sys

    for args in (["reproduce", "--task", "nonsense"], ["frobnicate"], ["inspect", "/nonexistent/model"]):
        proc = subprocess.run([sys.executable, "-m", "mpolstm.harness.cli", *args], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


def test_train_compress_inspect_round_trip(tmp_path, monkeypatch):
    from mpolstm.harness.tasks import load_model, seqcls
    from mpolstm.nn import MPOLSTM

    monkeypatch.setitem(seqcls.SIZES, "quick", seqcls.SeqClsSize(16, 200, 50, 1, 1, 1e-2))
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--task", "seqcls", "--out", str(run), "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert (run / "checkpoint.safetensors").is_file() and (run / "model" / "architecture.json").is_file()
    assert re.search(r"^epoch 1/1  loss \d+\.\d{4}  val accuracy", result.output, re.M), result.output  # not a TTY: lines

    small = tmp_path / "small"
    result = runner.invoke(app, ["compress", str(run / "model"), str(small), "--ratio", "8"])
    assert result.exit_code == 0, result.output
    model, spec = load_model(small)
    assert spec["name"] == "seqcls" and isinstance(model.lstm, MPOLSTM)
    dense = 4 * 16 * 28 + 4 * 16 * 16
    assert sum(c.numel() for cores in model.lstm.mpo_weights().values() for c in cores) <= dense / 8

    again = runner.invoke(app, ["compress", str(run / "model"), str(small), "--ratio", "8"])
    assert again.exit_code == 2 and "already exists" in again.output

    fast = tmp_path / "fast"  # a latency budget: multiply-adds per step at batch 1
    result = runner.invoke(app, ["compress", str(run / "model"), str(fast), "--ratio", "4", "--max-macs", "400"])
    assert result.exit_code == 0, result.output
    assert "multiply-add budget" in result.output
    model, _ = load_model(fast)
    from mpolstm import mpo
    assert sum(mpo.step_macs(*model.lstm.factors[w], model.lstm.mpo(w).bond_dims) for w in model.lstm.mpo_weights()) <= 400
    refused = runner.invoke(app, ["compress", str(run / "model"), str(tmp_path / "no"), "--max-macs", "3"])
    assert refused.exit_code == 2 and "--max-macs 3 is below the smallest possible" in refused.output

    monkeypatch.setenv("COLUMNS", "250")  # keep the table's rows on one line each
    plot = tmp_path / "entropy.png"
    result = runner.invoke(app, ["inspect", str(small), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "lstm.weight_hh_l0" in result.output and plot.stat().st_size > 1000

    bad = runner.invoke(app, ["compress", str(run / "model"), str(tmp_path / "x"), "--rel-tol", "2"])
    assert bad.exit_code == 2 and "--rel-tol" in bad.output and not (tmp_path / "x").exists()

    checkpoint = run / "checkpoint.safetensors"  # one flipped bit in its weights: resume refuses
    damaged = bytearray(checkpoint.read_bytes())
    damaged[-2] ^= 0x01
    checkpoint.write_bytes(bytes(damaged))
    refused = runner.invoke(app, ["train", "--task", "seqcls", "--out", str(run), "--epochs", "2", "--resume"])
    assert refused.exit_code == 2 and "damaged" in refused.output and str(checkpoint) in refused.output.replace("\n", "")
    assert len([line for line in refused.output.splitlines() if line.strip()]) == 1, refused.output


def test_export_command_formats_and_errors(tmp_path, monkeypatch):
    import torch

    from mpolstm.compression import CompressionConfig, compress
    from mpolstm.harness.tasks import load_model, save_model
    from mpolstm.harness.tasks.seqcls import SeqClassifier

    spec = {"name": "seqcls", "kwargs": {"num_classes": 3, "hidden_size": 16, "input_size": 8, "vocab_size": None}}
    model, _ = compress(SeqClassifier(3, 16, input_size=8), CompressionConfig(target_modules=["lstm"], max_bond=4))
    save_model(model, spec, tmp_path / "m")
    x = torch.randn(2, 5, 8)
    model.eval()

    ts = tmp_path / "m.pt"
    result = runner.invoke(app, ["export", str(tmp_path / "m"), "--format", "torchscript", "--out", str(ts)])
    assert result.exit_code == 0
    assert torch.allclose(torch.jit.load(str(ts))(x), model(x), atol=1e-5)
    from mpolstm.export import file_weight_bytes  # the summary gives the file's bytes

    assert f"{file_weight_bytes(ts):,} bytes of weights" in " ".join(result.output.split())

    dense_dir = tmp_path / "dense"
    assert runner.invoke(app, ["export", str(tmp_path / "m"), "--format", "dense", "--out", str(dense_dir)]).exit_code == 0
    dense, _ = load_model(dense_dir)
    assert isinstance(dense.lstm, torch.nn.LSTM)
    assert torch.allclose(dense.eval()(x), model(x), atol=1e-5)

    again = runner.invoke(app, ["export", str(tmp_path / "m"), "--format", "torchscript", "--out", str(ts)])
    assert again.exit_code == 2 and f"--out {ts} already exists" in again.output and "--overwrite" in again.output
    assert runner.invoke(app, ["export", str(tmp_path / "m"), "--format", "torchscript", "--out", str(ts),
                               "--overwrite"]).exit_code == 0
    new = tmp_path / "no" / "such" / "m.pt"  # missing parents are created, as by every command
    assert runner.invoke(app, ["export", str(tmp_path / "m"), "--format", "torchscript", "--out", str(new)]).exit_code == 0
    assert new.is_file()


def test_interrupted_reproduce_resumes_to_the_same_table(tmp_path, monkeypatch):
    from mpolstm.harness.protocol import rows as protocol_rows
    from mpolstm.harness.tasks import seqcls

    monkeypatch.setitem(seqcls.SIZES, "quick", seqcls.SeqClsSize(16, 200, 50, 2, 1, 1e-2))
    args = ["reproduce", "--task", "seqcls", "--ratios", "10", "--rows", "dense,mpo-decomp,prune-oneshot"]
    reference = runner.invoke(app, [*args, "--out", str(tmp_path / "ref")])
    assert reference.exit_code == 0, reference.output

    out, staging = tmp_path / "res", tmp_path / ".res.staging"
    real_prune = protocol_rows.prune_global

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(protocol_rows, "prune_global", interrupted)
    stopped = runner.invoke(app, [*args, "--out", str(out)])
    assert stopped.exit_code != 0 and not out.exists() and (staging / "runs" / "mpo-decomp-10x").is_dir()
    monkeypatch.setattr(protocol_rows, "prune_global", real_prune)

    refused = runner.invoke(app, [*args, "--out", str(out)])
    assert refused.exit_code == 2 and "--resume" in refused.output and staging.is_dir()
    resumed = runner.invoke(app, [*args, "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert not staging.exists()
    rows = json.loads((out / "results.json").read_text())["rows"]
    expected = json.loads((tmp_path / "ref" / "results.json").read_text())["rows"]
    assert [(r["row"], r["accuracy"], r["params"]) for r in rows] == \
        [(r["row"], r["accuracy"], r["params"]) for r in expected]


FACTORY = '''
import torch
from torch import nn


def build():
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.LSTM(32, 32, batch_first=True))
'''


def test_any_model_compress_inspect_export(tmp_path, monkeypatch):
    """A user's model from --factory + --weights: compress (calibrated, distilled), inspect, export."""
    import torch
    from safetensors.torch import save_file

    from mpolstm import io

    (tmp_path / "usernet.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import usernet

    torch.manual_seed(0)
    dense = usernet.build()
    torch.save(dense.state_dict(), tmp_path / "w.pt")
    save_file({"input0": torch.randn(16, 7, 16)}, tmp_path / "inputs.safetensors")
    out = tmp_path / "small"
    result = runner.invoke(app, ["compress", str(out), "--factory", "usernet:build", "--weights", str(tmp_path / "w.pt"),
                                 "--target", "0,2", "--ratio", "3", "--calibrate", str(tmp_path / "inputs.safetensors"),
                                 "--distill-steps", "3", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert "distilled 3 steps" in result.output and (out / "model.safetensors").is_file()
    loaded = io.load(out, usernet.build())
    assert type(loaded[2]).__name__ == "MPOLSTM"

    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert "2.weight_hh_l0" in result.output and "0.weight" in result.output

    result = runner.invoke(app, ["export", str(out), "--format", "torchscript", "--out", str(tmp_path / "m.pt"),
                                 "--inputs", str(tmp_path / "inputs.safetensors")])
    assert result.exit_code == 0, result.output
    x = torch.randn(2, 7, 16)
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    torch.testing.assert_close(scripted(x)[0], loaded.eval()(x)[0], atol=1e-5, rtol=1e-4)

    for args, message in ((["compress", str(tmp_path / "x"), "--factory", "nope:build", "--random-init", "--ratio", "3"],
                           "cannot import"),
                          (["compress", str(tmp_path / "x"), "--factory", "usernet:build", "--weights",
                            str(tmp_path / "missing.pt"), "--ratio", "3"], "does not exist"),
                          (["export", str(out), "--format", "onnx", "--out", str(tmp_path / "m.onnx")], "--inputs")):
        bad = runner.invoke(app, args)
        assert bad.exit_code == 2 and message in bad.output, bad.output
        assert not (tmp_path / "x").exists() and not (tmp_path / "m.onnx").exists()


def test_reproduce_seeds_writes_a_summary_with_error_bars(tmp_path, monkeypatch):
    from mpolstm.harness.tasks import seqcls

    monkeypatch.setitem(seqcls.SIZES, "quick", seqcls.SeqClsSize(16, 200, 50, 1, 1, 1e-2))
    out = tmp_path / "res"
    result = runner.invoke(app, ["reproduce", "--task", "seqcls", "--ratios", "10", "--rows",
                                 "dense,mpo-decomp,prune-oneshot,int8", "--seeds", "3,4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    seeds = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (3, 4)]
    assert summary["seeds"] == [3, 4] and [d["seed"] for d in seeds] == [3, 4]
    row = next(r for r in summary["rows"] if r["row"] == "mpo-decomp")
    accuracies = [next(e["accuracy"] for e in d["rows"] if e["row"] == "mpo-decomp") for d in seeds]
    assert row["accuracy"]["mean"] == pytest.approx(sum(accuracies) / 2)
    assert row["accuracy"]["std"] == pytest.approx(abs(accuracies[0] - accuracies[1]) / 2 ** 0.5)
    verdict = summary["verdict"][0]
    assert verdict["target_ratio"] == 10 and verdict["equal_params"]["mpo"] == "mpo-decomp"
    assert verdict["equal_params"]["baseline"] == "prune-oneshot"
    assert verdict["equal_params"]["outcome"] in ("win", "tie", "loss") and "equal_bytes" not in verdict  # pruning > bytes
    text = (out / "summary.md").read_text()
    assert " ± " in text and "- 10x: best" in text and (out / "summary.png").stat().st_size > 1000
    again = runner.invoke(app, ["reproduce", "--task", "seqcls", "--ratios", "10", "--rows",
                                "dense,mpo-decomp,prune-oneshot,int8", "--seeds", "3,4", "--out", str(out), "--resume"])
    assert again.exit_code == 0 and "seed 3: reusing" in again.output
    assert json.loads((out / "summary.json").read_text()) == summary


def test_paper_grid_on_a_tiny_imdb_folder(tmp_path, monkeypatch):
    from mpolstm.harness.tasks import seqcls
    from test_data import write_imdb

    monkeypatch.setenv("MPOLSTM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(seqcls.SIZES, "quick", seqcls.SeqClsSize(128, None, 10, 1, 1, 1e-2))
    root = tmp_path / "aclImdb"
    words = [f"w{k}" for k in range(40)]
    write_imdb(root, {
        "train": [("pos" if k % 2 else "neg", " ".join(words[k:k + 12]) + (" good" if k % 2 else " bad"))
                  for k in range(24)],
        "test": [("pos", "w3 w4 good"), ("neg", "w5 w6 bad")] * 2,
    })
    out = tmp_path / "grid"
    result = runner.invoke(app, ["paper-grid", "--dataset", "imdb", "--data-dir", str(root), "--rates", "100",
                                 "--rows", "dense,mpo-scratch,prune-agp", "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text())
    assert doc["layout"] == "paper" and doc["meta"]["hidden_size"] == 256
    spec = json.loads((out / "models" / "dense" / "architecture.json").read_text())
    assert spec["kwargs"]["embedding_dim"] == 256 and spec["kwargs"]["vocab_size"] == 2 + 35 + 2  # w0-w34, good, bad: all (< 25,000)
    rows = {r["row"]: r for r in doc["rows"]}
    assert rows["mpo-scratch"]["params"] == 2 * (320 * 7 + 8 * 7 ** 2) == rows["prune-agp"]["params"]
    grid = (out / "paper-grid.md").read_text()
    assert "| 100 | 7 | 7 | 5,264 | 99.6x |" in grid and "+0.00 |" in grid  # paper's VBD PESQ tie at 100x


def test_compress_int8_and_inspect_bytes_through_the_console_script(tmp_path):
    """The installed ``mpolstm`` script, in a subprocess: ``compress --int8`` writes int8 cores, ``inspect``
    prints each weight's bytes as stored (int8 + scales, or float32) and the total."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch

    from mpolstm.harness.tasks import load_model, save_model
    from mpolstm.harness.tasks.seqcls import SeqClassifier
    from mpolstm.storage import pack_weights

    spec = {"name": "seqcls", "kwargs": {"num_classes": 3, "hidden_size": 32, "input_size": 16, "vocab_size": None}}
    torch.manual_seed(0)
    save_model(SeqClassifier(3, 32, input_size=16), spec, tmp_path / "dense")

    def mpolstm_cli(*args):
        return subprocess.run([str(Path(sys.executable).parent / "mpolstm"), *map(str, args)], capture_output=True,
                              text=True, env={**os.environ, "COLUMNS": "250"})

    totals = {}
    for name, flags in (("float", []), ("int8", ["--int8"])):
        proc = mpolstm_cli("compress", tmp_path / "dense", tmp_path / name, "--ratio", "4", *flags)
        assert proc.returncode == 0, proc.stderr
        int8_line = [line for line in proc.stdout.splitlines() if line.startswith("int8 weights:")]
        assert len(int8_line) == (name == "int8"), proc.stdout  # the int8 model measured beside the float one
        model, _ = load_model(tmp_path / name)
        assert model.lstm.int8 == (name == "int8")
        tensors, formats = pack_weights(model, ["lstm"], int8_cores=True)
        proc = mpolstm_cli("inspect", tmp_path / name)
        assert proc.returncode == 0, proc.stderr
        assert all(line in proc.stdout for line in int8_line)
        rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.startswith("lstm.")}
        assert set(rows) == set(formats)
        for weight, row in rows.items():
            cores = sum(c.numel() for c in model.lstm.mpo_weights()[weight.removeprefix("lstm.")])
            stored = (sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(weight + "."))
                      if name == "int8" else 4 * cores)
            assert ("int8" if name == "int8" else "float32") in row and f"{stored:,}" in row, row
        totals[name] = int(proc.stdout.split(" bytes as stored")[0].split()[-1].replace(",", ""))
        assert totals[name] == sum(int(row[row.index("int8" if name == "int8" else "float32") + 1].replace(",", ""))
                                   for row in rows.values())
    assert 0.25 < totals["int8"] / totals["float"] < 0.27

    proc = mpolstm_cli("compress", tmp_path / "dense", tmp_path / "none", "--max-bond", "1000", "--int8")
    assert proc.returncode == 2 and not (tmp_path / "none").exists()
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        "error: --int8: SeqClassifier has no MPO module to quantize (none of its layers is compressed)"], proc.stderr
