"""Per-frame streaming enhancement: MPO-compressed, int8 and dense mask estimators at the same hidden size.

    python benchmarks/bench_speech.py                  # 2x512 and 2x1024 (the paper's sizes), 10x / 30x
    python benchmarks/bench_speech.py --quick          # 2x256 only, fewer rounds
    python benchmarks/bench_speech.py --out results/bench_speech.json

What one frame costs in ``mpolstm enhance``: shift 256 samples into the window, FFT, log-magnitude,
``MaskEstimator.step`` (two LSTM layers, Linear 257-bin mask), mask, inverse FFT, overlap-add; one
torch thread (what ``enhance`` uses). Two figures per model:

- ``step``: ``MaskEstimator.step`` alone (median of torch.utils.benchmark), the part compression
  changes; dense runs ``torch.lstm_cell`` per layer (the fastest dense step on CPU; nn.LSTM on a
  length-1 sequence costs several times more), MPO runs ``MPOLSTM.step``.
- ``frame``: the whole frame inside :func:`mpolstm.harness.tasks.speech.enhance_streaming` on 10 s of audio
  (mean and p95 per-frame latency, real-time factor).

The MPO models replace the LSTM by an MPOLSTM with the largest uniform bond D reaching the stated
compression of the LSTM weights (the structure ``compress(..., max_bond=D)`` gives a trained
model). ``dense int8`` is ``torch.ao.quantization.quantize_dynamic`` of the dense model (LSTM and
Linear; its LSTM steps on a length-1 sequence, the only path torch has for it); ``mpo-int8 Rx`` an
MPO whose int8 cores (``mpolstm.quantize``: 1 byte an entry + 4-byte scales) take R times fewer bytes than the
dense float32 weights, i.e. ~4x the entries of ``mpo Rx``, computed in float32 as the protocol's
``mpo-int8`` row is. Compression is in bytes of the LSTM weights as stored (mpolstm.storage).
Timings do not depend on the weights' values, so the models are randomly initialised. Rounds are
interleaved (a load spike hits every model); the table reports the minimum over rounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils import benchmark

from mpolstm import quantize
from mpolstm.harness.audio import N_BINS, SAMPLE_RATE
from mpolstm.harness.protocol.rows import quantize_dynamic_int8
from mpolstm.harness.tasks.speech import INPUT_BINS, enhance_streaming, make_model
from mpolstm.nn import MPOLSTM
from mpolstm.storage import pack_weights, packed_bytes


def lstm_weight_bytes(model, int8_cores: bool = False) -> int:
    """Bytes of the LSTM weights as stored (MPO cores, dense or int8 matrices)."""
    return packed_bytes(pack_weights(model, ["lstm"], int8_cores=int8_cores)[0])


def mpo_model(hidden: int, layers: int, ratio: float, int8_cores: bool = False):
    """(model, bond, achieved ratio in bytes): the dense model with its LSTM replaced by a randomly
    initialised MPOLSTM of the largest uniform bond whose byte compression is >= ratio (cores
    rounded to int8 with ``int8_cores``)."""
    model = make_model(hidden, layers)
    dense_bytes = lstm_weight_bytes(model)
    for bond in range(512, 0, -1):
        torch.manual_seed(0)
        model.lstm = MPOLSTM(INPUT_BINS, hidden, layers, batch_first=True, bond_dim=bond)
        achieved = dense_bytes / lstm_weight_bytes(model, int8_cores)
        if achieved >= ratio:
            if int8_cores:
                quantize(model.lstm)
            return model.eval(), bond, achieved
    raise ValueError(f"no bond reaches {ratio}x for hidden {hidden}")


def step_seconds(model) -> float:
    frame = torch.randn(1, N_BINS)
    with torch.no_grad():
        state = model.step(frame)[1]
        timer = benchmark.Timer("model.step(frame, state)", globals={"model": model, "frame": frame, "state": state},
                                num_threads=1)
        return timer.blocked_autorange(min_run_time=0.3).median


def frame_stats(model, noisy: np.ndarray) -> dict[str, float]:
    _, stats = enhance_streaming(model, noisy, threads=1)
    return {"frame_ms_mean": stats.frame_ms_mean, "frame_ms_p95": stats.frame_ms_p95, "rtf": stats.rtf}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2x256 only, 2 rounds (smoke run)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ratios", type=float, nargs="+", default=[10.0, 30.0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length of the frame test")
    parser.add_argument("--out", type=Path, default=Path("results/bench_speech.json"))
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.rounds, args.seconds = [256], 2, 3.0

    torch.set_num_threads(1)
    noisy = (0.1 * np.random.default_rng(0).standard_normal(int(args.seconds * SAMPLE_RATE))).astype(np.float32)
    rows = []
    for hidden in args.hidden:
        torch.manual_seed(0)
        dense = make_model(hidden, args.layers).eval()
        int8 = quantize_dynamic_int8(dense)
        models = {"dense": (dense, None, 1.0),
                  "dense int8": (int8, None, lstm_weight_bytes(dense) / lstm_weight_bytes(int8))}
        for ratio in args.ratios:
            models[f"mpo {ratio:g}x"] = mpo_model(hidden, args.layers, ratio)
            models[f"mpo-int8 {ratio:g}x"] = mpo_model(hidden, args.layers, ratio, int8_cores=True)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, (model, _, _) in models.items():
                runs[name].append({"step_ms": 1e3 * step_seconds(model), **frame_stats(model, noisy)})
        best = {name: {k: min(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
        for name, (model, bond, achieved) in models.items():
            b = best[name]
            rows.append({
                "hidden": hidden, "layers": args.layers, "model": name, "bond": bond, "compression": achieved,
                "lstm_weight_bytes": round(lstm_weight_bytes(dense) / achieved), **b,
                "step_speedup": best["dense"]["step_ms"] / b["step_ms"],
                "frame_speedup": best["dense"]["frame_ms_mean"] / b["frame_ms_mean"],
                "rounds": runs[name],
            })

    header = f"{'hidden':>6s} {'model':>13s} {'bond':>4s} {'bytes x':>7s} {'step ms':>8s} {'x dense':>7s} " \
             f"{'frame ms':>8s} {'p95 ms':>7s} {'x dense':>7s} {'RTF':>6s}"
    print(header)
    for r in rows:
        print(f"{r['hidden']:6d} {r['model']:>13s} {r['bond'] or '-':>4} {r['compression']:7.1f} {r['step_ms']:8.3f} "
              f"{r['step_speedup']:7.2f} {r['frame_ms_mean']:8.3f} {r['frame_ms_p95']:7.3f} {r['frame_speedup']:7.2f} "
              f"{r['rtf']:6.3f}")
    report = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "threads": 1, "audio_seconds": args.seconds, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
