"""Audio for speech enhancement: WAV IO, STFT features, ideal ratio mask, quality metrics.

Conventions: mono float32 waveforms in [-1, 1] at ``SAMPLE_RATE`` (16 kHz). The STFT is 512-point
with hop 256 and a periodic sqrt-Hann window, so analysis x synthesis windows sum to exactly 1 at 50%
overlap and the inverse is a plain overlap-add. Frames are causal: the signal is left-padded with
``N_FFT - HOP`` zeros, so frame t covers samples [t*HOP - 256, t*HOP + 256) and needs no future input
beyond its own window. Spectra are laid out (..., frames, N_BINS) so they feed a batch-first LSTM.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.io import wavfile
from scipy.signal import resample_poly

from ..atomic import atomic_open

SAMPLE_RATE = 16000
N_FFT = 512
HOP = 256
N_BINS = N_FFT // 2 + 1
LOG_EPS = 1e-6


def read_wav(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, list[str]]:
    """Read a WAV file as mono float32 (T,) in [-1, 1] at ``sample_rate``.

    Accepts PCM (8/16/24/32-bit) and IEEE float WAVs. Documented conversions, each described in the
    returned notes: several channels are downmixed by averaging them; another sample rate is
    resampled with ``scipy.signal.resample_poly`` (polyphase, Kaiser window) by the exact rational
    ratio. Raises ValueError for a missing or non-WAV file, an empty file, or non-finite samples.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file (expected a WAV file)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", wavfile.WavFileWarning)
            rate, data = wavfile.read(path)
    except (ValueError, EOFError, OSError) as exc:
        raise ValueError(f"{path}: not a readable WAV file ({exc}); expected RIFF/WAVE PCM or float") from exc
    notes: list[str] = []
    if data.dtype == np.uint8:
        x = (data.astype(np.float32) - 128.0) / 128.0
    elif data.dtype.kind == "i":
        x = data.astype(np.float32) / float(2 ** (8 * data.dtype.itemsize - 1))
    elif data.dtype.kind == "f":
        x = data.astype(np.float32)
    else:
        raise ValueError(f"{path}: unsupported sample type {data.dtype}; expected PCM integer or float")
    if x.ndim == 2:
        if x.shape[1] > 1:
            notes.append(f"downmixed {x.shape[1]} channels to mono by averaging")
        x = x.mean(axis=1)
    if x.size == 0:
        raise ValueError(f"{path}: the WAV file has no samples; expected non-empty audio")
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: the WAV file contains NaN or infinite samples")
    if rate <= 0:
        raise ValueError(f"{path}: invalid sample rate {rate}")
    if rate != sample_rate:
        x = resample(x, rate, sample_rate)
        notes.append(f"resampled {rate} Hz -> {sample_rate} Hz")
    return np.ascontiguousarray(x, dtype=np.float32), notes


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Polyphase resampling of (T,) float audio by the exact ratio rate_out / rate_in."""
    g = math.gcd(int(rate_in), int(rate_out))
    return resample_poly(np.asarray(x, dtype=np.float64), rate_out // g, rate_in // g).astype(np.float32)


def write_wav(path: str | os.PathLike, x: np.ndarray, sample_rate: int = SAMPLE_RATE, float32: bool = False) -> None:
    """Write mono audio (T,) atomically: 16-bit PCM (clipped to [-1, 1]) or, with ``float32``, IEEE float."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"write_wav expects non-empty mono audio of shape (T,), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("write_wav: audio contains NaN or infinite samples")
    data = x if float32 else np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)
    with atomic_open(path, "wb") as fh:
        wavfile.write(fh, sample_rate, data)


def _window(device=None) -> torch.Tensor:
    return torch.hann_window(N_FFT, periodic=True, dtype=torch.float32, device=device).sqrt()


def n_frames(n_samples: int) -> int:
    """Number of STFT frames for ``n_samples`` samples (every sample lies in two frames)."""
    return -(-n_samples // HOP) + 1


def stft(x: torch.Tensor) -> torch.Tensor:
    """Causal STFT: (..., T) real -> (..., n_frames(T), N_BINS) complex."""
    t = x.shape[-1]
    frames = n_frames(t)
    pad_end = frames * HOP - t
    xp = torch.nn.functional.pad(x.reshape(-1, t).float(), (N_FFT - HOP, pad_end))
    spec = torch.stft(xp, N_FFT, HOP, window=_window(x.device), center=False, return_complex=True)
    return spec.transpose(-1, -2).reshape(*x.shape[:-1], frames, N_BINS)


def frame_to_time(spec_frames: torch.Tensor) -> torch.Tensor:
    """Inverse FFT of frames with the synthesis window: (..., F, N_BINS) complex -> (..., F, N_FFT)."""
    return torch.fft.irfft(spec_frames, n=N_FFT) * _window(spec_frames.device)


def istft(spec: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`stft` by overlap-add: (..., F, N_BINS) complex -> (..., length) real."""
    frames = frame_to_time(spec)
    f = frames.shape[-2]
    if length > (f - 1) * HOP:
        raise ValueError(f"istft: {f} frames cover at most {(f - 1) * HOP} samples, asked for {length}")
    # Output block k (samples [k*HOP, (k+1)*HOP)) = second half of frame k + first half of frame k+1.
    y = frames[..., :-1, HOP:] + frames[..., 1:, :HOP]
    return y.reshape(*y.shape[:-2], (f - 1) * HOP)[..., :length]


def log_magnitude(spec: torch.Tensor) -> torch.Tensor:
    """Features: log(|S| + 1e-6), same shape as ``spec``."""
    return torch.log(spec.abs() + LOG_EPS)


def ideal_ratio_mask(clean_spec: torch.Tensor, noise_spec: torch.Tensor) -> torch.Tensor:
    """IRM = sqrt(|S|^2 / (|S|^2 + |N|^2)) in [0, 1], same shape as the spectra."""
    s2 = clean_spec.abs().square()
    n2 = noise_spec.abs().square()
    return torch.sqrt(s2 / (s2 + n2).clamp_min(1e-12))


def si_sdr(estimate: np.ndarray, reference: np.ndarray) -> float:
    """Scale-invariant SDR in dB of (T,) ``estimate`` against (T,) ``reference`` (both mean-removed)."""
    est = np.asarray(estimate, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if est.shape != ref.shape or est.ndim != 1:
        raise ValueError(f"si_sdr expects two (T,) signals of equal length, got {est.shape} and {ref.shape}")
    est = est - est.mean()
    ref = ref - ref.mean()
    ref_energy = np.dot(ref, ref)
    if ref_energy <= 0:
        raise ValueError("si_sdr: the reference is silent (zero energy after removing the mean)")
    target = (np.dot(est, ref) / ref_energy) * ref
    noise = est - target
    return float(10.0 * np.log10((np.dot(target, target) + 1e-20) / (np.dot(noise, noise) + 1e-20)))


def pesq_wb(reference: np.ndarray, degraded: np.ndarray) -> float:
    """Wide-band PESQ (ITU-T P.862.2, MOS-LQO about 1.0-4.64) at 16 kHz, via PyPI ``pesq``."""
    try:
        from pesq import PesqError, pesq
    except ImportError as exc:
        raise ImportError("PESQ needs the PyPI package 'pesq': pip install pesq") from exc
    try:
        return float(pesq(SAMPLE_RATE, np.asarray(reference, np.float32), np.asarray(degraded, np.float32), "wb"))
    except PesqError as exc:
        raise ValueError(f"PESQ could not score this pair ({type(exc).__name__}: {exc})") from exc


def stoi(reference: np.ndarray, degraded: np.ndarray) -> float:
    """Short-time objective intelligibility (0-1) at 16 kHz, via PyPI ``pystoi``."""
    try:
        from pystoi import stoi as _stoi
    except ImportError as exc:
        raise ImportError("STOI needs the PyPI package 'pystoi': pip install pystoi") from exc
    return float(_stoi(np.asarray(reference, np.float64), np.asarray(degraded, np.float64), SAMPLE_RATE))


def score(reference: np.ndarray, degraded: np.ndarray) -> dict[str, float]:
    """{'pesq', 'stoi', 'si_sdr'} of (T,) ``degraded`` against the clean (T,) ``reference``."""
    return {"pesq": pesq_wb(reference, degraded), "stoi": stoi(reference, degraded), "si_sdr": si_sdr(degraded, reference)}
