"""The recall model of issue 32: default calibrated compress (held-out decision) against uncalibrated and the old
default (allocation="per-matrix"), reported against unseen output error; then tolerance mode.

    OMP_NUM_THREADS=1 python benchmarks/bench_recall.py [--steps 600] [--tolerance]

Embedding(32, 64) -> 2-layer nn.LSTM 256 -> Linear, trained (seed 0, Adam 3e-3, batches of 32 sequences of 24
tokens) to output the token seen 3 steps earlier; 8 calibration batches of 32 sequences (seed 1); 512 unseen
sequences (seed 99). Prints Markdown tables (docs/results.md).
"""

import argparse
import copy
import time

import torch
from torch import nn

from mpolstm import CompressionConfig, compress


class Recall(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.lstm = nn.Embedding(32, 64), nn.LSTM(64, 256, 2, batch_first=True)
        self.head = nn.Linear(256, 32)

    def forward(self, x):
        return self.head(self.lstm(self.embed(x))[0])


def data(gen, rows, steps=24):
    x = torch.randint(0, 32, (rows, steps), generator=gen)
    return x, torch.roll(x, 3, 1)


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(-1)[:, 3:] == y[:, 3:]).float().mean())


def trained(steps):
    torch.manual_seed(0)
    gen, model = torch.Generator().manual_seed(0), Recall()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(steps):
        x, y = data(gen, 32)
        loss = nn.functional.cross_entropy(model(x)[:, 3:].reshape(-1, 32), y[:, 3:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--tolerance", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = trained(args.steps)
    gen = torch.Generator().manual_seed(1)
    calibration = [data(gen, 32)[0] for _ in range(8)]
    x, y = data(torch.Generator().manual_seed(99), 512)
    with torch.no_grad():
        reference = model(x)
    print(f"dense unseen accuracy {accuracy(model, x, y):.3f}")
    print("| ratio | method | kept | reported error (on) | unseen error | unseen accuracy | time s |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for ratio in (2, 5, 10, 30):
        for name, allocation, cal in (("uncalibrated", "error", None), ("old default", "per-matrix", calibration),
                                      ("default", "error", calibration)):
            start = time.perf_counter()
            small, report = compress(copy.deepcopy(model), CompressionConfig(target_ratio=ratio, allocation=allocation),
                                     calibration=cal)
            took = time.perf_counter() - start
            with torch.no_grad():
                unseen = float((small(x) - reference).norm() / reference.norm())
            check = report.output_check
            where = "synthetic" if check.source.startswith("synthetic") else f"{check.batches} held out"
            kept = report.allocation.chosen if report.allocation else "-"
            print(f"| {ratio}x | {name} | {kept} | {check.error:.3f} ({where}) | {unseen:.3f} | "
                  f"{accuracy(small, x, y):.3f} | {took:.1f} |", flush=True)
    if args.tolerance:
        print("| max error | kept ratio | reported error | unseen error | unseen accuracy | candidates | time s |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for tol in (0.3, 0.7):
            start = time.perf_counter()
            small, report = compress(model, CompressionConfig(max_output_error=tol), calibration=calibration)
            took = time.perf_counter() - start
            with torch.no_grad():
                unseen = float((small(x) - reference).norm() / reference.norm())
            print(f"| {tol} | {report.ratio:.2f}x | {report.output_check.error:.3f} | {unseen:.3f} | "
                  f"{accuracy(small, x, y):.3f} | {len(report.curve)} | {took:.0f} |", flush=True)


if __name__ == "__main__":
    main()
