"""The decomposition sweep: TT-SVD of a matrix into an MPO, and TT-rounding of an MPO.

Both run one left-to-right sweep of truncated factorisations (``_sweep``); each step keeps the
fewest singular values whose discarded tail energy stays under the per-bond tolerance, capped
by the bond limit, and records the spectrum and the discarded energy, so the achieved error is
exact.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .core import MPO, TruncationReport, canonicalize, check_factors, check_truncation_args, clipped_bonds

__all__ = ["decompose", "exact_spectra", "truncate", "spectra"]

# Smallest cols/rows ratio of an unfolding for the Gram route (its m^3 eigh in float64
# must stay small next to the SVD's 4 m^2 cols): measured with benchmarks/bench_mpo.py.
_GRAM_MIN_ASPECT = 2


def _rank_to_keep(s: Tensor, max_bond: int | None, delta: float | None) -> int:
    """Smallest rank whose discarded tail energy is <= delta^2, capped by max_bond."""
    rank = s.numel()
    if delta is not None:
        tail = (s.double() ** 2).flip(0).cumsum(0).flip(0)  # tail[r] = sum_{k>=r} s_k^2
        rank = int((tail > delta**2).sum())
    if max_bond is not None:
        rank = min(rank, max_bond)
    return max(rank, 1)


def _split(a: Tensor, max_bond: int | None, delta: float | None) -> tuple[Tensor, Tensor, Tensor, float]:
    """Truncated factorisation a ~= u @ rest of one unfolding (u with orthonormal columns).

    Returns (u, rest, singular values of a, discarded energy ||a - u rest||_F^2). A wide
    unfolding (rows <= cols / _GRAM_MIN_ASPECT) is split through its Gram matrix a a^T formed
    and diagonalised in float64: the eigenvalues are the squared singular values to ~1e-16 of
    ||a||^2, the eigenvectors an orthonormal u, and rest = u^T a is the exact projection, so
    rank choice, discarded energy and the rel_tol guarantee are as with the SVD (only singular
    values below ~1e-8 ||a|| lose relative accuracy, which no truncation reads): LAPACK's SVD
    of such a wide matrix is several times slower (docs/benchmarks.md). Other unfoldings take
    the SVD of the tall orientation, the faster of the two."""
    m, cols = a.shape
    if m * _GRAM_MIN_ASPECT <= cols:
        wide = a.double()
        energy, basis = torch.linalg.eigh(wide @ wide.T)
        energy, basis = energy.flip(0).clamp_min(0.0), basis.flip(1)  # descending
        s = energy.sqrt()
        r = _rank_to_keep(s, max_bond, delta)
        u = basis[:, :r].to(a.dtype)
        return u, u.T @ a, s.to(a.dtype), float(energy[r:].sum())
    if m <= cols:
        vt, s, ut = torch.linalg.svd(a.T, full_matrices=False)
        u, vh = ut.T, vt.T
    else:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
    r = _rank_to_keep(s, max_bond, delta)
    return u[:, :r], s[:r, None] * vh[:r], s, float((s[r:].double() ** 2).sum())


def _sweep(
    head: Tensor,
    tails: Sequence[Tensor] | None,
    in_factors: Sequence[int],
    out_factors: Sequence[int],
    caps: Sequence[int | None],
    delta: float | None,
) -> tuple[list[Tensor], list[Tensor], float]:
    """The one left-to-right sweep. ``head`` (i_1 j_1, X) is what remains to split; at bond k
    the unfolding (D_k i_k j_k, X) is split into core k and a carry (D_{k+1}, X), and the next
    head is the carry itself (``tails`` None: decomposing a full tensor) or carry @ tails[k]
    (rounding an MPO whose cores k+1.. are right-orthogonal; tails[k] is core k+1 as (D, rest)).

    Returns (cores, singular values at each bond before truncation, discarded energy)."""
    cores, spectra, discarded = [], [], 0.0
    d = 1
    for k in range(len(in_factors) - 1):
        i, j = in_factors[k], out_factors[k]
        u, carry, s, tail = _split(head.reshape(d * i * j, -1), caps[k], delta)
        cores.append(u.reshape(d, i, j, u.shape[1]))
        spectra.append(s.detach())
        discarded += tail
        d = u.shape[1]
        head = carry if tails is None else carry @ tails[k]
    cores.append(head.reshape(d, in_factors[-1], out_factors[-1], 1))
    return cores, spectra, discarded


def decompose(
    matrix: Tensor,
    in_factors: Sequence[int],
    out_factors: Sequence[int],
    *,
    max_bond: int | Sequence[int] | None = None,
    rel_tol: float | None = None,
) -> MPO:
    """TT-SVD of ``matrix`` (I, J) into an MPO with the given row/column factors.

    The 2n-index tensor is regrouped (i_1 j_1)(i_2 j_2)... and split by a sweep of SVDs.
    ``max_bond`` caps every bond (an int; requests above the largest useful bond are clipped
    and listed in ``report.clipped``) or each internal bond (n-1 ints); ``rel_tol=eps`` truncates each bond at
    eps ||W||_F / sqrt(n-1), which guarantees ||W - W_mpo||_F <= eps ||W||_F. With neither,
    the decomposition is exact. The achieved relative error is ``result.report.rel_error``.
    """
    if not isinstance(matrix, Tensor) or matrix.dim() != 2:
        raise ValueError(f"matrix must be a 2-D tensor, got {type(matrix).__name__} "
                         f"{tuple(getattr(matrix, 'shape', ()))}")
    if matrix.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"matrix must be float32 or float64, got dtype {matrix.dtype} (convert it with .float())")
    rows, cols = matrix.shape
    in_factors = check_factors("in_factors", in_factors, rows, "the matrix's row count")
    out_factors = check_factors("out_factors", out_factors, cols, "the matrix's column count")
    if len(in_factors) != len(out_factors):
        raise ValueError(
            f"in_factors and out_factors must have the same length (one pair per core), got "
            f"{len(in_factors)} and {len(out_factors)}"
        )
    check_truncation_args(None, rel_tol)
    caps = _caps(len(in_factors), max_bond)
    # One float64 reduction gives the norm; it is finite iff every entry is (the entry-wise
    # check only runs to tell a float64 overflow from a NaN/inf).
    norm = float(torch.linalg.vector_norm(matrix, dtype=torch.float64))
    if not math.isfinite(norm) and not bool(torch.isfinite(matrix).all()):
        raise ValueError("matrix contains NaN or inf; expected finite values")

    n = len(in_factors)
    delta = None if rel_tol is None else rel_tol * norm / math.sqrt(max(n - 1, 1))
    cores, _, discarded = _sweep(_interleave(matrix, in_factors, out_factors), None, in_factors, out_factors,
                                 caps, delta)
    err = math.sqrt(discarded) / norm if norm > 0 else 0.0
    single = max_bond if isinstance(max_bond, int) else None
    return MPO(cores, TruncationReport(err, single, rel_tol, clipped_bonds(in_factors, out_factors, single)))


def _interleave(matrix: Tensor, in_factors: Sequence[int], out_factors: Sequence[int]) -> Tensor:
    """The (I, J) matrix as the (i_1 j_1)(i_2 j_2)... tensor, flattened to (1, I J)."""
    n = len(in_factors)
    tensor = matrix.reshape(*in_factors, *out_factors)
    return tensor.permute(*[p for k in range(n) for p in (k, n + k)]).reshape(1, -1)


def exact_spectra(matrix: Tensor, in_factors: Sequence[int], out_factors: Sequence[int]) -> list[Tensor]:
    """Singular values of every unfolding of ``matrix`` in this layout, descending: at cut k the
    (i_1 j_1 .. i_k j_k, rest) unfolding, each from the eigenvalues of its smaller Gram matrix in
    float64 (no vectors, no sweep: the values an untruncated TT-SVD would find)."""
    with torch.no_grad():
        tensor = _interleave(matrix, in_factors, out_factors).double()
        out, rows = [], 1
        for i, j in zip(in_factors[:-1], out_factors[:-1]):
            rows *= i * j
            a = tensor.reshape(rows, -1)
            gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
            out.append(torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0).sqrt().to(matrix.dtype))
        return out


def _caps(num_cores: int, max_bond: int | Sequence[int] | None) -> list[int | None]:
    """One cap per internal bond from an int, a sequence of n-1 ints, or None."""
    if max_bond is None or isinstance(max_bond, str) or not isinstance(max_bond, Sequence):
        check_truncation_args(max_bond, None)
        return [max_bond] * (num_cores - 1)
    caps: list[int | None] = list(max_bond)
    if len(caps) != num_cores - 1:
        raise ValueError(f"max_bond has {len(caps)} entries, expected one per internal bond ({num_cores - 1})")
    for cap in caps:
        check_truncation_args(cap, None)
    return caps


def _round(mpo: MPO, caps: Sequence[int | None], delta_of_norm) -> tuple[list[Tensor], list[Tensor], float, float]:
    """Right-canonicalise, then sweep: (cores, spectra, discarded energy, ||W||_F)."""
    cores = canonicalize(mpo.cores, 0)
    norm = float(cores[0].norm())
    tails = [c.reshape(c.shape[0], -1) for c in cores[1:]]
    head = cores[0].reshape(cores[0].shape[1] * cores[0].shape[2], -1)
    new, spectra, discarded = _sweep(head, tails, mpo.in_factors, mpo.out_factors, caps, delta_of_norm(norm))
    return new, spectra, discarded, norm


def truncate(mpo: MPO, max_bond: int | Sequence[int] | None = None, rel_tol: float | None = None) -> MPO:
    """TT-rounding (see ``MPO.truncate``)."""
    caps = _caps(mpo.num_cores, max_bond)
    check_truncation_args(None, rel_tol)
    scale = math.sqrt(max(mpo.num_cores - 1, 1))
    cores, _, discarded, norm = _round(mpo, caps, lambda norm: None if rel_tol is None else rel_tol * norm / scale)
    err = math.sqrt(discarded) / norm if norm > 0 else 0.0
    single = max_bond if isinstance(max_bond, int) else None
    return MPO(cores, TruncationReport(err, single, rel_tol, clipped_bonds(mpo.in_factors, mpo.out_factors, single)))


def spectra(mpo: MPO) -> list[Tensor]:
    """Singular values of W at every internal bond, descending (one sweep, no truncation)."""
    with torch.no_grad():
        return _round(mpo, [None] * (mpo.num_cores - 1), lambda norm: None)[1]
