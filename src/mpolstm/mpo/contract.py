"""Contraction of MPO cores: rebuild the dense matrix, or multiply without forming it (the chain
merged into two halves: per call, or once and kept, :func:`prepare_halves` / :func:`halves_matmul`,
the deployed product), and the cost model that chooses per call.

Cores are (D_{k-1}, i_k, j_k, D_k); ``x @ W`` maps (..., I) -> (..., J).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence, Tuple  # TorchScript reads Tuple (Halves)

import torch
from torch import Tensor

__all__ = ["Halves", "Strategy", "best_split", "check_cores", "cores_to_matrix", "halves_matmul", "matmul_cost",
           "merged_halves", "mpo_matmul", "prepare_halves", "split_matmul", "step_macs"]

Strategy = Literal["auto", "cores", "rebuild"]


def check_cores(cores: Sequence[Tensor]) -> None:
    """Raise ValueError unless ``cores`` form a chain of 4-D cores with boundary bonds 1."""
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


# Each contraction below is one matrix product over the bond followed by one permuting copy of its
# output: measured 3-30x faster, forward and backward, than broadcast batched products written
# straight into the output's layout (those run as many tiny products, and their backward
# materialises the broadcasts: a rank-100 1024x4096 weight rebuilt in 31 ms instead of 1 s).


def _grow_left(left: Tensor, core: Tensor) -> Tensor:
    """(A, B, D) x (D, i, j, E) -> (A*i, B*j, E)."""
    a, b, d = left.shape
    _, i, j, e = core.shape
    out = (left.reshape(a * b, d) @ core.reshape(d, i * j * e)).reshape(a, b, i, j, e)
    return out.permute(0, 2, 1, 3, 4).reshape(a * i, b * j, e)


def _grow_right(core: Tensor, right: Tensor) -> Tensor:
    """(D, i, j, E) x (E, A, B) -> (D, i*A, j*B)."""
    d, i, j, e = core.shape
    _, a, b = right.shape
    out = (core.reshape(d * i * j, e) @ right.reshape(e, a * b)).reshape(d, i, j, a, b)
    return out.permute(0, 1, 3, 2, 4).reshape(d, i * a, j * b)


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

    The two halves of the chain are contracted separately and joined by one matrix product
    over the middle bond; the only permute of the full matrix is one copy of (I_L, J_L, I_R,
    J_R) into (I_L, I_R, J_L, J_R) (never a 2n-D one)."""
    if transpose:
        cores = [c.transpose(1, 2) for c in cores]
    n = len(cores)
    if n == 1:
        return cores[0][0, :, :, 0]
    left, right = _halves(cores, (n + 1) // 2)
    il, jl, d = left.shape
    _, ir, jr = right.shape
    out = (left.reshape(il * jl, d) @ right.reshape(d, ir * jr)).reshape(il, jl, ir, jr)
    return out.permute(0, 2, 1, 3).reshape(il * ir, jl * jr)


def _split_cost(shapes: Sequence[tuple[int, ...]], split: int, rows: int) -> tuple[float, float]:
    """(FLOPs, elements of the intermediate) of ``split_matmul`` cutting the chain at ``split``:
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


def best_split(cores: Sequence[Tensor], rows: int) -> int:
    """The bond at which :func:`split_matmul` of ``rows`` rows should cut the chain (fewest FLOPs)."""
    shapes = [tuple(c.shape) for c in cores]
    if len(shapes) == 1:
        return 1
    return min(range(1, len(shapes)), key=lambda k: _split_cost(shapes, k, rows)[0])


def split_matmul(x: Tensor, cores: Sequence[Tensor], split: int) -> Tensor:
    """x (N, I) @ W (I, J) without forming W, the chain cut at bond ``split`` (1 <= split < n).
    Returns (N, J).

    Each half is merged into one small block (independent of N), then x (N, I_L, I_R) is
    contracted with the left block (one broadcast matmul whose output (N, J_L, D, I_R) needs no
    permute) and the result with the right block (one GEMM over (D, I_R)): :func:`halves_matmul`.
    Two large ops instead of a matmul and a permute per core (docs/benchmarks.md)."""
    if len(cores) == 1:
        return x @ cores[0][0, :, :, 0]
    return halves_matmul(x, _as_operands(*_halves(cores, split)))


# ----------------------------------------------------------------------------- merged halves

Halves = Tuple[Tensor, Tensor, int, int, int, int, int]  # the operands of halves_matmul


def _as_operands(left: Tensor, right: Tensor) -> Halves:
    """Halves L (I_L, J_L, D) and R (D, I_R, J_R) as the operands of :func:`halves_matmul`."""
    il, jl, d = left.shape
    _, ir, jr = right.shape
    return left.reshape(il, jl * d).T, right.reshape(d * ir, jr), il, ir, jl, jr, d


def merged_halves(cores: Sequence[Tensor]) -> list[Tensor]:
    """The chain as two cores, (1, I_left, J_left, D) and (D, I_right, J_right, 1), split at the middle bond."""
    left, right = _halves(cores, len(cores) // 2)
    return [left.unsqueeze(0), right.unsqueeze(-1)]


def prepare_halves(cores: Sequence[Tensor]) -> Halves:
    """The chain merged into two halves at its middle bond, as the (contiguous) operands of
    :func:`halves_matmul`: what the eval cache and the factorized runtime keep (a one-core chain is
    L with R the 1 x 1 identity)."""
    if len(cores) == 1:
        _, i, j, _ = cores[0].shape
        return cores[0][0, :, :, 0].T.contiguous(), cores[0].new_ones(1, 1), i, 1, j, 1, 1
    lt, r, il, ir, jl, jr, d = _as_operands(*_halves(cores, len(cores) // 2))
    return lt.contiguous(), r.contiguous(), il, ir, jl, jr, d


def halves_matmul(x: Tensor, prepared: Halves) -> Tensor:
    """x (N, I_L I_R) @ W with W[(a, b), (c, e)] = sum_d L[a, c, d] R[d, b, e], the chain merged into
    two halves given as ``prepared`` = (L^T (J_L D, I_L), R (D I_R, J_R), I_L, I_R, J_L, J_R, D): two
    matmuls, (J_L D, I_L) x (N, I_L, I_R), then (N J_L, D I_R) x (D I_R, J_R). TorchScript-compatible."""
    lt, r, il, ir, jl, jr, d = prepared
    if ir == 1 and jl == 1:  # a rank-D factorization (I, D) x (D, J): two plain matmuls
        return torch.mm(torch.mm(x, lt.t()), r)
    n = x.shape[0]
    mid = torch.matmul(lt, x.reshape(n, il, ir))  # (N, J_L * D, I_R)
    return (mid.reshape(n * jl, d * ir) @ r).reshape(n, jl * jr)


def step_macs(in_factors: Sequence[int], out_factors: Sequence[int], bonds: Sequence[int], lookup: bool = False) -> int:
    """Multiply-adds of one row through the MPO as deployed: x (1, I) times the chain merged into two
    halves at its middle bond D (:func:`halves_matmul`), D J_L I_R (I_L + J_R); a rank-D
    factorization, (I, 1) x (1, J), costs D (I + J), exactly its parameters; one core, I J. A table
    lookup (``lookup``: an embedding row) joins its two gathered halves, J_L D J_R."""
    n = len(in_factors)
    if n == 1:
        return 0 if lookup else in_factors[0] * out_factors[0]
    split = (n + 1) // 2 if lookup else n // 2
    il, jl = math.prod(in_factors[:split]), math.prod(out_factors[:split])
    ir, jr = math.prod(in_factors[split:]), math.prod(out_factors[split:])
    d = bonds[split - 1]
    return d * jl * jr if lookup else d * jl * ir * (il + jr)


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

    "cores": contract x with the two merged halves of the chain (``split_matmul``).
    "rebuild": form W (skipped if ``weight_cached``) then one dense matmul."""
    shapes = [tuple(c.shape) for c in cores]
    size = cores[0].dtype.itemsize  # (element_size() breaks a torch.compile graph)
    in_dim = math.prod([s[1] for s in shapes])  # (a generator breaks a torch.compile graph)
    out_dim = math.prod([s[2] for s in shapes])

    if len(shapes) == 1:
        cores_s = 2.0 * rows * in_dim * out_dim / _FLOPS_PER_S + _OP_OVERHEAD_S
    else:
        flops, mid = _split_cost(shapes, best_split(cores, rows), rows)
        cores_s = flops / _SMALL_FLOPS_PER_S + 2 * size * mid / _BYTES_PER_S + 4 * len(shapes) * _OP_OVERHEAD_S

    matmul_s = 2.0 * rows * in_dim * out_dim / _FLOPS_PER_S + size * in_dim * out_dim / _BYTES_PER_S
    if weight_cached:
        rebuild_s = matmul_s + _OP_OVERHEAD_S
    else:
        bonds = [s[0] for s in shapes[1:]] or [1]
        build_flops = 2.0 * in_dim * out_dim * max(bonds)
        rebuild_s = matmul_s + build_flops / _FLOPS_PER_S + 3 * len(shapes) * _OP_OVERHEAD_S
    return {"cores": cores_s, "rebuild": rebuild_s}


def mpo_matmul(x: Tensor, mpo_or_cores: Any, strategy: Strategy = "auto") -> Tensor:
    """x (..., I) @ W (I, J) -> (..., J) with W given as an MPO or its cores.

    strategy: "cores" contracts core by core (cheap for few rows), "rebuild" forms W and
    runs one matmul (cheap for many rows), "auto" picks the cheaper by ``matmul_cost``.
    Both give the same result to float tolerance and are differentiable."""
    cores = list(getattr(mpo_or_cores, "cores", mpo_or_cores))
    check_cores(cores)
    in_dim = math.prod([c.shape[1] for c in cores])
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
        out = split_matmul(flat, cores, best_split(cores, flat.shape[0]))
    else:
        out = flat @ cores_to_matrix(cores)
    return out.reshape(*lead, out.shape[-1])
