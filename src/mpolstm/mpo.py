"""Matrix Product Operators: pure tensor functions (no nn.Module).

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
from typing import Literal, Sequence

import torch
from torch import Tensor

__all__ = [
    "MPO",
    "TruncationReport",
    "factorize",
    "decompose",
    "cores_to_matrix",
    "mpo_matmul",
    "matmul_cost",
    "max_bond_dims",
    "capped_bond_dims",
]

Strategy = Literal["auto", "cores", "rebuild"]


# ----------------------------------------------------------------------------- factors


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


def _check_factors(name: str, factors: Sequence[int], total: int, dim_name: str) -> tuple[int, ...]:
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


# ----------------------------------------------------------------------------- MPO class


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
        _check_cores(self.cores)

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
        return tuple(c.shape[3] for c in self.cores[:-1])

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
        return MPO(_canonicalize(self.cores, center), self.report)

    def truncate(self, max_bond: int | Sequence[int] | None = None, rel_tol: float | None = None) -> "MPO":
        """TT-rounding: orthogonalize, then an SVD sweep dropping the smallest singular values.

        With ``rel_tol=eps`` the result W' satisfies ||W - W'||_F <= eps ||W||_F.
        ``max_bond`` caps every bond (an int) or each internal bond (a sequence of n-1 ints).
        The achieved error is in ``result.report``."""
        caps = self._bond_caps(max_bond)
        _check_truncation_args(None, rel_tol)
        cores = _canonicalize(self.cores, 0)
        norm = cores[0].norm()
        delta = None if rel_tol is None else rel_tol * float(norm) / math.sqrt(max(self.num_cores - 1, 1))
        cores, _, discarded = _svd_sweep(cores, caps, delta)
        err = math.sqrt(sum(discarded)) / float(norm) if float(norm) > 0 else 0.0
        single = max_bond if isinstance(max_bond, int) else None
        clipped = _clipped(self.in_factors, self.out_factors, single)
        return MPO(cores, TruncationReport(err, single, rel_tol, clipped))

    def _bond_caps(self, max_bond: int | Sequence[int] | None) -> list[int | None]:
        if max_bond is None or isinstance(max_bond, int):
            _check_truncation_args(max_bond, None)
            return [max_bond] * (self.num_cores - 1)
        caps = list(max_bond)
        if len(caps) != self.num_cores - 1:
            raise ValueError(f"max_bond has {len(caps)} entries, expected one per internal bond ({self.num_cores - 1})")
        for cap in caps:
            _check_truncation_args(cap, None)
        return caps

    def singular_values(self, bond: int) -> Tensor:
        """Singular values of W unfolded at internal bond ``bond`` (0-based, between core
        ``bond`` and ``bond + 1``), descending."""
        if isinstance(bond, bool) or not isinstance(bond, int) or not 0 <= bond < self.num_cores - 1:
            raise ValueError(f"bond must be an integer in [0, {self.num_cores - 2}], got {bond!r}")
        return self.spectra()[bond]

    def spectra(self) -> list[Tensor]:
        """Singular values at every internal bond (one sweep)."""
        with torch.no_grad():
            _, spectra, _ = _svd_sweep(_canonicalize(self.cores, 0), [None] * (self.num_cores - 1), None)
        return spectra

    def entanglement_entropy(self) -> Tensor:
        """S_k = -sum p log p with p = s^2 / sum s^2 at each internal bond; S_k <= log D_k."""
        return torch.stack([_entropy(s) for s in self.spectra()]) if self.num_cores > 1 else torch.zeros(0)

    def __repr__(self) -> str:
        return (
            f"MPO(shape={self.shape}, in_factors={self.in_factors}, out_factors={self.out_factors}, "
            f"bond_dims={self.bond_dims}, num_params={self.num_params})"
        )


def _check_cores(cores: Sequence[Tensor]) -> None:
    if len(cores) == 0:
        raise ValueError("an MPO needs at least one core")
    for k, c in enumerate(cores):
        if c.dim() != 4:
            raise ValueError(f"core {k} must be 4-D (D_prev, i, j, D_next), got shape {tuple(c.shape)}")
    if cores[0].shape[0] != 1 or cores[-1].shape[3] != 1:
        raise ValueError(
            f"boundary bonds must be 1, got D_0={cores[0].shape[0]} and D_n={cores[-1].shape[3]}"
        )
    for k in range(len(cores) - 1):
        if cores[k].shape[3] != cores[k + 1].shape[0]:
            raise ValueError(
                f"bond mismatch between core {k} (D={cores[k].shape[3]}) and core {k + 1} "
                f"(D={cores[k + 1].shape[0]})"
            )


def _entropy(s: Tensor) -> Tensor:
    p = s.double() ** 2
    total = p.sum()
    if total <= 0:
        return torch.zeros((), dtype=torch.float64)
    p = p / total
    p = p[p > 0]
    return (-p * p.log()).sum().clamp_min(0.0)


def _clipped(in_factors, out_factors, max_bond) -> tuple[tuple[int, int, int], ...]:
    if max_bond is None:
        return ()
    return tuple(
        (k, max_bond, cap) for k, cap in enumerate(max_bond_dims(in_factors, out_factors)) if max_bond > cap
    )


def _check_truncation_args(max_bond, rel_tol) -> None:
    if max_bond is not None and (isinstance(max_bond, bool) or not isinstance(max_bond, int) or max_bond < 1):
        raise ValueError(f"max_bond must be a positive integer or None, got {max_bond!r}")
    if rel_tol is not None:
        if isinstance(rel_tol, bool) or not isinstance(rel_tol, (int, float)) or not 0 < rel_tol < 1:
            raise ValueError(f"rel_tol must be a number in (0, 1) or None, got {rel_tol!r}")


# ----------------------------------------------------------------------------- decomposition


def _rank_to_keep(s: Tensor, max_bond: int | None, delta: float | None) -> int:
    """Smallest rank whose discarded tail energy is <= delta^2, capped by max_bond."""
    rank = s.numel()
    if delta is not None:
        tail = (s.double() ** 2).flip(0).cumsum(0).flip(0)  # tail[r] = sum_{k>=r} s_k^2
        rank = int((tail > delta**2).sum())
    if max_bond is not None:
        rank = min(rank, max_bond)
    return max(rank, 1)


def _svd_sweep(cores: list[Tensor], caps: Sequence[int | None], delta: float | None):
    """Left-to-right SVD sweep over cores whose right part is right-orthogonal (centre 0),
    keeping at most ``caps[k]`` singular values at bond k (None: no cap).

    Returns (new cores, singular values per bond before truncation, discarded energy per bond).
    """
    cores = list(cores)
    spectra, discarded = [], []
    for k in range(len(cores) - 1):
        d, i, j, e = cores[k].shape
        u, s, vh = torch.linalg.svd(cores[k].reshape(d * i * j, e), full_matrices=False)
        r = _rank_to_keep(s, caps[k], delta)
        spectra.append(s.detach())
        discarded.append(float((s[r:].double() ** 2).sum()))
        cores[k] = u[:, :r].reshape(d, i, j, r)
        nxt = cores[k + 1]
        carry = s[:r, None] * vh[:r]  # (r, e)
        cores[k + 1] = (carry @ nxt.reshape(e, -1)).reshape(r, *nxt.shape[1:])
    return cores, spectra, discarded


def _canonicalize(cores: Sequence[Tensor], center: int) -> list[Tensor]:
    cores = list(cores)
    for k in range(center):  # left-orthogonalize
        d, i, j, e = cores[k].shape
        q, r = torch.linalg.qr(cores[k].reshape(d * i * j, e))
        cores[k] = q.reshape(d, i, j, q.shape[1])
        nxt = cores[k + 1]
        cores[k + 1] = (r @ nxt.reshape(e, -1)).reshape(r.shape[0], *nxt.shape[1:])
    for k in range(len(cores) - 1, center, -1):  # right-orthogonalize
        d, i, j, e = cores[k].shape
        q, r = torch.linalg.qr(cores[k].reshape(d, i * j * e).T)
        cores[k] = q.T.reshape(q.shape[1], i, j, e)
        prv = cores[k - 1]
        cores[k - 1] = (prv.reshape(-1, d) @ r.T).reshape(*prv.shape[:3], r.shape[0])
    return cores


def decompose(
    matrix: Tensor,
    in_factors: Sequence[int],
    out_factors: Sequence[int],
    *,
    max_bond: int | None = None,
    rel_tol: float | None = None,
) -> MPO:
    """TT-SVD of ``matrix`` (I, J) into an MPO with the given row/column factors.

    The 2n-index tensor is regrouped (i_1 j_1)(i_2 j_2)... and split by a sweep of SVDs.
    ``max_bond`` caps every bond (requests above the largest useful bond are clipped and
    listed in ``report.clipped``); ``rel_tol=eps`` truncates each bond at
    eps ||W||_F / sqrt(n-1), which guarantees ||W - W_mpo||_F <= eps ||W||_F. With neither,
    the decomposition is exact. The achieved relative error is ``result.report.rel_error``.
    """
    if not isinstance(matrix, Tensor) or matrix.dim() != 2:
        raise ValueError(f"matrix must be a 2-D tensor, got {type(matrix).__name__} "
                         f"{tuple(getattr(matrix, 'shape', ()))}")
    if matrix.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"matrix must be float32 or float64, got dtype {matrix.dtype} (convert it with .float())")
    rows, cols = matrix.shape
    in_factors = _check_factors("in_factors", in_factors, rows, "the matrix's row count")
    out_factors = _check_factors("out_factors", out_factors, cols, "the matrix's column count")
    if len(in_factors) != len(out_factors):
        raise ValueError(
            f"in_factors and out_factors must have the same length (one pair per core), got "
            f"{len(in_factors)} and {len(out_factors)}"
        )
    _check_truncation_args(max_bond, rel_tol)
    # One float64 reduction gives the norm; it is finite iff every entry is (the entry-wise
    # check only runs to tell a float64 overflow from a NaN/inf).
    norm = float(torch.linalg.vector_norm(matrix, dtype=torch.float64))
    if not math.isfinite(norm) and not bool(torch.isfinite(matrix).all()):
        raise ValueError("matrix contains NaN or inf; expected finite values")

    n = len(in_factors)
    tensor = matrix.reshape(*in_factors, *out_factors)
    tensor = tensor.permute(*[p for k in range(n) for p in (k, n + k)]).contiguous()
    delta = None if rel_tol is None else rel_tol * norm / math.sqrt(max(n - 1, 1))

    cores, discarded = [], 0.0
    rest = tensor.reshape(1, -1)
    for k in range(n - 1):
        d = rest.shape[0]
        i, j = in_factors[k], out_factors[k]
        u, rest, tail = _split(rest.reshape(d * i * j, -1), max_bond, delta)
        discarded += tail
        cores.append(u.reshape(d, i, j, u.shape[1]))
    cores.append(rest.reshape(rest.shape[0], in_factors[-1], out_factors[-1], 1))
    err = math.sqrt(discarded) / norm if norm > 0 else 0.0
    report = TruncationReport(err, max_bond, rel_tol, _clipped(in_factors, out_factors, max_bond))
    return MPO(cores, report)


def _split(a: Tensor, max_bond: int | None, delta: float | None) -> tuple[Tensor, Tensor, float]:
    """Truncated factorisation a ~= u @ rest of one unfolding (u with orthonormal columns).

    Returns (u, rest, discarded energy ||a - u rest||_F^2). A wide float32/16 unfolding
    (rows <= cols / _GRAM_MIN_ASPECT) is split through its Gram matrix a a^T formed and
    diagonalised in float64: the eigenvalues are the squared singular values to ~1e-16 of
    ||a||^2 (finer than the input's own precision), the eigenvectors are an orthonormal u,
    and rest = u^T a is the exact projection, so rank choice, discarded energy and the
    rel_tol guarantee are as with the SVD. LAPACK's SVD of such a wide matrix is 3-20x
    slower here (docs/benchmarks.md). Other unfoldings take the SVD of the tall orientation
    (2-4x faster than of the wide one)."""
    m, cols = a.shape
    if m * _GRAM_MIN_ASPECT <= cols and a.dtype in (torch.float32, torch.float16, torch.bfloat16):
        wide = a.double()
        energy, basis = torch.linalg.eigh(wide @ wide.T)
        energy, basis = energy.flip(0).clamp_min(0.0), basis.flip(1)  # descending
        r = _rank_to_keep(energy.sqrt(), max_bond, delta)
        u = basis[:, :r].to(a.dtype)
        return u, u.T @ a, float(energy[r:].sum())
    if m <= cols:
        vt, s, ut = torch.linalg.svd(a.T, full_matrices=False)
        u, vh = ut.T, vt.T
    else:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
    r = _rank_to_keep(s, max_bond, delta)
    return u[:, :r], s[:r, None] * vh[:r], float((s[r:].double() ** 2).sum())


# Smallest cols/rows ratio of an unfolding for the Gram route (its m^3 eigh in float64
# must stay small next to the SVD's 4 m^2 cols): measured with benchmarks/bench_mpo.py.
_GRAM_MIN_ASPECT = 2


def capped_bond_dims(
    in_factors: Sequence[int], out_factors: Sequence[int], max_bond: int
) -> tuple[int, ...]:
    """Internal bonds of an MPO whose every bond is min(max_bond, largest useful bond)."""
    return tuple(min(max_bond, cap) for cap in max_bond_dims(in_factors, out_factors))


# ----------------------------------------------------------------------------- contraction


def _grow_left(left: Tensor, core: Tensor) -> Tensor:
    """(A, B, D) x (D, i, j, E) -> (A*i, B*j, E), written directly in that layout."""
    a, b, d = left.shape
    _, i, j, e = core.shape
    out = torch.matmul(left.reshape(a, 1, b, d), core.permute(1, 0, 2, 3).reshape(1, i, d, j * e))
    return out.reshape(a * i, b * j, e)


def _grow_right(core: Tensor, right: Tensor) -> Tensor:
    """(D, i, j, E) x (E, A, B) -> (D, i*A, j*B), written directly in that layout."""
    d, i, j, e = core.shape
    _, a, b = right.shape
    out = torch.matmul(core.reshape(d, i, 1, j, e), right.permute(1, 0, 2).reshape(1, 1, a, e, b))
    return out.reshape(d, i * a, j * b)


def _halves(cores: Sequence[Tensor], split: int) -> tuple[Tensor, Tensor]:
    """Contract cores[:split] into (I_L, J_L, D) and cores[split:] into (D, I_R, J_R)."""
    left = cores[0][0]  # (i1, j1, D1)
    for core in cores[1:split]:
        left = _grow_left(left, core)
    right = cores[-1][..., 0]  # (D, i_n, j_n)
    for core in reversed(cores[split:-1]):
        right = _grow_right(core, right)
    return left, right


def cores_to_matrix(cores: Sequence[Tensor], transpose: bool = False) -> Tensor:
    """Rebuild W (I, J) from cores, or W^T (J, I) with ``transpose=True``.

    The two halves of the chain are contracted separately and joined by one broadcast
    matmul whose output is already in the requested row-major layout, so no 2n-D permute
    of the full matrix is ever made."""
    if transpose:
        cores = [c.transpose(1, 2) for c in cores]
    n = len(cores)
    if n == 1:
        return cores[0][0, :, :, 0]
    left, right = _halves(cores, (n + 1) // 2)
    il, jl, d = left.shape
    _, ir, jr = right.shape
    out = torch.matmul(left.reshape(il, 1, jl, d), right.permute(1, 0, 2).reshape(1, ir, d, jr))
    return out.reshape(il * ir, jl * jr)


def _split_cost(shapes: Sequence[tuple[int, int, int, int]], split: int, rows: int) -> tuple[float, float]:
    """(FLOPs, elements of the intermediate) of ``_sweep_matmul`` cutting the chain at ``split``:
    merging each half, then x with the left half, then with the right half."""
    il = jl = 1
    merge = 0.0
    for k, (_, i, j, e) in enumerate(shapes[:split]):
        il, jl = il * i, jl * j
        merge += 2.0 * il * jl * e * (shapes[k - 1][3] if k else 0)
    ir = jr = 1
    for k, (d, i, j, _) in enumerate(reversed(shapes[split:])):
        ir, jr = ir * i, jr * j
        merge += 2.0 * d * ir * jr * (shapes[len(shapes) - k][0] if k else 0)
    bond = shapes[split][0]
    flops = merge + 2.0 * rows * bond * jl * ir * (il + jr)
    return flops, float(rows * jl * bond * ir)


def _best_split(shapes: Sequence[tuple[int, int, int, int]], rows: int) -> int:
    return min(range(1, len(shapes)), key=lambda k: _split_cost(shapes, k, rows)[0])


def _sweep_matmul(x: Tensor, cores: Sequence[Tensor]) -> Tensor:
    """x (N, I) @ W (I, J) without forming W. Returns (N, J).

    The chain is cut at the bond that minimises the FLOPs; each half is merged into one
    small block (independent of N), then x (N, I_L, I_R) is contracted with the left block
    (one broadcast matmul whose output (N, J_L, D, I_R) needs no permute) and the result
    with the right block (one GEMM over (D, I_R)). Two large ops instead of a matmul and a
    permute per core: 2-3x faster than the core-by-core sweep at 32 rows."""
    n_rows = x.shape[0]
    if len(cores) == 1:
        return x @ cores[0][0, :, :, 0]
    shapes = [tuple(c.shape) for c in cores]
    left, right = _halves(cores, _best_split(shapes, n_rows))
    il, jl, d = left.shape
    _, ir, jr = right.shape
    mid = torch.matmul(left.reshape(il, jl * d).T, x.reshape(n_rows, il, ir))  # (N, J_L * D, I_R)
    return (mid.reshape(n_rows * jl, d * ir) @ right.reshape(d * ir, jr)).reshape(n_rows, jl * jr)


# Machine constants of the cost model, fitted on the 2-core AVX-512 reference machine with
# benchmarks/bench_mpo.py (docs/benchmarks.md): sustained throughput of the large dense
# matmul, of the two-half contraction's small/batched matmuls, bandwidth of strided copies,
# and the fixed cost of one dispatched torch op (forward plus its backward).
_FLOPS_PER_S = 6e10
_SMALL_FLOPS_PER_S = 4e10
_BYTES_PER_S = 4e9
_OP_OVERHEAD_S = 6e-6


def matmul_cost(rows: int, cores: Sequence[Tensor], weight_cached: bool = False) -> dict[str, float]:
    """Estimated seconds of ``x (rows, I) @ W`` for each strategy (FLOPs + bytes + op count).

    "cores": contract x with the two merged halves of the chain (``_sweep_matmul``).
    "rebuild": form W (skipped if ``weight_cached``) then one dense matmul."""
    shapes = [tuple(c.shape) for c in cores]
    size = cores[0].element_size()
    in_dim = math.prod(s[1] for s in shapes)
    out_dim = math.prod(s[2] for s in shapes)

    if len(shapes) == 1:
        cores_s = 2.0 * rows * in_dim * out_dim / _FLOPS_PER_S + _OP_OVERHEAD_S
    else:
        flops, mid = _split_cost(shapes, _best_split(shapes, rows), rows)
        cores_s = flops / _SMALL_FLOPS_PER_S + 2 * size * mid / _BYTES_PER_S + 4 * len(shapes) * _OP_OVERHEAD_S

    matmul_s = 2.0 * rows * in_dim * out_dim / _FLOPS_PER_S + size * in_dim * out_dim / _BYTES_PER_S
    if weight_cached:
        rebuild_s = matmul_s + _OP_OVERHEAD_S
    else:
        bonds = [s[0] for s in shapes[1:]] or [1]
        build_flops = 2.0 * in_dim * out_dim * max(bonds)
        rebuild_s = matmul_s + build_flops / _FLOPS_PER_S + 3 * len(shapes) * _OP_OVERHEAD_S
    return {"cores": cores_s, "rebuild": rebuild_s}


def mpo_matmul(
    x: Tensor,
    mpo_or_cores: MPO | Sequence[Tensor],
    strategy: Strategy = "auto",
) -> Tensor:
    """x (..., I) @ W (I, J) -> (..., J) with W given as an MPO or its cores.

    strategy: "cores" contracts core by core (cheap for few rows), "rebuild" forms W and
    runs one matmul (cheap for many rows), "auto" picks the cheaper by ``matmul_cost``.
    Both give the same result to float tolerance and are differentiable."""
    cores = mpo_or_cores.cores if isinstance(mpo_or_cores, MPO) else list(mpo_or_cores)
    _check_cores(cores)
    in_dim = math.prod(c.shape[1] for c in cores)
    if x.dim() == 0 or x.shape[-1] != in_dim:
        raise ValueError(f"x must have last dimension {in_dim} (the MPO's input size), got shape {tuple(x.shape)}")
    if strategy not in ("auto", "cores", "rebuild"):
        raise ValueError(f"strategy must be 'auto', 'cores' or 'rebuild', got {strategy!r}")
    lead = x.shape[:-1]
    flat = x.reshape(-1, in_dim)
    if strategy == "auto":
        cost = matmul_cost(flat.shape[0], cores)
        strategy = "cores" if cost["cores"] < cost["rebuild"] else "rebuild"
    if strategy == "cores":
        out = _sweep_matmul(flat, cores)
    else:
        out = flat @ cores_to_matrix(cores)
    return out.reshape(*lead, out.shape[-1])
