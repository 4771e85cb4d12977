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


def test_the_demos_spread_check_reads_the_documented_three_seed_table():
    """`make demo` prints each row against docs/results.md's seq. MNIST quick seeds 0-2 table: the
    reference in the package must be that table, row for row."""
    from mpolstm.harness.protocol.spread import SEQCLS_QUICK, spread_table

    text = RESULTS.read_text()
    start = text.index("### Sequence classification, `quick` preset (the demo's size)")
    section = text[start:text.index("\n### ", start + 1)]
    documented = {}
    for row, target, mean, std in re.findall(r"^\| ([a-z0-9-]+) \| (-|\d+x) \| (0\.\d{4}) ± (0\.\d{4}) \|", section,
                                             flags=re.M):
        documented[(row, None if target == "-" else float(target[:-1]))] = (float(mean), float(std))
    assert documented == SEQCLS_QUICK and len(documented) >= 30

    rows = [{"row": "dense", "target_ratio": None, "accuracy": SEQCLS_QUICK[("dense", None)][0]},
            {"row": "mpo-scratch", "target_ratio": 10.0, "accuracy": 0.0},
            {"row": "not-documented", "target_ratio": 10.0, "accuracy": 0.5}]
    table = spread_table({"metric": "accuracy", "rows": rows})
    assert "| dense | - |" in table and "| yes |" in table and "| no: -" in table
    assert "| not-documented | 10x | 0.5000 | - | - |" in table and "1 of 2 rows within" in table
