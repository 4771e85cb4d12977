"""A layer weight's factors and fresh cores: the (in, out) factorisations of an MPO layer's weight
(given, defaulted, or balanced with fewer cores where the sizes have too few primes) and cores
initialised so that the rebuilt matrix has a chosen entry variance."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .core import bond_dims, factorize

__all__ = ["Factors", "default_factors", "init_cores_", "random_cores", "resolve_factors"]

Factors = tuple[tuple[int, ...], tuple[int, ...]]


def resolve_factors(in_features: int, out_features: int, in_factors: Sequence[int] | None,
                    out_factors: Sequence[int] | None, num_cores: int) -> Factors:
    """Default or validate the (in, out) factorisations of a layer's weight.

    Raises ValueError when they do not multiply to the feature sizes, differ in length, or
    cannot split the matrix usefully (every core but one would have i_k = j_k = 1)."""
    in_f = tuple(in_factors) if in_factors is not None else factorize(in_features, num_cores)
    out_f = tuple(out_factors) if out_factors is not None else factorize(out_features, len(in_f))
    for name, factors, total in (("in_factors", in_f, in_features), ("out_factors", out_f, out_features)):
        if any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in factors):
            raise ValueError(f"{name} must be positive integers, got {factors!r}")
        if math.prod(factors) != total:
            raise ValueError(f"{name}={factors} multiply to {math.prod(factors)}, expected {total}")
    if len(in_f) != len(out_f):
        raise ValueError(f"in_factors {in_f} and out_factors {out_f} must have the same length")
    if len(in_f) > 1 and sum(i * j > 1 for i, j in zip(in_f, out_f)) < 2:
        raise ValueError(
            f"factors in={in_f} out={out_f} leave all but one core trivial, so the MPO cannot "
            f"compress ({in_features}x{out_features} has too few prime factors); pass factors "
            "explicitly or use fewer cores")
    return in_f, out_f


def default_factors(in_features: int, out_features: int, num_cores: int) -> Factors:
    """Balanced factors with ``num_cores`` cores, or fewer when the sizes have too few prime
    factors for that many non-trivial cores (a single core is a dense matrix)."""
    for n in range(num_cores, 1, -1):
        try:
            return resolve_factors(in_features, out_features, None, None, n)
        except ValueError:
            continue
    return (in_features,), (out_features,)


def init_cores_(cores: Sequence[Tensor], target_std: float) -> None:
    """Fill cores with N(0, s^2) so that every entry of the rebuilt matrix has variance
    ``target_std**2``: Var(W) = prod_k s^2 * prod_k D_k, so s^2 = (target^2 / prod D)^(1/n)."""
    n = len(cores)
    bond_product = math.prod(bond_dims(cores))
    core_std = (target_std**2 / bond_product) ** (1.0 / (2 * n))
    with torch.no_grad():
        for c in cores:
            c.normal_(0.0, core_std)


def random_cores(in_factors: Sequence[int], out_factors: Sequence[int], bonds: Sequence[int], std: float,
                 device=None, dtype=None) -> list[Tensor]:
    """Cores (D_{k-1}, i_k, j_k, D_k) of the given factors and internal ``bonds``, initialised by
    :func:`init_cores_` to entries of standard deviation ``std`` in the rebuilt matrix."""
    d = (1, *bonds, 1)
    cores = [torch.empty(d[k], int(i), int(j), d[k + 1], device=device, dtype=dtype)
             for k, (i, j) in enumerate(zip(in_factors, out_factors))]
    init_cores_(cores, std)
    return cores
