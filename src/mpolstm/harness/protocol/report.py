"""The protocol's results document as a Markdown table and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .rows import ROWS

__all__ = ["markdown_table", "plot_results"]


def markdown_table(document: dict[str, Any]) -> str:
    """The results as a Markdown table (one line per row and ratio)."""
    metric = document["metric"]
    standard = {"row", "target_ratio", metric, "params", "ratio", "bytes", "bytes_ratio", "storage", "file_bytes",
                "total_params", "hidden", "train_s", "batched_ms", "step_ms"}
    extra = [k for k in document["rows"][0] if k not in standard]  # the task's test report (PESQ, ...)
    lines = [
        f"Task `{document['task']}`, seed {document['seed']}, dense {document['dense_epochs']} epochs, "
        f"fine-tuning {document['finetune_epochs']} epochs (from scratch: both), distillation "
        f"{'on' if document['distill'] else 'off'}; params = entries of the LSTM weights "
        f"(MPO cores or non-zeros), dense {document['dense_recurrent_params']:,}; bytes = the LSTM weights as "
        "stored (float32 4 B an entry; int8 1 B + scales; pruned: values + CSR or bitmask index, whichever "
        "is smaller; see docs/results.md); total = every parameter of the model.",
        "",
        f"| row | target | {metric} | params | compression | bytes | bytes ratio | storage | hidden | total | "
        "train s | batched ms | step ms |" + "".join(f" {k} |" for k in extra),
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|" + "---:|" * len(extra),
    ]
    for r in document["rows"]:
        target = "-" if r["target_ratio"] is None else f"{r['target_ratio']:g}x"
        lines.append(f"| {r['row']} | {target} | {r[metric]:.4f} | {r['params']:,} | {r['ratio']:.1f}x | "
                     f"{r['bytes']:,} | {r['bytes_ratio']:.1f}x | {r['storage']} | {r['hidden']} | "
                     f"{r['total_params']:,} | {r['train_s']:.0f} | {r['batched_ms']:.2f} | {r['step_ms']:.3f} |"
                     + "".join(f" {r[k]:.3f} |" for k in extra))
    for skip in document.get("skipped", []):
        lines.append(f"\nSkipped: {skip['row']} at {skip['target_ratio']:g}x: {skip['reason']}.")
    return "\n".join(lines) + "\n"


X_LABELS = {"params": "LSTM weight parameters (MPO entries / non-zeros)",
            "bytes": "bytes of the LSTM weights as stored"}


def plot_results(document: dict[str, Any], path: str | Path, x: str = "params") -> None:
    """Metric versus ``x`` ("params" or "bytes", log scale), one line per method, dense as a
    horizontal line (and as a point in the bytes plot)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    metric = document["metric"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for index, row in enumerate(ROWS):
        points = sorted((r[x], r[metric]) for r in document["rows"] if r["row"] == row)
        if not points:
            continue
        if row == "dense":
            ax.axhline(points[0][1], color="black", linestyle="--", label=f"dense ({points[0][0]:,} {x})")
        else:
            ax.plot(*zip(*points), marker="os^vD"[index % 5], color=plt.cm.tab20(index % 20), label=ROWS[row].label)
    ax.set_xscale("log")
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel(metric)
    ax.set_title(document["task"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
