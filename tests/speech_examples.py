"""What the speech ONNX examples' tests (examples/nsnet2, examples/dtln) share: the skip reason and the
example's modules loaded from its folder."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
from pathlib import Path


def missing(files_reason: str | None) -> str | None:
    """Why the example cannot run here (``files_reason``: its ONNX files are missing), or None."""
    if files_reason is not None:
        return files_reason
    for name in ("onnx", "onnxruntime", "pesq", "pystoi"):
        if importlib.util.find_spec(name) is None:
            return f"{name} not installed"
    if shutil.which("espeak-ng") is None:
        return "espeak-ng is not installed (the speech corpus)"
    return None


def load_example(folder: Path, module: str):
    """(the example's ``module``, its table.py), table.py loaded under its own name (other examples
    have a table.py too)."""
    sys.path.insert(0, str(folder))
    try:
        front = importlib.import_module(module)
        spec = importlib.util.spec_from_file_location(f"{module}_table", folder / "table.py")
        table = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(table)
    finally:
        sys.path.remove(str(folder))
    return front, table
