"""The ``mpolstm`` command line (typer + rich).

Every usage error (bad option value, missing file) prints one line and exits with code 2.
"""

from __future__ import annotations

import shutil
import tempfile
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress LSTM networks with Matrix Product Operators.")
console = Console()
err_console = Console(stderr=True)


class TaskName(str, Enum):
    seqcls = "seqcls"
    ptb = "ptb"


class Preset(str, Enum):
    quick = "quick"
    standard = "standard"
    paper = "paper"


def _fail(message: str) -> None:
    """Print one clear line and exit with code 2 (bad usage or input)."""
    err_console.print(f"error: {message}", markup=False, highlight=False)
    raise typer.Exit(code=2)


def _parse_ratios(text: str) -> tuple[float, ...]:
    try:
        ratios = tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        _fail(f"--ratios must be comma-separated numbers > 1, got {text!r}")
    if not ratios or any(r <= 1 for r in ratios):
        _fail(f"--ratios must be comma-separated numbers > 1, got {text!r}")
    return ratios


def _run_protocol(task, ratios: tuple[float, ...], out: Path, seed: int, distill: bool, rows: Optional[str]) -> None:
    """Run the protocol into a temporary folder beside ``out`` and move it in place at the end,
    so an interrupted or failed run leaves no partial output."""
    from .tasks.protocol import ROWS, ProtocolConfig, run_protocol

    selected = tuple(ROWS) if rows is None else tuple(r.strip() for r in rows.split(",") if r.strip())
    try:
        config = ProtocolConfig(ratios=ratios, rows=selected, seed=seed, distill=distill)
    except ValueError as exc:
        _fail(str(exc))
    if out.exists() and any(out.iterdir()) and not (out / "results.json").exists():
        _fail(f"--out {out} exists and is not an earlier results folder; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        run_protocol(task, config, staging, log=lambda line: console.print(line, highlight=False))
        shutil.rmtree(staging / "runs", ignore_errors=True)  # per-run checkpoints are not results
        if out.exists():
            shutil.rmtree(out)
        staging.replace(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    console.print((out / "results.md").read_text(), highlight=False)
    console.print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")


@app.command()
def demo(
    out: Path = typer.Option(Path("results/demo"), help="Output folder (json, md, png)."),
    ratios: str = typer.Option("10,30,100", help="Compression ratios of the LSTM weights, comma-separated."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """MPO-LSTM vs magnitude pruning on sequential MNIST, end to end (quick preset, ~5 min on 2 cores)."""
    from .tasks import seqcls

    _run_protocol(seqcls.make_task("quick", seed=seed), _parse_ratios(ratios), out, seed, False, None)


@app.command()
def reproduce(
    task: TaskName = typer.Option(..., help="seqcls (sequence classification) or ptb (language modelling)."),
    preset: Preset = typer.Option(Preset.quick, help="quick: <= 5 min per task on 2 CPU cores; standard: "
                                  "<= 90 min for a task's whole table on 2 CPU cores; paper: paper-scale, for a GPU."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default results/<task>-<preset>)."),
    ratios: str = typer.Option("10,30,100", help="Compression ratios of the LSTM weights, comma-separated."),
    rows: Optional[str] = typer.Option(None, help="Comma-separated subset of rows (default: all)."),
    dataset: str = typer.Option("mnist", help="seqcls dataset: mnist, mnist1d or imdb (needs --data-dir)."),
    data_dir: Optional[Path] = typer.Option(None, help="Folder of the aclImdb data set (seqcls --dataset imdb)."),
    seed: int = typer.Option(0, help="Random seed."),
    distill: bool = typer.Option(False, help="Distil from the dense model in every fine-tuning row."),
) -> None:
    """Run the paper's MPO-vs-pruning comparison for one task and write json, md and png."""
    ratio_values = _parse_ratios(ratios)
    if data_dir is not None and not data_dir.is_dir():
        _fail(f"--data-dir {data_dir} is not a folder")
    try:
        if task is TaskName.seqcls:
            from .tasks import seqcls

            built = seqcls.make_task(preset.value, dataset=dataset, data_dir=data_dir, seed=seed)
        else:
            from .tasks import ptb

            built = ptb.make_task(preset.value, seed=seed)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    _run_protocol(built, ratio_values, out or Path(f"results/{task.value}-{preset.value}"), seed, distill, rows)


@app.command()
def decompose(
    size: int = typer.Option(256, help="The built-in matrix is size x size."),
    num_cores: int = typer.Option(4, help="Number of MPO cores."),
) -> None:
    """Decompose a built-in trained-looking matrix at several bonds: parameters, error, entropy."""
    import math

    import torch
    from rich.table import Table

    from . import mpo as mpo_math

    if size < 4 or num_cores < 2:
        _fail(f"--size must be >= 4 and --num-cores >= 2, got {size} and {num_cores}")
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))
    x = torch.linspace(0, 1, size, dtype=torch.float64)
    smooth = torch.cos(3 * math.pi * torch.outer(x, x))
    matrix = (smooth / smooth.norm() + 0.3 * (u * torch.arange(1, size + 1) ** -1.5) @ v.T).float()
    factors = mpo_math.factorize(size, num_cores)
    table = Table(title=f"MPO decomposition of a {size}x{size} matrix, factors {factors}")
    for col in ("max bond", "bonds", "parameters", "compression", "rel. error", "max entropy"):
        table.add_column(col, justify="right")
    for bond in (1, 2, 4, 8, 16, 32, 64):
        m = mpo_math.decompose(matrix, factors, factors, max_bond=bond)
        table.add_row(str(bond), str(m.bond_dims), f"{m.num_params:,}", f"{matrix.numel() / m.num_params:.1f}x",
                      f"{m.report.rel_error:.4f}", f"{float(m.entanglement_entropy().max()):.3f}")
    console.print(table)


if __name__ == "__main__":
    app()
