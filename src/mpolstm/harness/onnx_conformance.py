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

__all__ = ["Result", "cases", "run", "run_case", "table"]

READ_OPSET = 22
CONSTANT_WEIGHTS = {"LSTM", "GRU", "Conv"}  # the first input is data, the others weights
FLOATS = (np.float32, np.float64)


@dataclass(frozen=True)
class Result:
    name: str
    op: str
    status: str  # "passed", "refused" or "failed"
    detail: str
    is_float: bool


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
        op = base.model.graph.node[0].op_type
        if only is None or op in only:
            case.op = op
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
        try:
            np.testing.assert_allclose(g, e, rtol=case.rtol, atol=case.atol)
        except AssertionError:
            return f"output {k}: values differ (max |diff| {np.nanmax(np.abs(g.astype(float) - e)):.3g})"
    return None


def run_case(case, folder: Path) -> Result:
    """Load the case's model with mpolstm.onnx.load and run each of its data sets."""
    import onnx

    from ..onnx import load

    expected_all = [o for _, outs in case.data_sets for o in outs]
    is_float = all(isinstance(o, np.ndarray) and o.dtype in FLOATS for o in expected_all)
    model = _prepared(case)
    if model is None:
        return Result(case.name, case.op, "refused", "an operator changed meaning after opset 22", is_float)
    try:
        for inputs, expected in case.data_sets:
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


def table(results: list[Result]) -> str:
    """Markdown table: operator, cases passed / refused / failed (float cases passed of float cases)."""
    rows = collections.defaultdict(collections.Counter)
    for r in results:
        rows[r.op][r.status] += 1
        rows[r.op]["float"] += r.is_float
        rows[r.op]["float passed"] += r.is_float and r.status == "passed"
    out = io.StringIO()
    out.write("| operator | passed | refused | failed | float cases passed |\n|---|---:|---:|---:|---:|\n")
    for op in sorted(rows):
        c = rows[op]
        out.write(f"| {op} | {c['passed']} | {c['refused']} | {c['failed']} | {c['float passed']} / {c['float']} |\n")
    total = collections.Counter(r.status for r in results)
    out.write(f"| **all** | {total['passed']} | {total['refused']} | {total['failed']} | "
              f"{sum(r.is_float and r.status == 'passed' for r in results)} / {sum(r.is_float for r in results)} |\n")
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated operators (default: every case)")
    parser.add_argument("--failures", action="store_true", help="also print each failed case and why")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = run(set(args.only.split(",")) if args.only else None)
    print(table(results))
    if args.failures:
        for r in results:
            if r.status == "failed":
                print(f"{r.name}: {r.detail}")


if __name__ == "__main__":
    main()
