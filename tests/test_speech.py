"""Speech enhancement: audio IO and features, metrics, mask estimator, streaming, tiny corpus end to end."""

import shutil
import wave

import numpy as np
import pytest
import torch
import torch.nn.utils.parametrize
from hypothesis import given
from hypothesis import strategies as st
from scipy.io import wavfile

from mpolstm.harness import audio
from mpolstm.harness.data import speech as corpus
from mpolstm.harness.tasks import speech as se
from mpolstm.harness.training import evaluate, fit

NO_ESPEAK = "espeak-ng is not installed (apt-get install -y --no-install-recommends espeak-ng)"


def _sine(freq=440.0, seconds=0.5, rate=audio.SAMPLE_RATE, amp=0.5):
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# --- SI-SDR -----------------------------------------------------------------------------------

@given(st.floats(0.01, 100.0), st.integers(0, 2**31 - 1))
def test_si_sdr_is_scale_invariant(scale, seed):
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal(800)
    est = ref + 0.3 * rng.standard_normal(800)
    assert audio.si_sdr(scale * est, ref) == pytest.approx(audio.si_sdr(est, ref), abs=1e-6)


def test_si_sdr_values():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(4000)
    ref -= ref.mean()
    assert audio.si_sdr(ref, ref) > 100.0
    noise = rng.standard_normal(4000)
    noise -= noise.mean()
    noise -= noise @ ref / (ref @ ref) * ref  # orthogonal to the reference
    noise *= np.linalg.norm(ref) / np.linalg.norm(noise) * 10 ** (-10 / 20)
    assert audio.si_sdr(ref + noise, ref) == pytest.approx(10.0, abs=1e-6)
    assert audio.si_sdr(ref + 10 * noise, ref) == pytest.approx(-10.0, abs=1e-6)
    with pytest.raises(ValueError, match="equal length"):
        audio.si_sdr(ref[:-1], ref)
    with pytest.raises(ValueError, match="silent"):
        audio.si_sdr(ref, np.ones_like(ref))


# --- STFT, features, mask -----------------------------------------------------------------------

@pytest.mark.parametrize("length", [1, 255, 256, 257, 1000, 16000])
def test_stft_istft_round_trip(length):
    x = torch.randn(2, length)
    spec = audio.stft(x)
    assert spec.shape == (2, audio.n_frames(length), audio.N_BINS)
    assert torch.allclose(audio.istft(spec, length), x, atol=1e-5)


def test_stft_is_causal():
    x = torch.randn(4000)
    y = x.clone()
    y[2000:] = torch.randn(2000)
    a, b = audio.stft(x), audio.stft(y)
    last_unaffected = (2000 - audio.HOP) // audio.HOP  # frame t ends at sample t*HOP + HOP
    assert torch.equal(a[: last_unaffected + 1], b[: last_unaffected + 1])
    assert not torch.equal(a[last_unaffected + 1], b[last_unaffected + 1])


def test_istft_rejects_too_long_output():
    with pytest.raises(ValueError, match="frames cover"):
        audio.istft(audio.stft(torch.randn(512)), 10_000)


def test_ideal_ratio_mask_range_and_limits():
    s, n = audio.stft(torch.randn(3000)), audio.stft(torch.randn(3000))
    m = audio.ideal_ratio_mask(s, n)
    assert m.min() >= 0 and m.max() <= 1
    assert torch.allclose(audio.ideal_ratio_mask(s, torch.zeros_like(n))[1:-1], torch.ones(1))
    assert torch.all(audio.ideal_ratio_mask(torch.zeros_like(s), n) == 0)


# --- WAV IO -------------------------------------------------------------------------------------

def test_wav_round_trip_pcm16_and_float(tmp_path):
    x = _sine()
    audio.write_wav(tmp_path / "a.wav", x)
    y, notes = audio.read_wav(tmp_path / "a.wav")
    assert notes == [] and y.dtype == np.float32
    assert np.abs(y - x).max() < 1.0 / 32767
    audio.write_wav(tmp_path / "f.wav", x, float32=True)
    z, _ = audio.read_wav(tmp_path / "f.wav")
    assert np.array_equal(z, x)


def test_wav_stereo_is_downmixed_and_rate_is_converted(tmp_path):
    left, right = _sine(440, rate=8000), _sine(440, rate=8000, amp=0.1)
    wavfile.write(tmp_path / "s.wav", 8000, (np.stack([left, right], 1) * 32767).astype(np.int16))
    y, notes = audio.read_wav(tmp_path / "s.wav")
    assert any("downmixed 2 channels" in n for n in notes)
    assert any("8000 Hz -> 16000 Hz" in n for n in notes)
    assert len(y) == 2 * len(left)
    spectrum = np.abs(np.fft.rfft(y))
    assert np.argmax(spectrum) * audio.SAMPLE_RATE / len(y) == pytest.approx(440, abs=3)
    assert np.sqrt(np.mean(y[1000:-1000] ** 2)) == pytest.approx(0.3 / np.sqrt(2), rel=0.02)


def test_wav_bad_inputs_raise_value_error(tmp_path):
    (tmp_path / "text.wav").write_text("this is not audio")
    with pytest.raises(ValueError, match="not a readable WAV"):
        audio.read_wav(tmp_path / "text.wav")
    with wave.open(str(tmp_path / "empty.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    with pytest.raises(ValueError, match="no samples"):
        audio.read_wav(tmp_path / "empty.wav")
    with pytest.raises(ValueError, match="no such file"):
        audio.read_wav(tmp_path / "missing.wav")
    wavfile.write(tmp_path / "nan.wav", 16000, np.array([0.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="NaN"):
        audio.read_wav(tmp_path / "nan.wav")
    with pytest.raises(ValueError, match="mono"):
        audio.write_wav(tmp_path / "o.wav", np.zeros((2, 10)))


# --- model, loss, streaming ---------------------------------------------------------------------

def test_model_has_plain_lstm_and_mask_range():
    model = se.make_model(hidden=32, layers=2)
    assert type(model.lstm) is torch.nn.LSTM and model.lstm.batch_first
    assert (model.lstm.input_size, model.lstm.hidden_size, model.lstm.num_layers) == (256, 32, 2)
    mask, (h, c) = model(torch.randn(3, 7, 257))
    assert mask.shape == (3, 7, 257) and h.shape == (2, 3, 32)
    assert mask.min() > 0 and mask.max() < 1


def test_loss_ignores_padding():
    torch.manual_seed(0)
    model = se.make_model(hidden=16, layers=1)
    rng = np.random.default_rng(0)
    a = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (1000, 3000)]
    b = [x * 0.5 for x in a]
    pair_a, pair_b = (a[0], b[0]), (a[1], b[1])
    frames = [audio.n_frames(1000), audio.n_frames(3000)]
    with torch.no_grad():
        la = float(se.loss_fn(model, se.collate([pair_a])))
        lb = float(se.loss_fn(model, se.collate([pair_b])))
        both = float(se.loss_fn(model, se.collate([pair_a, pair_b])))
    assert both == pytest.approx((la * frames[0] + lb * frames[1]) / sum(frames), rel=1e-5)
    with pytest.raises(ValueError, match="equal lengths"):
        se.collate([(a[0], a[1])])


def test_streaming_equals_whole_utterance():
    torch.manual_seed(1)
    model = se.make_model(hidden=24, layers=2)
    se.fit_feature_stats(model, [np.random.default_rng(1).standard_normal(4000).astype(np.float32)])
    x = np.random.default_rng(2).standard_normal(5003).astype(np.float32) * 0.1
    offline = se.enhance(model, x)
    streamed, stats = se.enhance_streaming(model, x)
    assert streamed.shape == x.shape
    np.testing.assert_allclose(streamed, offline, atol=1e-5)
    assert stats.frames == audio.n_frames(len(x)) and stats.rtf > 0 and stats.algorithmic_latency_ms == 32.0
    with pytest.raises(ValueError, match="non-empty mono"):
        se.enhance_streaming(model, np.zeros(0, np.float32))


def test_streaming_uses_step_api_of_mpolstm():
    from mpolstm.nn import MPOLSTM

    torch.manual_seed(2)
    model = se.make_model(hidden=16, layers=2)
    model.lstm = MPOLSTM.from_lstm(model.lstm, max_bond=4)
    x = np.random.default_rng(3).standard_normal(3000).astype(np.float32) * 0.1
    streamed, _ = se.enhance_streaming(model, x)
    np.testing.assert_allclose(streamed, se.enhance(model, x), atol=1e-5)


class _Halve(torch.nn.Module):
    def forward(self, w):
        return 0.5 * w


def test_streaming_falls_back_to_length_one_sequences():
    """A parametrized nn.LSTM (no step method, not a plain nn.LSTM) still streams exactly."""
    torch.manual_seed(3)
    model = se.make_model(hidden=16, layers=1)
    torch.nn.utils.parametrize.register_parametrization(model.lstm, "weight_hh_l0", _Halve())
    x = np.random.default_rng(4).standard_normal(2000).astype(np.float32) * 0.1
    streamed, _ = se.enhance_streaming(model, x)
    np.testing.assert_allclose(streamed, se.enhance(model, x), atol=1e-5)


# --- corpus and end to end ----------------------------------------------------------------------

def test_unknown_preset_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown speech corpus preset"):
        corpus.build_corpus(tmp_path, preset="huge")


def test_noise_generators_are_seeded_and_normalised():
    for kind in ("white", "pink", "brown", "hum"):
        a = corpus.make_noise(kind, 8000, np.random.default_rng(5))
        assert np.array_equal(a, corpus.make_noise(kind, 8000, np.random.default_rng(5)))
        assert np.sqrt(np.mean(a**2)) == pytest.approx(1.0, rel=1e-6)
    spec = lambda k: np.abs(np.fft.rfft(corpus.make_noise(k, 16000, np.random.default_rng(0)))) ** 2  # noqa: E731
    low_high = {k: spec(k)[20:500].mean() / spec(k)[4000:8000].mean() for k in ("white", "pink", "brown")}
    assert low_high["white"] < low_high["pink"] < low_high["brown"]
    with pytest.raises(ValueError, match="unknown noise type"):
        corpus.make_noise("rain", 10, np.random.default_rng(0))


def test_task_presets_map_onto_corpus_presets(monkeypatch, tmp_path):
    """The task's quick/standard/paper name a corpus preset (tiny/quick/standard); no espeak-ng needed."""
    assert set(se.SIZES) == {"quick", "standard", "paper"}
    assert {size.corpus for size in se.SIZES.values()} <= set(corpus.PRESETS)
    with pytest.raises(ValueError, match="unknown speech corpus preset 'huge'"):
        se.SpeechSize("huge", 8, 1, None, None, 1, 1, 1e-3)
    rng = np.random.default_rng(0)

    def split(n):
        clean = [0.1 * rng.standard_normal(4000).astype(np.float32) for _ in range(n)]
        return corpus.SpeechSplit(clean=clean, noisy=[c + 0.05 * rng.standard_normal(4000).astype(np.float32)
                                                      for c in clean], info=[{}] * n)

    asked = []

    def fake_load_corpus(root=None, preset="quick", seed=0):
        asked.append(preset)
        return corpus.SpeechCorpus(root=tmp_path, manifest={}, splits={s: split(3) for s in corpus.SPLITS})

    monkeypatch.setattr(se, "load_corpus", fake_load_corpus)
    monkeypatch.setitem(se.SIZES, "paper", se.SpeechSize("standard", 8, 1, None, 2, 1, 1, 1e-3))
    task = se.make_task("paper")
    assert asked == ["standard"] and task.architecture == {"name": "speech", "kwargs": {"hidden": 8, "layers": 1}}
    assert task.meta["preset"] == "paper" and task.meta["test_utterances"] == 2
    assert isinstance(task.build_model(), se.MaskEstimator)
    with pytest.raises(ValueError, match="unknown preset 'tiny' for task 'speech'"):
        se.make_task("tiny")


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason=NO_ESPEAK)
def test_tiny_corpus_train_enhance_score(tmp_path):
    pytest.importorskip("pesq", reason="PESQ needs the PyPI package 'pesq'")
    pytest.importorskip("pystoi", reason="STOI needs the PyPI package 'pystoi'")
    data = corpus.load_corpus(tmp_path, preset="tiny", seed=0)
    man = data.manifest
    assert [len(data[s]) for s in corpus.SPLITS] == [8, 2, 2]
    assert man["espeak_ng"].startswith("eSpeak NG")
    rows = {s: man["splits"][s]["utterances"] for s in corpus.SPLITS}
    for s, t in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not {r["voice"] for r in rows[s]} & {r["voice"] for r in rows[t]}
        assert not {tuple(r["noise_seed"]) for r in rows[s]} & {tuple(r["noise_seed"]) for r in rows[t]}
        assert {r["ptb_split"] for r in rows[s]} != {r["ptb_split"] for r in rows[t]}
    for r, (noisy, clean) in zip(rows["train"], zip(data["train"].noisy, data["train"].clean)):
        snr = 10 * np.log10(np.sum(clean.astype(np.float64) ** 2) / np.sum((noisy - clean).astype(np.float64) ** 2))
        assert snr == pytest.approx(r["snr_db"], abs=0.1)
    # rebuilt elsewhere from the same seed: identical
    again = corpus.load_corpus(tmp_path / "again", preset="tiny", seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(data["test"].noisy, again["test"].noisy))

    torch.manual_seed(0)
    model = se.fit_feature_stats(se.make_model(hidden=16, layers=1), data["train"].noisy)
    train_loader = se.SpeechLoader(data["train"], batch_size=4, seed=0)
    val_loader = se.SpeechLoader(data["val"], shuffle=False)
    before = evaluate(model, val_loader, se.MASK_MSE, forward_fn=se.forward_fn)
    result = fit(model, train_loader, val_loader, se.mask_loss, se.MASK_MSE, forward_fn=se.forward_fn,
                 epochs=4, lr=1e-2, grad_clip=5.0, progress=False)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert evaluate(model, val_loader, se.MASK_MSE, forward_fn=se.forward_fn) < before
    result = se.evaluate(model, data["test"], noisy_baseline=True)
    pairs = list(zip(data["test"].noisy, data["test"].clean))  # the means of the scores, each measured here
    for key in ("pesq", "stoi"):
        noisy_mean = np.mean([audio.score(clean, noisy)[key] for noisy, clean in pairs])
        enhanced_mean = np.mean([audio.score(clean, se.enhance(model, noisy))[key] for noisy, clean in pairs])
        assert result[f"noisy_{key}"] == pytest.approx(noisy_mean, rel=1e-9)
        assert result[key] == pytest.approx(enhanced_mean, abs=0.05 if key == "pesq" else 0.005)

    noisy, clean = data["test"][0]
    audio.write_wav(tmp_path / "noisy.wav", noisy)
    stats, notes = se.enhance_file(model, tmp_path / "noisy.wav", tmp_path / "out.wav")
    enhanced, _ = audio.read_wav(tmp_path / "out.wav")
    assert notes == [] and enhanced.shape == noisy.shape and stats.frames == audio.n_frames(len(noisy))
    # the file holds the model's enhancement (to 16-bit WAV rounding), which changed the noisy input
    in_memory = se.enhance(model, noisy)
    np.testing.assert_allclose(enhanced, in_memory, atol=1.5 / 32768)
    assert np.abs(in_memory - noisy).max() > 1e-3
    scores, noisy_scores = audio.score(clean, enhanced), audio.score(clean, noisy)
    exact = audio.score(clean, in_memory)  # the file's scores are the enhancement's, to WAV rounding
    assert scores["pesq"] == pytest.approx(exact["pesq"], abs=0.05)
    assert scores["stoi"] == pytest.approx(exact["stoi"], abs=0.005)
    assert scores["si_sdr"] == pytest.approx(exact["si_sdr"], abs=0.1)
    # the pipeline and the metrics point the right way: the ideal ratio mask through the same STFT
    # raises PESQ, STOI and SI-SDR above the noisy input's
    spec_y, spec_s = audio.stft(torch.from_numpy(noisy)), audio.stft(torch.from_numpy(clean))
    oracle = audio.istft(spec_y * audio.ideal_ratio_mask(spec_s, spec_y - spec_s), len(noisy)).numpy()
    oracle_scores = audio.score(clean, oracle)
    for key in ("pesq", "stoi", "si_sdr"):
        assert oracle_scores[key] > noisy_scores[key] + (0.1 if key != "stoi" else 0.0), key
