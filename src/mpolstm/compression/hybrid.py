"""The hybrid layout "lowrank+sparse": a low-rank product plus a sparse residual.

A weight's matrix M (I, J) (W^T) becomes L + P: L = A B of rank r (the two-core MPO
(I, 1) x (1, J), exactly the "lowrank" layout) and P with k non-zeros at fixed positions.
The fit alternates, in the spirit of OATS (sparse plus low rank under activation scaling):

    P = 0; repeat: L = S^{-1} trunc_r(S (M - P));  R = M - L;
                   P = R on the k positions of largest |R_ia| d_i

with S = (C + damping)^{1/2} the whitening of the inputs' second moment C (calibration; the
identity without) and d_i = S_ii-scale of input i (sqrt of the damped C_ii), so both parts
minimise the output error on the data rather than the weight error. The first truncated SVD
is exact; later ones take one subspace-iteration step from the previous factors (the
residual changes little between iterations), so a 4096 x 1024 matrix costs a few
matrix products per iteration, not an SVD.

Sizes: a weight given p stored numbers and a sparse share s keeps rank
r = max(1, floor((1 - s) p / (I + J))) and k = p - r (I + J) sparse entries (k >= 0). The
sparse part is stored as pruning is: k values plus an index (``mpolstm.storage``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..calibration import apply_whitening
from ..mpo import MPO
from .fit import Fit, balance_first_bond

__all__ = ["HYBRID", "ITERATIONS", "SHARES", "bound_params", "fit_hybrid", "fit_target", "hybrid_sizes"]

HYBRID = "lowrank+sparse"
ITERATIONS = 12
SHARES = (0.0, 0.25, 0.5, 0.7)  # sparse shares tried when none is given


def hybrid_sizes(shape: tuple[int, int], params: int, share: float) -> tuple[int, int]:
    """(rank, sparse entries) for an (I, J) matrix given ``params`` stored numbers."""
    rows, cols = shape
    rank = max(1, min(min(rows, cols), math.floor((1.0 - share) * params / (rows + cols))))
    return rank, max(0, min(rows * cols, params - rank * (rows + cols)))


def _truncate(a: Tensor, rank: int, basis: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(U, s, Vh) of a rank-``rank`` approximation of ``a``: an exact SVD, or one subspace
    iteration from the right basis ``basis`` (J, r) of the previous iteration."""
    if basis is None:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    q, _ = torch.linalg.qr(a @ basis)
    u, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return q @ u, s, vh


def _lowrank_mpo(left: Tensor, s: Tensor, vh: Tensor) -> MPO:
    """The two-core MPO (I, 1) x (1, J) of left diag(s) vh, the two factors equally scaled."""
    root = s.clamp_min(0).sqrt()
    rows, cols, rank = left.shape[0], vh.shape[1], s.numel()
    cores = [(left * root).reshape(1, rows, 1, rank), (root[:, None] * vh).reshape(rank, 1, cols, 1)]
    return MPO(balance_first_bond(cores))


def _largest_entries(residual: Tensor, scale: Tensor, k: int) -> Tensor:
    """The residual kept on its k entries of largest |R_ia| d_i, zero elsewhere."""
    keep = torch.topk((residual.abs() * scale).reshape(-1), k, sorted=False).indices
    sparse = torch.zeros_like(residual).reshape(-1)
    sparse[keep] = residual.reshape(-1)[keep]
    return sparse.reshape(residual.shape)


def fit_hybrid(matrix: Tensor, whitening: tuple[Tensor, Tensor] | None, params: int, share: float,
               iterations: int = ITERATIONS) -> Fit:
    """Low rank plus sparse for M (I, J) within ``params`` stored numbers, ``share`` of them
    sparse (0 <= share <= 1), fitted by ``iterations`` alternations (see the module docstring)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"sparse share must be in [0, 1], got {share!r}")
    m = matrix.to(torch.float64)
    rows, cols = m.shape
    rank, k = hybrid_sizes((rows, cols), params, share)
    s_mat, s_inv = whitening if whitening is not None else (None, None)
    white = m if s_mat is None else apply_whitening(s_mat, m)
    scale = torch.ones(rows, 1, dtype=m.dtype) if s_mat is None else \
        (s_mat if s_mat.dim() == 1 else (s_mat * s_mat).sum(1).sqrt()).to(m.dtype)[:, None]  # sqrt of damped C_ii
    sparse, basis = torch.zeros_like(m), None
    for _ in range(max(1, iterations) if k else 1):
        target = white if not k else white - (sparse if s_mat is None else apply_whitening(s_mat, sparse))
        u, sv, vh = _truncate(target, rank, basis)
        basis = vh.T
        left = u if s_inv is None else apply_whitening(s_inv, u)
        if k:
            sparse = _largest_entries(m - (left * sv) @ vh, scale, k)
    diff = m - (left * sv) @ vh - sparse
    norm = float(white.norm())
    error = float((diff if s_mat is None else apply_whitening(s_mat, diff)).norm()) / norm if norm > 0 else 0.0
    flat = sparse.reshape(-1).nonzero().reshape(-1) if k else torch.zeros(0, dtype=torch.long)
    index = (flat % cols) * rows + flat // cols  # entry (i, j) of M is entry (j, i) of W = M^T
    order = torch.argsort(index)
    return Fit(HYBRID, _lowrank_mpo(left, sv, vh), index[order], sparse.reshape(-1)[flat][order], share, error)


def fit_target(target, params: int, share: float | None, iterations: int = ITERATIONS) -> Fit:
    """The hybrid fit of a compression ``Target`` within ``params`` stored numbers; with
    ``share=None`` every share of ``SHARES`` is fitted and the one with the lowest (output)
    error kept."""
    shares = SHARES if share is None else (share,)
    fits = [fit_hybrid(target.matrix, target.whitening, params, s, iterations) for s in shares]
    return min(fits, key=lambda f: math.inf if f.error is None else f.error)


def bound_params(shape: tuple[int, int], max_bond: int | None, share: float | None) -> int:
    """Stored numbers of a hybrid fit bounded by ``max_bond`` (its rank): the low-rank part's
    r (I + J) grown so that the sparse part is ``share`` of the total (0.5 when not given)."""
    if max_bond is None:
        raise ValueError(f"layout {HYBRID!r} needs a budget (target_ratio / max_params) or max_bond; "
                         "rel_tol does not apply to it")
    share = 0.5 if share is None else share
    if share >= 1.0:
        raise ValueError(f"with max_bond the sparse share of layout {HYBRID!r} must be below 1, got {share}")
    rows, cols = shape
    rank = min(max_bond, rows, cols)
    return min(rows * cols, math.ceil(rank * (rows + cols) / (1.0 - share)))
