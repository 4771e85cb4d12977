"""The `mpolstm` console script on a user's own model, run as a user runs it: in a subprocess,
from the folder that holds the model's module, with output to a pipe."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
MPOLSTM = Path(sys.executable).with_name("mpolstm")

USERNET = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.front = nn.Conv1d(16, 40, kernel_size=5, padding=2)
        self.rnn = nn.LSTM(40, hidden, batch_first=True)
        self.proj = nn.Linear(128, 500)
        self.out = nn.Linear(hidden, 128)

    def forward(self, x):
        y, _ = self.rnn(self.front(x.transpose(1, 2)).transpose(1, 2))
        return self.proj(self.out(y[:, -1]))


def build():
    torch.manual_seed(0)
    return Net()


def build_wide():
    torch.manual_seed(0)
    return Net(hidden=48)
'''


def mpolstm(*args, cwd: Path, check_rc: int | None = None) -> subprocess.CompletedProcess:
    """The installed console script, with the environment a user has (no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(MPOLSTM), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single `error: ...` line of a refused command (exit code 2, nothing on stdout but notes)."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory) -> Path:
    """A folder as a user has it: mymodels.py, its weights (plain, wrapped, of another size), inputs."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "mymodels.py").write_text(USERNET)
    sys.path.insert(0, str(folder))
    try:
        import mymodels
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("mymodels", None)
    state = mymodels.build().state_dict()
    torch.save(state, folder / "w.pt")
    torch.save({"model": state, "epoch": 7, "lr": 1e-3}, folder / "checkpoint.pt")
    torch.save(mymodels.build_wide().state_dict(), folder / "wide.pt")
    save_file({"input0": torch.randn(16, 9, 16, generator=torch.Generator().manual_seed(0))},
              folder / "inputs.safetensors")
    save_file({"x": torch.randn(2, 9, 16)}, folder / "misnamed.safetensors")
    return folder


@pytest.fixture(scope="module")
def distilled(user_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """compress --calibrate --distill-steps of the user's model, from its folder."""
    proc = mpolstm("compress", "small", "--factory", "mymodels:build", "--weights", "w.pt", "--target",
                   "front,rnn,proj", "--ratio", "4", "--calibrate", "inputs.safetensors", "--distill-steps", "3",
                   "--batch-size", "8", cwd=user_dir, check_rc=0)
    return user_dir / "small", proc


def test_factory_module_is_found_in_the_current_directory(distilled):
    """Like `python -m`, without PYTHONPATH=."""
    folder, proc = distilled
    assert (folder / "model.safetensors").is_file() and "saved small" in proc.stdout


def test_compress_prints_the_report_then_the_distillation(distilled):
    _, proc = distilled
    out = proc.stdout
    assert out.index("layouts chosen:") < out.index("distilled 3 steps") < out.index("saved small")
    assert "measured before distillation" in out
    assert "distill step 3/3 loss" in proc.stderr  # progress reaches a log when stderr is not a terminal
    # torch's weight shapes: Linear(128, 500) is 500x128, Conv1d(16, 40, 5) is 40x16x5
    assert " 500x128 " in out and " 40x16x5 " in out and "weight error" in out and "output error" in out


def test_inspect_names_its_errors_shapes_and_the_distillation(distilled):
    folder, compressed = distilled
    out = mpolstm("inspect", folder, cwd=folder.parent, check_rc=0).stdout
    header = next(line for line in out.splitlines() if line.startswith("weight "))
    assert "weight error" in header and "output error" in header and "rel. error" not in header
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("front.", "rnn.", "proj."))}
    assert rows["proj.weight"][1] == "500x128" and rows["front.weight"][1] == "40x16x5"
    assert rows["rnn.weight_hh_l0"][1] == "128x32"
    # the same two errors as compress's report (4 decimals; the report's entropy has 3)
    report_row = next(line.split() for line in compressed.stdout.splitlines() if " 500x128 " in line)
    errors = [[t for t in row if re.fullmatch(r"\d\.\d{4}", t)] for row in (rows["proj.weight"], report_row)]
    assert len(errors[0]) == 2 and errors[0] == errors[1]
    assert "distilled for 3 steps after these errors were measured" in out


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove-weights", "remove-config"])
def test_inspect_refuses_a_damaged_folder_as_load_does(distilled, tmp_path, damage):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(distilled[0], folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":
        for k in range(len(data) - 400, len(data) - 300):  # tensor data, past the header
            data[k] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "remove-weights":
        weights.unlink()
    else:
        (folder / "config.json").unlink()
    line = one_error_line(mpolstm("inspect", folder, cwd=tmp_path))
    expected = {"truncate": "SHA-256", "flip": "SHA-256", "remove-weights": "missing", "remove-config": "missing"}
    assert expected[damage] in line and str(folder) in line


def test_weights_inside_a_checkpoint_are_used_with_a_note(user_dir):
    proc = mpolstm("compress", "from-ckpt", "--factory", "mymodels:build", "--weights", "checkpoint.pt",
                   "--target", "rnn", "--ratio", "4", cwd=user_dir, check_rc=0)
    assert "note: --weights checkpoint.pt: using the state dict under 'model' (ignoring epoch, lr)" in proc.stdout
    mpolstm("compress", "from-plain", "--factory", "mymodels:build", "--weights", "w.pt",
                    "--target", "rnn", "--ratio", "4", cwd=user_dir, check_rc=0)
    a, b = (json.loads((user_dir / f / "config.json").read_text())["weights_sha256"] for f in ("from-ckpt", "from-plain"))
    assert a == b


def test_weights_that_do_not_fit_keep_torchs_details(user_dir):
    line = one_error_line(mpolstm("compress", "x", "--factory", "mymodels:build", "--weights", "wide.pt",
                                  "--target", "rnn", "--ratio", "4", cwd=user_dir))
    assert "--weights wide.pt does not fit the model from --factory mymodels:build" in line
    assert "size mismatch for rnn.weight_hh_l0" in line and "torch.Size([192, 48])" in line
    assert "size mismatch for out.weight" in line
    assert not (user_dir / "x").exists()


def test_a_target_that_matches_nothing_lists_the_models_modules(user_dir):
    line = one_error_line(mpolstm("compress", "x", "--factory", "mymodels:build", "--weights", "w.pt", "--ratio", "4",
                                  cwd=user_dir))
    assert "without --target, the module named 'lstm' is compressed" in line and "--target 'lstm'" not in line
    assert "the model's modules: front (Conv1d), rnn (LSTM), proj (Linear), out (Linear)" in line


@pytest.mark.parametrize("args,flag", [
    (["--ratio", "0.5"], "--ratio"),
    (["--ratio", "4", "--calibrate", "misnamed.safetensors"], "--calibrate misnamed.safetensors"),
    (["--ratio", "4", "--calibrate", "absent.safetensors"], "--calibrate absent.safetensors"),
    (["--max-bond", "0"], "--max-bond"),
    (["--rel-tol", "2"], "--rel-tol"),
    (["--ratio", "4", "--rel-tol", "0.1"], "--rel-tol cannot be combined with --ratio"),
    (["--ratio", "4", "--num-cores", "0"], "--num-cores"),
    (["--ratio", "4", "--layout", "tucker"], "--layout"),
    ([], "give a size: --ratio"),
    (["--ratio", "4", "--target", "("], "--target"),
    (["--ratio", "4", "--calibrate", "inputs.safetensors", "--distill-steps", "2", "--batch-size", "0"],
     "--batch-size"),
    (["--ratio", "4", "--weights", "absent.pt"], "--weights absent.pt"),
    (["--ratio", "100000"], "lower --ratio"),
])
def test_compress_errors_name_the_flag_typed(user_dir, args, flag):
    target = [] if "--target" in args else ["--target", "rnn"]
    weights = [] if "--weights" in args else ["--weights", "w.pt"]
    line = one_error_line(mpolstm("compress", "x", "--factory", "mymodels:build", *target, *weights, *args,
                                  cwd=user_dir))
    assert flag in line
    for api_name in ("target_ratio", "max_params", "max_bond", "rel_tol", "num_cores", "target_modules", "weights file"):
        assert api_name not in line
    assert not (user_dir / "x").exists()


@pytest.mark.parametrize("args,flag", [
    (["reproduce", "--task", "seqcls", "--rows", "dense,nonsense"], "--rows"),
    (["reproduce", "--task", "seqcls", "--dataset", "imdb"], "--data-dir"),
    (["paper-grid", "--rates", "7"], "--rates"),
    (["paper-grid", "--dense-epochs", "0"], "--dense-epochs"),
    (["paper-grid", "--finetune-epochs", "0"], "--finetune-epochs"),
    (["train", "--task", "seqcls", "--patience", "0"], "--patience"),
    (["export", "absent-model", "--format", "dense"], "absent-model does not exist"),
])
def test_other_commands_name_the_flag_typed(tmp_path, args, flag):
    line = one_error_line(mpolstm(*args, "--out", tmp_path / "o", cwd=tmp_path))
    assert flag in line and not (tmp_path / "o").exists()


def test_an_out_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    line = one_error_line(mpolstm("demo", "--out", tmp_path / "file" / "demo", cwd=tmp_path))
    assert "--out" in line


def test_make_demo_passes_args_and_the_resume_message_says_how():
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # under `make test`
    proc = subprocess.run(["make", "--no-print-directory", "-n", "demo", "ARGS=--resume --seed 3"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    demo = [line for line in proc.stdout.splitlines() if "mpolstm demo" in line]
    assert demo and demo[-1].endswith("/mpolstm demo --resume --seed 3"), proc.stdout
    from mpolstm.harness.protocol.run import RESUME_WITH_MAKE

    assert "make demo ARGS=--resume" in RESUME_WITH_MAKE


PROTOCOL = '''
import os
import sys
from mpolstm.harness.cli import main
from mpolstm.harness.tasks import seqcls

seqcls.SIZES["quick"] = seqcls.SeqClsSize(16, 200, 50, 2, 1, 1e-2)
os.umask(0o027)
sys.argv = ["mpolstm", "reproduce", "--task", "seqcls", "--ratios", "10", "--rows", "dense,mpo-decomp",
            "--out", sys.argv[1]]
main()
'''


def test_protocol_shows_each_epoch_and_writes_unwrapped_tables_to_a_pipe(tmp_path):
    """The demo's runner logs from the first epoch on; piped output keeps every table row whole."""
    proc = subprocess.run([sys.executable, "-c", PROTOCOL, str(tmp_path / "res")], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    first_row = next(i for i, line in enumerate(lines) if line.startswith("dense "))
    assert lines[0].strip().startswith("dense epoch 1/2: loss") and first_row == 2
    assert any(line.strip().startswith("mpo-decomp-10x epoch 1/") for line in lines)
    table = [line for line in lines if line.startswith("|")]
    expected = (tmp_path / "res" / "results.md").read_text().splitlines()
    assert len(table) >= 4 and table == [line for line in expected if line.startswith("|")]
    assert max(len(line) for line in table) > 80  # longer than a terminal's 80 columns, yet not wrapped
    # every file and folder written (results, plots, models, stored weights) as open() and mkdir() make them
    written = [p for p in (tmp_path / "res").rglob("*")]
    assert len(written) > 8
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == (0o750 if path.is_dir() else 0o640), path


def test_max_error_finds_a_ratio_within_it_and_inspect_shows_the_measured_output_error(user_dir):
    proc = mpolstm("compress", "tol", "--factory", "mymodels:build", "--weights", "w.pt", "--target",
                   "rnn,proj", "--max-error", "0.2", "--calibrate", "inputs.safetensors", "--plot", "curve.png",
                   cwd=user_dir, check_rc=0)
    assert "tolerance: kept" in proc.stdout and "model output error: " in proc.stdout
    assert "held-out calibration batches" in proc.stdout and (user_dir / "curve.png").stat().st_size > 0
    record = json.loads((user_dir / "tol" / "compression.json").read_text())
    assert record["report"]["output_check"]["error"] <= 0.2 and len(record["report"]["curve"]) >= 2
    shown = mpolstm("inspect", "tol", cwd=user_dir, check_rc=0).stdout
    assert f"model output error: {record['report']['output_check']['error']:.4f}" in shown
    line = one_error_line(mpolstm("compress", "x", "--factory", "mymodels:build", "--weights", "w.pt",
                                  "--plot", "c.png", "--ratio", "2", cwd=user_dir))
    assert "--plot draws the curve of the --max-error search" in line
    line = one_error_line(mpolstm("compress", "x", "--factory", "mymodels:build", "--weights", "w.pt",
                                  "--max-error", "0.1", "--ratio", "2", cwd=user_dir))
    assert "--max-error finds the budget itself" in line


def test_a_validate_file_is_four_batches_measured_on_the_users_data_without_the_unmeasured_warning(user_dir):
    proc = mpolstm("compress", "val", "--factory", "mymodels:build", "--weights", "w.pt", "--target", "rnn,proj",
                   "--ratio", "5", "--validate", "inputs.safetensors", cwd=user_dir, check_rc=0)
    assert "on 4 validation batches" in proc.stdout and "warning" not in proc.stdout, proc.stdout


def test_calibrate_inputs_are_sliced_along_the_batch_axis_the_model_has():
    """A time-first GRU's --calibrate tensor is (T, B, F): slicing axis 0 would cut time into stretches run
    from zero states (the held-out report then describes a few steps, not the model); axis 1 is the batch."""
    import torch
    from torch import nn

    from mpolstm.calibration import batch_axis
    from mpolstm.harness.cli.compression import _slices

    class TimeFirst(nn.Module):
        def __init__(self, batch_first: bool):
            super().__init__()
            self.rnn = nn.GRU(6, 12, batch_first=batch_first)
            self.out = nn.Linear(12, 3)

        def forward(self, x):
            return self.out(self.rnn(x)[0])

    torch.manual_seed(0)
    time_first, batch_first = TimeFirst(False), TimeFirst(True)
    assert batch_axis(time_first, (torch.randn(20, 16, 6),)) == 1
    assert batch_axis(batch_first, (torch.randn(16, 20, 6),)) == 0
    assert batch_axis(nn.Linear(6, 3), (torch.randn(16, 6),)) == 0
    assert time_first.training  # the probe leaves the mode as it found it
    slices = _slices((torch.randn(20, 16, 6),), 1)
    assert len(slices) == 8 and all(s[0].shape == (20, 2, 6) for s in slices)
