"""Wall time of compress() on a 4M-weight LSTM, with and without calibration, hybrid layout included.

    python benchmarks/bench_compress.py [--threads 2] [--ratio 10] [--out benchmarks/results/compress.json]

The model is nn.LSTM(512, 512, num_layers=2) (4 x 2048x512 weights, 4,194,304 entries);
calibration is 16 random sequences of 50 steps (the statistics' quality does not change the
cost). Prints a table and writes JSON with the settings and per-phase seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import nn

from mpolstm import CompressionConfig, compress
from mpolstm.calibration import collect_moments


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(512, 512, num_layers=2, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compress.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Net()
    batches = [torch.randn(4, 50, 512) for _ in range(4)]
    rows = []
    start = time.perf_counter()
    collect_moments(model, {"lstm": model.lstm}, batches)
    moments_s = time.perf_counter() - start
    modes = (("weight error", None, {}), ("calibrated", batches, {}),
             ("calibrated hybrid", batches, {"layout": "lowrank+sparse", "sparse_share": 0.5}),
             ("hybrid, share searched", batches, {"layout": "lowrank+sparse"}))
    for name, calibration, extra in modes:
        start, cpu = time.perf_counter(), time.process_time()
        _, report = compress(copy.deepcopy(model), CompressionConfig(target_ratio=args.ratio, **extra),
                             calibration=calibration)
        rows.append({"mode": name, "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                     "ratio": report.ratio,
                     "layouts": sorted({w.layout for m in report.modules for w in m.weights.values()})})
    print(f"compress nn.LSTM(512, 512, 2 layers): 4,194,304 weights, target {args.ratio}x, {args.threads} threads")
    print(f"{'mode':<24}{'seconds':>9}{'CPU s':>8}{'ratio':>8}  layouts")
    for r in rows:
        print(f"{r['mode']:<24}{r['seconds']:>9.1f}{r['cpu_seconds']:>8.1f}{r['ratio']:>8.1f}  {', '.join(r['layouts'])}")
    print(f"(of which recording the calibration moments: {moments_s:.1f} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "target_ratio": args.ratio, "rows": rows,
                                    "moments_seconds": moments_s}, indent=2))


if __name__ == "__main__":
    main()
