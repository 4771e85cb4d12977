"""How an int8 model (``mpolstm.quantize``: int8 cores) should be exported to ONNX: onnxruntime's dynamic
quantization of the factors against its QDQ (static) quantization, on the streaming step.

    python benchmarks/bench_int8_export.py                 # 2x1024 LSTM, 10x and 30x
    python benchmarks/bench_int8_export.py --hidden 256 --rounds 3 --out results/bench_int8_export.json

A 2-layer LSTM (input 256, hidden ``--hidden``, random weights) is compressed with ``compress`` (layout
search by error alone, and with ``max_macs`` = dense / R: "latency"), its cores rounded to int8
(``mpolstm.quantize``), and its step exported with ``export_step`` (factorized runtime, float32 factors).
That file is then written four ways, all with onnxruntime's tools (``onnxruntime.quantization``):

- ``float``: as exported (the factors in float32: what an int8 model exported without int8);
- ``mpolstm``: what ``export_step`` now writes for an int8 model (``mpolstm.export.int8``: dynamic
  quantization of the MPO products only, torch.mm's Gemm as MatMul);
- ``dynamic``: ``quantize_dynamic`` (weights int8 per tensor, activations quantized per call:
  DynamicQuantizeLinear + MatMulInteger);
- ``dynamic-pc``: the same with one scale per output channel;
- ``qdq``: ``quantize_static`` in the QDQ format (weights and activations int8, activations calibrated
  on 64 random frames and states; onnxruntime fuses DequantizeLinear / QuantizeLinear around MatMul).

Per variant: the file's weight bytes (initializers), the step time at one stream (N = 1) and the
frames/s at 32 streams, each the minimum over ``--rounds`` interleaved rounds of a round's median, one
onnxruntime thread; and the relative error of the new hidden state after 20 steps against the torch
model with int8 cores (``||h_onnx - h|| / ||h||``). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench_deploy import median_seconds  # this folder is on sys.path when the script runs
from mpolstm import quantize
from mpolstm.compression import CompressionConfig, compress
from mpolstm.export import export_step, onnx_weight_bytes

INPUT, STEPS = 256, 20
VARIANTS = ("float", "mpolstm", "dynamic", "dynamic-pc", "qdq")


def compressed(hidden: int, ratio: float, latency: bool) -> nn.Module:
    torch.manual_seed(0)
    host = nn.Sequential(nn.LSTM(INPUT, hidden, num_layers=2))
    dense_macs = sum(p.numel() for n, p in host.named_parameters() if "weight" in n)
    config = CompressionConfig(target_ratio=ratio, max_macs=int(dense_macs / ratio) if latency else None)
    compress(host, config)
    return quantize(host[0]).eval()


def _frames(rows: int, module: nn.Module, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    gen = torch.Generator().manual_seed(seed)
    feeds = []
    for _ in range(count):
        h = torch.randn(module.num_layers, rows, module.hidden_size, generator=gen) * 0.5
        c = torch.randn(module.num_layers, rows, module.hidden_size, generator=gen) * 0.5
        feeds.append({"frame": torch.randn(rows, INPUT, generator=gen).numpy(), "state0": h.numpy(),
                      "state1": c.numpy()})
    return feeds


def write_variants(module: nn.Module, folder: Path) -> dict[str, Path]:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    float_path = export_step(module, folder / "float.onnx", frame=torch.zeros(1, INPUT), int8=False)
    paths = {"float": float_path, "dynamic": folder / "dynamic.onnx", "dynamic-pc": folder / "dynamic-pc.onnx",
             "qdq": folder / "qdq.onnx",
             "mpolstm": export_step(module, folder / "mpolstm.onnx", frame=torch.zeros(1, INPUT))}

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(_frames(1, module, 64, seed=1))

        def get_next(self):
            return next(self.feeds, None)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)  # onnxruntime logs a pre-processing hint per call
        quantize_dynamic(str(float_path), str(paths["dynamic"]), weight_type=QuantType.QInt8)
        quantize_dynamic(str(float_path), str(paths["dynamic-pc"]), weight_type=QuantType.QInt8, per_channel=True)
        quantize_static(str(float_path), str(paths["qdq"]), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        logging.disable(logging.NOTSET)
    return paths


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def error_after_steps(module: nn.Module, sess) -> float:
    """||h - h_torch|| / ||h_torch|| after STEPS steps from zeros on random frames."""
    gen = torch.Generator().manual_seed(2)
    frames = torch.randn(STEPS, 4, INPUT, generator=gen)
    state = None
    h = np.zeros((module.num_layers, 4, module.hidden_size), np.float32)
    c = np.zeros_like(h)
    with torch.no_grad():
        for frame in frames:
            _, state = module.step(frame, state)
            _, h, c = sess.run(None, {"frame": frame.numpy(), "state0": h, "state1": c})
    ref = state[0].numpy()
    return float(np.linalg.norm(h - ref) / np.linalg.norm(ref))


def measure(hidden: int, ratio: float, latency: bool, rounds: int, min_time: float) -> list[dict]:
    module = compressed(hidden, ratio, latency)
    with tempfile.TemporaryDirectory() as folder:
        paths = write_variants(module, Path(folder))
        sessions = {name: session(path) for name, path in paths.items()}
        feeds = {rows: _frames(rows, module, 1, seed=3)[0] for rows in (1, 32)}
        best = {(name, rows): float("inf") for name in VARIANTS for rows in (1, 32)}
        for _ in range(rounds):  # interleaved: a load spike hits every variant
            for name in VARIANTS:
                for rows in (1, 32):
                    run = lambda s=sessions[name], f=feeds[rows]: s.run(None, f)  # noqa: E731
                    best[(name, rows)] = min(best[(name, rows)], median_seconds(run, min_time))
        return [{"model": f"{'latency' if latency else 'mpo'} {ratio:g}x int8", "hidden": hidden, "variant": name,
                 "weight_bytes": onnx_weight_bytes(paths[name]), "step_us": 1e6 * best[(name, 1)],
                 "frames_per_s_32": 32 / best[(name, 32)], "rel_error": error_after_steps(module, sessions[name])}
                for name in VARIANTS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ratios", default="10,30")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=Path("results/bench_int8_export.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(f"{'model':18s} {'variant':11s} {'weight B':>10s} {'step us':>9s} {'fps@32':>9s} {'rel err':>8s}")
    for ratio in (float(r) for r in args.ratios.split(",")):
        for latency in (False, True):
            for row in measure(args.hidden, ratio, latency, args.rounds, args.min_time):
                rows.append(row)
                print(f"{row['model']:18s} {row['variant']:11s} {row['weight_bytes']:10,d} {row['step_us']:9.1f} "
                      f"{row['frames_per_s_32']:9.0f} {row['rel_error']:8.4f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "hidden": args.hidden, "rounds": args.rounds,
                                    "torch": torch.__version__}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
