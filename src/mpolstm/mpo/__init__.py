"""Matrix Product Operators: pure tensor functions, no nn.Module.

core       the MPO type, shapes and factors, canonical forms, entanglement entropy
sweep      the decomposition sweep: TT-SVD of a matrix, TT-rounding of an MPO
contract   rebuild the matrix or multiply without forming it, and the cost model
allocation bond allocation under a parameter budget, from singular spectra
"""

from .contract import Strategy, best_split, check_cores, cores_to_matrix, matmul_cost, mpo_matmul, split_matmul
from .core import (
    MPO,
    TruncationReport,
    bond_dims,
    canonicalize,
    capped_bond_dims,
    central_core,
    check_factors,
    entropy,
    factorize,
    max_bond_dims,
)
from .sweep import decompose

__all__ = [
    "MPO",
    "Strategy",
    "best_split",
    "TruncationReport",
    "bond_dims",
    "canonicalize",
    "capped_bond_dims",
    "central_core",
    "check_cores",
    "check_factors",
    "cores_to_matrix",
    "decompose",
    "entropy",
    "factorize",
    "matmul_cost",
    "max_bond_dims",
    "mpo_matmul",
    "split_matmul",
]
