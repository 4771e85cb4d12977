"""The protocol's results document as a Markdown table and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .rows import ROWS

__all__ = ["markdown_table", "plot_results"]


def markdown_table(document: dict[str, Any]) -> str:
    """The results as a Markdown table (one line per row and ratio)."""
    metric = document["metric"]
    standard = {"row", "target_ratio", metric, "params", "ratio", "train_s", "batched_ms", "step_ms"}
    extra = [k for k in document["rows"][0] if k not in standard]
    lines = [
        f"Task `{document['task']}`, seed {document['seed']}, dense {document['dense_epochs']} epochs, "
        f"fine-tuning {document['finetune_epochs']} epochs (from scratch: both), distillation "
        f"{'on' if document['distill'] else 'off'}; params = entries of the LSTM weights "
        f"(MPO cores or non-zeros), dense {document['dense_recurrent_params']:,}.",
        "",
        f"| row | target | {metric} | params | compression | train s | batched ms | step ms |"
        + "".join(f" {k} |" for k in extra),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(extra),
    ]
    for r in document["rows"]:
        target = "-" if r["target_ratio"] is None else f"{r['target_ratio']:g}x"
        lines.append(f"| {r['row']} | {target} | {r[metric]:.4f} | {r['params']:,} | {r['ratio']:.1f}x | "
                     f"{r['train_s']:.0f} | {r['batched_ms']:.2f} | {r['step_ms']:.3f} |"
                     + "".join(f" {r[k]:.3f} |" for k in extra))
    return "\n".join(lines) + "\n"


def plot_results(document: dict[str, Any], path: str | Path) -> None:
    """Metric versus parameter count (log x), one line per method, dense as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    metric = document["metric"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row in ROWS:
        points = sorted((r["params"], r[metric]) for r in document["rows"] if r["row"] == row)
        if not points:
            continue
        if row == "dense":
            ax.axhline(points[0][1], color="black", linestyle="--", label=f"dense ({points[0][0]:,} params)")
        else:
            ax.plot(*zip(*points), marker="o", label=ROWS[row].label)
    ax.set_xscale("log")
    ax.set_xlabel("LSTM weight parameters (MPO entries / non-zeros)")
    ax.set_ylabel(metric)
    ax.set_title(document["task"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
