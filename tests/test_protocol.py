import json

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from mpolstm.compression import CompressionConfig, compress
from mpolstm.nn import MPOLSTM
from mpolstm.harness.tasks.base import Task
from mpolstm.harness.protocol import ROWS, BondSchedule, ProtocolConfig, mpo_bonds, run_protocol
from mpolstm.harness.tasks.seqcls import SeqClassifier
from mpolstm.harness.training import ACCURACY, TrainState


def tiny_task():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, 8, generator=gen)
    y = (x[:, :, 0].sum(1) > 0).long()
    data = TensorDataset(x, y)
    return Task(
        name="tiny", metric=ACCURACY,
        build_model=lambda: SeqClassifier(2, 16, input_size=8),
        train_loader=DataLoader(data, batch_size=32, shuffle=True, generator=gen),
        val_loader=DataLoader(data, batch_size=96), test_loader=DataLoader(data, batch_size=96),
        loss_fn=F.cross_entropy, dense_epochs=1, finetune_epochs=2, lr=1e-2,
        example_batch=x[:4], step_input=torch.zeros(1, 8),
    )


def test_protocol_writes_all_rows_at_equal_parameter_counts(tmp_path):
    doc = run_protocol(tiny_task(), ProtocolConfig(ratios=(4.0,)), tmp_path, log=lambda _: None)
    rows = {r["row"]: r for r in doc["rows"]}
    assert set(rows) == set(ROWS)
    budget = rows["mpo-decomp"]["params"]
    dense = doc["dense_recurrent_params"]
    assert dense == 4 * 16 * 8 + 4 * 16 * 16
    assert budget <= dense / 4
    for name in ("mpo-scratch", "mpo-central", "prune-agp", "prune-oneshot"):
        assert rows[name]["params"] == budget, name  # pruning keeps exactly the MPO's count
    assert rows["mpo-gradual"]["params"] <= budget
    assert rows["mpo-posttrain"]["params"] <= budget  # layout search + calibration + distillation
    for r in doc["rows"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["batched_ms"] > 0 and r["step_ms"] > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == doc["rows"]
    assert "| mpo-decomp | 4x |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_bond_schedule_shrinks_cubically_to_target():
    torch.manual_seed(0)
    model = SeqClassifier(2, 16, input_size=8)
    model, _ = compress(model, CompressionConfig(target_modules=["lstm"], target_ratio=1.5))
    initial = mpo_bonds(model, ["lstm"])
    target = {"lstm": {w: tuple(1 for _ in b) for w, b in initial["lstm"].items()}}
    schedule = BondSchedule(target, end=3)
    state = TrainState(model=model)
    schedule.on_fit_start(state)
    seen = []
    x = torch.randn(2, 5, 8)
    for epoch in range(4):
        state.epoch = epoch
        schedule.on_epoch_start(state)
        seen.append(sum(sum(b) for b in mpo_bonds(model, ["lstm"])["lstm"].values()))
        assert model(x).shape == (2, 2)  # the module still runs after its cores were replaced
    assert seen == sorted(seen, reverse=True) and seen[0] == sum(sum(b) for b in initial["lstm"].values())
    assert mpo_bonds(model, ["lstm"]) == target and schedule.ready(state)
    assert isinstance(model.lstm, MPOLSTM)


def test_protocol_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown protocol rows"):
        ProtocolConfig(rows=("dense", "magic"))
    with pytest.raises(ValueError, match="ratios must be numbers > 1"):
        ProtocolConfig(ratios=(0.5,))
