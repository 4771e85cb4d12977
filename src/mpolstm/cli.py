"""The ``mpolstm`` command line (typer + rich)."""

from __future__ import annotations

import math

import torch
import typer
from rich.console import Console
from rich.table import Table

from . import mpo as mpo_math

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compress LSTM networks with Matrix Product Operators.")
console = Console()


@app.callback()
def main() -> None:
    """Compress LSTM networks with Matrix Product Operators."""


def structured_matrix(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A trained-looking (rows, cols) matrix: a smooth low-entanglement part plus a
    power-law spectrum and a little noise, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.linspace(0, 1, rows, dtype=torch.float64)[:, None]
    y = torch.linspace(0, 1, cols, dtype=torch.float64)[None, :]
    smooth = torch.cos(3 * math.pi * x * y) + torch.exp(-((x - y) ** 2) / 0.05)
    rank = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, rank, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, rank, generator=gen, dtype=torch.float64))
    spectrum = torch.arange(1, rank + 1, dtype=torch.float64) ** -1.0
    noise = 0.002 * torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    return (smooth / smooth.norm() + (u * spectrum) @ v.T / spectrum.norm() + noise).float()


@app.command()
def demo(
    size: int = typer.Option(256, help="The demo matrix is size x size."),
    num_cores: int = typer.Option(4, help="Number of MPO cores."),
) -> None:
    """Decompose a built-in structured matrix at several bond dimensions and print the trade-off."""
    if size < 4 or num_cores < 2:
        _fail(f"--size must be >= 4 and --num-cores >= 2, got {size} and {num_cores}")
    matrix = structured_matrix(size, size)
    factors = mpo_math.factorize(size, num_cores)
    table = Table(title=f"MPO decomposition of a {size}x{size} matrix, factors {factors}")
    for col in ("max bond", "bonds", "parameters", "compression", "rel. error", "entropy (max bond)"):
        table.add_column(col, justify="right")
    for bond in (1, 2, 4, 8, 16, 32, 64):
        m = mpo_math.decompose(matrix, factors, factors, max_bond=bond)
        entropy = m.entanglement_entropy()
        table.add_row(
            str(bond), str(m.bond_dims), f"{m.num_params:,}", f"{matrix.numel() / m.num_params:.1f}x",
            f"{m.report.rel_error:.4f}", f"{float(entropy.max()):.3f}",
        )
    console.print(table)


def _fail(message: str) -> None:
    """Print one clear line and exit with code 2 (bad usage)."""
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


if __name__ == "__main__":
    app()
