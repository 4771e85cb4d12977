import json

import pytest
import safetensors.torch
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import mpolstm.checkpoint as checkpoint_mod
from mpolstm.harness.training import (
    ACCURACY,
    BEST_FORMAT,
    CHECKPOINT_FORMAT,
    PERPLEXITY,
    Callback,
    Distillation,
    Metric,
    count_parameters,
    evaluate,
    fit,
    load_checkpoint,
)


class Net(nn.Module):
    def __init__(self, hidden=8):
        super().__init__()
        self.lstm = nn.LSTM(5, hidden, batch_first=True)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc(self.drop(self.lstm(x)[0][:, -1]))


_g = torch.Generator().manual_seed(1)
X, Y = torch.randn(64, 6, 5, generator=_g), torch.randint(0, 3, (64,), generator=_g)


def loaders():
    train = DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True)
    return train, DataLoader(TensorDataset(X[:32], Y[:32]), batch_size=32)


def run(epochs, out=None, resume=False, **kw):
    torch.manual_seed(0)
    model = Net()
    kw = {"lr": 1e-2, "grad_clip": 1.0, "progress": False, "restore_best": False, **kw}
    result = fit(model, *loaders(), F.cross_entropy, ACCURACY, epochs=epochs, out_dir=out, resume=resume, **kw)
    return model, result


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def strip_times(history):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in history]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resume_is_bit_exact(tmp_path, optimizer):
    straight, r_straight = run(4, tmp_path / "a", optimizer=optimizer, momentum=0.9)
    run(2, tmp_path / "b", optimizer=optimizer, momentum=0.9)
    resumed, r_resumed = run(4, tmp_path / "b", resume=True, optimizer=optimizer, momentum=0.9)
    assert same_weights(straight, resumed)
    assert strip_times(r_straight.history) == strip_times(r_resumed.history)
    lines = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    assert strip_times(lines) == strip_times(r_straight.history)


def test_same_seed_same_result_and_other_seed_differs():
    a, _ = run(2, seed=3)
    b, _ = run(2, seed=3)
    c, _ = run(2, seed=4)
    assert same_weights(a, b)
    assert not same_weights(a, c)


def test_checkpoint_format_and_no_pickle(tmp_path):
    run(1, tmp_path)
    tensors, state = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert state["epoch"] == 1 and state["optimizer"]["name"] == "adam"
    assert "model/lstm.weight_hh_l0" in tensors and any(k.startswith("optim/") for k in tensors)
    assert state["shapes"]["fc.weight"] == [3, 8]
    with open(tmp_path / "checkpoint.safetensors", "rb") as fh:
        assert b"\x80\x04" not in fh.read(64)  # a pickle protocol header would sit at the start


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    run(2, tmp_path)
    before = (tmp_path / "checkpoint.safetensors").read_bytes()
    real_save = checkpoint_mod.st_save

    def crash(tensors, metadata):
        data = real_save(tensors, metadata)
        # leave a partly written temp file, as a kill -9 mid-write would
        (tmp_path / ".checkpoint.safetensors.partial.tmp").write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_mod, "st_save", crash)
    with pytest.raises(KeyboardInterrupt):
        run(4, tmp_path, resume=True)
    monkeypatch.setattr(checkpoint_mod, "st_save", real_save)
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == before
    resumed, _ = run(4, tmp_path, resume=True)
    straight, _ = run(4, tmp_path / "straight")
    assert same_weights(resumed, straight)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_corrupt_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    run(1, tmp_path)
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="unreadable or corrupt"):
        run(2, tmp_path, resume=True)
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not an mpolstm checkpoint"):
        load_checkpoint(path)


def test_resume_with_changed_structure_is_a_clear_error(tmp_path):
    run(1, tmp_path)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="shape differs"):
        fit(Net(hidden=6), *loaders(), F.cross_entropy, ACCURACY, epochs=2, lr=1e-2, out_dir=tmp_path,
            resume=True, progress=False)


def test_early_stopping_and_best_weights(tmp_path):
    torch.manual_seed(0)
    model = Net()
    values = iter([0.5, 0.7, 0.6, 0.6, 0.6, 0.9])  # scripted validation values: best at epoch 2
    metric = Metric("fake", "max", lambda o, t: (0.0, 1), finalize=lambda _: next(values))
    result = fit(model, *loaders(), F.cross_entropy, metric, epochs=6, lr=1e-2, patience=2, out_dir=tmp_path,
                 progress=False)
    assert result.stopped_early and result.epochs_completed == 4
    assert result.best_epoch == 2 and result.best_metric == 0.7
    best, state = load_checkpoint(tmp_path / "best.safetensors", BEST_FORMAT)
    assert state["epoch"] == 2
    assert all(torch.equal(model.state_dict()[k[len("model/"):]], v) for k, v in best.items())
    # resuming a run that stopped early does not train further
    again = fit(model, *loaders(), F.cross_entropy, metric, epochs=6, lr=1e-2, patience=2, out_dir=tmp_path,
                resume=True, progress=False)
    assert again.epochs_completed == 4


def test_callbacks_see_epochs_and_structure_change_rebuilds_optimizer():
    events = []

    class Freeze(Callback):
        def on_epoch_start(self, state):
            events.append(("start", state.epoch))
            if state.epoch == 1:
                state.model.lstm.requires_grad_(False)

        def on_epoch_end(self, state):
            state.record["seen"] = True

    torch.manual_seed(0)
    model = Net()
    result = fit(model, *loaders(), F.cross_entropy, ACCURACY, epochs=3, lr=1e-2, callbacks=[Freeze()],
                 progress=False)
    frozen = model.lstm.weight_hh_l0.detach().clone()
    assert events == [("start", 0), ("start", 1), ("start", 2)]
    assert all(r["seen"] for r in result.history)
    assert len(result.history) == 3
    assert torch.equal(model.lstm.weight_hh_l0, frozen)


def test_lr_schedule_and_evaluate_and_count():
    torch.manual_seed(0)
    model = Net()
    result = fit(model, *loaders(), F.cross_entropy, ACCURACY, epochs=3, lr=0.1, optimizer="rmsprop",
                 lr_schedule=lambda e: 0.5**e, progress=False, restore_best=False)
    assert [r["lr"] for r in result.history] == [0.1, 0.05, 0.025]
    acc = evaluate(model, loaders()[1], ACCURACY)
    assert acc == result.history[-1]["val_accuracy"]
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    model.fc.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - 8 * 3 - 3


def test_perplexity_metric():
    logits = torch.zeros(2, 3, 10)  # uniform over 10 words -> perplexity 10
    assert PERPLEXITY.finalize(PERPLEXITY.batch(logits, torch.zeros(2, 3, dtype=torch.long))[0] / 6) == pytest.approx(10.0)


def test_distillation_pulls_student_towards_teacher():
    torch.manual_seed(1)
    teacher = Net()
    def gap(model):
        with torch.no_grad():
            return F.kl_div(F.log_softmax(model.eval()(X), -1), F.log_softmax(teacher.eval()(X), -1),
                            log_target=True, reduction="batchmean").item()
    plain, _ = run(3)
    distilled, _ = run(3, distill=Distillation(teacher, alpha=1.0, temperature=1.0))
    assert gap(distilled) < gap(plain)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="optimizer"):
        run(1, optimizer="lbfgs")
    with pytest.raises(ValueError, match="needs out_dir"):
        run(1, resume=True)
    with pytest.raises(ValueError, match="CUDA"):
        run(1, amp=True)
    with pytest.raises(ValueError, match="patience"):
        run(1, patience=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        run(1, tmp_path / "file")
    assert CHECKPOINT_FORMAT.startswith("mpolstm")


# ------------------------------------------------------- mpolstm.checkpoint, used by a plain loop
def plain_training(path, epochs, stop_after=None):
    """A minimal training routine resuming with the library API, as the module docstring shows."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train = loaders()[0]
    start = 0
    if path.exists():
        tensors, state = checkpoint_mod.load_checkpoint(path, fields={"epoch": int})
        checkpoint_mod.restore(path, tensors, state, model, opt, loader=train)
        start = state["epoch"]
    else:
        torch.manual_seed(1)
    for epoch in range(start, epochs if stop_after is None else stop_after):
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        checkpoint_mod.save_checkpoint(path, model, opt, {"epoch": epoch + 1, "note": "plain"}, loader=train)
    return model


def test_library_checkpoint_gives_exact_resume_to_a_plain_loop(tmp_path):
    straight = plain_training(tmp_path / "a.safetensors", 3)
    plain_training(tmp_path / "b.safetensors", 3, stop_after=1)
    resumed = plain_training(tmp_path / "b.safetensors", 3)
    assert same_weights(straight, resumed)
    tensors, state = checkpoint_mod.load_checkpoint(tmp_path / "b.safetensors", fields={"note": str})
    assert state["optimizer"]["name"] == "sgd" and state["epoch"] == 3 and "model/fc.weight" in tensors
    with pytest.raises(ValueError, match="'missing' should be int"):
        checkpoint_mod.load_checkpoint(tmp_path / "b.safetensors", fields={"missing": int})
    with pytest.raises(ValueError, match="was written with optimizer 'sgd', not 'adam'"):
        model = Net()
        checkpoint_mod.restore(tmp_path / "b.safetensors", tensors, state, model, torch.optim.Adam(model.parameters()))


def test_library_checkpoint_rejects_reserved_keys_and_reads_weights_files(tmp_path):
    model = Net()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="reserved"):
        checkpoint_mod.save_checkpoint(tmp_path / "c.safetensors", model, opt, {"rng": 1})
    checkpoint_mod.save_weights(tmp_path / "w.safetensors", model.state_dict(), {"epoch": 1, "metric": 0.5})
    tensors, state = load_checkpoint(tmp_path / "w.safetensors", BEST_FORMAT)
    assert state == {"epoch": 1, "metric": 0.5}
    assert same_weights(model, _loaded(checkpoint_mod.model_state(tensors)))
    with pytest.raises(ValueError, match="not an mpolstm checkpoint"):
        load_checkpoint(tmp_path / "w.safetensors")  # a weights file is not a checkpoint


def _loaded(weights):
    model = Net()
    model.load_state_dict(weights)
    return model
