"""The library imports only torch, numpy and safetensors, and never the harness."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import mpolstm

PACKAGE = pathlib.Path(mpolstm.__file__).parent
LIBRARY = sorted(p for p in PACKAGE.rglob("*.py") if "harness" not in p.relative_to(PACKAGE).parts)

_PROBE = r"""
import importlib, importlib.abc, pathlib, sys

BLOCKED = ("typer", "rich", "matplotlib", "scipy", "click", "pesq", "pystoi", "onnx", "onnxruntime")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked: {name}")
        return None

sys.meta_path.insert(0, Block())
import mpolstm
root = pathlib.Path(mpolstm.__file__).parent
names = [".".join(("mpolstm", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
         for p in sorted(root.rglob("*.py")) if "harness" not in p.relative_to(root).parts]
for name in names:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.startswith("mpolstm.harness") or m.split(".")[0] in BLOCKED)
print(len(names), loaded)
"""


def test_library_imports_without_harness_dependencies():
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    count, loaded = proc.stdout.split(" ", 1)
    assert int(count) >= 14 and loaded.strip() == "[]"


def _imports(path: pathlib.Path) -> list[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    module = ".".join(("mpolstm", *path.relative_to(PACKAGE).with_suffix("").parts))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names += [target] + [f"{target}.{a.name}" for a in node.names]
    return names


def test_no_library_module_imports_the_harness():
    offenders = {str(p.relative_to(PACKAGE)): [n for n in _imports(p) if n.startswith("mpolstm.harness")]
                 for p in LIBRARY}
    assert len(LIBRARY) >= 14
    assert {k: v for k, v in offenders.items() if v} == {}


def test_import_scan_sees_relative_imports():
    # the scan itself must resolve "from ..harness import x" style imports, or the check above proves nothing
    assert "mpolstm.harness.tasks" in _imports(PACKAGE / "harness" / "cli.py") or any(
        n.startswith("mpolstm.harness.tasks") for n in _imports(PACKAGE / "harness" / "cli.py"))
    assert "mpolstm.nn.registry" in _imports(PACKAGE / "compression" / "engine.py")
