"""The demo's spread: pool runs of the demo's table into the reference `mpolstm demo` checks each row
against (mpolstm/harness/protocol/spread.py, docs/results.md "The demo's spread").

    python benchmarks/demo_spread.py \\
        --group "Xeon, 1 and 2 threads=runs/t1-s0,runs/t1-s1,runs/t1-s2,runs/t2-s0,runs/t2-s1,runs/t2-s2" \\
        --out docs/results/seqcls-quick-spread.json

Each run folder is one `mpolstm --threads T reproduce --task seqcls --preset quick --seed S --out DIR`
(its results.json); each --group names one machine. Within a group a row that came out identical
(accuracy and parameters) in two runs of the same seed, at different thread counts, counts once: the
same run, not a second draw. The documented three-seed summary
(``--documented``, default docs/results/seqcls-quick-3seeds.json: n, mean and std per row, parameters as
a mean) joins as a group of its own, with the one per-run parameter count known for it: its seed 0, the
`make demo` table of docs/results.md. Per row the groups are pooled exactly from their n, mean and
sample std (spread.pool); the parameter range is over the runs whose count is known. Prints the pooled
Markdown table and writes JSON: per group its rows (n, mean, std, parameter counts; for the run
folders each run's metric too), and the pooled rows.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from mpolstm.harness.protocol.spread import pool

ROOT = Path(__file__).resolve().parents[1]
Key = tuple[str, "float | None"]


def _target(text: str) -> float | None:
    return None if text == "-" else float(text[:-1])


def run_group(name: str, folders: list[Path]) -> dict[str, Any]:
    """One machine: its runs' rows as n, mean, sample std and per-run parameters, each distinct result of
    a seed once (thread counts that give the same row give the same run)."""
    docs = [json.loads((folder / "results.json").read_text()) for folder in folders]
    metric = docs[0]["metric"]
    distinct: dict[Key, dict[tuple[int, float, float], dict[str, Any]]] = {}
    for doc in docs:
        for entry in doc["rows"]:
            same = (doc["seed"], entry[metric], entry["params"])
            distinct.setdefault((entry["row"], entry["target_ratio"]), {}).setdefault(same, entry)
    rows = {key: list(entries.values()) for key, entries in distinct.items()}
    return {"name": name, "runs": [f.name for f in folders], "seeds": [d["seed"] for d in docs],
            "rows": [{"row": row, "target_ratio": target, "runs": len(entries),
                      "mean": statistics.fmean(e[metric] for e in entries),
                      "std": statistics.stdev(e[metric] for e in entries) if len(entries) > 1 else 0.0,
                      "params": [round(e["params"]) for e in entries], metric: [e[metric] for e in entries]}
                     for (row, target), entries in rows.items()]}


def documented_group(summary: Path) -> dict[str, Any]:
    """The documented three seeds (the 2-core AMD EPYC, 2 threads): mean ± std, seed 0's parameter counts."""
    doc = json.loads(summary.read_text())
    text = (ROOT / "docs" / "results.md").read_text()
    start = text.index("## Sequence classification: sequential MNIST, `quick` preset (`make demo`)")
    seed0 = {(row, _target(target)): int(params.replace(",", "")) for row, target, params in re.findall(
        r"^\| ([a-z0-9-]+) \| (-|\d+x) \| 0\.\d{4} \| ([\d,]+) \|", text[start:text.index("\n## ", start + 1)],
        flags=re.M)}
    metric = doc["metric"]
    return {"name": "EPYC, 2 threads (documented)", "runs": [str(summary.relative_to(ROOT))],
            "seeds": doc["seeds"] if isinstance(doc["seeds"], list) else list(range(doc["seeds"])),
            "rows": [{"row": e["row"], "target_ratio": e["target_ratio"], "runs": e["seeds"],
                      "mean": e[metric]["mean"], "std": e[metric]["std"],
                      "params": [seed0[(e["row"], e["target_ratio"])]], "params_mean": e["params"]}
                     for e in doc["rows"]]}


def pooled(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per row (in the first group's order) the pooled runs: n, mean, std, parameter range."""
    keys = [(e["row"], e["target_ratio"]) for e in groups[0]["rows"]]
    by_key = [{(e["row"], e["target_ratio"]): e for e in g["rows"]} for g in groups]
    out = []
    for key in keys:
        entries = [rows[key] for rows in by_key if key in rows]
        n, mean, std = pool((e["runs"], e["mean"], e["std"]) for e in entries)
        params = [p for e in entries for p in e["params"]]
        out.append({"row": key[0], "target_ratio": key[1], "runs": n, "mean": mean, "std": std,
                    "params_min": min(params), "params_max": max(params)})
    return out


def markdown(rows: list[dict[str, Any]], groups: list[dict[str, Any]]) -> str:
    """The pooled rows, then each group's mean (its parameter counts where they differ from the pool's)."""
    lines = ["| row | target | accuracy | runs | params | " + " | ".join(g["name"] for g in groups) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(groups)]
    by_key = [{(e["row"], e["target_ratio"]): e for e in g["rows"]} for g in groups]
    for r in rows:
        key = (r["row"], r["target_ratio"])
        target = "-" if r["target_ratio"] is None else f"{r['target_ratio']:g}x"
        span = f"{r['params_min']:,}" + ("" if r["params_max"] == r["params_min"] else f"-{r['params_max']:,}")
        cells = [_cell(g[key], r) if key in g else "-" for g in by_key]
        lines.append(f"| {r['row']} | {target} | {r['mean']:.4f} ± {r['std']:.4f} | {r['runs']} | {span} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(entry: dict[str, Any], pooled_row: dict[str, Any]) -> str:
    """A group's mean, with its runs' parameter counts when the pooled range is not one number."""
    counts = "" if pooled_row["params_min"] == pooled_row["params_max"] else \
        " (" + "/".join(f"{p:,}" for p in entry["params"]) + ")"
    return f"{entry['mean']:.4f}{counts}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", action="append", required=True, help="NAME=DIR,DIR,... (run folders)")
    parser.add_argument("--documented", type=Path, default=ROOT / "docs" / "results" / "seqcls-quick-3seeds.json")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "seqcls-quick-spread.json")
    args = parser.parse_args(argv)
    groups = [documented_group(args.documented.resolve())]
    for spec in args.group:
        name, sep, folders = spec.partition("=")
        if not sep or not folders:
            sys.exit(f"error: --group must be NAME=DIR,DIR,..., got {spec!r}")
        groups.append(run_group(name, [Path(f) for f in folders.split(",")]))
    rows = pooled(groups)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"groups": groups, "pooled": rows}, indent=1) + "\n")
    print(markdown(rows, groups))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
