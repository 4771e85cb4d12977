"""How large each weight's fit is: layouts and bonds allocated under budgets, or bounded by
``max_bond`` / ``rel_tol``. Every answer is one :class:`~.fit.Fit` per target, whatever the layout.

Budget mode: every candidate layout of a weight offers an error-versus-cost curve from the exact
spectra of its (whitened) matrix (``layouts.Candidate``, computed once per weight and kept);
``mpo.allocation.allocate`` picks one point per weight minimising sum_W scale_W err_W^2 under the
budgets. The default scales are the weights' sizes (the per-matrix objective); output-aware
allocation passes measured output sensitivities instead. A layout the spectra cannot size
(``LayoutKind.sized``: a sparse part) gets, by default, budget in proportion to its weight's size;
with given scales it joins the allocator on its low-rank part's curve, and is then fitted to the
stored numbers of the chosen point.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ..mpo.allocation import CurvePoint, allocate
from .fit import Fit
from .layouts import LAYOUTS, Candidate, LayoutKind, Target, bound_default, decompose_target

if TYPE_CHECKING:
    from .config import ModuleSettings

__all__ = ["FLOOR_BOND", "Sizing"]

# A bond is not cut below this (or its largest useful value) unless the budget forces it.
FLOOR_BOND = 2


class Sizing:
    """The targets with their settings, and their layout candidates (exact spectra, computed
    when first needed, then kept): ``allocate`` / ``uniform`` under a budget, ``bounded`` without."""

    def __init__(self, targets: Sequence[Target], settings: dict[str, ModuleSettings]) -> None:
        self.targets = list(targets)
        self.settings = [settings[t.module] for t in self.targets]
        self.sizes = [t.dense_params for t in self.targets]
        self._candidates: list[list[Candidate] | None] = [None] * len(self.targets)
        self._fits: dict[tuple, Fit] = {}

    def kind(self, i: int) -> LayoutKind | None:
        """The layout target ``i`` is pinned to (None for "auto")."""
        return LAYOUTS.get(self.settings[i].layout)

    def sized_by_params(self, i: int) -> bool:
        kind = self.kind(i)
        return kind is not None and kind.sized is not None

    def candidates(self, i: int) -> list[Candidate]:
        candidates = self._candidates[i]
        if candidates is None:
            target, settings, kind = self.targets[i], self.settings[i], self.kind(i)
            if kind is not None and kind.sized is not None:  # its low-rank part's curve
                rows, cols = target.matrix.shape
                options = {kind.name: kind.factors(rows, cols, target.interleaved)}
            else:
                options = target.candidates(settings.layout)
            candidates = [Candidate.of(target, name, f, settings.max_bond) for name, f in options.items()]
            self._candidates[i] = candidates
        return candidates

    def fit_params(self, i: int, params: int) -> Fit:
        """Target ``i`` (pinned to a layout sized by parameters) fitted within ``params`` stored numbers."""
        kind = self.kind(i)
        assert kind is not None and kind.sized is not None  # sized_by_params(i)
        return kind.sized.fit(self.targets[i], params, self.settings[i].sparse_share)

    def fit_point(self, i: int, point: CurvePoint) -> Fit:
        """Target ``i`` fitted at an allocator point of its candidates (each point fitted once:
        several allocations of one compress often share points)."""
        key = (i, point.option, point.bonds, point.params)
        if key not in self._fits:
            candidate = self.candidates(i)[point.option]
            self._fits[key] = self.fit_params(i, point.params) if self.sized_by_params(i) else \
                Fit(candidate.name, candidate.decompose(self.targets[i], list(point.bonds)))
        return self._fits[key]

    def allocate(self, budget: int | None, max_macs: int | None = None,
                 scales: Sequence[float] | None = None) -> list[Fit]:
        """One Fit per target under the parameter and / or MAC budgets; ``scales`` (default: the
        weights' sizes, layouts sized by parameters then proportional) weight the objective."""
        fits: list[Fit | None] = [None] * len(self.targets)
        if scales is None:
            total = sum(self.sizes)
            for i in filter(self.sized_by_params, range(len(self.targets))):
                kind = self.kind(i)
                assert kind is not None  # sized_by_params(i)
                if budget is None:
                    raise ValueError(f"layout {kind.name!r} needs a parameter budget (target_ratio or "
                                     "max_params)")
                fits[i] = self.fit_params(i, int(budget * self.sizes[i] / total))
            spent = sum(f.params for f in fits if f is not None)  # a sparse entry costs one multiply-add
            budget = None if budget is None else budget - spent
            max_macs = None if max_macs is None else max_macs - spent
            scales = self.sizes
        rest = [i for i, f in enumerate(fits) if f is None]
        if rest:
            points = allocate([[c.model for c in self.candidates(i)] for i in rest], scales=[scales[i] for i in rest],
                              limits=[self.sizes[i] for i in rest], max_params=budget, floor=FLOOR_BOND,
                              max_macs=max_macs)
            for i, point in zip(rest, points):
                fits[i] = self.fit_point(i, point)
        return fits  # type: ignore[return-value]

    def uniform(self, budget: int) -> list[Fit] | None:
        """Every weight at the same ratio (budget in proportion to its size), each in its best
        layout at that size; None when some weight cannot be made that small."""
        total, fits = sum(self.sizes), []
        for i, size in enumerate(self.sizes):
            share = int(budget * size / total)
            if self.sized_by_params(i):
                fits.append(self.fit_params(i, share))
                continue
            try:
                point = allocate([[c.model for c in self.candidates(i)]], scales=[1.0], limits=[size], max_params=share,
                                 floor=FLOOR_BOND)[0]
            except ValueError:
                return None
            fits.append(self.fit_point(i, point))
        return fits

    def bounded(self) -> list[Fit]:
        """One Fit per target under its max_bond / rel_tol: the layout with the fewest parameters."""
        return [self._bounded(i) for i in range(len(self.targets))]

    def _bounded(self, i: int) -> Fit:
        target, settings, kind = self.targets[i], self.settings[i], self.kind(i)
        if kind is not None and kind.sized is not None:
            rows, cols = target.matrix.shape
            params = kind.sized.params_for_bond((rows, cols), settings.max_bond, settings.sparse_share)
            return self.fit_params(i, params)
        layout = settings.layout
        if layout == "auto" and settings.rel_tol is None:
            layout = bound_default(target.whitening is not None)
        options = [Fit(name, decompose_target(target, f, settings.max_bond, settings.rel_tol))
                   for name, f in target.candidates(layout).items()]
        return min(options, key=lambda fit: fit.params)
