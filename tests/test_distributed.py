"""DDP under torchrun (2 CPU processes, gloo) against the single-process run, and data sharding.

Run as a script (``python -m torch.distributed.run ... tests/test_distributed.py OUT``) this file is
the worker that the test launches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from mpolstm.harness import distributed
from mpolstm.harness.data.ptb import BPTTLoader, batchify
from mpolstm.harness.training import ACCURACY, PERPLEXITY, fit, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(5, 8, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.lstm(x)[0][:, -1])


class LM(nn.Module):
    def __init__(self, vocab=20):
        super().__init__()
        self.emb, self.lstm, self.head = nn.Embedding(vocab, 8), nn.LSTM(8, 8), nn.Linear(8, vocab)

    def forward(self, tokens):
        return self.head(self.lstm(self.emb(tokens))[0])


def lm_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


_g = torch.Generator().manual_seed(1)
X, Y = torch.randn(64, 6, 5, generator=_g), torch.randint(0, 3, (64,), generator=_g)
TOKENS = torch.randint(0, 20, (400,), generator=_g)


def classify(epochs, out, resume=False):
    torch.manual_seed(0)
    model = Classifier()
    train = DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(5))
    val = DataLoader(TensorDataset(X[:30], Y[:30]), batch_size=8)  # last batch of 6: uneven parts
    result = fit(model, train, val, F.cross_entropy, ACCURACY, epochs=epochs, lr=0.1, optimizer="sgd",
                 out_dir=out, resume=resume, progress=False, restore_best=False)
    return model, result


def language_model(out):
    torch.manual_seed(0)
    model = LM()
    data = BPTTLoader(batchify(TOKENS, 4), 10)
    result = fit(model, data, data, lm_loss, PERPLEXITY, epochs=2, lr=0.5, optimizer="sgd", out_dir=out,
                 progress=False, restore_best=False)
    return model, result


def worker(out: Path) -> None:
    """Runs on every rank: straight, interrupted-then-resumed and BPTT runs; each rank saves its weights."""
    r = distributed.rank() if distributed.setup() else -1
    straight, _ = classify(3, out / "straight")
    classify(2, out / "resumed")
    resumed, _ = classify(3, out / "resumed", resume=True)
    lm, _ = language_model(out / "lm")
    for name, model in (("straight", straight), ("resumed", resumed), ("lm", lm)):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"{name}.rank{r}.safetensors"))
    with open(out / f"rank{r}.json", "w") as fh:
        json.dump({"world_size": distributed.world_size(), "rank": r}, fh)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).resolve()), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def close(a, b, atol=1e-5):
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


def metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_match_one_process_on_the_same_global_batch(ddp_run, tmp_path):
    assert [json.loads((ddp_run / f"rank{r}.json").read_text()) for r in (0, 1)] == [
        {"world_size": 2, "rank": 0}, {"world_size": 2, "rank": 1}]
    rank0, rank1 = (load_file(str(ddp_run / f"straight.rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # DDP keeps the replicas identical
    single, result = classify(3, tmp_path / "single")
    expected = single.state_dict()
    assert close(rank0, expected)
    assert not close(rank0, Classifier().state_dict())  # training moved the weights
    # rank 0 alone wrote the checkpoint and one metrics line per epoch, with losses and metrics
    # reduced over both ranks
    ckpt, _ = load_checkpoint(ddp_run / "straight" / "checkpoint.safetensors")
    assert close({k[len("model/"):]: v for k, v in ckpt.items() if k.startswith("model/")}, expected)
    lines = metrics(ddp_run / "straight")
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    for got, want in zip(lines, result.history):
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-5)
        assert got["val_accuracy"] == pytest.approx(want["val_accuracy"], abs=1e-9)


def test_resume_under_ddp_equals_the_uninterrupted_ddp_run(ddp_run):
    for r in (0, 1):
        straight = load_file(str(ddp_run / f"straight.rank{r}.safetensors"))
        resumed = load_file(str(ddp_run / f"resumed.rank{r}.safetensors"))
        assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    strip = lambda rows: [{k: v for k, v in row.items() if k != "time_s"} for row in rows]  # noqa: E731
    assert strip(metrics(ddp_run / "resumed")) == strip(metrics(ddp_run / "straight"))


def test_bptt_loader_is_split_by_columns(ddp_run, tmp_path):
    single, result = language_model(tmp_path / "lm")
    rank0 = load_file(str(ddp_run / "lm.rank0.safetensors"))
    assert close(rank0, single.state_dict())
    lines = metrics(ddp_run / "lm")
    assert lines[-1]["val_perplexity"] == pytest.approx(result.history[-1]["val_perplexity"], rel=1e-5)


# ------------------------------------------------------------------- sharding, one process
def test_dataloader_parts_cover_each_global_batch_once():
    loader = DataLoader(TensorDataset(torch.arange(10)), batch_size=4, shuffle=True,
                        generator=torch.Generator().manual_seed(3))
    expected = [b[0].tolist() for b in loader]
    parts = []
    for r in (0, 1):  # each rank starts from the same generator state
        loader.generator.manual_seed(3)
        parts.append([b[0].tolist() for b in distributed.shard_loader(loader, rank_=r, size=2)])
    assert [p0 + p1 for p0, p1 in zip(*parts)] == expected
    assert [len(p) for p in parts[0]] == [2, 2, 1]


def test_shuffling_loader_without_generator_gets_a_seeded_one():
    loader = DataLoader(TensorDataset(torch.arange(12)), batch_size=6, shuffle=True)
    a, b = (distributed.shard_loader(loader, seed=7, rank_=r, size=2) for r in (0, 1))
    torch.manual_seed(0)
    first = [x[0] for x in a]
    torch.manual_seed(1)  # ranks whose global RNGs differ still split the same order
    second = [x[0] for x in b]
    assert sorted(torch.cat(first + second).tolist()) == list(range(12))
    assert a.batch_sampler.generator is not None


def test_bptt_and_generic_loaders_are_sliced_along_the_batch_dimension():
    data = batchify(torch.arange(40), 4)  # (10, 4)
    parts = [list(distributed.shard_loader(BPTTLoader(data, 3), rank_=r, size=2)) for r in (0, 1)]
    assert torch.equal(torch.cat([parts[0][0][0], parts[1][0][0]], dim=1), data[:3])
    first = list(distributed.shard_loader(BPTTLoader(data, 3, batch_first=True), rank_=1, size=2))[0][0]
    assert torch.equal(first, data[:3, 2:].t())
    batches = [(torch.arange(3), {"w": torch.ones(3, 2)})]
    assert list(distributed.shard_loader(batches, rank_=1, size=2))[0][1]["w"].shape == (2, 2)


def test_a_loader_with_a_shard_method_shards_itself():
    class Own:
        def __iter__(self):
            raise AssertionError("a loader that shards itself is not iterated by shard_loader")

        def shard(self, rank, world_size, *, allow_empty=False):
            return [("part", rank, world_size, allow_empty)]

    assert distributed.shard_loader(Own(), allow_empty=True, rank_=1, size=3) == [("part", 1, 3, True)]
    assert distributed.shard_loader(Own(), rank_=0, size=1).__class__ is Own  # one process: untouched
    data = batchify(torch.arange(40), 2)  # 2 columns for 3 ranks
    with pytest.raises(ValueError, match="2 sample.*3 ranks"):
        distributed.shard_loader(BPTTLoader(data, 3), rank_=0, size=3)
    parts = [list(distributed.shard_loader(BPTTLoader(data, 3), allow_empty=True, rank_=r, size=3)) for r in range(3)]
    assert [len(p) for p in parts] == [0, 7, 7]  # rank 0 is left without a column
    assert torch.equal(torch.cat([parts[1][0][0], parts[2][0][0]], dim=1), data[:3])


def test_distributed_imports_no_data_module():
    probe = "import sys, mpolstm.harness.distributed; print([m for m in sys.modules if m.startswith('mpolstm.harness.data')])"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def test_too_small_batches_are_a_clear_error_unless_allowed():
    loader = DataLoader(TensorDataset(torch.arange(5)), batch_size=4)  # last global batch: 1 sample
    with pytest.raises(ValueError, match="1 sample.*2 ranks"):
        list(distributed.shard_loader(loader, rank_=0, size=2))
    assert [len(b[0]) for b in distributed.shard_loader(loader, allow_empty=True, rank_=1, size=2)] == [2, 1]
    assert [len(b[0]) for b in distributed.shard_loader(loader, allow_empty=True, rank_=0, size=2)] == [2]
    with pytest.raises(ValueError, match="without tensors"):
        list(distributed.shard_loader([["a", "b"]], rank_=0, size=2))


def test_single_process_helpers(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.setup() and not distributed.launched()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.all_reduce_sum([1, 2.5]) == [1.0, 2.5] and distributed.any_rank(True)
    assert distributed.run_on_main(lambda: 3) == 3
    loader = [1, 2]
    assert distributed.shard_loader(loader) is loader
    assert distributed.device_for_rank("cpu") == torch.device("cpu")


def test_bad_launch_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' must be an integer"):
        distributed.setup()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match=r"RANK must be set to an integer in \[0, 2\)"):
        distributed.setup()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR is not set"):
        distributed.setup()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
