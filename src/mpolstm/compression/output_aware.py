"""Output-aware allocation: size each weight by what it does to the model's output, decided on
calibration data the decision was not made from.

The per-matrix allocation (``sizing.Sizing.allocate``) minimises sum_W numel(W) err_W^2 of each
weight's own (output) error; errors of different weights do not add up like that in the model's
output (a recurrent weight's error compounds over the steps, a decoder's over fed-back tokens).
With ``CompressionConfig(allocation="output")`` and calibration given as batches, compress:

1. splits the batches: the even-numbered ones (0, 2, 4, ...) are the *fit* half, the odd-numbered
   ones the *held-out* half (the whitening of every candidate below, as in the default, uses all);
2. measures on the fit half (at most ``SENSITIVITY_BATCHES`` of its batches, evenly spaced) each
   weight's output sensitivity: the relative squared error of the model's outputs with only that
   weight replaced by its per-matrix fit, divided by that fit's squared (whitened) error: beta_W,
   the output error per unit of the allocator's error measure;
3. builds three complete candidates: the per-matrix allocation (the default's result), every weight
   at the same ratio ("uniform") and the allocator's choice with the objective
   sum_W beta_W err_W^2 ("output sensitivity"), all layouts and bonds alike;
4. keeps the candidate with the lowest output error on the held-out half, but leaves the per-matrix
   allocation only for one at least ``MARGIN`` (relatively) lower there: never a choice worse than
   the default's on data the decision was not fitted to.

Cost: one run of the model over those fit batches per weight, and one over the held-out half per
candidate (a candidate identical to another is run once); candidates are evaluated by writing
their matrices into the model's weights in place and restoring them afterwards. (The uniform
candidate never won on the tagger, nano-ocr or g2p-en; it wins NSNet2's 30x on held-out batches,
0.1185 against 0.1203 and the per-matrix 0.1669, so it stays: one more run over the held-out half.)
"""

from __future__ import annotations

import math
import statistics
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..calibration import Calibration, run_hooked
from .fit import Fit
from .layouts import Target
from .sizing import Sizing

__all__ = ["MARGIN", "AllocationChoice", "calibration_outputs", "choose_allocation",
           "relative_output_error", "split_calibration"]

DEFAULT = "per-matrix error"
# A candidate replaces the per-matrix allocation only when its held-out output error is lower by this share.
MARGIN = 0.02
# Sensitivities are measured on at most this many fit batches (evenly spaced): one run per weight each.
SENSITIVITY_BATCHES = 8


@dataclass
class AllocationChoice:
    """Which allocation compress kept, each candidate's output error on the held-out half of the
    calibration batches (relative squared error of the model's outputs), and how many batches
    the sensitivities were measured on (fit) and the choice made on (held out)."""

    chosen: str
    errors: dict[str, float] = field(default_factory=dict)
    fit_batches: int = 0
    held_out_batches: int = 0

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {err:.4g}" for name, err in self.errors.items())
        return (f"allocation: {self.chosen} (held-out output error on {self.held_out_batches} of "
                f"{self.fit_batches + self.held_out_batches} calibration batches: {parts})")


def split_calibration(calibration: Calibration) -> tuple[list[Any], list[Any]]:
    """(fit batches, held-out batches): the even- and the odd-numbered calibration batches.
    ValueError for a callable or fewer than two batches (nothing to hold out)."""
    if callable(calibration) and not isinstance(calibration, (Tensor, nn.Module)):
        raise ValueError("allocation='output' holds out half of the calibration batches to decide on: give "
                         "calibration as a list of batches (tensors, tuples of inputs, or callables that each run "
                         "the model on one batch), not one callable")
    batches = [calibration] if isinstance(calibration, Tensor) else list(calibration)
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
def _substituted(model: nn.Module, targets: Sequence[Target], fits: Sequence[Fit | None]) -> Iterator[None]:
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
        with _substituted(model, targets, [fit if k == i else None for k in range(len(fits))]):
            betas.append(relative_output_error(model, batches, reference) / own)
    per_entry = [b / t.dense_params for b, t in zip(betas, targets) if b is not None]
    fill = statistics.median(per_entry) if per_entry else 1.0
    return [b if b is not None else fill * t.dense_params for b, t in zip(betas, targets)]


def choose_allocation(model: nn.Module, sizing: Sizing, per_matrix: list[Fit], budget: int,
                      calibration: Calibration) -> tuple[list[Fit], AllocationChoice]:
    """The fits of the candidate kept by the held-out rule (see the module docstring), and the
    AllocationChoice saying which and by how much."""
    fit_half, held_out = split_calibration(calibration)
    targets, probe = sizing.targets, fit_half[::math.ceil(len(fit_half) / SENSITIVITY_BATCHES)]
    scales = _sensitivities(model, targets, per_matrix, probe, calibration_outputs(model, probe))
    candidates = {DEFAULT: per_matrix, "uniform": sizing.uniform(budget),
                  "output sensitivity": sizing.allocate(budget, scales=scales)}
    reference = calibration_outputs(model, held_out)
    errors: dict[str, float] = {}
    for name, fits in candidates.items():
        if fits is None:
            continue
        same = next((k for k in errors if _same(candidates[k], fits)), None)
        if same is not None:
            errors[name] = errors[same]
            continue
        with _substituted(model, targets, fits):
            errors[name] = relative_output_error(model, held_out, reference)
    best = min(errors, key=errors.get)
    chosen = best if errors[best] < (1.0 - MARGIN) * errors[DEFAULT] else DEFAULT
    return candidates[chosen], AllocationChoice(chosen, errors, len(fit_half), len(held_out))


def _same(a: list[Fit], b: list[Fit]) -> bool:
    """Whether two candidates hold the same fits (``Sizing`` fits each allocator point once, so the
    same choice is the same object)."""
    return all(x is y for x, y in zip(a, b))
