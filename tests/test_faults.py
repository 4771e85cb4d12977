"""Faults: SIGKILL mid-epoch then resume, checkpoint write ordering, unwritable or full disks.

Run as a script (``python tests/test_faults.py OUT EPOCHS``) this file is the training process that
the kill test starts; with $HANG_AT_STEP set it announces that step in OUT/hanging and sleeps."""

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import mpolstm.harness.data.cache as cache
from mpolstm.harness.training import ACCURACY, Callback, fit, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(5, 8, batch_first=True)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.drop(self.lstm(x)[0][:, -1]))


class HangAt(Callback):
    """Blocks at optimizer step $HANG_AT_STEP (after announcing it), so a kill lands mid-epoch."""

    def on_batch_end(self, state):
        if os.environ.get("HANG_AT_STEP") == str(state.step):
            (state.out_dir / "hanging").write_text(str(state.step))
            time.sleep(300)


_g = torch.Generator().manual_seed(1)
X, Y = torch.randn(64, 6, 5, generator=_g), torch.randint(0, 3, (64,), generator=_g)


def run(epochs, out, resume=False):
    torch.manual_seed(0)
    model = Net()
    train = DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True)  # 4 steps per epoch
    val = DataLoader(TensorDataset(X[:32], Y[:32]), batch_size=32)
    result = fit(model, train, val, F.cross_entropy, ACCURACY, epochs=epochs, lr=1e-2, grad_clip=1.0, out_dir=out,
                 resume=resume, callbacks=[HangAt()], progress=False, restore_best=False)
    return model, result


def strip_times(rows):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "HANG_AT_STEP": "6", "PYTHONPATH": str(ROOT / "src"),
           "TORCH_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(out), "4"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (out / "hanging").exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the training process never reached step 6"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    _, state = load_checkpoint(out / "checkpoint.safetensors")
    assert state["epoch"] == 1 and state["step"] == 4  # killed in epoch 2, after its 2nd step
    resumed, r_resumed = run(4, out, resume=True)
    straight, r_straight = run(4, tmp_path / "straight")
    assert same_weights(resumed.state_dict(), straight.state_dict())
    assert strip_times(r_resumed.history) == strip_times(r_straight.history)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert strip_times(lines) == strip_times(r_straight.history)


def test_checkpoint_is_fsynced_renamed_then_its_directory_fsynced(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name, Path(src).parent == Path(dst).parent))
        real_replace(src, dst)

    monkeypatch.setattr(cache.os, "fsync", fsync)
    monkeypatch.setattr(cache.os, "replace", replace)
    run(1, tmp_path)
    i = events.index(("replace", "checkpoint.safetensors", True))  # the temp file sits beside the target
    assert events[i - 1] == ("fsync", "file") and events[i + 1] == ("fsync", "dir")


def test_unwritable_out_dir_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    torch.manual_seed(0)
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    started = []

    class Spy(Callback):
        def on_epoch_start(self, state):
            started.append(state.epoch)

    bad = tmp_path / "file" / "run"
    with pytest.raises(ValueError, match=f"out_dir {bad} is not a writable directory"):
        fit(model, [(X, Y)], [(X, Y)], F.cross_entropy, ACCURACY, epochs=1, lr=1e-2, out_dir=bad,
            callbacks=[Spy()], progress=False)
    assert started == [] and same_weights(model.state_dict(), before)


def test_disk_full_keeps_the_previous_checkpoint_and_names_the_file(tmp_path, monkeypatch):
    run(2, tmp_path)
    before = (tmp_path / "checkpoint.safetensors").read_bytes()
    real_replace = os.replace

    def full(src, dst):
        if Path(dst).name == "checkpoint.safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst)

    monkeypatch.setattr(cache.os, "replace", full)
    with pytest.raises(OSError, match=f"could not write {tmp_path / 'checkpoint.safetensors'}: No space left") as e:
        run(4, tmp_path, resume=True)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(cache.os, "replace", real_replace)
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    resumed, _ = run(4, tmp_path, resume=True)
    straight, _ = run(4, tmp_path / "straight")
    assert same_weights(resumed.state_dict(), straight.state_dict())


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ["TORCH_THREADS"]))
    run(int(sys.argv[2]), Path(sys.argv[1]))
