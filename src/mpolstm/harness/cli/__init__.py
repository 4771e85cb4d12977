"""The ``mpolstm`` command line (typer + rich).

Every usage error (bad option value, missing file) prints one line, naming the option the user
typed, and exits with code 2. Output to a pipe or a file is not wrapped at 80 columns.

The commands register on :data:`~.common.app` when their modules are imported here, in the order
``mpolstm --help`` lists them.
"""

from __future__ import annotations

import typer

# the import order is the commands' order in the help
# isort: off
from . import experiments  # noqa: F401  (demo, reproduce, paper-grid, train)
from . import compression  # noqa: F401  (compress, inspect)
from . import deploy  # noqa: F401  (enhance, export)
from . import extras  # noqa: F401  (decompose, data)
# isort: on
from .common import app, err_console
from .compression import plot_curve

__all__ = ["app", "main", "plot_curve"]


def main() -> None:
    """Console entry point: click's usage errors (bad option values, unknown commands) become one
    ``error: ...`` line and exit code 2, like every other bad input."""
    try:  # typer >= 0.20 vendors click; older versions use click itself
        from typer._click.exceptions import UsageError
    except ImportError:  # pragma: no cover
        from click.exceptions import UsageError

    try:
        code = app(standalone_mode=False)
    except UsageError as exc:
        if exc.format_message():  # empty when no command was given: the help was printed
            err_console.print(f"error: {exc.format_message()}", markup=False, highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except typer.Abort:
        raise SystemExit(130) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    raise SystemExit(code if isinstance(code, int) else 0)
