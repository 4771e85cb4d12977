"""NSNet2 (examples/nsnet2, 16 kHz ONNX file, its two GRUs compressed): the default calibrated compress (held-out
decision) against the old default (allocation="per-matrix") and uncalibrated; reported against unseen output error.

    OMP_NUM_THREADS=1 python benchmarks/bench_nsnet2_decision.py [--ratios 2 5 10 30]

Calibration: the first ``--n-calib`` (32) train utterances of the quick speech corpus in 200-frame crops, 8 a batch;
unseen: crops of train utterances 64-95 (other utterances, same distribution). Errors ||y' - y|| / ||y|| of
the gain. Prints a Markdown table (docs/results.md).
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "nsnet2"))

import mpolstm  # noqa: E402
from mpolstm import onnx as mo  # noqa: E402


def main():
    from table import _batches, _crops, gru_layers, model_file  # examples/nsnet2/table.py

    from mpolstm.harness.data.speech import load_corpus

    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", type=float, nargs="+", default=[2, 5, 10, 30])
    parser.add_argument("--n-calib", type=int, default=32, help="train utterances for calibration")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train = load_corpus(preset="quick")["train"].noisy
    calib = _batches(_crops(train[:args.n_calib], 16000, 200), 8, shuffle=False)
    unseen = torch.stack(_crops(train[64:96], 16000, 200))
    original = mo.load(model_file(16000))
    with torch.no_grad():
        reference = original(unseen)
    print(f"{len(calib)} calibration batches, {unseen.shape[0]} unseen crops")
    print("| ratio | method | kept | reported error (on) | unseen error | time s |")
    print("|---:|---|---|---:|---:|---:|")
    for ratio in args.ratios:
        for name, allocation, cal in (("old default", "per-matrix", calib), ("default", "error", calib),
                                      ("uncalibrated", "error", None)):
            config = mpolstm.CompressionConfig(target_modules=gru_layers(original), target_ratio=ratio,
                                               allocation=allocation)
            start = time.perf_counter()
            small, report = mpolstm.compress(copy.deepcopy(original), config, calibration=cal)
            took = time.perf_counter() - start
            with torch.no_grad():
                error = float((small(unseen) - reference).norm() / reference.norm())
            check = report.output_check
            where = "none" if check is None else "synthetic" if check.source.startswith("synthetic") else \
                f"{check.batches} held out"
            shown = "-" if check is None else f"{check.error:.4f}"
            kept = report.allocation.chosen if report.allocation else "-"
            print(f"| {ratio:g}x | {name} | {kept} | {shown} ({where}) | {error:.4f} | {took:.1f} |", flush=True)


if __name__ == "__main__":
    main()
