"""ONNX's own backend node cases (shipped in the onnx wheel) through mpolstm.onnx: no case gets a wrong
answer or a crash, every float case of a claimed operator passes or meets a documented limit, every
other case is refused in one line, and docs/onnx.md is the table the conformance script writes."""

from __future__ import annotations

import pathlib

import pytest

pytest.importorskip("onnx")

from mpolstm.harness import onnx_conformance as conformance  # noqa: E402

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "onnx.md"


@pytest.fixture(scope="module")
def results():
    return conformance.run()  # all 1,884 cases: about 15 s on one core


def test_no_case_gets_a_wrong_answer_or_a_crash(results):
    assert len(results) > 1500
    failed = [f"{r.name}: {r.detail}" for r in results if r.status == "failed"]
    assert not failed, failed[:10]


def test_every_refusal_is_one_line_naming_what_is_refused(results):
    for r in results:
        if r.status == "refused":
            assert r.detail and "\n" not in r.detail, r.name


def test_every_float_case_of_a_claimed_operator_passes_or_meets_a_documented_limit(results):
    claimed = set(conformance.claimed())
    assert {"Einsum", "ConvTranspose", "Pad", "If", "Loop", "Scan", "LSTM", "GRU"} <= claimed
    missed = [f"{r.name}: {r.detail}" for r in results if r.op in claimed and r.is_float and r.status != "passed"
              and not any(limit in r.detail for limit in conformance.LIMITS.get(r.op, ()))]
    assert not missed, missed
    for op in ("Einsum", "ConvTranspose", "Pad", "If", "Loop", "LayerNormalization", "Conv", "LSTM"):
        assert any(r.op == op and r.is_float and r.status == "passed" for r in results), op


def test_docs_list_is_the_scripts_table(results):
    assert DOCS.read_text() == conformance.markdown(results), \
        "docs/onnx.md is stale: python -m mpolstm.harness.onnx_conformance --markdown docs/onnx.md"
