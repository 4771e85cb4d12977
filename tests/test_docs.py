"""docs/results.md's `make demo` table has the demo's columns and exactly the rows the demo runs."""

from __future__ import annotations

import inspect
import pathlib
import re

from mpolstm.harness.cli import experiments
from mpolstm.harness.protocol import ROWS
from mpolstm.harness.protocol.report import markdown_table

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "results.md"


def _demo_section() -> str:
    text = RESULTS.read_text()
    start = text.index("## Sequence classification: sequential MNIST, `quick` preset (`make demo`)")
    return text[start:text.index("\n## ", start + 1)]


def test_the_demo_table_is_the_demos():
    section = _demo_section()
    table = [line for line in section.splitlines() if line.startswith("| ")]
    row = {"row": "dense", "target_ratio": None, "accuracy": 0.5, "params": 1, "ratio": 1.0, "bytes": 4,
           "bytes_ratio": 1.0, "storage": "float32", "total_params": 1, "hidden": 1, "train_s": 0.0,
           "batched_ms": 0.0, "step_ms": 0.0}
    document = {"task": "t", "metric": "accuracy", "seed": 0, "dense_epochs": 1, "finetune_epochs": 1,
                "distill": False, "dense_recurrent_params": 1, "rows": [row]}
    printed = next(line for line in markdown_table(document).splitlines() if line.startswith("| row "))
    assert table[0] == "|".join(printed.split("|")[:11]) + "|"  # the demo's columns up to `total`, in order

    ratios = [float(r) for r in inspect.signature(experiments.demo).parameters["ratios"].default.default.split(",")]
    expected = {("dense", "-")} | {(name, "-" if spec.once else f"{ratio:g}x") for name, spec in ROWS.items()
                                   if spec.recipe is not None for ratio in ratios}
    documented = {tuple(cell.strip() for cell in line.split("|")[1:3]) for line in table[1:]}
    note = section[section.index("Skipped"):].split("\n\n")[0]  # "Skipped (...): a at 100x (...); b and c at 100x"
    missing = {(name, ratio) for a, b, ratio in re.findall(r"([a-z0-9-]+)(?: and ([a-z0-9-]+))? at (\d+x)", note)
               for name in (a, b) if name}
    assert documented <= expected and expected - documented == missing
    assert len(table) - 1 == len(documented)  # no row twice
    assert re.search(rf"\b{len(documented)} rows\. ", section)  # and the text counts them as the table has them
    for line in table[1:]:
        assert re.fullmatch(r"\| [a-z0-9-]+ \| (-|\d+x) \| 0\.\d{4} \| [\d,]+ \| .*", line), line


def test_every_table_of_numbers_says_where_it_ran():
    """Issue 27: a table that does not say on which machine it ran cannot be checked on another one."""
    checked = 0
    for doc in ("results.md", "benchmarks.md"):
        lines = (RESULTS.parent / doc).read_text().splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("|") or lines[i - 1].startswith("|"):
                continue  # not the first line of a table
            end = next((k for k in range(i, len(lines)) if not lines[k].startswith("|")), len(lines))
            if not any(re.search(r"\| *[-+]?\d[\d,.]*(x| s| ms| us|%)? *\|", row) for row in lines[i + 2:end]):
                continue  # a table of words (the rows' definitions)
            start = max(k for k in range(i + 1) if k == 0 or lines[k].startswith("## "))
            context = "\n".join(lines[start:i])
            assert re.search(r"Where it ran|Machine:|Machine and conditions", context), (doc, lines[start], line)
            checked += 1
    assert checked >= 30


def _demo_spread_section() -> str:
    text = RESULTS.read_text()
    start = text.index("### The demo's spread")
    end = re.search(r"\n##+ ", text[start + 1:])
    return text[start:start + 1 + end.start() if end else len(text)]


def test_the_demos_spread_check_reads_the_documented_pooled_table():
    """`make demo` prints each row against docs/results.md's "The demo's spread": the reference in the
    package must be that table, row for row, and the table must pool the runs its JSON holds."""
    import json
    import statistics

    import pytest

    from mpolstm.harness.protocol.spread import SEQCLS_QUICK, Spread, pool

    documented = {}
    for row, target, mean, std, runs, low, high in re.findall(
            r"^\| ([a-z0-9-]+) \| (-|\d+x) \| (0\.\d{4}) ± (0\.\d{4}) \| (\d+) \| ([\d,]+)(?:-([\d,]+))? \|",
            _demo_spread_section(), flags=re.M):
        documented[(row, None if target == "-" else float(target[:-1]))] = Spread(
            float(mean), float(std), int(runs), int(low.replace(",", "")), int((high or low).replace(",", "")))
    assert documented == SEQCLS_QUICK and len(documented) == 39

    doc = json.loads((RESULTS.parent / "results" / "seqcls-quick-spread.json").read_text())
    assert [g["seeds"] for g in doc["groups"]] == [[0, 1, 2], [0, 1, 2, 0, 1, 2]]  # documented; 1 and 2 threads
    for key, ref in SEQCLS_QUICK.items():
        entries = [e for g in doc["groups"] for e in g["rows"] if (e["row"], e["target_ratio"]) == key]
        for e in entries[1:]:  # the run folders' groups keep each run's accuracy: their n, mean, std are those
            assert (e["runs"], e["mean"], e["std"]) == pytest.approx(
                (len(e["accuracy"]), statistics.fmean(e["accuracy"]), statistics.stdev(e["accuracy"])))
        n, mean, std = pool((e["runs"], e["mean"], e["std"]) for e in entries)
        counts = [p for e in entries for p in e["params"]]
        assert (n, round(mean, 4), round(std, 4), min(counts), max(counts)) == \
            (ref.runs, ref.mean, ref.std, ref.params_min, ref.params_max), key


def test_pool_gives_the_statistics_of_all_runs_together():
    import statistics

    import pytest

    from mpolstm.harness.protocol.spread import pool

    runs = [[0.91, 0.93, 0.95], [0.88, 0.9], [0.97]]
    groups = [(len(r), statistics.fmean(r), statistics.stdev(r) if len(r) > 1 else 0.0) for r in runs]
    n, mean, std = pool(groups)
    every = [x for r in runs for x in r]
    assert n == 6 and mean == pytest.approx(statistics.fmean(every)) and std == pytest.approx(statistics.stdev(every))
    with pytest.raises(ValueError, match=r"groups of at least one run, got sizes \[3, 0\]"):
        pool([(3, 0.9, 0.01), (0, 0.0, 0.0)])


def test_the_spread_table_marks_accuracy_and_parameters_outside():
    from mpolstm.harness.protocol.spread import SEQCLS_QUICK, spread_table

    dense, scratch = SEQCLS_QUICK[("dense", None)], SEQCLS_QUICK[("mpo-scratch", 10.0)]
    rows = [{"row": "dense", "target_ratio": None, "accuracy": dense.mean, "params": dense.params_min},
            {"row": "mpo-scratch", "target_ratio": 10.0, "accuracy": 0.0, "params": scratch.params_max + 1},
            {"row": "mpo-scratch", "target_ratio": 10.0, "accuracy": scratch.mean, "params": scratch.params_max + 1},
            {"row": "not-documented", "target_ratio": 10.0, "accuracy": 0.5, "params": 7}]
    table = spread_table({"metric": "accuracy", "rows": rows})
    assert "| dense | - |" in table and "| yes |" in table
    assert f"| no: accuracy {-scratch.mean:+.4f}, params {scratch.params_max + 1:,} |" in table
    assert f"| no: params {scratch.params_max + 1:,} |" in table
    assert "| not-documented | 10x | 0.5000 | - | 7 | - | - |" in table
    assert "1 of 3 rows within the documented spread (accuracy: 2, params: 1)" in table
