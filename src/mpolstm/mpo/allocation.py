"""Bond allocation under a parameter budget, a multiply-add budget, or both: pure math on
singular spectra.

Each weight offers one or more candidate layouts (core count and factors), each with the
singular spectrum at every bond of its exact MPO. For a layout with bonds D the squared
relative error is estimated as 1 - prod_b kept_b(D_b), kept_b(r) being the fraction of
||W||^2 held by the r largest singular values at bond b (exact for two cores, where the MPO
is the truncated SVD). The objective is sum_w scale_w * error_w^2. A point costs its parameters
and its multiply-adds per product with one row (MACs, ``contract.step_macs``) along the deployed
path: the chain merged into two halves at its middle bond.

1. ``tradeoff_curve``: for one layout, shrink from the largest bonds one step at a time,
   always the bond whose step adds the least error per unit of cost saved; every state is a
   point (params, MACs, error^2, bonds).
2. ``allocate``: for each weight, the points of all its layouts that do not exceed its dense
   size form one curve; the lower convex hull of each curve (error against cost, cost = params /
   params budget + MACs / MAC budget, the terms of the budgets given) is walked greedily across
   weights (always the step that adds the least objective per unit of cost saved) until every
   budget holds, first among points whose bonds stay at or above a floor, then, only if the
   budgets need it, among all; what the last step freed is spent on the moves that lower the
   objective most while every budget still holds.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import NoReturn, Sequence

from torch import Tensor

from ..errors import ConfigError, one_of
from .contract import step_macs

__all__ = ["Budget", "ErrorModel", "CurvePoint", "tradeoff_curve", "allocate"]

# Kept energy fractions are rounded to this many decimals: spectra that differ only by float rounding (another
# thread count or CPU capability sums in another order) give the same error models, hence the same allocation;
# exact ties are then broken by order (the first weight, layout and bond).
KEPT_DECIMALS = 12


@dataclass(frozen=True)
class ErrorModel:
    """The estimated error of one layout of a weight as a function of its bonds: sizes[k] =
    i_k j_k per core, caps[b] the largest bond at internal bond b, and kept[b][r] the fraction
    of ||W||^2 kept with r singular values at bond b."""

    sizes: tuple[int, ...]
    caps: tuple[int, ...]
    kept: tuple[tuple[float, ...], ...]
    factors: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # (i_k), (j_k): for MACs
    lookup: bool = False  # a table lookup (embedding), not a product

    @classmethod
    def from_spectra(cls, sizes: Sequence[int], caps: Sequence[int], spectra: Sequence[Tensor],
                     factors: tuple[Sequence[int], Sequence[int]] | None = None, lookup: bool = False
                     ) -> "ErrorModel":
        kept = []
        for s in spectra:
            energy = (s.double() ** 2).cumsum(0)
            total = float(energy[-1]) if energy.numel() else 0.0
            kept.append((0.0, *(round(x, KEPT_DECIMALS) for x in (energy / total).tolist())) if total > 0
                        else (1.0,) * (s.numel() + 1))
        pair = None if factors is None else (tuple(factors[0]), tuple(factors[1]))
        return cls(tuple(sizes), tuple(caps), tuple(kept), pair, lookup)

    def params(self, bonds: Sequence[int]) -> int:
        d = (1, *bonds, 1)
        return sum(d[k] * p * d[k + 1] for k, p in enumerate(self.sizes))

    def macs(self, bonds: Sequence[int]) -> int:
        """Multiply-adds per row as deployed (``contract.step_macs``); without factors, the parameters."""
        if self.factors is None:
            return self.params(bonds)
        return step_macs(*self.factors, bonds, self.lookup)

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
    ``bonds`` are its internal bonds, ``error`` the estimated squared relative error, ``macs`` the
    multiply-adds per product with one row."""

    params: int
    error: float
    option: int
    bonds: tuple[int, ...]
    macs: int = 0


@dataclass(frozen=True)
class Budget:
    """Most parameters and most MACs over all weights (None: no limit of that kind)."""

    max_params: int | None
    max_macs: int | None = None

    def cost(self, p: CurvePoint) -> float:
        """What a point spends of the budgets, as one number."""
        return ((p.params / self.max_params if self.max_params else 0.0)
                + (p.macs / self.max_macs if self.max_macs else 0.0))

    def holds(self, points: Sequence[CurvePoint]) -> bool:
        return ((self.max_params is None or sum(p.params for p in points) <= self.max_params)
                and (self.max_macs is None or sum(p.macs for p in points) <= self.max_macs))


@functools.lru_cache(maxsize=128)
def tradeoff_curve(model: ErrorModel, option: int = 0, budget: Budget | None = None) -> tuple[CurvePoint, ...]:
    """Points from the largest bonds down to all ones, by greedy single-bond shrinking (the step
    adding the least error per unit of ``budget.cost`` saved; default: per parameter). Cached: the
    allocations of one compress (and its candidates) share the curves of a weight."""
    budget = budget or Budget(1)
    counts_macs = budget.max_macs is not None

    def point(bonds: list[int]) -> CurvePoint:
        return CurvePoint(model.params(bonds), model.error(bonds), option, tuple(bonds),
                          model.macs(bonds) if counts_macs else 0)

    bonds = model.feasible(model.caps)
    points = [point(bonds)]
    while any(d > 1 for d in bonds):
        here = budget.cost(points[-1])
        best: tuple[float, CurvePoint] | None = None
        for b, d in enumerate(bonds):
            if d <= 1:
                continue
            trial = point(model.feasible(bonds[:b] + [d - 1] + bonds[b + 1:]))
            rate = (trial.error - points[-1].error) / max(here - budget.cost(trial), 1e-12)
            if best is None or rate < best[0]:
                best = (rate, trial)
        assert best is not None  # some bond is above 1
        bonds = list(best[1].bonds)
        points.append(best[1])
    if not counts_macs:  # the MACs of the points kept, for the report and the MAC budget's check
        points = [replace(p, macs=model.macs(p.bonds)) for p in points]
    return tuple(points)


def _lower_hull(points: Sequence[CurvePoint], budget: Budget) -> list[CurvePoint]:
    """Lower convex hull of (cost, error), from the costliest point to the cheapest."""
    best: dict[float, CurvePoint] = {}
    for p in points:
        c = budget.cost(p)
        if c not in best or p.error < best[c].error:
            best[c] = p
    ordered = sorted(best.values(), key=budget.cost)
    hull: list[CurvePoint] = []
    for p in ordered:
        if hull and p.error >= hull[-1].error:  # costs more, no better: dominated
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            ca, cb, cp = budget.cost(a), budget.cost(b), budget.cost(p)
            if (b.error - a.error) * (cp - cb) >= (p.error - b.error) * (cb - ca):
                hull.pop()  # b lies on or above the chord from a to p
            else:
                break
        hull.append(p)
    return hull[::-1]


def allocate(
    options: Sequence[Sequence[ErrorModel]], scales: Sequence[float], limits: Sequence[int], max_params: int | None,
    floor: int = 1, max_macs: int | None = None,
) -> list[CurvePoint]:
    """Choose one point (layout option + bonds) per weight with total params <= ``max_params`` and
    total MACs <= ``max_macs`` (either may be None, not both).

    options[w]: the error models of weight w's candidate layouts; scales[w]: its weight in the objective;
    limits[w]: most parameters it may keep (its dense size: an MPO never grows a weight);
    floor: no bond is cut below min(floor, its largest value) unless the budgets cannot be met
    otherwise. Raises ValueError naming the smallest possible total when a budget cannot be met."""
    spend = Budget(max_params, max_macs)
    if max_params is None and max_macs is None:
        raise ValueError("allocate needs a parameter budget, a MAC budget, or both")
    curves = []
    for w, models in enumerate(options):
        # a parameter budget's size does not change the curve's order: one curve serves every size
        points = [p for k, model in enumerate(models) for p in tradeoff_curve(model, k, spend if max_macs else None)]
        fitting = [p for p in points if p.params <= limits[w]] or [min(points, key=lambda p: p.params)]
        curves.append(fitting)
    floored = []
    for w, curve in enumerate(curves):
        keep = [p for p in curve if all(b >= min(floor, cap) for b, cap in zip(p.bonds, options[w][p.option].caps))]
        floored.append(keep or curve)
    chosen = _descend([_lower_hull(c, spend) for c in floored], scales, spend)
    if chosen is None:
        chosen = _descend([_lower_hull(c, spend) for c in curves], scales, spend)
    if chosen is None:
        _refuse(curves, spend)
    return _spend(curves, chosen, scales, spend)


def _refuse(curves: list[list[CurvePoint]], spend: Budget) -> NoReturn:
    """The ValueError of budgets that cannot be met, naming the smallest possible totals."""
    params = sum(min(p.params for p in c) for c in curves)
    macs = sum(min(p.macs for p in c) for c in curves)
    if spend.max_params is not None and params > spend.max_params:
        raise ConfigError("max_params", lambda n: (
            f"the budget of {spend.max_params:,} MPO parameters is below the smallest possible ({params:,}, every "
            f"bond 1); {one_of(n.offered(['max_params', 'target_ratio'], ['raise {}', 'lower {}'])) or 'raise it'}"))
    if spend.max_macs is not None and macs > spend.max_macs:
        raise ConfigError("max_macs", lambda n: f"{n.given('max_macs', spend.max_macs)} is below the smallest "
                                                f"possible ({macs:,} multiply-adds per step, every bond 1)")
    raise ValueError(f"no choice of bonds meets both budgets ({spend.max_params:,} parameters and "
                     f"{spend.max_macs:,} multiply-adds); the smallest possible are {params:,} and {macs:,}")


def _descend(hulls: list[list[CurvePoint]], scales: Sequence[float], spend: Budget) -> list[CurvePoint] | None:
    """Walk every hull from its costliest point, always taking the step that adds the least
    objective per unit of cost saved, until every budget holds (None if they never do)."""
    at = [0] * len(hulls)

    def rate(w: int) -> float:
        a, b = hulls[w][at[w]], hulls[w][at[w] + 1]
        return scales[w] * (b.error - a.error) / max(spend.cost(a) - spend.cost(b), 1e-12)

    while not spend.holds([h[i] for h, i in zip(hulls, at)]):
        movable = [w for w in range(len(hulls)) if at[w] + 1 < len(hulls[w])]
        if not movable:
            return None
        w = min(movable, key=rate)
        at[w] += 1
    return [hulls[w][at[w]] for w in range(len(hulls))]


def _spend(curves, chosen: list[CurvePoint], scales: Sequence[float], spend: Budget) -> list[CurvePoint]:
    """Repeatedly take the single move to another curve point that keeps every budget and lowers
    the objective most per unit of added cost."""
    chosen = list(chosen)
    params, macs = sum(p.params for p in chosen), sum(p.macs for p in chosen)
    while True:
        best = None
        for w, curve in enumerate(curves):
            here = chosen[w]
            for p in curve:
                gain = scales[w] * (here.error - p.error)
                over_params = spend.max_params is not None and params - here.params + p.params > spend.max_params
                over_macs = spend.max_macs is not None and macs - here.macs + p.macs > spend.max_macs
                if gain <= 0 or over_params or over_macs:
                    continue
                rate = gain / max(spend.cost(p) - spend.cost(here), 1e-12)
                if best is None or rate > best[0]:
                    best = (rate, w, p)
        if best is None:
            return chosen
        _, w, p = best
        params, macs = params - chosen[w].params + p.params, macs - chosen[w].macs + p.macs
        chosen[w] = p
