"""The recall model of issue 32: default calibrated compress (held-out decision) against uncalibrated and the old
default (allocation="per-matrix"), reported against unseen output error; then tolerance mode against a dense sweep.

    OMP_NUM_THREADS=1 python benchmarks/bench_recall.py [--steps 600] [bench_honest.py's options: --ratios, --sweep,
        --tolerances, --max-drop, --out]

Embedding(32, 64) -> 2-layer nn.LSTM 256 -> Linear, trained (seed 0, Adam 3e-3, batches of 32 sequences of 24
tokens) to output the token seen 3 steps earlier; 8 calibration batches of 32 sequences (seed 1); 16 unseen
batches of 32 sequences (same generator, after them); 256 held-out sequences (seed 7) for max_drop. The tables are
benchmarks/bench_honest.py's (``run``); prints Markdown (docs/results.md), writes benchmarks/results/honest_recall.json.
"""

import argparse

import torch
from bench_honest import Setup, arguments, run
from torch import nn


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


def setup(steps: int) -> Setup:
    model = trained(steps)
    gen = torch.Generator().manual_seed(1)
    calibration = [data(gen, 32)[0] for _ in range(8)]
    unseen = [data(gen, 32) for _ in range(16)]
    held = data(torch.Generator().manual_seed(7), 256)
    return Setup("recall", model, None, calibration, [x for x, _ in unseen],
                 lambda small: [accuracy(small, x, y) for x, y in unseen], "accuracy",
                 lambda small: accuracy(small, *held),
                 f"Embedding(32, 64) -> 2-layer nn.LSTM 256 -> Linear, trained {steps} steps to output the token "
                 "seen 3 steps earlier; default target modules; 8 calibration batches of 32 sequences; unseen: "
                 "16 batches of 32; metric: accuracy (steps 3-23); max_drop on 256 other sequences")


def main():
    parser = arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(setup(args.steps), args)


if __name__ == "__main__":
    main()
