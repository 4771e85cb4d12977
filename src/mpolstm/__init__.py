"""mpolstm: compress LSTM networks with Matrix Product Operators.

The library (this package, less ``mpolstm.harness``) needs only torch, numpy and safetensors.
Every nn.Linear, nn.Embedding, nn.LSTM / GRU / RNN, their cells and nn.Conv1d / Conv2d has an
MPO drop-in (``mpolstm.nn``).
The top level re-exports the everyday API; the compression module is ``mpolstm.compression``
(``mpolstm.compress`` is the function), int8 cores ``mpolstm.quantization``
(``mpolstm.quantize``).
"""

from .compression import CompressionConfig, CompressionReport, compress, freeze_central, print_trainable_parameters
from .distill import distill
from .errors import ConfigError
from .io import load, save
from .mpo import MPO, decompose, factorize, mpo_matmul
from .quantization import quantize
from .nn import (MPOGRU, MPOLSTM, MPORNN, MPOConv1d, MPOConv2d, MPOEmbedding, MPOGRUCell, MPOLinear, MPOLSTMCell,
                 MPORNNCell)
from .version import __version__

__all__ = [
    "__version__",
    "CompressionConfig",
    "CompressionReport",
    "ConfigError",
    "compress",
    "distill",
    "freeze_central",
    "print_trainable_parameters",
    "quantize",
    "load",
    "save",
    "MPO",
    "decompose",
    "factorize",
    "mpo_matmul",
    "MPOGRU",
    "MPOLSTM",
    "MPORNN",
    "MPOGRUCell",
    "MPOLSTMCell",
    "MPORNNCell",
    "MPOConv1d",
    "MPOConv2d",
    "MPOEmbedding",
    "MPOLinear",
]
