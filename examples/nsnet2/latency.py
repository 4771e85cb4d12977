"""Per-frame latency of NSNet2 in onnxruntime (one thread): the original file, its dynamic int8, and the
streaming step files ``mpolstm.onnx`` writes (states in and out, one frame a call).

    python examples/nsnet2/latency.py --out examples/nsnet2/results/latency.json

Rows: ``original`` / ``original int8``: the package's file (and ``onnxruntime.quantization.quantize_dynamic``
of it) called on one frame (input (1, 1, 161); it cannot carry the GRU states across calls, so this is
its cost per frame, not a usable stream); ``dense step``: the original weights written as a step file
(the GRU ops with their states as inputs and outputs); ``<method> <r>x``: the GRUs compressed with
calibration (``mpo-latency``: with the latency budget ``max_macs`` = dense MACs / r; ``mpo-calibrated``:
the parameter budget alone) and written as step files, float32 and with int8 MatMul weights.
Bytes: the initializers of each file. Rounds are interleaved; each figure is the minimum over rounds of
a round's median.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
from nsnet2 import FRONT_ENDS, model_file, ort_session  # noqa: E402
from table import build, load_data  # noqa: E402

import mpolstm.onnx as mo  # noqa: E402
from mpolstm.export import onnx_weight_bytes  # noqa: E402


def _weight_bytes(data: bytes) -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "m.onnx").write_bytes(data)
        return onnx_weight_bytes(Path(tmp) / "m.onnx")


def files(rate: int, ratios: list[float], calib: list) -> dict[str, bytes]:
    """name -> ONNX bytes of every row."""
    source = model_file(rate).read_bytes()
    original = mo.load(model_file(rate))
    out = {"original": source, "original int8": mo.dynamic_int8(source),
           "dense step": mo.to_bytes(original, step=True)}
    for ratio in ratios:
        for method in ("mpo-latency", "mpo-calibrated"):
            model, _ = build(method, copy.deepcopy(original), ratio, calib)
            out[f"{method} {ratio:g}x"] = mo.to_bytes(model, step=True)
            out[f"{method} {ratio:g}x int8"] = mo.to_bytes(model, step=True, int8=True)
    return out


def frame_fn(data: bytes, bins: int):
    session = ort_session(data)
    feeds = {}
    for value in session.get_inputs():
        shape = [1 if isinstance(d, str) or d is None else d for d in value.shape]
        feeds[value.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    feeds[session.get_inputs()[0].name] = np.full((1, 1, bins), -3.0, np.float32)
    return lambda: session.run(None, feeds)


def median_seconds(fn, min_time: float) -> float:
    fn()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 20:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=16000, choices=(16000, 48000))
    parser.add_argument("--ratios", type=float, nargs="+", default=[5, 10, 30])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.5)
    parser.add_argument("--n-calib", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = load_data(args.rate, 0, args.n_calib, 100, 8, n_distill=0)
    models = files(args.rate, args.ratios, data.calib)
    bins = FRONT_ENDS[args.rate].bins
    fns = {name: frame_fn(blob, bins) for name, blob in models.items()}
    best = {name: float("inf") for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], median_seconds(fn, args.min_time))
    base_bytes = _weight_bytes(models["original"])
    rows = []
    for name, blob in models.items():
        nbytes = _weight_bytes(blob)
        rows.append({"model": name, "frame_us": round(1e6 * best[name], 1), "bytes": nbytes,
                     "speedup_vs_original": round(best["original"] / best[name], 2),
                     "speedup_vs_int8": round(best["original int8"] / best[name], 2),
                     "bytes_vs_original": round(base_bytes / nbytes, 2)})
    print("| model | per frame (us) | x original | x original int8 | weight bytes | x fewer bytes |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['frame_us']:.0f} | {r['speedup_vs_original']:.2f}x | {r['speedup_vs_int8']:.2f}x | "
              f"{r['bytes']:,} | {r['bytes_vs_original']:.2f}x |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"argv": list(sys.argv[1:] if argv is None else argv), "rate": args.rate, "threads": 1,
                "onnxruntime": __import__("onnxruntime").__version__, "machine": platform.machine(),
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
