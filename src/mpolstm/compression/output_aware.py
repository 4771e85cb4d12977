"""The held-out decision: which allocation of the budget compress keeps, decided on calibration data
the allocations were not measured on.

The per-matrix allocation (``sizing.Sizing.allocate``) minimises sum_W numel(W) err_W^2 of each
weight's own (output) error on the calibration inputs; errors of different weights do not add up like
that in the model's output (a recurrent weight's error compounds over the steps), and a weight whose
inputs have little energy but carry the information (an embedding's rows) is cut to nothing. So a
calibrated compress with a budget builds complete candidates, in order of simplicity:

1. "uniform": every weight at the same ratio (whitened fits), without ``max_macs``;
2. "weight error": the allocation by weight error (what compress does without calibration);
3. "per-matrix error": the allocation by each weight's output error (the calibrated default's);
4. with ``allocation="output"``, "output sensitivity": the allocator rerun with the objective
   sum_W beta_W err_W^2, beta_W measured on the fit half (the even-numbered batches, at most
   ``SENSITIVITY_BATCHES``): the model's output error with only W at its per-matrix fit, per unit of
   that fit's squared whitened error (one model run per weight per batch).

Each candidate's output error is measured per held-out batch (the odd-numbered calibration batches,
or the ``validation=`` batches; at most ``FORWARD_BUDGET`` model runs in all, evenly spaced batches).
The per-matrix allocation (the calibrated result before the decision existed) is the incumbent: the
candidate with the lowest error replaces it only where its advantage exceeds the batches' noise
(``checks.paired_advantage``: a one-sided paired t-test at 95% on per-batch log error ratios). Not the
simplest candidate: on the repository's models, uniform ratios kept over a per-matrix allocation that
was lower within the noise were worse on unseen data in 4 of 4 cases (docs/results.md, issue 32). With
fewer than ``checks.MIN_DECIDE`` held-out batches nothing is decided: the per-matrix allocation is kept
and the report says how many batches would decide. Candidates are evaluated by writing their matrices into the model's weights in
place and restoring them afterwards; identical candidates are run once.

Evidence (docs/results.md): on the recall model (Embedding(32, 64) -> 2-layer LSTM 256 -> Linear)
the per-matrix allocation cuts the embedding-fed W_ih to rank 2 at 10x; the decision keeps the
weight-error allocation there.
"""

from __future__ import annotations

import math
import statistics
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence, cast

import torch
from torch import Tensor, nn

from ..calibration import Calibration, run_hooked
from .checks import MIN_DECIDE, batch_errors, paired_advantage, total_error
from .fit import Fit
from .layouts import Target
from .sizing import Sizing

__all__ = ["AllocationChoice", "calibration_outputs", "choose_allocation", "relative_output_error",
           "sensitivity_allocation", "spaced", "split_calibration", "substituted"]

DEFAULT = "per-matrix error"
# Sensitivities are measured on at most this many fit batches (evenly spaced): one run per weight each.
SENSITIVITY_BATCHES = 8
# Most model runs over held-out batches the decision makes (candidates x batches; the original's outputs included).
FORWARD_BUDGET = 48


@dataclass
class AllocationChoice:
    """Which allocation compress kept, each candidate's relative output error ||y' - y|| / ||y|| on
    the held-out batches, how many batches the choice was made on, and why (``note``: too little
    data, or an advantage within the noise and about how many batches would decide)."""

    chosen: str
    errors: dict[str, float] = field(default_factory=dict)
    fit_batches: int = 0
    held_out_batches: int = 0
    note: str = ""

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {err:.4g}" for name, err in self.errors.items())
        measured = f" (output error on {self.held_out_batches} held-out batches: {parts})" if parts else ""
        return f"allocation: {self.chosen}{measured}" + (f"; {self.note}" if self.note else "")


def split_calibration(calibration: Calibration) -> tuple[list[Any], list[Any]]:
    """(fit batches, held-out batches): the even- and the odd-numbered calibration batches.
    ValueError for a callable or fewer than two batches (nothing to hold out)."""
    if callable(calibration) and not isinstance(calibration, (Tensor, nn.Module)):
        raise ValueError("allocation='output' holds out half of the calibration batches to decide on: give "
                         "calibration as a list of batches (tensors, tuples of inputs, or callables that each run "
                         "the model on one batch), not one callable")
    # past the check a callable is a Module, iterated as a container (nn.Sequential, nn.ModuleList)
    batches = [calibration] if isinstance(calibration, Tensor) else list(cast(Iterable[Any], calibration))
    if len(batches) < 2:
        raise ValueError(f"allocation='output' holds out every second calibration batch to decide on: give at least "
                         f"2 batches (got {len(batches)}; split a large batch into several)")
    return batches[0::2], batches[1::2]


@torch.no_grad()
def calibration_outputs(model: nn.Module, calibration: Calibration) -> list[Tensor]:
    """The first output tensor of every call of ``model`` while the calibration runs (eval mode)."""
    seen: list[Tensor] = []

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        first = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(first, Tensor):
            seen.append(first.detach().double())

    run_hooked(model, calibration, [(model, hook)])
    if not seen:
        raise ValueError("allocation='output' needs the model to return a tensor while the calibration runs")
    return seen


def relative_output_error(model: nn.Module, calibration: Calibration, reference: list[Tensor]) -> float:
    """sum ||y - y_ref||^2 / sum ||y_ref||^2 over the calibration outputs."""
    outputs = calibration_outputs(model, calibration)
    if len(outputs) != len(reference) or any(o.shape != r.shape for o, r in zip(outputs, reference)):
        raise ValueError("the calibration must run the model the same way every time for allocation='output'")
    num = sum(float((o - r).pow(2).sum()) for o, r in zip(outputs, reference))
    den = sum(float(r.pow(2).sum()) for r in reference)
    return num / den if den > 0 else num


def _torch_form(module: nn.Module, target: Target, matrix: Tensor) -> Tensor:
    """The torch weight of ``target`` for an approximation of its matrix M (W^T, or a table)."""
    weight = getattr(module, target.weight)
    if isinstance(module, nn.Embedding):
        return matrix[: weight.shape[0]].to(weight)
    return matrix.T.reshape(weight.shape).to(weight)


@contextmanager
def substituted(model: nn.Module, targets: Sequence[Target], fits: Sequence[Fit | None]) -> Iterator[None]:
    """Temporarily write the fits' matrices into the model's weights (None: keep the weight)."""
    saved = []
    with torch.no_grad():
        for target, fit in zip(targets, fits):
            if fit is None:
                continue
            module = model.get_submodule(target.module)
            weight = getattr(module, target.weight)
            saved.append((weight, weight.detach().clone()))
            weight.copy_(_torch_form(module, target, fit.matrix()))
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, value in saved:
                weight.copy_(value)


def _sensitivities(model: nn.Module, targets: Sequence[Target], fits: Sequence[Fit], batches: list,
                   reference: list[Tensor]) -> list[float]:
    """beta_W per target (step 2 of the module docstring); a weight whose fit is exact gets the
    median beta per entry of the others, times its size."""
    betas: list[float | None] = []
    for i, (target, fit) in enumerate(zip(targets, fits)):
        own = (target.output_error(fit.matrix()) or 0.0) ** 2
        if own <= 1e-12:
            betas.append(None)
            continue
        with substituted(model, targets, [fit if k == i else None for k in range(len(fits))]):
            betas.append(relative_output_error(model, batches, reference) / own)
    per_entry = [b / t.dense_params for b, t in zip(betas, targets) if b is not None]
    fill = statistics.median(per_entry) if per_entry else 1.0
    return [b if b is not None else fill * t.dense_params for b, t in zip(betas, targets)]


def spaced(batches: list, count: int) -> list:
    """At most ``count`` of ``batches``, evenly spaced."""
    return batches[::math.ceil(len(batches) / count)] if len(batches) > count else batches


def sensitivity_allocation(model: nn.Module, sizing: Sizing, per_matrix: list[Fit], budget: int,
                           fit_half: list) -> list[Fit]:
    """The allocator's choice with the objective sum_W beta_W err_W^2 (step 4 of the module docstring)."""
    probe = spaced(fit_half, SENSITIVITY_BATCHES)
    scales = _sensitivities(model, sizing.targets, per_matrix, probe, calibration_outputs(model, probe))
    return sizing.allocate(budget, scales=scales)


def choose_allocation(model: nn.Module, targets: Sequence[Target], candidates: dict[str, list[Fit] | None],
                      held_out: list, reference: list[list[Tensor]], fit_batches: int = 0
                      ) -> tuple[list[Fit], AllocationChoice, dict[int, tuple[float, float]]]:
    """The fits of the candidate the held-out rule keeps (module docstring), the AllocationChoice, and
    the kept candidate's (||y' - y||^2, ||y||^2) per held-out batch index it was measured on.
    ``candidates`` in order of simplicity (None: not available); ``reference``: the original model's
    outputs per held-out batch (``checks.batch_outputs``)."""
    live = {name: fits for name, fits in candidates.items() if fits is not None}
    count = max(1, FORWARD_BUDGET // (len(live) + 1))
    keep = [i for i in range(len(held_out))][::math.ceil(len(held_out) / count)] if len(held_out) > count else \
        list(range(len(held_out)))
    batches, refs = [held_out[i] for i in keep], [reference[i] for i in keep]
    per: dict[str, list[tuple[float, float]]] = {}
    for name, fits in live.items():
        same = next((k for k in per if _same(live[k], fits)), None)
        if same is not None:
            per[name] = per[same]
            continue
        with substituted(model, targets, fits):
            per[name] = batch_errors(model, batches, refs)
    chosen, note = _decide(per, len(batches))
    errors = {name: total_error(e) for name, e in per.items()}
    measured = dict(zip(keep, per[chosen]))
    return live[chosen], AllocationChoice(chosen, errors, fit_batches, len(batches), note), measured


def _decide(per: dict[str, list[tuple[float, float]]], batches: int) -> tuple[str, str]:
    """(the candidate kept, why when not the best): the best where it beats the per-matrix allocation
    beyond noise, else the per-matrix allocation."""
    totals = {name: total_error(e) for name, e in per.items()}
    best = min(per, key=lambda name: (totals[name], list(per).index(name)))
    if best == DEFAULT:
        return DEFAULT, ""
    if batches < MIN_DECIDE:
        return DEFAULT, (f"too little held-out data to decide ({batches} batch{'es' if batches != 1 else ''}; "
                         f"at least {MIN_DECIDE} held-out batches, {2 * MIN_DECIDE} calibration batches, decide): "
                         f"kept {DEFAULT}")
    better, need = paired_advantage(per[DEFAULT], per[best])
    if better:
        return best, ""
    return DEFAULT, (f"{best} was {1 - totals[best] / totals[DEFAULT]:.1%} lower but within the noise of "
                     f"{batches} held-out batches" + (f"; about {need} would decide" if need else ""))


def _same(a: list[Fit], b: list[Fit]) -> bool:
    """Whether two candidates hold the same fits (``Sizing`` fits each allocator point once, so the
    same choice is the same object)."""
    return all(x is y for x, y in zip(a, b))
