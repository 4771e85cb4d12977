"""pyproject.toml uses the current (PEP 639) license form, so building prints no setuptools deprecation."""

from __future__ import annotations

import pathlib
import re

import tomllib

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_license_is_an_spdx_expression_with_a_setuptools_that_reads_it():
    config = tomllib.loads(PYPROJECT.read_text())
    assert config["project"]["license"] == "Apache-2.0"  # not the deprecated {text = ...} table
    assert not any(c.startswith("License ::") for c in config["project"].get("classifiers", []))
    setuptools = next(r for r in config["build-system"]["requires"] if r.startswith("setuptools"))
    assert int(re.fullmatch(r"setuptools>=(\d+)", setuptools)[1]) >= 77  # PEP 639 support


def test_make_test_runs_the_linter_and_the_type_checker_first():
    """CI runs `make test`: ruff over src and tests and mypy over the library, then pytest; `make lint` alone."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # under make
    steps = {}
    for target in ("lint", "test"):
        proc = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.installed", target],
                              cwd=PYPROJECT.parent, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        steps[target] = [line.split("/bin/", 1)[-1] for line in proc.stdout.splitlines() if "/bin/" in line]
    assert steps["lint"] == ["ruff check src tests", "mypy src/mpolstm"]
    assert steps["test"] == [*steps["lint"], "python -m pytest"]
    config = tomllib.loads(PYPROJECT.read_text())
    assert {"F", "B", "I"} <= set(config["tool"]["ruff"]["lint"]["select"])
    assert {"ruff", "mypy"} <= {re.split(r"[=<>]", r)[0] for r in config["project"]["optional-dependencies"]["dev"]}
