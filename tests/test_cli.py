import json

import pytest
from typer.testing import CliRunner

from mpolstm.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "args,message",
    [
        (["demo", "--ratios", "0.5"], "--ratios must be comma-separated numbers > 1"),
        (["demo", "--ratios", "ten"], "--ratios must be comma-separated numbers > 1"),
        (["reproduce", "--task", "seqcls", "--rows", "dense,nonsense"], "unknown protocol rows"),
        (["reproduce", "--task", "seqcls", "--dataset", "imdb"], "needs data_dir"),
        (["reproduce", "--task", "seqcls", "--dataset", "imdb", "--data-dir", "/nonexistent/aclImdb"], "is not a folder"),
        (["reproduce", "--task", "seqcls", "--preset", "huge"], "huge"),
        (["decompose", "--size", "2"], "--size must be >= 4"),
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
    from mpolstm.tasks import seqcls

    monkeypatch.setitem(seqcls.SIZES, "quick", seqcls.SeqClsSize(16, 200, 50, 1, 1, 1e-2))
    out = tmp_path / "res"
    result = runner.invoke(app, ["reproduce", "--task", "seqcls", "--ratios", "10", "--rows",
                                 "dense,mpo-decomp,prune-oneshot", "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text())
    assert [r["row"] for r in doc["rows"]] == ["dense", "mpo-decomp", "prune-oneshot"]
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "results.png"]
    assert not any(p.name.startswith(".res.") for p in tmp_path.iterdir())  # no staging left behind
