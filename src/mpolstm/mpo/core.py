"""The MPO type: a chain of cores, its shapes, canonical forms and entanglement.

A matrix W of shape (I, J), I = i_1*...*i_n, J = j_1*...*j_n, is stored as n cores
G_k of shape (D_{k-1}, i_k, j_k, D_k) with D_0 = D_n = 1:

    W[(i_1..i_n), (j_1..j_n)] = G_1[:, i_1, j_1, :] @ G_2[:, i_2, j_2, :] @ ... @ G_n[:, i_n, j_n, :]

Row index x <-> (i_1, ..., i_n) and column index y <-> (j_1, ..., j_n) in row-major order.
``x @ W`` maps (..., I) -> (..., J). Everything here works on float32/float64 tensors on
any device and is differentiable with autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from .contract import check_cores, cores_to_matrix

__all__ = [
    "MPO",
    "TruncationReport",
    "bond_dims",
    "canonicalize",
    "capped_bond_dims",
    "central_core",
    "check_factors",
    "entropy",
    "factorize",
    "max_bond_dims",
]


def _prime_factors(n: int) -> list[int]:
    primes, p = [], 2
    while p * p <= n:
        while n % p == 0:
            primes.append(p)
            n //= p
        p += 1
    if n > 1:
        primes.append(n)
    return primes


def factorize(n: int, num_factors: int) -> tuple[int, ...]:
    """Split ``n`` into ``num_factors`` integer factors whose product is ``n``.

    The factors are as balanced as the primes of ``n`` allow, with the larger ones in the
    middle (e.g. ``factorize(1024, 4) == (4, 8, 8, 4)``); factors of 1 fill in when ``n``
    has fewer prime factors than requested (``factorize(13, 3) == (1, 13, 1)``).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"factorize: n must be a positive integer, got {n!r}")
    if isinstance(num_factors, bool) or not isinstance(num_factors, int) or num_factors < 1:
        raise ValueError(f"factorize: num_factors must be a positive integer, got {num_factors!r}")
    buckets = [1] * num_factors
    for p in sorted(_prime_factors(n), reverse=True):  # largest prime into the smallest bucket
        buckets[buckets.index(min(buckets))] *= p
    ascending = sorted(buckets)
    # smallest factors at the ends, largest in the middle: a0, a2, a4, ..., a5, a3, a1
    return tuple(ascending[0::2] + ascending[1::2][::-1])


def check_factors(name: str, factors: Sequence[int], total: int, dim_name: str) -> tuple[int, ...]:
    """``factors`` as a tuple of positive ints multiplying to ``total``; ValueError naming ``name`` otherwise."""
    if not isinstance(factors, Sequence) or isinstance(factors, str):
        raise ValueError(f"{name} must be a non-empty sequence of positive integers, got {factors!r}")
    factors = tuple(factors)
    if not factors or any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in factors):
        raise ValueError(f"{name} must be a non-empty sequence of positive integers, got {factors!r}")
    if math.prod(factors) != total:
        raise ValueError(
            f"{name}={factors} multiply to {math.prod(factors)}, expected {total} ({dim_name})"
        )
    return factors


def max_bond_dims(in_factors: Sequence[int], out_factors: Sequence[int]) -> tuple[int, ...]:
    """Largest useful internal bond at each cut: min(prod_{m<=k} i_m j_m, prod_{m>k} i_m j_m)."""
    sizes = [i * j for i, j in zip(in_factors, out_factors)]
    return tuple(
        min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1)
    )


def _qr(a: Tensor, keep_shape: bool) -> tuple[Tensor, Tensor]:
    """a (m, n) = q @ r with orthonormal columns of q. With ``keep_shape`` and m < n, q is
    zero-padded to (m, n) and r to (n, n), so the core shapes never change."""
    m, n = a.shape
    q, r = torch.linalg.qr(a)
    if not keep_shape or m >= n:
        return q, r
    return torch.cat([q, q.new_zeros(m, n - m)], 1), torch.cat([r, r.new_zeros(n - m, n)], 0)


def canonicalize(cores: Sequence[Tensor], center: int, keep_shapes: bool = False) -> list[Tensor]:
    """Mixed-canonical form by QR, centred on core ``center``: cores left of it become
    left-isometries (reshaped (D i j, D') with orthonormal columns), cores right of it
    right-isometries (reshaped (D, i j D') with orthonormal rows); the represented matrix is
    unchanged. Bonds larger than useful shrink, unless ``keep_shapes`` (then every core keeps
    its shape, padded with zeros)."""
    cores = list(cores)
    for k in range(center):  # left-orthogonalize
        d, i, j, e = cores[k].shape
        q, r = _qr(cores[k].reshape(d * i * j, e), keep_shapes)
        cores[k] = q.reshape(d, i, j, q.shape[1])
        nxt = cores[k + 1]
        cores[k + 1] = (r @ nxt.reshape(e, -1)).reshape(r.shape[0], *nxt.shape[1:])
    for k in range(len(cores) - 1, center, -1):  # right-orthogonalize
        d, i, j, e = cores[k].shape
        q, r = _qr(cores[k].reshape(d, i * j * e).T, keep_shapes)
        cores[k] = q.T.reshape(q.shape[1], i, j, e)
        prv = cores[k - 1]
        cores[k - 1] = (prv.reshape(-1, d) @ r.T).reshape(*prv.shape[:3], r.shape[0])
    return cores


def central_core(shapes: Sequence[Sequence[int]]) -> int:
    """Index of the central tensor (MPOP): the core with the most entries (ties: nearest the middle)."""
    n = len(shapes)
    return max(range(n), key=lambda k: (math.prod(shapes[k]), -abs(k - (n - 1) / 2)))


def capped_bond_dims(
    in_factors: Sequence[int], out_factors: Sequence[int], max_bond: int
) -> tuple[int, ...]:
    """Internal bonds of an MPO whose every bond is min(max_bond, largest useful bond)."""
    return tuple(min(max_bond, cap) for cap in max_bond_dims(in_factors, out_factors))


def bond_dims(cores: Sequence[Tensor] | nn.ParameterList) -> tuple[int, ...]:
    """The n-1 internal bond dimensions D_1..D_{n-1} of a chain of cores."""
    return tuple(c.shape[3] for c in cores[:-1])


@dataclass(frozen=True)
class TruncationReport:
    """What a decomposition or truncation achieved.

    rel_error: ||W - W_mpo||_F / ||W||_F of this step (exact, from the discarded spectrum).
    clipped: (bond, requested, used) for each bond where ``max_bond`` exceeded the largest
        useful value and was clipped to it.
    """

    rel_error: float
    max_bond: int | None
    rel_tol: float | None
    clipped: tuple[tuple[int, int, int], ...] = ()


@dataclass(eq=False)
class MPO:
    """A list of cores (D_{k-1}, i_k, j_k, D_k) representing one (I, J) matrix."""

    cores: list[Tensor]
    report: TruncationReport | None = field(default=None)

    def __post_init__(self) -> None:
        self.cores = list(self.cores)
        check_cores(self.cores)

    @property
    def num_cores(self) -> int:
        return len(self.cores)

    @property
    def in_factors(self) -> tuple[int, ...]:
        return tuple(c.shape[1] for c in self.cores)

    @property
    def out_factors(self) -> tuple[int, ...]:
        return tuple(c.shape[2] for c in self.cores)

    @property
    def bond_dims(self) -> tuple[int, ...]:
        """The n-1 internal bond dimensions D_1..D_{n-1}."""
        return bond_dims(self.cores)

    @property
    def shape(self) -> tuple[int, int]:
        return math.prod(self.in_factors), math.prod(self.out_factors)

    @property
    def num_params(self) -> int:
        return sum(c.numel() for c in self.cores)

    @property
    def rel_error(self) -> float | None:
        """Achieved relative error of the decomposition/truncation that produced this MPO."""
        return None if self.report is None else self.report.rel_error

    def to_matrix(self, transpose: bool = False) -> Tensor:
        """Dense W (I, J), or W^T (J, I) with ``transpose=True`` (no extra copy)."""
        return cores_to_matrix(self.cores, transpose=transpose)

    def canonicalize(self, center: int) -> "MPO":
        """Mixed-canonical form by QR: cores left of ``center`` are left-isometries
        (reshaped (D i j, D') with orthonormal columns), cores right of it right-isometries
        (reshaped (D, i j D') with orthonormal rows). ``center`` = 0 or n-1 gives the right-
        or left-canonical form. Returns a new MPO representing the same matrix."""
        n = self.num_cores
        if isinstance(center, bool) or not isinstance(center, int) or not 0 <= center < n:
            raise ValueError(f"center must be an integer in [0, {n - 1}], got {center!r}")
        return MPO(canonicalize(self.cores, center), self.report)

    def truncate(self, max_bond: int | Sequence[int] | None = None, rel_tol: float | None = None) -> "MPO":
        """TT-rounding: orthogonalize, then an SVD sweep dropping the smallest singular values.

        With ``rel_tol=eps`` the result W' satisfies ||W - W'||_F <= eps ||W||_F.
        ``max_bond`` caps every bond (an int) or each internal bond (a sequence of n-1 ints).
        The achieved error is in ``result.report``."""
        from .sweep import truncate

        return truncate(self, max_bond, rel_tol)

    def singular_values(self, bond: int) -> Tensor:
        """Singular values of W unfolded at internal bond ``bond`` (0-based, between core
        ``bond`` and ``bond + 1``), descending."""
        if isinstance(bond, bool) or not isinstance(bond, int) or not 0 <= bond < self.num_cores - 1:
            raise ValueError(f"bond must be an integer in [0, {self.num_cores - 2}], got {bond!r}")
        return self.spectra()[bond]

    def spectra(self) -> list[Tensor]:
        """Singular values at every internal bond (one sweep)."""
        from .sweep import spectra

        return spectra(self)

    def entanglement_entropy(self) -> Tensor:
        """S_k = -sum p log p with p = s^2 / sum s^2 at each internal bond; S_k <= log D_k."""
        return torch.stack([entropy(s) for s in self.spectra()]) if self.num_cores > 1 else torch.zeros(0)

    def __repr__(self) -> str:
        return (
            f"MPO(shape={self.shape}, in_factors={self.in_factors}, out_factors={self.out_factors}, "
            f"bond_dims={self.bond_dims}, num_params={self.num_params})"
        )


def entropy(s: Tensor) -> Tensor:
    """-sum p log p with p = s^2 / sum s^2 (float64 scalar; 0 for an all-zero spectrum)."""
    p = s.double() ** 2
    total = p.sum()
    if total <= 0:
        return torch.zeros((), dtype=torch.float64)
    p = p / total
    p = p[p > 0]
    return (-p * p.log()).sum().clamp_min(0.0)


def clipped_bonds(in_factors, out_factors, max_bond) -> tuple[tuple[int, int, int], ...]:
    """(bond, requested, used) for every bond where ``max_bond`` exceeds the largest useful bond."""
    if max_bond is None:
        return ()
    return tuple(
        (k, max_bond, cap) for k, cap in enumerate(max_bond_dims(in_factors, out_factors)) if max_bond > cap
    )


def check_truncation_args(max_bond, rel_tol) -> None:
    """ValueError unless max_bond is None or a positive int and rel_tol None or in (0, 1)."""
    if max_bond is not None and (isinstance(max_bond, bool) or not isinstance(max_bond, int) or max_bond < 1):
        raise ValueError(f"max_bond must be a positive integer or None, got {max_bond!r}")
    if rel_tol is not None:
        if isinstance(rel_tol, bool) or not isinstance(rel_tol, (int, float)) or not 0 < rel_tol < 1:
            raise ValueError(f"rel_tol must be a number in (0, 1) or None, got {rel_tol!r}")


