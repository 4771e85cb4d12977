import json

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from mpolstm.compression import CompressionConfig, compress
from mpolstm.harness.protocol import ROWS, BondSchedule, ProtocolConfig, largest_hidden, mpo_bonds, run_protocol
from mpolstm.harness.protocol.paper import PAPER_BONDS, paper_factors, paper_formula_entries, paper_lstm
from mpolstm.harness.protocol.run import STORED_WEIGHTS
from mpolstm.harness.tasks.base import Task
from mpolstm.harness.tasks.seqcls import SeqClassifier
from mpolstm.harness.training import ACCURACY, TrainState
from mpolstm.nn import MPOLSTM
from mpolstm.storage import file_data_bytes


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
        example_batch=x[:4],
        resize=lambda h: (SeqClassifier(2, h, input_size=8), {}),
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
    # small dense: the largest hidden size whose LSTM weights fit (4h(8 + h) <= budget)
    hidden = rows["small-dense"]["hidden"]
    assert 4 * hidden * (8 + hidden) == rows["small-dense"]["params"] <= budget < 4 * (hidden + 1) * (9 + hidden)
    assert rows["small-dense"]["total_params"] == sum(p.numel() for p in SeqClassifier(2, hidden, input_size=8).parameters())
    assert rows["lowrank-decomp"]["params"] == rows["lowrank-scratch"]["params"] <= budget
    # latency-aware: within the budget in parameters and in multiply-adds per step (= the budget)
    assert rows["mpo-latency"]["params"] <= budget and rows["mpo-latency"]["macs"] <= budget
    assert rows["mpo-latency"]["storage"] == "float32"
    # bytes: float rows 4 B an entry; int8 1 B an entry + scale and zero point per matrix; MPO int8 cores
    # use about the float rows' bytes with ~4x the entries
    for name in ("mpo-decomp", "mpo-scratch", "small-dense", "lowrank-decomp"):
        assert rows[name]["bytes"] == 4 * rows[name]["params"] and rows[name]["storage"] == "float32"
    assert rows["int8"]["target_ratio"] is None and rows["int8"]["params"] == dense
    assert rows["int8"]["bytes"] == dense + 8 * 2 and rows["int8"]["storage"] == "int8-affine"
    assert rows["mpo-int8"]["storage"] == "int8"
    assert 2 * budget < rows["mpo-int8"]["params"] < rows["mpo-int8"]["bytes"] <= 4 * budget
    assert rows["prune-oneshot"]["storage"] in ("csr", "bitmask", "bitmask+csr")
    assert rows["prune-oneshot"]["bytes"] > 4 * budget  # values plus an index
    assert rows["prune-bytes"]["params"] < budget and 0.9 * 4 * budget < rows["prune-bytes"]["bytes"] <= 4 * budget
    # int8 values: ~2-4x prune-bytes' non-zeros in the same bytes, each matrix in its smallest int8 format
    assert set(rows["prune-int8"]["storage"].split("+")) <= {"int8", "csr-int8", "bitmask-int8"}
    assert 2 * rows["prune-bytes"]["params"] < rows["prune-int8"]["params"] and rows["prune-int8"]["bytes"] <= 4 * budget
    for name in ("mpo-int8", "prune-int8"):  # int8 rounding after training moves a few of the 96 answers
        assert abs(rows[name]["accuracy"] - rows[name]["before_int8"]) <= 0.1, rows[name]
    for r in doc["rows"]:
        for value in (r["accuracy"], r.get("before_int8", 0.0)):  # a share of the 96 test sequences
            assert value * 96 == pytest.approx(round(value * 96), abs=0.01), r
        assert r["batched_ms"] > 0 and r["step_ms"] > 0
        run = r["row"] if r["target_ratio"] is None else f"{r['row']}-{r['target_ratio']:g}x"
        assert r["file_bytes"] == r["bytes"] == file_data_bytes(tmp_path / "models" / run / STORED_WEIGHTS), run
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == doc["rows"]
    assert "| mpo-decomp | 4x |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").stat().st_size > 1000
    assert (tmp_path / "results-bytes.png").stat().st_size > 1000


def test_largest_hidden_fits_the_budget_exactly():
    build = lambda h: SeqClassifier(2, h, input_size=28, num_layers=2)  # noqa: E731
    for budget in (4 * 1 * 29 + 4 * 1 * 2, 10_000, 123_456):
        h = largest_hidden(build, ["lstm"], budget)
        weights = lambda k: 4 * k * (28 + k) + 4 * k * (2 * k)  # noqa: E731  layer 1 + layer 2
        assert weights(h) <= budget < weights(h + 1)
    with pytest.raises(ValueError, match="no hidden size fits 10"):
        largest_hidden(build, ["lstm"], 10)


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


@pytest.mark.parametrize("input_size", [256, 28])
def test_paper_layout_counts_match_the_papers_formula_and_table_2(input_size):
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(input_size, 256)
    factors = paper_factors(input_size)
    assert factors["weight_hh_l0"] == ((8, 2, 2, 8), (32, 2, 2, 8))  # the four gates widen the first core
    for rate, (d_w, d_u) in PAPER_BONDS.items():
        mpo = paper_lstm(lstm, rate)
        entries = {name: sum(c.numel() for c in cores) for name, cores in mpo.mpo_weights().items()}
        assert entries["weight_hh_l0"] == paper_formula_entries((8, 2, 2, 8), (8, 2, 2, 8), d_u) == 320 * d_u + 8 * d_u ** 2
        if input_size == 256:  # the paper's own LSTM: W like U, and the rates of its Table 2
            assert entries["weight_ih_l0"] == paper_formula_entries((8, 2, 2, 8), (8, 2, 2, 8), d_w)
            assert 4 * 256 * 512 / sum(entries.values()) == pytest.approx(rate, rel=0.05)
    with pytest.raises(ValueError, match="Table 2"):
        paper_lstm(lstm, 30)
    with pytest.raises(ValueError, match="one-layer"):
        paper_lstm(torch.nn.LSTM(256, 256, 2), 10)


def test_paper_layout_is_exact_at_full_bond():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(256, 256).double()
    mpo = MPOLSTM.from_lstm(lstm, factors=paper_factors(256))
    x = torch.randn(5, 2, 256, dtype=torch.float64)
    (out, (h, c)), (ref, (h_ref, c_ref)) = mpo(x), lstm(x)
    assert torch.allclose(out, ref, atol=1e-10) and torch.allclose(h, h_ref, atol=1e-10)
    assert torch.allclose(c, c_ref, atol=1e-10)


def test_a_row_that_cannot_fit_the_budget_is_skipped_with_its_reason(tmp_path):
    # LSTM(8, 16): rank 1 everywhere takes (64 + 8) + (64 + 16) = 152 entries; at 12x the budget is below
    # and pruning at equal bytes at 32x: a bitmask alone takes 1536 / 8 = 192 bytes, the MPO 4 * 48
    config = ProtocolConfig(ratios=(12.0, 32.0), rows=("dense", "mpo-decomp", "lowrank-decomp", "prune-bytes"))
    doc = run_protocol(tiny_task(), config, tmp_path, log=lambda _: None)
    assert [(r["row"], r["target_ratio"]) for r in doc["rows"]] == [
        ("dense", None), ("mpo-decomp", 12.0), ("prune-bytes", 12.0), ("mpo-decomp", 32.0)]
    budget = doc["rows"][1]["params"]
    assert doc["skipped"][0] == {"row": "lowrank-decomp", "target_ratio": 12.0,
                                 "reason": f"rank 1 for every weight takes 152 entries, above the budget of {budget:,}"}
    assert doc["skipped"][1]["row"] == "prune-bytes" and "the sparse index alone takes 192 bytes" in doc["skipped"][1]["reason"]
    assert "Skipped: lowrank-decomp at 12x" in (tmp_path / "results.md").read_text()
