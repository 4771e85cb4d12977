"""``data`` (the offline data sets) and ``decompose`` (the MPO decomposition of a built-in matrix)."""

from __future__ import annotations

import typer

from .common import _fail, app, console

data_app = typer.Typer(help="Build the offline data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("speech")
def data_speech(
    preset: str = typer.Option("quick", help="Corpus size: tiny, quick or standard."),
    seed: int = typer.Option(0, help="Random seed of sentences, voices and noises."),
) -> None:
    """Build (or find cached) the synthetic noisy-speech corpus and print where it is."""
    from ..data.speech import PRESETS, EspeakMissingError, build_corpus

    if preset not in PRESETS:
        _fail(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    try:
        path = build_corpus(preset=preset, seed=seed)
    except EspeakMissingError as exc:
        _fail(str(exc))
    console.print(f"speech corpus ({preset}, seed {seed}): {path}")


@app.command()
def decompose(
    size: int = typer.Option(256, help="The built-in matrix is size x size."),
    num_cores: int = typer.Option(4, help="Number of MPO cores."),
) -> None:
    """Decompose a built-in trained-looking matrix at several bonds: parameters, error, entropy."""
    import math

    import torch
    from rich.table import Table

    from ... import mpo as mpo_math

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
