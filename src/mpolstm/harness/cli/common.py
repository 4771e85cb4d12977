"""What every command of the ``mpolstm`` app shares: the typer ``app`` and its global options, the
consoles, the task and preset choices, and the one-line error and output checks."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console

from ...errors import ConfigError
from ..tasks.registry import PRESETS, task_names

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress LSTM networks with Matrix Product Operators.")
# plain text: no markup or highlighting of what is printed, and no wrapping in pipes and logs
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 1000, markup=False, highlight=False)
err_console = Console(stderr=True)


TaskName = Enum("TaskName", [(name, name) for name in task_names()], type=str)
"""The registered tasks (see :mod:`mpolstm.harness.tasks.registry`)."""

Preset = Enum("Preset", [(name, name) for name in PRESETS], type=str)
"""The preset vocabulary every task uses (each task checks it has the one asked for)."""


@app.callback()
def _global_options(
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: one per core). On a "
                                          "machine shared with other jobs, use the cores that are free (e.g. "
                                          "--threads 1); OMP_WAIT_POLICY=PASSIVE is set unless you set it."),
) -> None:
    """Options for every command: mpolstm --threads N COMMAND ..."""
    if threads is not None:
        if threads < 1:
            _fail(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def _fail(message: str) -> NoReturn:
    """Print one clear line and exit with code 2 (bad usage or input)."""
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _said(exc: ValueError, flags: dict[str, str]) -> str:
    """The message of a library error; a :class:`ConfigError`'s with its fields named by the flags the
    user typed (``flags``: field -> flag, e.g. ``{"target_ratio": "--ratio"}``)."""
    return exc.render(flags) if isinstance(exc, ConfigError) else str(exc)


def _log(line: str) -> None:
    console.print(line)


def _load_model(path: Path):
    from ..tasks import load_model

    if not path.exists():
        _fail(f"model {path} does not exist")
    try:
        return load_model(path)
    except ValueError as exc:
        _fail(str(exc))


def _check_output(path: Path, overwrite: bool, what: str, folder: bool = True) -> None:
    """The one rule for every output (``mpolstm.atomic``): an existing ``path`` (but an empty folder) is
    refused unless --overwrite; ``what`` names it as the user typed it (e.g. "--out x", "OUT x")."""
    from ...atomic import check_target

    if (path.exists() or path.is_symlink()) and folder != path.is_dir():
        _fail(f"{what} is {'a file' if folder else 'a folder'}; the output is {'a folder' if folder else 'one file'}: "
              "choose another path")
    try:
        check_target(path, overwrite, folder)
    except ValueError:
        _fail(f"{what} already exists; choose a new path, or add --overwrite to replace it (the whole "
              f"{'folder' if folder else 'file'})")
