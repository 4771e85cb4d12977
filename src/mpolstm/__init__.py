"""mpolstm: compress LSTM networks with Matrix Product Operators.

The top level re-exports the everyday API; ``mpolstm.compress`` here is the function (the module
stays importable as ``from mpolstm.compress import CompressionConfig``).
"""

__version__ = "0.1.0"

from .compress import CompressionConfig, CompressionReport, compress, freeze_central, print_trainable_parameters
from .io import load, save
from .mpo import MPO, decompose, factorize, mpo_matmul
from .nn import MPOGRU, MPOLSTM, MPOEmbedding, MPOLinear

__all__ = [
    "__version__",
    "CompressionConfig",
    "CompressionReport",
    "compress",
    "freeze_central",
    "print_trainable_parameters",
    "load",
    "save",
    "MPO",
    "decompose",
    "factorize",
    "mpo_matmul",
    "MPOGRU",
    "MPOLSTM",
    "MPOEmbedding",
    "MPOLinear",
]
