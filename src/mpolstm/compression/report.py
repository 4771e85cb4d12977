"""The report of a compression: per module and weight, sizes, bonds, layout and errors."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .checks import SYNTHETIC, OutputCheck
from .output_aware import AllocationChoice

__all__ = ["CompressionReport", "ModuleReport", "WeightReport", "REPORT_COLUMNS", "measured_lines",
           "print_trainable_parameters"]


@dataclass
class WeightReport:
    """One compressed weight. shape: the torch weight's (out, in), or (rows, dim) for an
    embedding; rel_error: ||W - W'||_F / ||W||_F measured exactly on the torch weight (an
    embedding's real rows); output_error: ||(W - W') C^{1/2}||_F / ||W C^{1/2}||_F with C the
    calibration inputs' second moment (None without calibration); layout: the chosen layout;
    entropy: entanglement entropy at each bond of the compressed MPO; sparse_params: entries of
    the sparse residual (layout "lowrank+sparse"), included in mpo_params; dense_macs / macs:
    multiply-adds of one row through the dense weight / the compressed weight as deployed
    (``mpo.step_macs`` plus the sparse entries; 0 dense for a table lookup); stored_bytes: the
    bytes of the compressed weight as ``mpolstm.save`` writes it in float32 (cores, sparse values and
    their index; ``mpolstm.storage.mpo_stored``)."""

    shape: tuple[int, int]
    dense_params: int
    mpo_params: int
    bond_dims: tuple[int, ...]
    rel_error: float | None
    entropy: tuple[float, ...]
    layout: str = "interleaved"
    output_error: float | None = None
    sparse_params: int = 0
    dense_macs: int = 0
    macs: int = 0
    stored_bytes: int = 0


@dataclass
class ModuleReport:
    """One replaced module; params count every parameter (cores and biases). dense_macs / macs: those
    of a layer with no weight of its own (a tied layer, ``Shared*``: its product through the owner's
    rebuilt weight, the same before and after), beside its weights'."""

    name: str
    old_class: str
    new_class: str
    params_before: int
    params_after: int
    weights: dict[str, WeightReport]
    dense_macs: int = 0
    macs: int = 0


@dataclass
class CompressionReport:
    """Result of ``compress``: one entry per replaced module, plus skipped modules
    (name, reason: not compressible, or left dense because its MPO would not be smaller) and
    the budgets used (max MPO core entries, max multiply-adds per step; None when not given), and
    with ``allocation="output"`` which allocation won on the held-out calibration batches' output
    error and each candidate's error there; ``output_check``: the compressed model's output error
    against the original (``checks.OutputCheck``: on held-out or validation batches, or a
    synthetic-input estimate without calibration); ``int8_check``: the same for the file written
    with int8 weights and the float model's on the same batches ({"error", "float_error", "batches"};
    ``mpolstm compress --int8`` fills it in)."""

    modules: list[ModuleReport]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    budget: int | None = None
    allocation: Any = None  # output_aware.AllocationChoice when calibrated with a budget, else None
    max_macs: int | None = None
    output_check: Any = None  # checks.OutputCheck, None when it could not be measured
    curve: list[tuple[float, float]] = field(default_factory=list)  # tolerance mode: (ratio, error or metric)
    tolerance: str = ""  # tolerance mode: what was kept and why
    int8_check: dict[str, Any] | None = None

    @property
    def dense_params(self) -> int:
        return sum(w.dense_params for m in self.modules for w in m.weights.values())

    @property
    def mpo_params(self) -> int:
        return sum(w.mpo_params for m in self.modules for w in m.weights.values())

    @property
    def stored_bytes(self) -> int:
        """Bytes of the compressed weights as stored in float32 (``WeightReport.stored_bytes``)."""
        return sum(w.stored_bytes for m in self.modules for w in m.weights.values())

    @property
    def dense_macs(self) -> int:
        """Multiply-adds per step at batch 1 of the compressed weights (and tied layers) when dense."""
        return sum(m.dense_macs + sum(w.dense_macs for w in m.weights.values()) for m in self.modules)

    @property
    def macs(self) -> int:
        """Multiply-adds per step at batch 1 of their MPOs (and tied layers) as deployed."""
        return sum(m.macs + sum(w.macs for w in m.weights.values()) for m in self.modules)

    @property
    def ratio(self) -> float:
        """Dense entries / MPO core entries over the compressed weights."""
        return self.dense_params / self.mpo_params if self.mpo_params else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "modules": [asdict(m) for m in self.modules],
            "skipped": [list(s) for s in self.skipped],
            "budget": self.budget,
            "allocation": None if self.allocation is None else {
                "chosen": self.allocation.chosen, "errors": dict(self.allocation.errors),
                "fit_batches": self.allocation.fit_batches, "held_out_batches": self.allocation.held_out_batches,
                "note": self.allocation.note},
            "output_check": None if self.output_check is None else self.output_check.to_dict(),
            "curve": [list(p) for p in self.curve],
            "tolerance": self.tolerance,
            "int8_check": self.int8_check,
            "max_macs": self.max_macs,
            "dense_params": self.dense_params,
            "mpo_params": self.mpo_params,
            "ratio": self.ratio,
            "stored_bytes": self.stored_bytes,
            "dense_macs": self.dense_macs,
            "macs": self.macs,
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def rows(self) -> list[tuple[str, ...]]:
        """One row of strings per compressed weight, under ``REPORT_COLUMNS``."""
        return [
            (f"{m.name} ({m.new_class})", wname, "x".join(map(str, w.shape)), w.layout,
             str(w.bond_dims) + (f" +{w.sparse_params:,} sparse" if w.sparse_params else ""),
             f"{w.dense_params:,} -> {w.mpo_params:,}", f"{w.dense_params / w.mpo_params:.1f}x",
             f"{w.dense_macs:,} -> {w.macs:,}",
             "-" if w.rel_error is None else f"{w.rel_error:.4f}",
             "-" if w.output_error is None else f"{w.output_error:.4f}",
             f"{max(w.entropy):.3f}" if w.entropy else "-")
            for m in self.modules for wname, w in m.weights.items()
        ]

    @property
    def title(self) -> str:
        """What was compressed, which layouts were chosen and why (two lines)."""
        weights = [w for m in self.modules for w in m.weights.values()]
        counts = Counter(w.layout for w in weights)
        chosen = ", ".join(f"{layout} for {n}" + (f" of {len(weights)} weights" if i == 0 else "")
                           for i, (layout, n) in enumerate(counts.most_common()))
        calibrated = any(w.output_error is not None for w in weights)
        error = "output error on the calibration inputs" if calibrated else "weight error"
        budgets = " and ".join(b for b, v in (("parameter", self.budget), ("multiply-add", self.max_macs))
                               if v is not None)
        why = f"per weight, the least {error} within the {budgets} budget" if budgets else "bonds set by max_bond / rel_tol"
        ratio = self.dense_macs / self.macs if self.macs else 0.0
        macs = "none" if not self.macs else f"{ratio:.1f}x fewer" if ratio >= 1 else f"{1 / ratio:.1f}x more"
        return (f"compression: {self.dense_params:,} -> {self.mpo_params:,} weight entries ({self.ratio:.1f}x), "
                f"{self.stored_bytes:,} bytes as stored in float32; multiply-adds per step at batch 1: {self.dense_macs:,} -> {self.macs:,} ({macs})\n"
                f"layouts chosen: {chosen or 'none'} ({why})")

    def __str__(self) -> str:
        rows = [REPORT_COLUMNS, *self.rows()]
        widths = [max(len(r[c]) for r in rows) for c in range(len(REPORT_COLUMNS))]
        lines = [self.title]
        for r in rows:
            lines.append("  ".join(v.ljust(w) if c < 2 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths))))
        lines += measured_lines(self.to_dict())
        if self.skipped:
            lines.append("skipped: " + "; ".join(f"{name} ({reason})" for name, reason in self.skipped))
        return "\n".join(lines) + "\n"


WARN_RATIO = 3.0
UNMEASURED = ("warning: compressed {ratio:.1f}x without calibration: not measured on your inputs; the weight errors "
              "above do not say how far the model's outputs moved (give calibration batches)")

REPORT_COLUMNS = ("module", "weight", "shape", "layout", "bonds", "params", "ratio", "MACs/step", "weight error",
                  "output error", "max entropy")


def measured_lines(report: dict[str, Any]) -> list[str]:
    """The model output error, the allocation kept and the warning of an unmeasured compression, from a
    report as ``CompressionReport.to_dict`` gives it (the report's text; inspect reads the stored one)."""
    lines = []
    check, choice = report.get("output_check"), report.get("allocation")
    if check:
        lines.append(str(OutputCheck(check["error"], check["batches"], check["source"])))
    int8 = report.get("int8_check")
    if int8:
        lines.append(f"int8 weights: the written file's output error {int8['error']:.4f} on the same {int8['batches']} "
                     f"batches, the model's with float weights {int8['float_error']:.4f} (int8 adds "
                     f"{int8['error'] - int8['float_error']:+.4f})")
    if report.get("tolerance"):
        lines.append("tolerance: " + report["tolerance"])
    if choice:
        lines.append(str(AllocationChoice(choice["chosen"], choice["errors"], choice.get("fit_batches", 0),
                                          choice.get("held_out_batches", 0), choice.get("note", ""))))
    weights = [w for m in report.get("modules", []) for w in m["weights"].values()]
    ratio = report.get("ratio") or 0.0
    measured = check and check.get("source") != SYNTHETIC  # on the user's inputs (validation= without calibration)
    if weights and all(w.get("output_error") is None for w in weights) and ratio >= WARN_RATIO and not measured:
        lines.append(UNMEASURED.format(ratio=ratio))
    return lines


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print "trainable params: T || all params: A || trainable%: P" and return (T, A)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    percent = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}")
    return trainable, total


