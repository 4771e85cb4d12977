"""The harness that reproduces the paper on top of the library: tasks, data, audio, the
MPO-versus-baselines protocol, the trainer, distributed helpers and the ``mpolstm`` command.

It may import the library (``mpolstm``); the library never imports it. Its extra dependencies
(typer, rich, matplotlib, scipy, the data and speech packages) come with ``pip install
mpolstm[harness]``.
"""

import os

THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
"""What the ``mpolstm`` command sets before torch starts, unless the user set it: OpenMP threads that
sleep while they wait. torch's default lets them spin, so when another process holds a core every
parallel region waits for a thread that is not running (20-100x slower on a shared 2-core machine)."""


def set_thread_env() -> None:
    """Set :data:`THREAD_ENV`'s variables that the environment does not set already (call before torch
    is imported: OpenMP reads them once, when torch loads it)."""
    for name, value in THREAD_ENV.items():
        os.environ.setdefault(name, value)


def main() -> None:
    """The ``mpolstm`` console script: the CLI, or one line naming the missing extra (exit 2)."""
    set_thread_env()
    try:
        from .cli import main as cli_main
    except ModuleNotFoundError as exc:
        import sys

        print(f"error: the mpolstm command needs the harness extra ({exc.name} is missing): "
              "pip install 'mpolstm[harness]'", file=sys.stderr)
        raise SystemExit(2) from None
    cli_main()
