"""ONNX's backend node cases run through mpolstm.onnx's interpreter: operator -> passed / refused / failed.

``python -m mpolstm.harness.onnx_conformance [--markdown FILE] [--only OP,OP]`` prints the table; with
``--markdown`` it also writes the supported-operator table (docs/onnx.md is written from it).

The cases ship inside the ``onnx`` wheel (``onnx.backend.test.case.node.collect_testcases``), made at
onnx's newest operator set. mpolstm.onnx reads operator sets 7-22, so a case is run at
``min(its opset, 22)`` when every operator in it has the same inputs and attributes at both (later
versions only added element types); otherwise it counts as refused. For operators that run as torch
layers and need constant weights (LSTM, GRU, Conv), the case's inputs after the first become
initializers. A case *passes* when every output equals the expected one (dtype, shape, values within
the case's rtol / atol), is *refused* when load or forward raises a one-line ValueError, and *fails*
otherwise (a wrong answer or another exception).
"""

from __future__ import annotations

import argparse
import collections
import io
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["LIMITS", "Result", "cases", "claimed", "markdown", "run", "run_case", "table"]

READ_OPSET = 22
CONSTANT_WEIGHTS = {"LSTM", "GRU", "Conv"}  # the first input is data, the others weights
FLOATS = (np.float32, np.float64)
# a float case: float32 / float64 outputs, and inputs of those or integers / booleans (indices, shapes)
HALF_ULP = {"float16": 2 * 2.0 ** -10, "bfloat16": 2 * 2.0 ** -7}
FLOAT_CASE_INPUTS = {"float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"}
LIMITS = {
    "Dropout": ["training_mode=True (random dropout) is not supported"],
    "GRU": ["linear_before_reset=0"],
    "LSTM": ["sequence_lens is not supported"],
    "Scan": ["Scan before operator set 9"],
    "SpaceToDepth": ["changed meaning after opset 22"],  # its mode attribute (operator set 25)
}
"""The documented refusals a float case of a claimed operator may meet (operator -> message parts)."""


@dataclass(frozen=True)
class Result:
    name: str
    op: str
    status: str  # "passed", "refused" or "failed"
    detail: str
    is_float: bool


def claimed() -> list[str]:
    """The operators mpolstm.onnx claims: the interpreter's and those that become torch layers."""
    from ..onnx import model  # noqa: F401  (registers every operator)
    from ..onnx.ops import OPS

    return sorted(set(OPS) | CONSTANT_WEIGHTS)


def cases(only: set[str] | None = None) -> list:
    """ONNX's node cases (``only``: those whose operator is in it), each with ``.op`` set: the
    operator the case is about (an ``_expanded`` case: its unexpanded sibling's)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = collect_testcases(None)
    by_name = {c.name: c for c in found}
    out = []
    for case in found:
        base = by_name.get(case.name.split("_expanded")[0], case)
        assert base.model is not None
        op = base.model.graph.node[0].op_type
        if only is None or op in only:
            case.op = op  # type: ignore[attr-defined]  # the operator, beside onnx's own fields
            out.append(case)
    return out


def _same_meaning(node, old: int, new: int) -> bool:
    """Whether ``node``'s operator has the same inputs and outputs at operator sets ``old`` and
    ``new``, and every attribute the node sets exists at ``old`` (later versions added types or
    attributes whose defaults keep the old meaning)."""
    from onnx import defs

    try:
        a, b = defs.get_schema(node.op_type, old), defs.get_schema(node.op_type, new)
    except Exception:  # no such operator at ``old``
        return False
    names = lambda s: ([i.name for i in s.inputs], [o.name for o in s.outputs])  # noqa: E731
    return names(a) == names(b) and all(attr.name in a.attributes for attr in node.attribute)


def _prepared(case):
    """The case's model at an operator set mpolstm.onnx reads (None when an operator changed meaning)."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    opset = next((o for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset.version > READ_OPSET:
        if not all(_same_meaning(node, READ_OPSET, opset.version) for node in _all_nodes(model.graph)):
            return None
        opset.version = READ_OPSET
    return model


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _all_nodes(sub)


def _as_initializers(model, values: list) -> list:
    """Move the graph inputs after the first into initializers holding ``values``; the first value left."""
    from onnx import numpy_helper

    graph = model.graph
    for proto, value in zip(list(graph.input[1:]), values[1:]):
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), proto.name))
    del graph.input[1:]
    return values[:1]


def _array(value):
    """A case's value as numpy (some cases store TensorProtos or numpy scalars)."""
    if hasattr(value, "data_type") and hasattr(value, "dims"):
        from onnx import numpy_helper

        return numpy_helper.to_array(value)
    return np.asarray(value) if isinstance(value, np.generic) else value


def _to_torch(x) -> torch.Tensor:
    x = np.array(x)
    if x.dtype.name == "bfloat16":  # numpy has no bfloat16 of its own (ml_dtypes'), torch reads its bits
        return torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16)
    if x.dtype.kind in "SUO" or x.dtype.name not in _TORCH_READS:
        raise ValueError(f"an input of {x.dtype} (torch has no such tensor)")
    return torch.from_numpy(x)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


_TORCH_READS = {"float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool",
                "uint16", "uint32", "uint64"}


def _compare(got, expected, case) -> str | None:
    """What differs between the model's outputs and the expected ones (None when they agree)."""
    got = got if isinstance(got, tuple) else (got,)
    if len(got) != len(expected):
        return f"{len(got)} outputs, expected {len(expected)}"
    for k, (g, e) in enumerate(zip(got, expected)):
        e = np.asarray(e)
        g = _to_numpy(g)
        if g.dtype != e.dtype or g.shape != e.shape:
            return f"output {k}: {g.dtype}{list(g.shape)}, expected {e.dtype}{list(e.shape)}"
        # float16 / bfloat16: within 2 units in the last place of the type (torch rounds its steps its own way)
        tol = HALF_ULP.get(e.dtype.name, 0.0)
        try:
            np.testing.assert_allclose(g.astype(np.float64) if tol else g, e.astype(np.float64) if tol else e,
                                       rtol=max(case.rtol, tol), atol=max(case.atol, tol))
        except AssertionError:
            return f"output {k}: values differ (max |diff| {np.nanmax(np.abs(g.astype(float) - e)):.3g})"
    return None


def run_case(case, folder: Path) -> Result:
    """Load the case's model with mpolstm.onnx.load and run each of its data sets."""
    import onnx

    from ..onnx import load

    data_sets = [([_array(x) for x in ins], [_array(o) for o in outs]) for ins, outs in case.data_sets]
    is_float = all(isinstance(o, np.ndarray) and o.dtype in FLOATS for _, outs in data_sets for o in outs) and \
        all(isinstance(x, np.ndarray) and x.dtype.name in FLOAT_CASE_INPUTS for ins, _ in data_sets for x in ins)
    model = _prepared(case)
    if model is None:
        return Result(case.name, case.op, "refused", "an operator changed meaning after opset 22", is_float)
    try:
        for inputs, expected in data_sets:
            inputs = list(inputs)
            if case.op in CONSTANT_WEIGHTS:
                inputs = _as_initializers(model, inputs)
            path = folder / f"{case.name}.onnx"
            onnx.save(model, str(path))
            imported = load(path)
            with torch.no_grad():
                got = imported(*[_to_torch(x) for x in inputs])
            wrong = _compare(got, expected, case)
            if wrong:
                return Result(case.name, case.op, "failed", wrong, is_float)
    except ValueError as exc:
        text = str(exc)
        status = "refused" if text and "\n" not in text else "failed"
        return Result(case.name, case.op, status, text, is_float)
    except Exception as exc:  # a crash is a failure: a refusal is a one-line ValueError
        return Result(case.name, case.op, "failed", f"{type(exc).__name__}: {exc}"[:300], is_float)
    return Result(case.name, case.op, "passed", "", is_float)


def run(only: set[str] | None = None) -> list[Result]:
    with tempfile.TemporaryDirectory() as folder:
        return [run_case(case, Path(folder)) for case in cases(only)]


def _counts(results: list[Result]) -> dict[str, collections.Counter]:
    rows: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in results:
        rows[r.op][r.status] += 1
        rows[r.op]["float"] += r.is_float
        rows[r.op]["float passed"] += r.is_float and r.status == "passed"
    return rows


def table(results: list[Result], ops: list[str] | None = None) -> str:
    """Markdown table: operator, cases passed / refused / failed, float cases passed (``ops``: those rows)."""
    rows = _counts(results)
    out = io.StringIO()
    out.write("| operator | passed | refused | failed | float cases passed |\n|---|---:|---:|---:|---:|\n")
    for op in sorted(rows) if ops is None else ops:
        c = rows[op]
        out.write(f"| {op} | {c['passed']} | {c['refused']} | {c['failed']} | {c['float passed']} / {c['float']} |\n")
    picked = [r for r in results if ops is None or r.op in ops]
    total = collections.Counter(r.status for r in picked)
    out.write(f"| **all** | {total['passed']} | {total['refused']} | {total['failed']} | "
              f"{sum(r.is_float and r.status == 'passed' for r in picked)} / {sum(r.is_float for r in picked)} |\n")
    return out.getvalue()


def markdown(results: list[Result]) -> str:
    """docs/onnx.md: the claimed operators' table, their documented limits, the others."""
    import onnx

    ops = claimed()
    tested = [op for op in ops if op in _counts(results)]
    others = sorted(set(_counts(results)) - set(ops))
    total = collections.Counter(r.status for r in results)
    limits = "\n".join(f"- {op}: " + "; ".join(f"`{m}`" for m in LIMITS[op]) for op in sorted(LIMITS))
    return f"""# ONNX operators mpolstm.onnx reads

Written by `python -m mpolstm.harness.onnx_conformance --markdown docs/onnx.md` from ONNX's own backend
node cases (onnx {onnx.__version__}: {len(results)} cases, run at operator set min(theirs, {READ_OPSET})
when the operator's inputs and attributes are the same there). Passed: every output equal to the
expected one (dtype, shape, values within the case's tolerance; float16 / bfloat16 ones within 2
units in the last place of their type); refused: a one-line error naming
the node and its operator; failed: anything else. All cases: {total['passed']} passed, {total['refused']}
refused, {total['failed']} failed. `tests/test_onnx_conformance.py` asserts that nothing fails and that
every float case (float32 / float64 outputs) of a claimed operator passes or meets a limit below.

## Claimed operators ({len(ops)}; operator sets 7-22; LSTM, GRU, Conv, MatMul / Gemm with constant
weights become torch layers)

{table(results, tested)}
Claimed operators without a case here: {", ".join(sorted(set(ops) - set(tested))) or "none"}.

## Limits (refused in one line)

{limits}
- Every operator: element types torch has no tensor for (strings, uint16-64, float8, int4);
  operator sets above {READ_OPSET} (an operator whose inputs or attributes changed); a graph input
  or output that is a sequence (sequences inside a graph are computed: ONNX's cases of the sequence
  operators all take or return one, so they count as refused here; `tests/test_onnx_control.py`
  checks them against onnxruntime); optional values; domains other than the default one.

## Other operators (every case refused in one line)

{", ".join(others)}
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated operators (default: every case)")
    parser.add_argument("--failures", action="store_true", help="also print each failed case and why")
    parser.add_argument("--markdown", type=Path, help="write the supported-operator page (docs/onnx.md) there")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = run(set(args.only.split(",")) if args.only else None)
    print(table(results))
    if args.markdown:
        args.markdown.write_text(markdown(results))
    if args.failures:
        for r in results:
            if r.status == "failed":
                print(f"{r.name}: {r.detail}")


if __name__ == "__main__":
    main()
