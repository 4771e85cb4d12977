"""Speech enhancement: causal LSTM ideal-ratio-mask estimator, training glue, streaming enhancement.

Model: log|Y| (bins 0-255 of 257, standardised with training-set statistics) -> LSTM (``model.lstm``, a plain
``nn.LSTM`` that compression may replace by an MPOLSTM) -> Linear -> sigmoid = mask M. Enhanced
speech = iSTFT(M * Y). Loss: MSE between M and the ideal ratio mask of the (clean, noise) pair, over
the valid frames of each utterance only (batches are zero-padded to the longest one).
Everything is causal, so :func:`enhance_streaming` runs it one STFT frame (16 ms hop) at a time.
The LSTM reads 256 bins, not 257: the Nyquist bin (8 kHz) carries almost nothing, and 257 is prime,
so an MPO of a 1024x257 weight could only split it as (1, 257, 1, ...) and barely compress; 256 =
4^4 factorises like every other dimension. The mask still covers all 257 bins.

Training with the shared loop::

    fit(model, SpeechLoader(corpus["train"]), SpeechLoader(corpus["val"], shuffle=False),
        mask_loss, MASK_MSE, forward_fn=forward_fn, epochs=..., lr=1e-3, grad_clip=5.0)

then :func:`evaluate` for PESQ / STOI / SI-SDR on the test split. The protocol task (model, presets,
builder, export inputs) is declared at the end and registered as ``speech``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mpolstm.harness import audio
from mpolstm.harness.audio import HOP, N_BINS, N_FFT, SAMPLE_RATE
from mpolstm.harness.data.speech import PRESETS as CORPUS_PRESETS
from mpolstm.harness.data.speech import load_corpus
from mpolstm.harness.training import Metric

from .base import Task, lstm_cell_step
from .registry import TaskType, register_task

__all__ = [
    "INPUT_BINS",
    "MaskEstimator",
    "Batch",
    "SpeechLoader",
    "StreamStats",
    "MASK_MSE",
    "make_model",
    "fit_feature_stats",
    "collate",
    "forward_fn",
    "mask_loss",
    "loss_fn",
    "enhance",
    "enhance_batch",
    "evaluate",
    "enhance_streaming",
    "enhance_file",
    "SpeechSize",
    "SIZES",
    "make_task",
    "example_inputs",
    "TASK",
]


INPUT_BINS = N_BINS - 1
"""STFT bins fed to the LSTM: 0 .. 255 (DC to 7.97 kHz); the Nyquist bin is left out."""


class MaskEstimator(nn.Module):
    """Causal mask estimator: features (B, T, 257) -> mask (B, T, 257) in (0, 1).

    The first 256 bins (INPUT_BINS) feed the LSTM; buffers ``feat_mean`` / ``feat_std`` (256,)
    standardise them (set them with :func:`fit_feature_stats`). ``lstm`` is a batch-first nn.LSTM
    (or a drop-in replacement).
    """

    def __init__(self, hidden: int = 256, layers: int = 2) -> None:
        super().__init__()
        if hidden <= 0 or layers <= 0:
            raise ValueError(f"hidden and layers must be positive, got hidden={hidden}, layers={layers}")
        self.register_buffer("feat_mean", torch.zeros(INPUT_BINS))
        self.register_buffer("feat_std", torch.ones(INPUT_BINS))
        self.lstm = nn.LSTM(INPUT_BINS, hidden, layers, batch_first=True)
        self.out = nn.Linear(hidden, N_BINS)

    def forward(self, feats: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """feats (B, T, 257), optional (h, c) -> (mask (B, T, 257), (h, c))."""
        h, state = self.lstm((feats[..., :INPUT_BINS] - self.feat_mean) / self.feat_std, state)
        return torch.sigmoid(self.out(h)), state

    def step(self, feat: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One frame: feat (B, 257), optional (h, c) -> (mask (B, 257), (h, c)).

        Uses the recurrent module's own ``step`` (MPOLSTM's streaming API) when it has one; a plain
        unidirectional nn.LSTM runs ``torch.lstm_cell`` per layer (same math; calling nn.LSTM on a
        length-1 sequence costs ~10x more on CPU, where oneDNN re-lays out the weights every call);
        anything else runs on a length-1 sequence."""
        z = (feat[..., :INPUT_BINS] - self.feat_mean) / self.feat_std
        rnn = self.lstm
        if hasattr(rnn, "step"):
            h, state = rnn.step(z, state)
        elif type(rnn) is nn.LSTM and not rnn.bidirectional and rnn.proj_size == 0:
            h, state = lstm_cell_step(rnn, z, state)
        else:
            h, state = rnn(z.unsqueeze(1), state)
            h = h.squeeze(1)
        return torch.sigmoid(self.out(h)), state


def make_model(hidden: int = 256, layers: int = 2) -> MaskEstimator:
    """A fresh :class:`MaskEstimator` (2x128 for the quick preset, 2x256 for standard, 2x1024 for paper)."""
    return MaskEstimator(hidden, layers)


@torch.no_grad()
def fit_feature_stats(model: MaskEstimator, noisy: Sequence[np.ndarray]) -> MaskEstimator:
    """Set the model's feature mean/std (256,) from noisy training waveforms; returns the model."""
    if len(noisy) == 0:
        raise ValueError("fit_feature_stats needs at least one waveform")
    feats = torch.cat([audio.log_magnitude(audio.stft(torch.as_tensor(x)))[:, :INPUT_BINS] for x in noisy])
    model.feat_mean.copy_(feats.mean(0))
    model.feat_std.copy_(feats.std(0).clamp_min(1e-3))
    return model


Batch = tuple[Tensor, Tensor, Tensor]
"""(noisy (B, T), clean (B, T), lengths (B,) int64): waveforms zero-padded to the longest."""


def collate(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> Batch:
    """[(noisy (T_i,), clean (T_i,)), ...] -> (noisy, clean, lengths) padded to max T_i."""
    if len(pairs) == 0:
        raise ValueError("collate needs at least one (noisy, clean) pair")
    lengths = torch.tensor([len(n) for n, _ in pairs], dtype=torch.int64)
    noisy = torch.zeros(len(pairs), int(lengths.max()))
    clean = torch.zeros_like(noisy)
    for i, (n, c) in enumerate(pairs):
        if len(n) != len(c):
            raise ValueError(f"pair {i}: noisy has {len(n)} samples, clean {len(c)}; expected equal lengths")
        noisy[i, : len(n)] = torch.as_tensor(n)
        clean[i, : len(c)] = torch.as_tensor(c)
    return noisy, clean, lengths


class SpeechLoader:
    """Re-iterable batches of a split (anything with len() and [i] -> (noisy, clean)).

    With ``shuffle`` every pass draws a new order from ``self.generator`` (seeded by ``seed``; the
    training loop saves its state for exact resume). ``limit`` keeps only the first utterances."""

    def __init__(self, split, batch_size: int = 16, shuffle: bool = True, seed: int = 0, limit: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split, self.batch_size, self.shuffle = split, batch_size, shuffle
        self.n = len(split) if limit is None else min(limit, len(split))
        if self.n == 0:
            raise ValueError("SpeechLoader got an empty split")
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        for start in range(0, self.n, self.batch_size):
            yield collate([self.split[int(i)] for i in order[start : start + self.batch_size]])


def _frame_mask(lengths: Tensor, frames: int) -> Tensor:
    """(B, frames) bool: frame t of utterance i is valid iff t < n_frames(lengths[i])."""
    valid = torch.div(lengths + HOP - 1, HOP, rounding_mode="floor") + 1
    return torch.arange(frames, device=lengths.device)[None, :] < valid[:, None]


def forward_fn(model: nn.Module, batch: Batch) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """For :func:`mpolstm.harness.training.fit`: batch -> (mask (B, F, 257), (IRM target (B, F, 257), valid (B, F)))."""
    noisy, clean, lengths = batch
    spec_y = audio.stft(noisy)
    spec_s = audio.stft(clean)
    target = audio.ideal_ratio_mask(spec_s, spec_y - spec_s)
    mask, _ = model(audio.log_magnitude(spec_y))
    return mask, (target, _frame_mask(lengths, spec_y.shape[1]))


def _masked_sse(mask: Tensor, targets: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    target, valid = targets
    weight = valid.unsqueeze(-1).to(mask.dtype)
    return ((mask.float() - target).square() * weight).sum(), weight.sum() * N_BINS


def mask_loss(mask: Tensor, targets: tuple[Tensor, Tensor]) -> Tensor:
    """For fit's ``loss_fn``: MSE between predicted and ideal ratio masks over valid frames and bins."""
    sse, count = _masked_sse(mask, targets)
    return sse / count


def _mask_mse_batch(mask: Tensor, targets: tuple[Tensor, Tensor]) -> tuple[float, int]:
    sse, count = _masked_sse(mask, targets)
    return float(sse), int(count)


MASK_MSE = Metric("mask_mse", "min", _mask_mse_batch)
"""Validation metric for fit: mask MSE over valid frames (lower is better)."""


def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
    """Masked IRM MSE of ``model`` on one batch (forward_fn followed by mask_loss)."""
    return mask_loss(*forward_fn(model, batch))


@torch.no_grad()
def enhance_batch(model: nn.Module, batch: Batch) -> list[np.ndarray]:
    """Whole-utterance enhancement of a padded batch -> list of (T_i,) float32 waveforms."""
    noisy, _, lengths = batch
    model.eval()
    spec_y = audio.stft(noisy)
    mask, _ = model(audio.log_magnitude(spec_y))
    out = audio.istft(spec_y * mask, noisy.shape[-1]).cpu()
    return [out[i, : int(n)].numpy() for i, n in enumerate(lengths)]


def enhance(model: nn.Module, noisy: np.ndarray) -> np.ndarray:
    """Whole-utterance enhancement of one (T,) waveform -> (T,) float32."""
    noisy = _check_waveform(noisy)
    return enhance_batch(model, collate([(noisy, noisy)]))[0]


def evaluate(model: nn.Module, split, batch_size: int = 16, limit: int | None = None,
             noisy_baseline: bool = False) -> dict[str, float]:
    """Mean 'loss' and enhanced 'pesq', 'stoi', 'si_sdr' over (the first ``limit`` of) ``split``.

    With ``noisy_baseline`` also 'noisy_pesq', 'noisy_stoi', 'noisy_si_sdr' of the unprocessed input."""
    n = len(split) if limit is None else min(limit, len(split))
    sums: dict[str, float] = {}
    loss_total = 0.0
    model.eval()
    for start in range(0, n, batch_size):
        pairs = [split[i] for i in range(start, min(n, start + batch_size))]
        batch = collate(pairs)
        with torch.no_grad():
            loss_total += float(loss_fn(model, batch)) * len(pairs)
        for (noisy, clean), est in zip(pairs, enhance_batch(model, batch)):
            scores = audio.score(clean, est)
            if noisy_baseline:
                scores.update({f"noisy_{k}": v for k, v in audio.score(clean, noisy).items()})
            for k, v in scores.items():
                sums[k] = sums.get(k, 0.0) + v
    return {"loss": loss_total / n, **{k: v / n for k, v in sums.items()}}


@dataclass
class StreamStats:
    """Streaming run: frames processed, audio and compute seconds, real-time factor (compute / audio),
    mean and 95th-percentile per-frame compute latency (ms), and the algorithmic latency (ms) of the
    STFT framing (one 512-sample window = 32 ms)."""

    frames: int
    audio_seconds: float
    compute_seconds: float
    rtf: float
    frame_ms_mean: float
    frame_ms_p95: float
    algorithmic_latency_ms: float


def _check_waveform(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"expected a non-empty mono waveform of shape (T,), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("the waveform contains NaN or infinite samples")
    return x


def enhance_streaming(model: MaskEstimator, noisy: np.ndarray, threads: int | None = 1) -> tuple[np.ndarray, StreamStats]:
    """Enhance (T,) audio one hop (256 samples) at a time with carried recurrent state.

    Each step shifts a hop into a 512-sample buffer, takes its windowed FFT, runs ``model.step``,
    masks, inverse-FFTs and overlap-adds; a hop of output is final one frame later. The result
    equals :func:`enhance` up to float rounding. Runs on the CPU with ``threads`` torch intra-op threads
    (restored afterwards; None keeps the current setting): per-frame operations are too small to
    gain from more, and on a busy machine extra threads multiply the latency.
    Returns ((T,) float32, StreamStats)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _stream(model, _check_waveform(noisy))
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def _stream(model: MaskEstimator, noisy: np.ndarray) -> tuple[np.ndarray, StreamStats]:
    x = torch.from_numpy(noisy)
    model.eval()
    frames = audio.n_frames(x.numel())
    x = torch.nn.functional.pad(x, (0, frames * HOP - x.numel()))
    window = torch.hann_window(N_FFT, periodic=True).sqrt()
    buf = torch.zeros(N_FFT)
    tail = torch.zeros(HOP)
    state = None
    out = []
    times = np.empty(frames)
    for t in range(frames):
        t0 = time.perf_counter()
        buf = torch.cat([buf[HOP:], x[t * HOP : (t + 1) * HOP]])
        spec = torch.fft.rfft(buf * window)
        mask, state = model.step(audio.log_magnitude(spec).unsqueeze(0), state)
        y = torch.fft.irfft(spec * mask[0], n=N_FFT) * window
        if t > 0:
            out.append(tail + y[:HOP])
        tail = y[HOP:]
        times[t] = time.perf_counter() - t0
    enhanced = torch.cat(out)[: len(noisy)].numpy()
    audio_s = len(noisy) / SAMPLE_RATE
    stats = StreamStats(
        frames=frames,
        audio_seconds=audio_s,
        compute_seconds=float(times.sum()),
        rtf=float(times.sum()) / audio_s,
        frame_ms_mean=float(times.mean() * 1e3),
        frame_ms_p95=float(np.percentile(times, 95) * 1e3),
        algorithmic_latency_ms=N_FFT / SAMPLE_RATE * 1e3,
    )
    return enhanced, stats


def enhance_file(model: MaskEstimator, noisy_path: str | os.PathLike, out_path: str | os.PathLike,
                 float32: bool = False) -> tuple[StreamStats, list[str]]:
    """Read a WAV (converted to 16 kHz mono as documented in :func:`mpolstm.harness.audio.read_wav`), enhance
    it by streaming, write the result; returns (StreamStats, notes on the input conversions)."""
    noisy, notes = audio.read_wav(noisy_path)
    enhanced, stats = enhance_streaming(model, noisy)
    audio.write_wav(out_path, enhanced, float32=float32)
    return stats, notes


@dataclass(frozen=True)
class SpeechSize:
    """Corpus, model size and training budget of one task preset.

    ``corpus`` maps the task preset (quick / standard / paper) onto a corpus preset of
    :data:`mpolstm.harness.data.speech.PRESETS` (tiny / quick / standard: data sizes only)."""

    corpus: str
    hidden: int
    layers: int
    train_utterances: int | None  # None: the whole training split
    test_utterances: int | None
    dense_epochs: int
    finetune_epochs: int
    lr: float

    def __post_init__(self) -> None:
        if self.corpus not in CORPUS_PRESETS:
            raise ValueError(f"unknown speech corpus preset {self.corpus!r}; expected one of {sorted(CORPUS_PRESETS)}")


SIZES = {
    # quick: <= 5 minutes for a reduced table on 2 CPU cores (measured: 2.2 min on one thread)
    "quick": SpeechSize("quick", 128, 2, 96, 8, 4, 2, 3e-3),
    # standard: <= 90 minutes for the whole table on 2 CPU cores (measured: 81 min on one thread)
    "standard": SpeechSize("standard", 256, 2, None, 40, 10, 4, 2e-3),
    # paper scale (2x1024 mask estimator) on the standard corpus (the largest); for a GPU
    "paper": SpeechSize("standard", 1024, 2, None, None, 30, 10, 1e-3),
}


def make_task(preset: str = "quick", *, seed: int = 0, layers: int | None = None, hidden_size: int | None = None) -> Task:
    """The speech-enhancement task at a preset size (``layers`` and ``hidden_size`` override its
    LSTM's); builds the corpus on first use (needs espeak-ng).

    Validation metric for training: mask MSE; every protocol row also reports test PESQ-wb, STOI
    and SI-SDR (and the noisy input's scores go in the task's meta)."""
    size: SpeechSize = TASK.size(preset)
    if hidden_size is not None:
        size = dataclasses.replace(size, hidden=hidden_size)
    corpus = load_corpus(preset=size.corpus, seed=seed)
    train, val, test = corpus["train"], corpus["val"], corpus["test"]
    n_train = len(train) if size.train_utterances is None else min(size.train_utterances, len(train))
    n_test = len(test) if size.test_utterances is None else min(size.test_utterances, len(test))
    stats_from = [train.noisy[i] for i in range(n_train)]

    depth = size.layers if layers is None else layers

    def spec(hidden: int) -> dict[str, Any]:
        return {"name": "speech", "kwargs": {"hidden": hidden, "layers": depth}}

    def resize(hidden: int) -> tuple[nn.Module, dict[str, Any]]:
        model = make_model(hidden, depth)
        if model.feat_mean.device.type != "meta":  # sizing probes build on the meta device
            fit_feature_stats(model, stats_from)
        return model, spec(hidden)

    architecture = spec(size.hidden)

    def build() -> nn.Module:
        return resize(size.hidden)[0]

    def report(model: nn.Module) -> dict[str, float]:
        scores = evaluate(model, test, limit=n_test)
        return {k: scores[k] for k in ("pesq", "stoi", "si_sdr")}

    noisy = [audio.score(test.clean[i], test.noisy[i]) for i in range(n_test)]
    example = torch.stack([audio.log_magnitude(audio.stft(torch.as_tensor(test.noisy[0][: SAMPLE_RATE * 2])))] * 8)
    return Task(
        name="speech",
        metric=MASK_MSE,
        distill_loss="mse",
        build_model=build,
        train_loader=SpeechLoader(train, batch_size=16, shuffle=True, seed=seed, limit=n_train),
        val_loader=SpeechLoader(val, batch_size=16, shuffle=False),
        test_loader=SpeechLoader(test, batch_size=16, shuffle=False, limit=n_test),
        loss_fn=mask_loss,
        forward_fn=forward_fn,
        dense_epochs=size.dense_epochs,
        finetune_epochs=size.finetune_epochs,
        lr=size.lr,
        grad_clip=5.0,
        example_batch=example,
        test_report=report,
        architecture=architecture,
        resize=resize,
        meta={"dataset": f"synthetic espeak-ng corpus ({size.corpus})", "preset": preset, "seed": seed,
              "hidden_size": size.hidden, "layers": depth, "train_utterances": n_train,
              "test_utterances": n_test, "manifest": str(corpus.root / "manifest.json"),
              **{f"noisy_{k}": float(np.mean([s[k] for s in noisy])) for k in ("pesq", "stoi", "si_sdr")}},
    )


def example_inputs(kwargs: Mapping[str, Any], batch: int = 2, steps: int = 5) -> tuple[Tensor, ...]:
    """(batch, steps, 257) log-magnitude frames."""
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(batch, steps, N_BINS, generator=gen),)


TASK = register_task(TaskType(name="speech", model_class=MaskEstimator, make_task=make_task, presets=SIZES,
                              example_inputs=example_inputs))
