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
    assert "mpolstm.harness.tasks.registry" in _imports(PACKAGE / "harness" / "cli" / "common.py")
    assert "mpolstm.nn.registry" in _imports(PACKAGE / "compression" / "engine.py")


def _module_name(path: pathlib.Path) -> str:
    return ".".join(("mpolstm", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


def _import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _library_graph() -> dict[str, set[str]]:
    """Library module -> the library modules it imports (anywhere in it: lazy imports count too)."""
    modules = {_module_name(p): p for p in LIBRARY}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            while imported and imported not in modules:  # mpolstm.mpo.core.MPO -> mpolstm.mpo.core
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def test_no_import_cycles_among_library_modules():
    """docs/architecture.md: no module imports one above it; the one exception, core -> sweep inside two
    MPO methods, is the only cycle."""
    assert _import_cycles(_library_graph()) == [["mpolstm.mpo.core", "mpolstm.mpo.sweep"]]


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _import_cycles(graph) == [["a", "b", "c"]]
    assert "mpolstm.compression.config" in _library_graph()["mpolstm.compression.engine"]
