"""Output-aware allocation: choose each weight's size by what it does to the model's output.

The per-matrix allocation (``mpo.allocation``) minimises sum_W numel(W) err_W^2 of each weight's
own (output) error; errors of different weights do not add up like that in the model's output
(a recurrent weight's error compounds over the steps, a decoder's over fed-back tokens). With
``CompressionConfig(allocation="output")`` and calibration, compress measures instead (ASVD-like):

1. the calibration outputs of the original model (the first tensor the model returns on every
   call while the calibration runs);
2. for every weight alone and a few candidate ranks around the uniform one (x 0.5, 0.75, 1,
   1.5, 2), the relative squared error of those outputs with only that weight truncated
   (whitened low rank), i.e. the model's sensitivity to it;
3. an allocation of ranks by those sensitivities: from the smallest candidates, repeatedly the
   upgrade that lowers the summed sensitivity most per parameter, while the budget holds;
4. the calibration output error of three complete candidates: the per-matrix allocation,
   uniform ranks (every weight the same ratio) and the sensitivity allocation; the lowest
   wins, so the result is never worse on the calibration data than the other two.

Candidates are evaluated by writing the approximated weights into the model in place and
restoring them afterwards (no module is replaced until the winner is known).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..calibration import Calibration, run_hooked
from ..mpo import MPO
from .layouts import Target, decompose_target

__all__ = ["ALLOCATIONS", "FACTORS", "AllocationChoice", "calibration_outputs", "choose_allocation",
           "relative_output_error"]

ALLOCATIONS = ("error", "output")
FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0)


@dataclass
class AllocationChoice:
    """Which allocation compress kept and the calibration output error (relative squared error
    of the model's outputs) of each candidate."""

    chosen: str
    errors: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {err:.4g}" for name, err in self.errors.items())
        return f"allocation: {self.chosen} (calibration output error: {parts})"


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
def _substituted(model: nn.Module, targets: list[Target], matrices: list[Tensor | None]) -> Iterator[None]:
    """Temporarily write approximated matrices into the model's weights (None: keep the weight)."""
    saved = []
    with torch.no_grad():
        for target, matrix in zip(targets, matrices):
            if matrix is None:
                continue
            module = model.get_submodule(target.module)
            weight = getattr(module, target.weight)
            saved.append((weight, weight.detach().clone()))
            weight.copy_(_torch_form(module, target, matrix))
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, value in saved:
                weight.copy_(value)


def _rank_matrix(target: Target, rank: int) -> tuple[Tensor, int]:
    """(approximated M, params) of the whitened low rank of ``target`` at ``rank``."""
    rows, cols = target.matrix.shape
    mpo = decompose_target(target, ((rows, 1), (1, cols)), min(rank, rows, cols))
    return mpo.to_matrix(), mpo.num_params


def _uniform_ranks(targets: list[Target], budget: int) -> list[int]:
    total = sum(t.dense_params for t in targets)
    return [max(1, math.floor(budget * t.dense_params / total / sum(t.matrix.shape))) for t in targets]


def _greedy(options: list[list[tuple[int, float]]], budget: int) -> list[int]:
    """Index of one (params, error) option per weight: from the smallest, upgrade by the best error
    decrease per parameter while the budget holds (options sorted by params)."""
    pick = [0] * len(options)
    spent = sum(o[0][0] for o in options)
    while True:
        best, gain = None, 0.0
        for w, opts in enumerate(options):
            for j in range(pick[w] + 1, len(opts)):
                extra = opts[j][0] - opts[pick[w]][0]
                drop = opts[pick[w]][1] - opts[j][1]
                if extra > 0 and spent + extra <= budget and drop / extra > gain:
                    best, gain = (w, j), drop / extra
        if best is None:
            return pick
        w, j = best
        spent += options[w][j][0] - options[w][pick[w]][0]
        pick[w] = j


def choose_allocation(model: nn.Module, targets: list[Target], per_matrix: list[tuple[str, MPO]], budget: int,
                      calibration: Calibration) -> tuple[list[tuple[str, MPO]], AllocationChoice]:
    """The (layout, MPO) per target of the candidate with the lowest calibration output error
    (see the module docstring), and the AllocationChoice saying which and by how much."""
    reference = calibration_outputs(model, calibration)
    uniform = _uniform_ranks(targets, budget)
    options = []
    for i, (target, rank) in enumerate(zip(targets, uniform)):
        ranks = sorted({max(1, round(rank * f)) for f in FACTORS})
        opts = []
        for r in ranks:
            matrix, params = _rank_matrix(target, r)
            single = [matrix if k == i else None for k in range(len(targets))]
            with _substituted(model, targets, single):
                opts.append((params, relative_output_error(model, calibration, reference), r))
        options.append(opts)
    picks = _greedy([[(p, e) for p, e, _ in opts] for opts in options], budget)
    candidates = {"per-matrix error": [mpo for _, mpo in per_matrix],
                  "uniform": [_lowrank(t, r) for t, r in zip(targets, uniform)],
                  "output sensitivity": [_lowrank(t, options[i][j][2]) for i, (t, j) in enumerate(zip(targets, picks))]}
    errors = {}
    for name, mpos in candidates.items():
        with _substituted(model, targets, [m.to_matrix() for m in mpos]):
            errors[name] = relative_output_error(model, calibration, reference)
    chosen = min(errors, key=errors.get)
    if chosen == "per-matrix error":
        return per_matrix, AllocationChoice(chosen, errors)
    return [("lowrank", m) for m in candidates[chosen]], AllocationChoice(chosen, errors)


def _lowrank(target: Target, rank: int) -> MPO:
    rows, cols = target.matrix.shape
    return decompose_target(target, ((rows, 1), (1, cols)), min(rank, rows, cols))
