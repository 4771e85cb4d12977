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
