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
from dataclasses import dataclass

import torch
from torch import Tensor

from ..calibration import apply_whitening
from ..mpo import MPO

__all__ = ["HYBRID", "ITERATIONS", "SHARES", "HybridFit", "fit_hybrid", "hybrid_sizes"]

HYBRID = "lowrank+sparse"
ITERATIONS = 12
SHARES = (0.0, 0.25, 0.5, 0.7)  # sparse shares tried when none is given


@dataclass
class HybridFit:
    """The fitted parts of one weight: the rank-r MPO of L (input side in the first core),
    the sparse part's flat positions in the torch weight (out, in) = M^T and its values, and
    the relative output (or weight, uncalibrated) error of L + P on the whitened matrix."""

    mpo: MPO
    index: Tensor
    values: Tensor
    error: float
    share: float

    @property
    def params(self) -> int:
        return self.mpo.num_params + self.index.numel()


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
    a = left * root
    b = root[:, None] * vh
    scale = torch.where((a.norm(dim=0) > 0) & (b.norm(dim=1) > 0),
                        (b.norm(dim=1) / a.norm(dim=0).clamp_min(1e-300)).sqrt(), torch.ones_like(root))
    a, b = a * scale, b / scale[:, None]
    rows, cols, rank = a.shape[0], b.shape[1], a.shape[1]
    return MPO([a.reshape(1, rows, 1, rank), b.reshape(rank, 1, cols, 1)])


def fit_hybrid(matrix: Tensor, whitening: tuple[Tensor, Tensor] | None, params: int, share: float,
               iterations: int = ITERATIONS) -> HybridFit:
    """Low rank plus sparse for M (I, J) within ``params`` stored numbers, ``share`` of them
    sparse (0 <= share <= 1), fitted by ``iterations`` alternations (see the module docstring)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"sparse share must be in [0, 1], got {share!r}")
    m = matrix.to(torch.float64)
    rows, cols = m.shape
    rank, k = hybrid_sizes((rows, cols), params, share)
    if whitening is None:
        s_mat, s_inv, scale = None, None, torch.ones(rows, 1, dtype=m.dtype)
    else:
        s_mat, s_inv = whitening
        diag = s_mat if s_mat.dim() == 1 else (s_mat * s_mat).sum(1).sqrt()  # sqrt of the damped C_ii
        scale = diag.to(m.dtype)[:, None]
    white = m if s_mat is None else apply_whitening(s_mat, m)
    sparse = torch.zeros_like(m)
    basis = None
    for _ in range(max(1, iterations) if k else 1):
        target = white if not k else white - (sparse if s_mat is None else apply_whitening(s_mat, sparse))
        u, sv, vh = _truncate(target, rank, basis)
        basis = vh.T
        left = u if s_inv is None else apply_whitening(s_inv, u)
        if not k:
            break
        residual = m - (left * sv) @ vh
        score = (residual.abs() * scale).reshape(-1)
        keep = torch.topk(score, k, sorted=False).indices
        sparse = torch.zeros_like(m).reshape(-1)
        sparse[keep] = residual.reshape(-1)[keep]
        sparse = sparse.reshape(rows, cols)
    approx = (left * sv) @ vh + sparse
    diff = m - approx
    err_num = diff if s_mat is None else apply_whitening(s_mat, diff)
    norm = float(white.norm())
    flat = sparse.reshape(-1).nonzero().reshape(-1) if k else torch.zeros(0, dtype=torch.long)
    i, j = flat // cols, flat % cols  # M = W^T: entry (i, j) of M is entry (j, i) of W
    index = j * rows + i
    order = torch.argsort(index)
    return HybridFit(_lowrank_mpo(left, sv, vh), index[order], sparse.reshape(-1)[flat][order],
                     float(err_num.norm()) / norm if norm > 0 else 0.0, share)


def fit_target(target, params: int, share: float | None, iterations: int = ITERATIONS) -> HybridFit:
    """The hybrid fit of a compression ``Target`` within ``params`` stored numbers; with
    ``share=None`` every share of ``SHARES`` is fitted and the one with the lowest (output)
    error kept."""
    shares = SHARES if share is None else (share,)
    fits = [fit_hybrid(target.matrix, target.whitening, params, s, iterations) for s in shares]
    return min(fits, key=lambda f: f.error)


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


def whitened_error(target, weight: Tensor) -> float | None:
    """||S (M - W'^T)||_F / ||S M||_F for the rebuilt torch weight W' (out, in) of a calibrated
    target (None without calibration)."""
    if target.whitening is None:
        return None
    s = target.whitening[0]
    reference = apply_whitening(s, target.matrix)
    norm = float(reference.norm())
    diff = apply_whitening(s, target.matrix - weight.to(target.matrix).reshape(weight.shape[0], -1).T)
    return float(diff.norm()) / norm if norm > 0 else 0.0
