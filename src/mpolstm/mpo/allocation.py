"""Bond allocation under a parameter budget: pure math on singular spectra.

Each weight offers one or more candidate layouts (core count and factors), each with the
singular spectrum at every bond of its exact MPO. For a layout with bonds D the squared
relative error is estimated as 1 - prod_b kept_b(D_b), kept_b(r) being the fraction of
||W||^2 held by the r largest singular values at bond b (exact for two cores, where the MPO
is the truncated SVD). The objective is sum_w scale_w * error_w^2.

1. ``tradeoff_curve``: for one layout, shrink from the largest bonds one step at a time,
   always the bond whose step adds the least error per parameter saved; every state is a
   point (params, error^2, bonds).
2. ``allocate``: for each weight, the points of all its layouts that do not exceed its dense
   size form one curve; the lower convex hull of each curve is walked greedily across weights
   (always the step that adds the least objective per parameter saved) until the budget
   holds, first among points whose bonds stay at or above a floor, then, only if the budget
   needs it, among all; what the last step freed is spent on the single move that lowers
   the objective most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from torch import Tensor

__all__ = ["ErrorModel", "CurvePoint", "tradeoff_curve", "allocate"]


@dataclass(frozen=True)
class ErrorModel:
    """The estimated error of one layout of a weight as a function of its bonds: sizes[k] =
    i_k j_k per core, caps[b] the largest bond at internal bond b, and kept[b][r] the fraction
    of ||W||^2 kept with r singular values at bond b."""

    sizes: tuple[int, ...]
    caps: tuple[int, ...]
    kept: tuple[tuple[float, ...], ...]

    @classmethod
    def from_spectra(cls, sizes: Sequence[int], caps: Sequence[int], spectra: Sequence[Tensor]) -> "ErrorModel":
        kept = []
        for s in spectra:
            energy = (s.double() ** 2).cumsum(0)
            total = float(energy[-1]) if energy.numel() else 0.0
            kept.append((0.0, *(energy / total).tolist()) if total > 0 else (1.0,) * (s.numel() + 1))
        return cls(tuple(sizes), tuple(caps), tuple(kept))

    def params(self, bonds: Sequence[int]) -> int:
        d = (1, *bonds, 1)
        return sum(d[k] * p * d[k + 1] for k, p in enumerate(self.sizes))

    def error(self, bonds: Sequence[int]) -> float:
        """Estimated squared relative error with these bonds."""
        return 1.0 - math.prod(self._kept(b, r) for b, r in enumerate(bonds))

    def _kept(self, bond: int, rank: int) -> float:
        row = self.kept[bond]
        return row[min(rank, len(row) - 1)]

    def feasible(self, bonds: Sequence[int]) -> list[int]:
        """Bonds clipped to D_b <= D_{b-1} i_b j_b and D_b <= D_{b+1} i_{b+1} j_{b+1}
        (larger bonds only waste parameters)."""
        d = list(bonds)
        for b in range(len(d)):
            d[b] = min(d[b], (d[b - 1] if b else 1) * self.sizes[b])
        for b in reversed(range(len(d))):
            d[b] = min(d[b], (d[b + 1] if b + 1 < len(d) else 1) * self.sizes[b + 1])
        return d


@dataclass(frozen=True)
class CurvePoint:
    """One point of a weight's trade-off: ``option`` indexes the candidate layouts of the weight,
    ``bonds`` are its internal bonds, ``error`` the estimated squared relative error."""

    params: int
    error: float
    option: int
    bonds: tuple[int, ...]


def tradeoff_curve(model: ErrorModel, option: int = 0) -> list[CurvePoint]:
    """Points from the largest bonds down to all ones, by greedy single-bond shrinking."""
    bonds = model.feasible(model.caps)
    points = [CurvePoint(model.params(bonds), model.error(bonds), option, tuple(bonds))]
    while any(d > 1 for d in bonds):
        here = points[-1]
        best = None
        for b, d in enumerate(bonds):
            if d <= 1:
                continue
            trial = model.feasible(bonds[:b] + [d - 1] + bonds[b + 1:])
            saved = here.params - model.params(trial)
            rate = (model.error(trial) - here.error) / max(saved, 1)
            if best is None or rate < best[0]:
                best = (rate, trial)
        bonds = best[1]
        points.append(CurvePoint(model.params(bonds), model.error(bonds), option, tuple(bonds)))
    return points


def _lower_hull(points: Sequence[CurvePoint]) -> list[CurvePoint]:
    """Lower convex hull of (params, error), from most to fewest parameters."""
    best: dict[int, CurvePoint] = {}
    for p in points:
        if p.params not in best or p.error < best[p.params].error:
            best[p.params] = p
    ordered = sorted(best.values(), key=lambda p: p.params)
    hull: list[CurvePoint] = []
    for p in ordered:
        if hull and p.error >= hull[-1].error:  # more params, no better: dominated
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (b.error - a.error) * (p.params - b.params) >= (p.error - b.error) * (b.params - a.params):
                hull.pop()  # b lies on or above the chord from a to p
            else:
                break
        hull.append(p)
    return hull[::-1]


def allocate(
    options: Sequence[Sequence[ErrorModel]], scales: Sequence[float], limits: Sequence[int], budget: int,
    floor: int = 1,
) -> list[CurvePoint]:
    """Choose one point (layout option + bonds) per weight with total params <= ``budget``.

    options[w]: the error models of weight w's candidate layouts; scales[w]: its weight in the objective;
    limits[w]: most parameters it may keep (its dense size: an MPO never grows a weight);
    floor: no bond is cut below min(floor, its largest value) unless the budget cannot be met
    otherwise. Raises ValueError when even the smallest points exceed the budget."""
    curves = []
    for w, models in enumerate(options):
        points = [p for k, model in enumerate(models) for p in tradeoff_curve(model, k)]
        fitting = [p for p in points if p.params <= limits[w]] or [min(points, key=lambda p: p.params)]
        curves.append(fitting)
    floored = []
    for w, curve in enumerate(curves):
        keep = [p for p in curve if all(b >= min(floor, cap) for b, cap in zip(p.bonds, options[w][p.option].caps))]
        floored.append(keep or curve)
    chosen = _descend([_lower_hull(c) for c in floored], scales, budget)
    if chosen is None:
        chosen = _descend([_lower_hull(c) for c in curves], scales, budget)
    if chosen is None:
        smallest = sum(min(p.params for p in c) for c in curves)
        raise ValueError(f"the budget of {budget:,} MPO parameters is below the smallest possible "
                         f"({smallest:,}, every bond 1); raise max_params or lower target_ratio")
    return _spend(curves, chosen, scales, budget - sum(p.params for p in chosen))


def _descend(hulls: list[list[CurvePoint]], scales: Sequence[float], budget: int) -> list[CurvePoint] | None:
    """Walk every hull from its largest point, always taking the step that adds the least
    objective per parameter saved, until the total fits ``budget`` (None if it never does)."""
    at = [0] * len(hulls)
    total = sum(h[0].params for h in hulls)

    def rate(w: int) -> float:
        a, b = hulls[w][at[w]], hulls[w][at[w] + 1]
        return scales[w] * (b.error - a.error) / (a.params - b.params)

    while total > budget:
        movable = [w for w in range(len(hulls)) if at[w] + 1 < len(hulls[w])]
        if not movable:
            return None
        w = min(movable, key=rate)
        total -= hulls[w][at[w]].params - hulls[w][at[w] + 1].params
        at[w] += 1
    return [hulls[w][at[w]] for w in range(len(hulls))]


def _spend(curves, chosen: list[CurvePoint], scales: Sequence[float], slack: int) -> list[CurvePoint]:
    """Repeatedly take the single move to another curve point that fits in ``slack`` and
    lowers the objective most per added parameter."""
    chosen = list(chosen)
    while True:
        best = None
        for w, curve in enumerate(curves):
            here = chosen[w]
            for p in curve:
                extra = p.params - here.params
                gain = scales[w] * (here.error - p.error)
                if 0 < extra <= slack and gain > 0 and (best is None or gain / extra > best[0]):
                    best = (gain / extra, w, p)
        if best is None:
            return chosen
        _, w, p = best
        slack -= p.params - chosen[w].params
        chosen[w] = p
