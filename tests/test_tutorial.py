"""docs/tutorial.md runs: its Python blocks are executed in order, in one namespace."""

from __future__ import annotations

import pathlib
import re

import pytest

TUTORIAL = pathlib.Path(__file__).resolve().parents[1] / "docs" / "tutorial.md"


def test_tutorial_runs(capsys):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'mpolstm[export]')")
    blocks = re.findall(r"```python\n(.*?)```", TUTORIAL.read_text(), flags=re.S)
    assert len(blocks) >= 6
    namespace: dict = {"__name__": "tutorial"}
    for number, block in enumerate(blocks):
        try:
            exec(compile(block, f"{TUTORIAL.name}[block {number}]", "exec"), namespace)
        except Exception as exc:  # name the block that rotted
            raise AssertionError(f"tutorial block {number} failed: {exc!r}\n{block}") from exc
    assert not pathlib.Path(namespace["workdir"].name).exists()  # the tutorial leaves no folder behind
    out = capsys.readouterr().out
    assert "layouts chosen:" in out and "KL" in out and "error when made" in out
    assert "pip install '.[harness,export]'" in TUTORIAL.read_text()  # the extras it needs are stated
