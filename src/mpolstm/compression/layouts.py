"""Candidate layouts of one weight, and their decomposition (optionally whitened by its inputs).

A weight is compressed as the matrix M (I, J) of its layer's MPO convention (W^T for Linear
and recurrent weights, the table for embeddings). A layout is the (in_factors, out_factors)
of its cores:

- "interleaved": the paper's layout, ``num_cores`` balanced factors on both sides, cut
  (i_1 j_1)(i_2 j_2)...: cheap when the matrix has Kronecker-like structure.
- "interleaved-2": the same with two cores.
- "lowrank": (I, 1) x (1, J): two cores whose bond is the rank; this MPO IS the truncated
  SVD, so with it in the search no weight ends worse than truncated SVD at the same count.
- "lowrank-mpo": (I, 1, 1) x (1, j_a, j_b): the low-rank input factor, with the output
  factor itself split into two cores (fewer parameters than low rank when J is large).
- "lowrank+sparse": "lowrank" plus a sparse residual at fixed positions (compression/hybrid.py);
  fitted by alternation, so it is not searched by "auto" (pin it with ``layout=``).

With calibration, the decomposed matrix is A = S M (S = C^{1/2}, C the inputs' second
moment), so truncation minimises the output error ||S (M - M')||_F; M' = S^{-1} A' keeps the
MPO form only when the whole input side sits in the first core, so only "lowrank" and
"lowrank-mpo" are searched then.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..calibration import apply_whitening
from ..mpo import MPO, decompose, factorize, max_bond_dims
from ..mpo.allocation import Layout
from ..mpo.sweep import exact_spectra

__all__ = ["LAYOUTS", "WHITENABLE", "Candidate", "Target", "candidate_factors", "decompose_target", "output_error"]

LAYOUTS = ("interleaved", "interleaved-2", "lowrank", "lowrank-mpo", "lowrank+sparse")
WHITENABLE = ("lowrank", "lowrank-mpo")

Factors = tuple[tuple[int, ...], tuple[int, ...]]


def _useful(factors: Factors) -> bool:
    """At least two cores carry an index (otherwise the MPO cannot compress)."""
    return sum(i * j > 1 for i, j in zip(*factors)) >= 2


def candidate_factors(shape: tuple[int, int], interleaved: Factors, whitened: bool) -> dict[str, Factors]:
    """The layouts to consider for an (I, J) matrix whose paper layout is ``interleaved``."""
    rows, cols = shape
    ja, jb = factorize(cols, 2)
    options: dict[str, Factors] = {
        "interleaved": interleaved,
        "interleaved-2": (factorize(rows, 2), (ja, jb)),
        "lowrank": ((rows, 1), (1, cols)),
        "lowrank-mpo": ((rows, 1, 1), (1, ja, jb)),
    }
    return {name: f for name, f in options.items()
            if _useful(f) and (not whitened or name in WHITENABLE)
            and not (name == "interleaved-2" and f == interleaved)}


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

    @property
    def whitened(self) -> Tensor:
        return self.matrix if self.whitening is None else apply_whitening(self.whitening[0], self.matrix)

    def candidates(self, pinned: str) -> dict[str, Factors]:
        options = candidate_factors(tuple(self.matrix.shape), self.interleaved, self.whitening is not None)
        if pinned == "auto":
            return options
        if pinned not in options:
            why = " (with calibration only lowrank and lowrank-mpo keep the MPO form)" if self.whitening is not None else ""
            raise ValueError(f"layout {pinned!r} does not apply to {self.weight} of shape "
                             f"{tuple(self.matrix.shape)}{why}; possible: {sorted(options)}")
        return {pinned: options[pinned]}


@dataclass
class Candidate:
    """One layout of a target, with its spectra as an allocation ``Layout``."""

    name: str
    factors: Factors
    layout: Layout

    @classmethod
    def of(cls, target: Target, name: str, factors: Factors, max_bond: int | None) -> "Candidate":
        spectra = exact_spectra(target.whitened, *factors)
        caps = [b if max_bond is None else min(b, max_bond) for b in max_bond_dims(*factors)]
        sizes = [i * j for i, j in zip(*factors)]
        return cls(name, factors, Layout.from_spectra(sizes, caps, spectra))


def decompose_target(target: Target, factors: Factors, max_bond, rel_tol: float | None = None) -> MPO:
    """The MPO of M in this layout: TT-SVD of S M truncated by ``max_bond`` (int or per bond)
    / ``rel_tol``, then S^{-1} folded into the first core (which holds the whole input side)."""
    mpo = decompose(target.whitened, *factors, max_bond=max_bond, rel_tol=rel_tol)
    if target.whitening is None:
        return mpo
    first = apply_whitening(target.whitening[1], mpo.cores[0][0].reshape(mpo.cores[0].shape[1], -1))
    return MPO(_balance(first.reshape(mpo.cores[0].shape), mpo.cores[1:]), mpo.report)


def _balance(first: Tensor, rest: list[Tensor]) -> list[Tensor]:
    """Rescale each bond-1 channel so that it has the same norm in the first core and in the
    second (the matrix is unchanged). Folding S^{-1} into the first core leaves the two factors
    of a whitened decomposition badly scaled for gradient training otherwise."""
    if not rest:
        return [first]
    left = first.flatten(0, 2).norm(dim=0)  # (D_1,)
    right = rest[0].flatten(1).norm(dim=1)
    scale = torch.where((left > 0) & (right > 0), (right / left.clamp_min(1e-300)).sqrt(), torch.ones_like(left))
    return [first * scale, rest[0] / scale[:, None, None, None], *rest[1:]]


def output_error(target: Target, mpo: MPO) -> float | None:
    """||S (M - M')||_F / ||S M||_F for a calibrated target (None otherwise)."""
    if target.whitening is None:
        return None
    s = target.whitening[0]
    reference = apply_whitening(s, target.matrix)
    approx = apply_whitening(s, mpo.to_matrix().to(torch.float64))
    norm = float(reference.norm())
    return float((reference - approx).norm()) / norm if norm > 0 else 0.0
