"""Matrix Product Operators: pure tensor functions, no nn.Module.

core       the MPO type, shapes and factors, canonical forms, entanglement entropy
sweep      the decomposition sweep: TT-SVD of a matrix, TT-rounding of an MPO
contract   rebuild the matrix or multiply without forming it (the merged halves), and the cost model
allocation bond allocation under a parameter budget, from singular spectra
factors    a layer weight's (in, out) factors and freshly initialised cores
int8       the int8 grid: symmetric int8 values with float32 scales, per core slice
"""

from .contract import (
                       Halves,
                       Strategy,
                       best_split,
                       check_cores,
                       cores_to_matrix,
                       halves_matmul,
                       matmul_cost,
                       merged_halves,
                       mpo_matmul,
                       prepare_halves,
                       split_matmul,
                       step_macs,
)
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
from .factors import Factors, default_factors, init_cores_, random_cores, resolve_factors
from .int8 import core_scale_shape, dequantize_int8, quantize_core, quantize_int8
from .sweep import decompose

__all__ = [
    "MPO",
    "Factors",
    "Halves",
    "Strategy",
    "best_split",
    "TruncationReport",
    "bond_dims",
    "canonicalize",
    "capped_bond_dims",
    "central_core",
    "check_cores",
    "check_factors",
    "core_scale_shape",
    "cores_to_matrix",
    "decompose",
    "default_factors",
    "dequantize_int8",
    "entropy",
    "factorize",
    "halves_matmul",
    "init_cores_",
    "matmul_cost",
    "max_bond_dims",
    "merged_halves",
    "mpo_matmul",
    "prepare_halves",
    "quantize_core",
    "quantize_int8",
    "random_cores",
    "resolve_factors",
    "split_matmul",
    "step_macs",
]
