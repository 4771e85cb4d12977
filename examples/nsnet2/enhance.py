"""A WAV file in, the enhanced WAV out, frame by frame through a step file (states carried), checked
against the offline result of the matching whole-sequence file.

    python examples/nsnet2/enhance.py noisy.wav enhanced.wav --step small.step.onnx --offline small.onnx
    python examples/nsnet2/enhance.py --write-calibration calib.safetensors   # inputs for mpolstm compress

Without ``--step`` the original model is written as a step file on the fly (``mpolstm.onnx.save(...,
step=True)`` of the package's file). ``--offline`` (default: the package's file) is run on the whole
signal at once; the script prints the largest difference between the two outputs. The WAV is read
(mono, resampled to the model's rate if needed) and written with ``mpolstm.harness.audio``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
from nsnet2 import FRONT_ENDS, enhance, model_file, offline_runner, ort_session, stream  # noqa: E402

import mpolstm.onnx as mo  # noqa: E402
from mpolstm.harness.audio import read_wav, write_wav  # noqa: E402


def write_calibration(path: Path, rate: int = 16000, utterances: int = 16, frames: int = 300) -> Path:
    """A safetensors file with input0 (utterances, frames, bins): the features of the first train
    utterances of the speech corpus that have ``frames`` frames, cropped to that length."""
    from safetensors.torch import save_file
    from table import _features

    from mpolstm.harness.data.speech import load_corpus

    train = load_corpus(preset="quick")["train"]
    crops = [f[:frames] for f in (_features(x, rate) for x in train.noisy) if f.shape[0] >= frames][:utterances]
    save_file({"input0": torch.stack(crops).contiguous()}, str(path))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("noisy", type=Path, nargs="?")
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--rate", type=int, default=16000, choices=(16000, 48000))
    parser.add_argument("--step", type=Path, default=None, help="a step file (mpolstm.onnx.save(..., step=True))")
    parser.add_argument("--offline", type=Path, default=None, help="the whole-sequence file to compare with")
    parser.add_argument("--write-calibration", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.write_calibration is not None:
        print(f"wrote {write_calibration(args.write_calibration, args.rate)}")
        return
    if args.noisy is None or args.out is None:
        parser.error("give NOISY.wav and OUT.wav")
    front = FRONT_ENDS[args.rate]
    x, notes = read_wav(args.noisy, args.rate)
    for note in notes:
        print(f"note: {note}")
    step = args.step.read_bytes() if args.step else mo.to_bytes(mo.load(model_file(args.rate)), step=True)
    start = time.perf_counter()
    y = stream(ort_session(step), x, front)
    seconds = time.perf_counter() - start
    offline = enhance(offline_runner(ort_session(args.offline or model_file(args.rate))), x, front)
    write_wav(args.out, y, args.rate)
    frames = front.frames(len(x))
    print(f"wrote {args.out}: {frames} frames streamed in {seconds:.2f} s ({1e3 * seconds / max(frames, 1):.2f} ms a "
          f"frame, real-time factor {seconds / (len(x) / args.rate):.3f}); largest difference to the offline "
          f"result {np.abs(y - offline).max():.2e}")


if __name__ == "__main__":
    main()
