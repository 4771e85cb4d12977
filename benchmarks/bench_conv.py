"""MPOConv1d / MPOConv2d vs torch.nn.Conv1d / Conv2d at equal shapes: training step and inference.

    python benchmarks/bench_conv.py                 # Conv2d 64->128 3x3 on 32x32 and Conv1d 256->256 k=5 on
                                                    # length 200, batch 32, bonds for 5x / 10x / 20x compression
    python benchmarks/bench_conv.py --quick         # small shapes, two rounds (a smoke run)
    python benchmarks/bench_conv.py --out benchmarks/results/bench_conv.json

Per configuration, for dense and for each MPO bond: the training step (forward, backward, SGD
step: the MPO rebuilds its kernel from the cores once per forward and back-propagates into them)
and eval-mode inference under no_grad (the MPO's rebuilt kernel is cached). Timing as in
bench_rnn.py: every model of a configuration runs once per round, rounds interleaved, so a load
spike hits all of them; the table gives the minimum over rounds and the ratio of those minima to
dense (the JSON also has medians). The bond of each compression target is the largest whose kernel
compression (dense kernel entries / core entries) reaches it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rnn import interleaved, summarize

from mpolstm.nn import MPOConv1d, MPOConv2d

CONFIGS = {  # name -> (dims, in, out, kernel, padding, input shape without the batch)
    "Conv2d 64->128 3x3, 32x32": (2, 64, 128, 3, 1, (64, 32, 32)),
    "Conv1d 256->256 k=5, L=200": (1, 256, 256, 5, 2, (256, 200)),
}
QUICK = {
    "Conv2d 16->32 3x3, 16x16": (2, 16, 32, 3, 1, (16, 16, 16)),
    "Conv1d 64->64 k=5, L=50": (1, 64, 64, 5, 2, (64, 50)),
}


def build(dims: int, cin: int, cout: int, kernel: int, padding: int, bond: int | None) -> nn.Module:
    torch.manual_seed(0)
    if bond is None:
        return (nn.Conv1d if dims == 1 else nn.Conv2d)(cin, cout, kernel, padding=padding)
    return (MPOConv1d if dims == 1 else MPOConv2d)(cin, cout, kernel, padding=padding, bond_dim=bond)


def bond_for(dims: int, cin: int, cout: int, kernel: int, ratio: float) -> int:
    """The largest bond whose kernel compression is at least ``ratio``."""
    best = 1
    for bond in range(1, 257):
        with torch.device("meta"):
            if build(dims, cin, cout, kernel, 0, bond).compression_ratio < ratio:
                break
        best = bond
    return best


def train_fn(model: nn.Module, x: torch.Tensor):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        opt.step()

    return step


def infer_fn(model: nn.Module, x: torch.Tensor):
    model.eval()

    def run():
        with torch.no_grad():
            model(x)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, two rounds (smoke run)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ratios", type=float, nargs="+", default=[5, 10, 20], help="kernel compression targets")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_conv.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = QUICK if args.quick else CONFIGS
    batch = 4 if args.quick else args.batch
    rounds = 2 if args.quick else args.rounds
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "load_avg": os.getloadavg()},
              "batch": batch, "rounds": rounds, "configs": []}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch}, {rounds} rounds")
    for name, (dims, cin, cout, kernel, padding, shape) in configs.items():
        x = torch.randn(batch, *shape)
        bonds = sorted({bond_for(dims, cin, cout, kernel, r) for r in args.ratios}, reverse=True)
        models = {"dense": build(dims, cin, cout, kernel, padding, None)}
        models.update({f"MPO D={b}": build(dims, cin, cout, kernel, padding, b) for b in bonds})
        kernel_entries = models["dense"].weight.numel()
        compression = {n: 1.0 if n == "dense" else kernel_entries / sum(c.numel() for c in m.weight_cores)
                       for n, m in models.items()}
        train = summarize(interleaved({n: train_fn(m, x) for n, m in models.items()}, rounds), "dense")
        infer = summarize(interleaved({n: infer_fn(m, x) for n, m in models.items()}, rounds), "dense")
        config = {"name": name, "input": [batch, *shape], "compression": compression, "train": train,
                  "inference": infer, "factors": {n: [list(f) for f in m.factors["weight"]]
                                                  for n, m in models.items() if n != "dense"}}
        report["configs"].append(config)
        print_config(config)
    report["machine"]["load_avg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


def print_config(config: dict) -> None:
    print(f"\n### {config['name']}, input {tuple(config['input'])}\n")
    print("| model | kernel compression | train step (ms) | vs dense | inference (ms) | vs dense |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, tr in config["train"].items():
        inf = config["inference"][name]
        print(f"| {name} | {config['compression'][name]:.1f}x | {tr['min_s'] * 1e3:.1f} | {tr['ratio_min']:.3f}x | "
              f"{inf['min_s'] * 1e3:.1f} | {inf['ratio_min']:.3f}x |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
