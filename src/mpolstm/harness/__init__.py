"""The harness that reproduces the paper on top of the library: tasks, data, audio, the
MPO-versus-baselines protocol, the trainer, distributed helpers and the ``mpolstm`` command.

It may import the library (``mpolstm``); the library never imports it. Its extra dependencies
(typer, rich, matplotlib, scipy, the data and speech packages) come with ``pip install
mpolstm[harness]``.
"""


def main() -> None:
    """The ``mpolstm`` console script: the CLI, or one line naming the missing extra (exit 2)."""
    try:
        from .cli import main as cli_main
    except ModuleNotFoundError as exc:
        import sys

        print(f"error: the mpolstm command needs the harness extra ({exc.name} is missing): "
              "pip install 'mpolstm[harness]'", file=sys.stderr)
        raise SystemExit(2) from None
    cli_main()
