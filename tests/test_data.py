import random

import numpy as np
import pytest
import torch

from mpolstm.harness.data import (
    BPTTLoader,
    batchify,
    bptt_windows,
    cache_dir,
    load_imdb,
    load_ptb,
    load_seq_mnist,
    load_seqcls,
    stratified_split,
)
from mpolstm.harness.data.cache import cached_arrays
from mpolstm.harness.data.ptb import build_vocab, tokenize
from mpolstm.harness.data.seqcls import encode
from mpolstm.harness.data.seqcls import tokenize as words


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_cache_dir_env_and_override(tmp_path, monkeypatch):
    monkeypatch.setenv("MPOLSTM_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env" and (tmp_path / "env").is_dir()
    assert cache_dir(tmp_path / "arg") == tmp_path / "arg"
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        cache_dir(tmp_path / "f")


def test_cached_arrays_builds_once_and_rebuilds_corrupt(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"a": np.arange(5)}

    assert cached_arrays("x", build, tmp_path)["a"].tolist() == [0, 1, 2, 3, 4]
    assert cached_arrays("x", build, tmp_path)["a"].tolist() == [0, 1, 2, 3, 4]
    assert len(calls) == 1
    (tmp_path / "x.npz").write_bytes(b"PK\x03\x04 truncated")
    assert cached_arrays("x", build, tmp_path)["a"].tolist() == [0, 1, 2, 3, 4]
    assert len(calls) == 2
    assert not list(tmp_path.glob(".*.tmp"))


def test_stratified_split_balanced_disjoint_and_seeded():
    y = np.repeat(np.arange(4), 25)
    a = stratified_split(y, [20, 40, 40], seed=1)
    assert sorted(np.concatenate(a).tolist()) == list(range(100))
    assert [np.bincount(y[p]).tolist() for p in a] == [[5] * 4, [10] * 4, [10] * 4]
    assert np.bincount(y[a[1][:8]]).tolist() == [2] * 4  # round-robin order: prefixes are balanced
    assert all(np.array_equal(p, q) for p, q in zip(a, stratified_split(y, [20, 40, 40], seed=1)))
    assert not np.array_equal(a[0], stratified_split(y, [20, 40, 40], seed=2)[0])
    with pytest.raises(ValueError, match="split sizes"):
        stratified_split(y, [60, 60], seed=0)


def test_seq_mnist(cache):
    d = load_seq_mnist(cache=cache)
    assert (d.num_classes, d.seq_len, d.input_size) == (10, 28, 28)
    assert d.meta["sizes"] == {"train": 3500, "val": 500, "test": 1000}
    x, y = d.train.tensors
    assert x.shape == (3500, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() == 1.0
    assert torch.bincount(d.test.tensors[1]).tolist() == [100] * 10
    assert torch.bincount(d.head(train=30).train.tensors[1]).tolist() == [3] * 10
    # splits are disjoint: no test image appears in train
    train_rows = {r.numpy().tobytes() for r in x}
    assert not any(r.numpy().tobytes() in train_rows for r in d.test.tensors[0])
    again = load_seq_mnist(cache=cache)
    assert torch.equal(again.val.tensors[0], d.val.tensors[0])


def test_mnist1d_offline_and_leaves_global_rng_alone(cache, monkeypatch):
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError("mnist1d tried the network")

    monkeypatch.setattr(requests, "get", no_network)
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    d = load_seqcls("mnist1d", cache=cache)
    assert (random.random(), np.random.rand()) == expected
    assert d.meta["sizes"] == {"train": 3600, "val": 400, "test": 1000}
    assert d.train.tensors[0].shape == (3600, 40, 1) and d.input_size == 1
    assert torch.bincount(d.val.tensors[1]).tolist() == [40] * 10


def write_imdb(root, reviews):
    for split, items in reviews.items():
        for label in ("pos", "neg"):
            (root / split / label).mkdir(parents=True, exist_ok=True)
        for i, (label, text) in enumerate(items):
            (root / split / label / f"{i}_7.txt").write_text(text, encoding="utf-8")


def test_imdb_folder(tmp_path, cache):
    root = tmp_path / "aclImdb"
    write_imdb(root, {
        "train": [("pos", "A great great film.<br /><br />Loved it"), ("neg", "Bad film, bad acting"),
                  ("pos", "great fun"), ("neg", "boring and bad")] * 5,
        "test": [("pos", "great unseenword film"), ("neg", "bad")],
    })
    d = load_imdb(root, vocab_size=4, max_len=6, val_fraction=0.2, cache=cache)
    vocab = d.meta["vocab"]
    assert vocab[:2] == ["<pad>", "<unk>"] and len(vocab) == d.vocab_size == 6
    assert set(vocab[2:]) == {"bad", "great", "film", "a"}  # the four most frequent training words
    assert d.meta["sizes"] == {"train": 16, "val": 4, "test": 2}
    x, y = d.test.tensors
    ids = {w: i for i, w in enumerate(vocab)}
    rows = {int(label): row.tolist() for row, label in zip(x, y)}
    assert rows[1] == [0, 0, 0, ids["great"], 1, ids["film"]]  # pre-padded, unknown -> 1
    assert rows[0] == [0, 0, 0, 0, 0, ids["bad"]]
    post = load_imdb(root, vocab_size=4, max_len=2, side="post", cache=cache)
    assert post.test.tensors[0].shape == (2, 2)
    assert load_seqcls("imdb", data_dir=root, vocab_size=4, max_len=6, val_fraction=0.2, cache=cache).num_classes == 2


def test_imdb_bad_folder(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_imdb(tmp_path / "missing")
    (tmp_path / "train" / "pos").mkdir(parents=True)
    with pytest.raises(ValueError, match="train/neg"):
        load_imdb(tmp_path)
    with pytest.raises(ValueError, match="data_dir"):
        load_seqcls("imdb")
    with pytest.raises(ValueError, match="unknown"):
        load_seqcls("cifar")


def test_text_helpers():
    assert words("It's GREAT!<br />10/10") == ["it's", "great", "10", "10"]
    assert encode([["a", "b", "c"]], ["<pad>", "<unk>", "a", "c"], 2, "pre").tolist() == [[1, 3]]
    assert encode([["a", "b", "c"]], ["<pad>", "<unk>", "a", "c"], 4, "post").tolist() == [[2, 1, 3, 0]]
    text = " a b a \n\n c a \n"
    vocab = build_vocab(text)
    assert vocab == ["a", "<eos>", "b", "c"]
    ids = tokenize(text, {w: i for i, w in enumerate(vocab)})
    assert [vocab[i] for i in ids] == ["a", "b", "a", "<eos>", "c", "a", "<eos>"]


def test_ptb(cache):
    c = load_ptb(cache=cache)
    assert c.vocab_size == 10_000
    assert [len(c.train), len(c.valid), len(c.test)] == [929_589, 73_760, 82_430]
    assert c.train.dtype == torch.int64 and int(c.train.max()) < 10_000
    assert c.decode(c.valid[:4]) == ["consumers", "may", "want", "to"]
    assert c.word_to_id["<eos>"] == 2


def test_batchify_and_bptt():
    stream = torch.arange(23)
    data = batchify(stream, 4)
    assert data.shape == (5, 4)
    assert data[:, 1].tolist() == [5, 6, 7, 8, 9]  # a column reads the text
    windows = list(bptt_windows(data, 2))
    assert [x.shape[0] for x, _ in windows] == [2, 2]
    for x, y in windows:
        assert torch.equal(y, x + 1)
    loader = BPTTLoader(data, 3, batch_first=True)
    assert len(loader) == 2 == len(list(loader)) == len(list(loader))
    assert next(iter(loader))[0].shape == (4, 3)
    with pytest.raises(ValueError, match="batch_size"):
        batchify(stream, 30)
    with pytest.raises(ValueError, match="bptt"):
        BPTTLoader(data, 0)


def test_the_test_suite_never_writes_the_users_cache():
    """tests/conftest.py points $MPOLSTM_CACHE at a temporary folder of the session (issue 27)."""
    import os
    import tempfile
    from pathlib import Path

    folder = cache_dir()
    assert folder == Path(os.environ["MPOLSTM_CACHE"]) and folder != Path.home() / ".cache" / "mpolstm"
    assert folder.parent == Path(tempfile.gettempdir())
