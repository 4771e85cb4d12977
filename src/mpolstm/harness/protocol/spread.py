"""The spread docs/results.md gives for the demo's table, and the check ``mpolstm demo`` prints beside
its table: does each row's accuracy lie within that spread, and its parameter count within the range
the documented runs gave?

A single seed on the ``quick`` preset moves by up to 0.07 between CPUs (their kernels sum in another
order, and training amplifies it), as much as a change of seed; the thread count moves only the rows
that train a large MPO (gradual truncation, MPO-int8 at 10x). Parameter counts move too: the budgeted
rows' bonds and ranks are allocated from the trained dense model's singular spectra, so the trained
weights (seed, CPU) move them by a few entries. So the reference pools seeds 0-2 on two CPUs, on one
of them at 1 and 2 threads ("The demo's spread" in docs/results.md, made by benchmarks/demo_spread.py;
a row identical at both thread counts counts once): a row is within when its accuracy lies within
``BAND`` pooled standard deviations of the pooled mean and its parameter count inside the runs'
range. A row outside says that this machine (or this code) moves it more than those runs did.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, NamedTuple

__all__ = ["BAND", "SEQCLS_QUICK", "Spread", "pool", "spread_table"]

BAND = 2.0
"""A row's accuracy is "within" when |accuracy - mean| <= BAND * std of the pooled runs."""


class Spread(NamedTuple):
    """One row's pooled runs: accuracy mean and sample std over ``runs`` runs, parameter count range."""

    mean: float
    std: float
    runs: int
    params_min: int
    params_max: int


SEQCLS_QUICK: dict[tuple[str, float | None], Spread] = {
    ('dense', None): Spread(0.9315, 0.0115, 6, 79872, 79872),
    ('mpo-decomp', 10.0): Spread(0.9262, 0.0048, 6, 7792, 7792),
    ('mpo-scratch', 10.0): Spread(0.9263, 0.0094, 6, 7792, 7792),
    ('mpo-central', 10.0): Spread(0.8888, 0.0113, 6, 7792, 7792),
    ('prune-agp', 10.0): Spread(0.9442, 0.0033, 6, 7792, 7792),
    ('prune-oneshot', 10.0): Spread(0.9390, 0.0055, 6, 7792, 7792),
    ('prune-bytes', 10.0): Spread(0.9350, 0.0053, 6, 5296, 5296),
    ('prune-int8', 10.0): Spread(0.9535, 0.0056, 6, 21176, 21176),
    ('mpo-gradual', 10.0): Spread(0.9306, 0.0142, 9, 7792, 7792),
    ('mpo-posttrain', 10.0): Spread(0.9263, 0.0104, 6, 7280, 7380),
    ('small-dense', 10.0): Spread(0.9232, 0.0149, 6, 7680, 7680),
    ('lowrank-decomp', 10.0): Spread(0.9307, 0.0165, 6, 7280, 7380),
    ('lowrank-scratch', 10.0): Spread(0.9322, 0.0143, 6, 7280, 7380),
    ('int8', None): Spread(0.9313, 0.0118, 6, 79872, 79872),
    ('mpo-int8', 10.0): Spread(0.9316, 0.0094, 9, 30576, 30576),
    ('mpo-latency', 10.0): Spread(0.9298, 0.0160, 6, 7280, 7380),
    ('mpo-decomp', 30.0): Spread(0.8855, 0.0168, 6, 2592, 2608),
    ('mpo-scratch', 30.0): Spread(0.9080, 0.0088, 6, 2592, 2608),
    ('mpo-central', 30.0): Spread(0.8350, 0.0067, 6, 2592, 2608),
    ('prune-agp', 30.0): Spread(0.9045, 0.0087, 6, 2592, 2608),
    ('prune-oneshot', 30.0): Spread(0.8473, 0.0185, 6, 2592, 2608),
    ('prune-bytes', 30.0): Spread(0.7948, 0.0242, 6, 1044, 1054),
    ('prune-int8', 30.0): Spread(0.8822, 0.0153, 6, 2085, 2106),
    ('mpo-gradual', 30.0): Spread(0.9080, 0.0101, 9, 2592, 2608),
    ('mpo-posttrain', 30.0): Spread(0.7353, 0.0251, 6, 2460, 2460),
    ('small-dense', 30.0): Spread(0.8608, 0.0154, 6, 2580, 2580),
    ('lowrank-decomp', 30.0): Spread(0.7917, 0.0245, 6, 2360, 2360),
    ('lowrank-scratch', 30.0): Spread(0.8078, 0.0157, 6, 2360, 2360),
    ('mpo-int8', 30.0): Spread(0.9202, 0.0130, 6, 9968, 10096),
    ('mpo-latency', 30.0): Spread(0.7845, 0.0419, 6, 2360, 2360),
    ('mpo-decomp', 100.0): Spread(0.8423, 0.0128, 6, 752, 752),
    ('mpo-scratch', 100.0): Spread(0.8777, 0.0038, 6, 752, 752),
    ('mpo-central', 100.0): Spread(0.7908, 0.0128, 6, 752, 752),
    ('prune-agp', 100.0): Spread(0.7735, 0.0290, 6, 752, 752),
    ('prune-oneshot', 100.0): Spread(0.6518, 0.0520, 6, 752, 752),
    ('mpo-gradual', 100.0): Spread(0.8143, 0.0119, 9, 752, 752),
    ('mpo-posttrain', 100.0): Spread(0.6407, 0.0585, 6, 716, 716),
    ('small-dense', 100.0): Spread(0.5965, 0.0276, 6, 660, 660),
    ('mpo-int8', 100.0): Spread(0.8833, 0.0111, 6, 2672, 2688),
}
"""(row, target ratio; None for the rows run once) -> its :class:`Spread`, as docs/results.md's "The
demo's spread" table gives it (tests/test_docs.py checks they agree, and that the table pools the runs
docs/results/seqcls-quick-spread.json holds)."""


def pool(groups: Iterable[tuple[int, float, float]]) -> tuple[int, float, float]:
    """Pool groups of runs given as (n, mean, sample std): the (n, mean, sample std) of all their runs
    together, exactly (the within-group sums of squares plus the between-group ones)."""
    groups = list(groups)
    n = sum(k for k, _, _ in groups)
    if n < 1 or any(k < 1 for k, _, _ in groups):
        raise ValueError(f"pool needs groups of at least one run, got sizes {[k for k, _, _ in groups]}")
    mean = sum(k * m for k, m, _ in groups) / n
    squares = sum((k - 1) * s * s + k * (m - mean) ** 2 for k, m, s in groups)
    return n, mean, math.sqrt(squares / (n - 1)) if n > 1 else 0.0


def _check(row: Mapping[str, Any], metric: str, ref: Spread) -> tuple[bool, bool, str]:
    """(accuracy within, params within, the verdict cell) of one row against its reference."""
    value_ok = abs(row[metric] - ref.mean) <= BAND * ref.std + 1e-9
    params_ok = ref.params_min <= round(row["params"]) <= ref.params_max
    wrong = ([] if value_ok else [f"{metric} {row[metric] - ref.mean:+.4f}"]) + \
        ([] if params_ok else [f"params {round(row['params']):,}"])
    return value_ok, params_ok, "yes" if not wrong else "no: " + ", ".join(wrong)


def spread_table(document: Mapping[str, Any], reference: Mapping[tuple[str, float | None], Spread]
                 = SEQCLS_QUICK) -> str:
    """A Markdown table of ``document``'s rows (a results document of ``run_protocol``) against
    ``reference``: the row's metric and parameters, the documented mean ± std and parameter range, and
    whether it lies within both ("-" for a row the reference does not have)."""
    metric = document["metric"]
    lines = ["Against the documented spread (docs/results.md, \"The demo's spread\": seeds 0-2 on two CPUs at "
             f"1 and 2 threads; within = {metric} inside mean ± {BAND:g} std and params inside the runs' range; "
             "params follow the trained weights):", "",
             f"| row | target | {metric} | runs: mean ± std | params | runs: params | within |",
             "|---|---:|---:|---:|---:|---:|---|"]
    inside = values = params = known = 0
    for row in document["rows"]:
        target = "-" if row["target_ratio"] is None else f"{row['target_ratio']:g}x"
        head = f"| {row['row']} | {target} | {row[metric]:.4f} |"
        ref = reference.get((row["row"], row["target_ratio"]))
        if ref is None:
            lines.append(f"{head} - | {round(row['params']):,} | - | - |")
            continue
        value_ok, params_ok, verdict = _check(row, metric, ref)
        known, values, params = known + 1, values + value_ok, params + params_ok
        inside += value_ok and params_ok
        span = f"{ref.params_min:,}" + ("" if ref.params_max == ref.params_min else f"-{ref.params_max:,}")
        lines.append(f"{head} {ref.mean:.4f} ± {ref.std:.4f} | {round(row['params']):,} | {span} | {verdict} |")
    lines.append(f"\n{inside} of {known} rows within the documented spread ({metric}: {values}, params: {params}).")
    return "\n".join(lines) + "\n"
