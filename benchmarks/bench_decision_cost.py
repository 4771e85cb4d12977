"""What the default's held-out decision costs: the time of the default calibrated compress against the old
default (``allocation="per-matrix"``, whitened on every calibration batch, measured on the odd-numbered ones:
``validation=``) on the models of bench_honest.py and bench_recall.py, at 2 / 5 / 10 / 30x, one thread.

    OMP_NUM_THREADS=1 python benchmarks/bench_decision_cost.py [--models recall ocr tutorial seqmnist g2p]
        [--ratios 2 5 10 30] [--repeats 2] [--out PATH]

Each time is the least of ``--repeats`` runs (the two methods alternate, on copies of the same trained model);
the kept allocation and the reported error are printed so a change of code can be checked to give the same
answer. Prints a Markdown table, writes benchmarks/results/decision_cost.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from mpolstm import CompressionConfig, compress

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def setup(name: str):
    import bench_honest

    if name == "recall":
        import bench_recall

        return bench_recall.setup(600)
    return {"g2p": bench_honest.g2p_setup, "ocr": bench_honest.ocr_setup, "tutorial": bench_honest.tutorial_setup,
            "seqmnist": bench_honest.seqmnist_setup}[name]()


def timed(setup, ratio: float, old: bool):
    config = CompressionConfig(target_ratio=ratio, target_modules=setup.modules,
                               **({"allocation": "per-matrix"} if old else {}))
    extra = {"validation": setup.calibration[1::2]} if old else {}
    start = time.perf_counter()
    _, report = compress(copy.deepcopy(setup.model), config, calibration=setup.calibration, **extra)
    return time.perf_counter() - start, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["recall", "ocr", "tutorial", "seqmnist", "g2p"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[2, 5, 10, 30])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decision_cost.json")
    parser.add_argument("--no-header", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.no_header:
        print("| model | ratio | old default s | default s | ratio of times | kept | reported error |")
        print("|---|---:|---:|---:|---:|---|---:|", flush=True)
    if len(args.models) > 1:  # each model in its own process: the examples' modules share names (table.py)
        rows = []
        for name in args.models:
            part = args.out.with_suffix(f".{name}.json")
            subprocess.run([sys.executable, __file__, "--models", name, "--ratios", *map(str, args.ratios),
                            "--repeats", str(args.repeats), "--out", str(part), "--no-header"], check=True)
            rows += json.loads(part.read_text())["rows"]
            part.unlink()
    else:
        rows = measure(args.models[0], args.ratios, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"argv": sys.argv[1:], "torch": torch.__version__, "threads": 1, "rows": rows},
                                   indent=1))


def measure(name: str, ratios: list[float], repeats: int) -> list[dict]:
    """The rows of one model: per ratio the least time of each method over ``repeats`` alternating runs."""
    bench, rows = setup(name), []
    for ratio in ratios:
        times: dict[str, list[float]] = {"old": [], "default": []}
        for _ in range(repeats):
            times["old"].append(timed(bench, ratio, True)[0])
            seconds, report = timed(bench, ratio, False)
            times["default"].append(seconds)
        old, new = min(times["old"]), min(times["default"])
        row = {"model": name, "ratio": ratio, "old_seconds": old, "seconds": new, "time_ratio": new / old,
               "kept": report.allocation.chosen if report.allocation else "-",
               "reported": report.output_check.error if report.output_check else None}
        rows.append(row)
        print(f"| {name} | {ratio:g}x | {old:.3f} | {new:.3f} | {new / old:.2f} | {row['kept']} | "
              f"{row['reported']:.4f} |", flush=True)
    return rows

if __name__ == "__main__":
    main()
