"""The protocol over several seeds: one table per seed, then mean ± std and a verdict per ratio.

``run_seeds`` writes ``<out>/seed-<s>/`` (a full :func:`~.run.run_staged` table each) and
``<out>/summary.{json,md,png}``. The verdict at each ratio ranks the rows by mean metric and calls
a difference smaller than one standard deviation (the larger of the two rows') a tie; it names the
best MPO row (``mpo-*``) and the best baseline and says which wins at that ratio, at equal
parameters and at equal bytes, with their bytes.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from ...atomic import atomic_write_bytes
from ..distributed import is_main
from ..tasks.base import Task
from .rows import ROWS
from .run import ProtocolConfig, run_staged

__all__ = ["run_seeds", "summarize", "summary_markdown", "verdict", "write_summary"]

SUMMED = ("params", "bytes", "bytes_ratio", "file_bytes", "ratio", "total_params", "hidden", "train_s")
"""Keys averaged without a spread (they are equal or nearly so across seeds)."""


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(documents: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over the seeds' results documents, per (row, target ratio), plus :func:`verdict`."""
    if not documents:
        raise ValueError("summarize needs at least one results document")
    first = documents[0]
    metric = first["metric"]
    groups: dict[tuple[str, float | None], list[dict[str, Any]]] = {}
    for doc in documents:
        if doc["task"] != first["task"] or doc["metric"] != metric:
            raise ValueError(f"cannot summarize tables of different tasks: {doc['task']!r} vs {first['task']!r}")
        for entry in doc["rows"]:
            groups.setdefault((entry["row"], entry["target_ratio"]), []).append(entry)
    rows = []
    for (row, target), entries in groups.items():
        scored = [k for k, v in entries[0].items()
                  if isinstance(v, (int, float)) and k not in SUMMED and k not in ("target_ratio",)]
        summary = {"row": row, "target_ratio": target, "seeds": len(entries), "storage": entries[0].get("storage")}
        summary.update({k: statistics.fmean(e[k] for e in entries) for k in SUMMED if k in entries[0]})
        summary.update({k: _mean_std([e[k] for e in entries]) for k in scored})
        rows.append(summary)
    document = {"task": first["task"], "metric": metric, "higher_is_better": first["higher_is_better"],
                "seeds": [d["seed"] for d in documents], "meta": first["meta"],
                "dense_recurrent_params": first["dense_recurrent_params"], "rows": rows}
    document["verdict"] = verdict(document)
    return document


def _is_mpo(row: str) -> bool:
    return row.startswith("mpo-")


BYTES_TOLERANCE = 1.01
"""A baseline counts as "at equal bytes" when its bytes are at most this times the MPO row's."""


def verdict(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per target ratio: the rows ranked by mean metric, which of them tie with the best (difference
    below the larger std), and the best MPO row against the best baseline, twice: at the same
    target (equal parameters, the paper's view) and among the baselines with no more bytes than that
    MPO row (equal bytes). Each comparison is "win", "tie" or "loss" for MPO, and its difference is
    signed so that a positive one favours MPO (for a lower-is-better metric, MPO's is lower)."""
    metric, sign = summary["metric"], 1.0 if summary["higher_is_better"] else -1.0

    def tie(a: dict[str, Any], b: dict[str, Any]) -> bool:
        return abs(a[metric]["mean"] - b[metric]["mean"]) < max(a[metric]["std"], b[metric]["std"])

    def compare(mpo: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
        better = sign * (mpo[metric]["mean"] - base[metric]["mean"]) > 0
        return {"mpo": mpo["row"], "baseline": base["row"], "difference": sign * (mpo[metric]["mean"] - base[metric]["mean"]),
                "mpo_bytes": mpo["bytes"], "baseline_bytes": base["bytes"],
                "outcome": "tie" if tie(mpo, base) else ("win" if better else "loss")}

    out = []
    for target in sorted({r["target_ratio"] for r in summary["rows"] if r["target_ratio"] is not None}):
        ranked = sorted((r for r in summary["rows"] if r["target_ratio"] == target),
                        key=lambda r: -sign * r[metric]["mean"])
        best = ranked[0]
        entry = {"target_ratio": target, "ranking": [r["row"] for r in ranked],
                 "tied_with_best": [r["row"] for r in ranked[1:] if tie(best, r)]}
        mpo = next((r for r in ranked if _is_mpo(r["row"])), None)
        base = next((r for r in ranked if not _is_mpo(r["row"])), None)
        if mpo is not None and base is not None:
            entry["equal_params"] = compare(mpo, base)
            cheaper = next((r for r in ranked if not _is_mpo(r["row"]) and r["bytes"] <= BYTES_TOLERANCE * mpo["bytes"]),
                           None)
            if cheaper is not None:
                entry["equal_bytes"] = compare(mpo, cheaper)
        out.append(entry)
    return out


def _cell(value: dict[str, float], digits: int) -> str:
    return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table (mean ± std) followed by the verdict per ratio."""
    metric = summary["metric"]
    digits = 4 if summary["higher_is_better"] and summary["rows"][0][metric]["mean"] <= 1 else 3
    extra = [k for k, v in summary["rows"][0].items() if isinstance(v, dict) and k not in (metric, "batched_ms", "step_ms")]
    lines = [f"Task `{summary['task']}`, seeds {summary['seeds']}: mean ± std (sample std over seeds); "
             "params and bytes of the LSTM weights as stored.", "",
             f"| row | target | {metric} | params | bytes | bytes ratio | storage |" + "".join(f" {k} |" for k in extra),
             "|---|---:|---:|---:|---:|---:|---|" + "---:|" * len(extra)]
    for r in summary["rows"]:
        target = "-" if r["target_ratio"] is None else f"{r['target_ratio']:g}x"
        lines.append(f"| {r['row']} | {target} | {_cell(r[metric], digits)} | {r['params']:,.0f} | {r['bytes']:,.0f} | "
                     f"{r['bytes_ratio']:.1f}x | {r['storage']} |" + "".join(f" {_cell(r[k], 3)} |" for k in extra))
    lines += ["", "Verdict (a difference below one std is a tie; a positive difference favours MPO):", ""]
    for v in summary["verdict"]:
        line = f"- {v['target_ratio']:g}x: best {v['ranking'][0]}"
        if v["tied_with_best"]:
            line += f" (tied: {', '.join(v['tied_with_best'])})"
        for view in ("equal_params", "equal_bytes"):
            if view in v:
                c = v[view]
                line += (f"; {view.replace('_', ' ')}: {c['mpo']} ({c['mpo_bytes']:,.0f} B) vs {c['baseline']} "
                         f"({c['baseline_bytes']:,.0f} B) {c['outcome']} ({c['difference']:+.{digits}f})")
        lines.append(line)
    return "\n".join(lines) + "\n"


def _plot(summary: dict[str, Any], path: Path) -> None:
    """Mean metric (error bars: std) versus stored bytes, log x, one line per row."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    metric = summary["metric"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for index, row in enumerate(ROWS):
        points = sorted((r["bytes"], r[metric]["mean"], r[metric]["std"]) for r in summary["rows"] if r["row"] == row)
        if points:
            x, y, err = zip(*points)
            ax.errorbar(x, y, yerr=err, marker="os^vD"[index % 5], capsize=3, label=ROWS[row].label,
                        color=plt.cm.tab20(index % 20), linestyle="none" if len(points) == 1 else "-")
    ax.set_xscale("log")
    ax.set_xlabel("bytes of the LSTM weights as stored")
    ax.set_ylabel(f"{metric} (mean ± std over seeds {summary['seeds']})")
    ax.set_title(summary["task"])
    ax.legend(fontsize=6)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_summary(summary: dict[str, Any], out: Path) -> None:
    """summary.json, summary.md and summary.png in ``out``."""
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    atomic_write_bytes(out / "summary.md", summary_markdown(summary).encode())
    _plot(summary, out / "summary.png")


def run_seeds(make_task: Callable[[int], Task], config: ProtocolConfig, out: str | Path, seeds: Sequence[int],
              log: Callable[[str], None] = print, resume: bool = False) -> dict[str, Any]:
    """One protocol table per seed in ``out/seed-<s>`` (task and data built with that seed), then
    the summary. With ``resume`` a seed whose table is complete is reused and an interrupted one
    continues; without, every seed runs afresh."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and non-empty, got {list(seeds)}")
    out = Path(out)
    documents = []
    for seed in seeds:
        folder = out / f"seed-{seed}"
        done = folder / "results.json"
        if resume and done.is_file():
            log(f"seed {seed}: reusing the finished table in {folder}")
            documents.append(json.loads(done.read_text()))
            continue
        log(f"seed {seed}:")
        documents.append(run_staged(make_task(seed), replace(config, seed=seed), folder, log=log, resume=resume))
    summary = summarize(documents)
    if is_main():
        write_summary(summary, out)
    return summary
