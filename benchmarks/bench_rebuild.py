"""Rebuilding dense weights from MPO cores (``mpolstm.mpo.cores_to_matrix``): what training pays per step.

    python benchmarks/bench_rebuild.py [--threads 1] [--rounds 5] [--out results/bench_rebuild.json]

Cases: the cores ``compress(nn.LSTM(256, H, 2), CompressionConfig(target_ratio=10, layout=L))`` gives
for H = 512 and 1024 and L = lowrank, interleaved (2 cores) and auto, plus a 4-core MPO of a
1024 x 4096 matrix at bond 32. Per case: milliseconds to rebuild every weight of the model and
backpropagate a sum through it ("fwd+bwd", as each training step does), and to rebuild without
gradients ("no-grad", as the eval cache does once), each the minimum over ``--rounds``; beside them
one training step of the dense nn.LSTM on batch 32, length 50 (forward, backward), so the share
of a step the rebuild costs can be read off.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from mpolstm.compression import CompressionConfig, compress
from mpolstm.mpo import cores_to_matrix


def best_ms(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def rebuild_times(chains: list[list[torch.Tensor]], rounds: int) -> dict[str, float]:
    """fwd+bwd and no-grad milliseconds of rebuilding every chain (W^T, as the RNN layers do)."""
    leaves = [[c.detach().clone().requires_grad_() for c in chain] for chain in chains]

    def train():
        for chain in leaves:
            for c in chain:
                c.grad = None
        sum(cores_to_matrix(chain, transpose=True).sum() for chain in leaves).backward()

    def infer():
        with torch.no_grad():
            for chain in leaves:
                cores_to_matrix(chain, transpose=True)

    return {"fwd_bwd_ms": best_ms(train, rounds), "no_grad_ms": best_ms(infer, rounds)}


def dense_step_ms(hidden: int, rounds: int) -> float:
    lstm, x = nn.LSTM(256, hidden, num_layers=2), torch.randn(50, 32, 256)

    def step():
        lstm.zero_grad(set_to_none=True)
        lstm(x)[0].pow(2).mean().backward()

    return best_ms(step, rounds)


def cases() -> dict[str, tuple[int, list[list[torch.Tensor]]]]:
    out: dict[str, tuple[int, list[list[torch.Tensor]]]] = {}
    for hidden in (512, 1024):
        for layout in ("lowrank", "interleaved", "auto"):
            torch.manual_seed(0)
            model, report = compress(nn.Sequential(nn.LSTM(256, hidden, num_layers=2)),
                                     CompressionConfig(target_ratio=10, layout=layout))
            lstm = model[0]
            chains = [list(cores) for cores in lstm.mpo_weights().values()]
            layouts = sorted({r.layout for m in report.modules for r in m.weights.values()})
            out[f"2x{hidden} 10x {layout} ({', '.join(layouts)})"] = (hidden, chains)
    torch.manual_seed(0)
    shapes = [(1, 4, 8, 32), (32, 8, 8, 32), (32, 8, 8, 32), (32, 4, 8, 1)]
    out["1024x4096 4-core MPO, bond 32"] = (0, [[torch.randn(s) for s in shapes]])
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/bench_rebuild.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dense = {h: dense_step_ms(h, args.rounds) for h in (512, 1024)}
    rows = []
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    print(f"{'case':48s} {'fwd+bwd ms':>11s} {'no-grad ms':>11s} {'dense step ms':>14s} {'share':>6s}")
    for name, (hidden, chains) in cases().items():
        times = rebuild_times(chains, args.rounds)
        step = dense.get(hidden)
        share = None if step is None else times["fwd_bwd_ms"] / step
        rows.append({"case": name, **times, "dense_step_ms": step, "share_of_dense_step": share})
        print(f"{name:48s} {times['fwd_bwd_ms']:11.1f} {times['no_grad_ms']:11.1f} "
              f"{'-' if step is None else f'{step:.0f}':>14s} {'-' if share is None else f'{share:.0%}':>6s}")
    document = {"meta": {"torch": torch.__version__, "threads": args.threads, "machine": platform.machine(),
                         "time": time.strftime("%Y-%m-%d %H:%M:%S")}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1))
    print(f"wrote {args.out}")
    return document


if __name__ == "__main__":
    main()
