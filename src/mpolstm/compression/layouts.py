"""The table of layouts a weight can take, and their decomposition (optionally whitened by its inputs).

A weight is compressed as the matrix M (I, J) of its layer's MPO convention (W^T for Linear
and recurrent weights, the table for embeddings). A layout is the (in_factors, out_factors)
of its cores. :data:`LAYOUTS` is the one table of them: the engine, the config's docstring and
the CLI help all read it, so a new layout is one entry here.

With calibration, the decomposed matrix is A = S M (S = C^{1/2}, C the inputs' second
moment), so truncation minimises the output error ||S (M - M')||_F; M' = S^{-1} A' keeps the
MPO form only when the whole input side sits in the first core, so only the layouts marked
``whitenable`` are searched then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch
from torch import Tensor

from ..calibration import apply_whitening
from ..mpo import MPO, TruncationReport, decompose, factorize, max_bond_dims
from ..mpo.allocation import ErrorModel
from ..mpo.sweep import exact_spectra
from . import hybrid
from .fit import Fit, balance_first_bond

__all__ = ["LAYOUTS", "LayoutKind", "Candidate", "Fit", "ParamsSized", "Target", "bound_default", "candidate_factors",
           "decompose_target", "describe_layouts", "fit_like"]

Factors = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class ParamsSized:
    """How a layout that the exact spectra cannot size (a sparse part) is fitted: ``fit(target,
    params, share)`` -> Fit within ``params`` stored numbers, ``share`` of them sparse (None:
    searched), and ``params_for_bond(shape, max_bond, share)``, the stored numbers ``max_bond``
    allows. Its ``factors`` are those of its low-rank part, whose spectra stand in for it where a
    curve is needed (output-aware allocation)."""

    fit: Callable[["Target", int, float | None], Fit]
    params_for_bond: Callable[[tuple[int, int], int | None, float | None], int]


@dataclass(frozen=True)
class LayoutKind:
    """One entry of the layout table: its name, what it is (one line), whether it keeps the MPO
    form under calibration's whitening, and ``factors(I, J, interleaved)`` -> its factors for an
    (I, J) matrix whose paper layout is ``interleaved``. ``sized``: None when the MPO's exact
    spectra size it (the allocator's curves, TT-SVD), else how it is fitted to a parameter count
    (it then gets budget in proportion to its weight's size, applies to products, not to table
    lookups, and takes max_bond or a budget, not rel_tol)."""

    name: str
    description: str
    whitenable: bool
    factors: Callable[[int, int, Factors], Factors]
    searched: bool = True  # tried by layout="auto"; False: used only when pinned
    sized: ParamsSized | None = None


def _two(size: int) -> tuple[int, int]:
    return tuple(factorize(size, 2))  # type: ignore[return-value]


LAYOUTS: dict[str, LayoutKind] = {kind.name: kind for kind in (
    LayoutKind("interleaved", "the paper's MPO: num_cores balanced factors per side, cut (i1 j1)(i2 j2)...",
               False, lambda rows, cols, interleaved: interleaved),
    LayoutKind("interleaved-2", "the same with two cores", False,
               lambda rows, cols, interleaved: (_two(rows), _two(cols))),
    LayoutKind("lowrank", "(I, 1) x (1, J): the truncated SVD, the bond is the rank", True,
               lambda rows, cols, interleaved: ((rows, 1), (1, cols))),
    LayoutKind("lowrank-mpo", "(I, 1, 1) x (1, ja, jb): low rank whose output factor is a 2-core MPO", True,
               lambda rows, cols, interleaved: ((rows, 1, 1), (1, *_two(cols)))),
    LayoutKind(hybrid.HYBRID, "low rank plus a sparse residual at fixed positions (compression/hybrid.py); "
               "pinned only, sparse_share of the budget sparse", True,
               lambda rows, cols, interleaved: ((rows, 1), (1, cols)), searched=False,
               sized=ParamsSized(hybrid.fit_target, hybrid.bound_params)),
)}


def describe_layouts() -> str:
    """One line per layout of the table (for docstrings and the CLI help)."""
    return "; ".join(f"{k.name}: {k.description}" + ("" if k.whitenable else " (not with calibration)")
                     for k in LAYOUTS.values())


def bound_default(whitened: bool) -> str:
    """The layout "auto" means under ``max_bond`` alone (no budget to search against): the
    paper's, or with calibration the first whitenable one."""
    return next(k.name for k in LAYOUTS.values() if k.whitenable) if whitened else "interleaved"


def _useful(factors: Factors) -> bool:
    """At least two cores carry an index (otherwise the MPO cannot compress)."""
    return sum(i * j > 1 for i, j in zip(*factors)) >= 2


def candidate_factors(shape: tuple[int, int], interleaved: Factors, whitened: bool) -> dict[str, Factors]:
    """{layout name: factors} to consider for an (I, J) matrix whose paper layout is ``interleaved``
    (layouts that cannot compress, or duplicate the paper's, are left out)."""
    rows, cols = shape
    options = {}
    for kind in LAYOUTS.values():
        factors = kind.factors(rows, cols, interleaved)
        if kind.searched and _useful(factors) and (kind.whitenable or not whitened) and (
                kind.name == "interleaved" or factors != interleaved):
            options[kind.name] = factors
    return options


@dataclass
class Target:
    """One weight to compress: M (I, J) in float64, its paper layout, its dense size (the
    torch weight's entries), and the whitening pair (S, S^{-1}) when calibrated."""

    module: str
    weight: str
    matrix: Tensor
    interleaved: Factors
    dense_params: int
    whitening: tuple[Tensor, Tensor] | None = None
    lookup: bool = False  # an embedding's table: rows are looked up, not multiplied (MACs)

    @property
    def dense_macs(self) -> int:
        """Multiply-adds of one row through the dense weight (0 for a table lookup)."""
        return 0 if self.lookup else self.dense_params

    @cached_property
    def whitened(self) -> Tensor:
        """S M (M itself without calibration), computed once."""
        return self.matrix if self.whitening is None else apply_whitening(self.whitening[0], self.matrix)

    def output_error(self, approx: Tensor) -> float | None:
        """||S (M - M')||_F / ||S M||_F for an approximation M' (I, J) of a calibrated target
        (None without calibration): the relative output error on the calibration inputs."""
        if self.whitening is None:
            return None
        reference = self.whitened
        norm = float(reference.norm())
        diff = reference - apply_whitening(self.whitening[0], approx.to(torch.float64))
        return float(diff.norm()) / norm if norm > 0 else 0.0

    def candidates(self, pinned: str) -> dict[str, Factors]:
        rows, cols = self.matrix.shape
        options = candidate_factors((rows, cols), self.interleaved, self.whitening is not None)
        if pinned == "auto":
            return options
        if pinned not in options:
            whitenable = [k.name for k in LAYOUTS.values() if k.whitenable]
            why = f" (with calibration only {', '.join(whitenable)} keep the MPO form)" if self.whitening is not None else ""
            raise ValueError(f"layout {pinned!r} does not apply to {self.weight} of shape "
                             f"{tuple(self.matrix.shape)}{why}; possible: {sorted(options)}")
        return {pinned: options[pinned]}


@dataclass
class Candidate:
    """One layout of a target: its name (a key of LAYOUTS), factors and error model (the
    estimated error as a function of the bonds, from the exact spectra)."""

    name: str
    factors: Factors
    model: ErrorModel
    _split: MPO | None = field(default=None, repr=False, compare=False)  # one-bond layouts: S M split once

    @classmethod
    def of(cls, target: Target, name: str, factors: Factors, max_bond: int | None) -> "Candidate":
        spectra = exact_spectra(target.whitened, *factors)
        caps = [b if max_bond is None else min(b, max_bond) for b in max_bond_dims(*factors)]
        sizes = [i * j for i, j in zip(*factors)]
        return cls(name, factors, ErrorModel.from_spectra(sizes, caps, spectra, factors, target.lookup))

    def decompose(self, target: Target, bonds: list[int]) -> MPO:
        """``decompose_target`` of ``target`` in this layout at ``bonds``. A layout with one bond (two
        cores: the truncated SVD of S M) is split once at full rank and sliced at each rank asked for
        (the same cores: TT-SVD truncates that split)."""
        if len(bonds) != 1:
            return decompose_target(target, self.factors, bonds)
        if self._split is None:
            self._split = decompose(target.whitened, *self.factors)
        left, right = self._split.cores
        rank = min(bonds[0], left.shape[3])
        spectrum = right.flatten(1).norm(dim=1)  # the singular values: the left core is orthonormal
        norm = float(spectrum.norm())
        error = float(spectrum[rank:].norm()) / norm if norm > 0 else 0.0
        return _unwhitened(target, MPO([left[..., :rank], right[:rank]], TruncationReport(error, bonds[0], None)))


def decompose_target(target: Target, factors: Factors, max_bond, rel_tol: float | None = None) -> MPO:
    """The MPO of M in this layout: TT-SVD of S M truncated by ``max_bond`` (int or per bond)
    / ``rel_tol``, then S^{-1} folded into the first core (which holds the whole input side)."""
    return _unwhitened(target, decompose(target.whitened, *factors, max_bond=max_bond, rel_tol=rel_tol))


def _unwhitened(target: Target, mpo: MPO) -> MPO:
    """The MPO of S M' turned into that of M': S^{-1} folded into the first core, bond balanced."""
    if target.whitening is None:
        return mpo
    first = apply_whitening(target.whitening[1], mpo.cores[0][0].reshape(mpo.cores[0].shape[1], -1))
    return MPO(balance_first_bond([first.reshape(mpo.cores[0].shape), *mpo.cores[1:]]), mpo.report)


def fit_like(target: Target, fit: Fit) -> Fit:
    """``target`` fitted in the layout and at the size of ``fit`` (the same factors and bonds, or
    for a layout sized by parameters the same stored numbers and sparse share)."""
    sized = LAYOUTS[fit.layout].sized
    if sized is not None:
        return sized.fit(target, fit.params, fit.share)
    mpo = fit.mpo
    factors = (tuple(c.shape[1] for c in mpo.cores), tuple(c.shape[2] for c in mpo.cores))
    return Fit(fit.layout, decompose_target(target, factors, list(mpo.bond_dims)))
