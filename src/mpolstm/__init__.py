"""mpolstm: compress LSTM networks with Matrix Product Operators.

The library (this package, less ``mpolstm.harness``) needs only torch, numpy and safetensors.
Every nn.Linear, nn.Embedding, nn.LSTM / GRU / RNN, their cells and nn.Conv1d / Conv2d has an
MPO drop-in (``mpolstm.nn``).
The top level re-exports the everyday API; the compression module is ``mpolstm.compression``
(``mpolstm.compress`` is the function), int8 cores ``mpolstm.quantization``
(``mpolstm.quantize``).

The names below are imported on first use (PEP 562), so ``import mpolstm.harness`` (the ``mpolstm``
command's entry point) runs before torch is imported: the command sets ``OMP_WAIT_POLICY`` first.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from .version import __version__

_EXPORTS = {
    "CompressionConfig": "compression", "CompressionReport": "compression", "compress": "compression",
    "ConfigError": "errors",
    "freeze_central": "compression", "print_trainable_parameters": "compression",
    "distill": "distill", "quantize": "quantization", "load": "io", "save": "io",
    "MPO": "mpo", "decompose": "mpo", "factorize": "mpo", "mpo_matmul": "mpo",
    **{name: "nn" for name in ("MPOGRU", "MPOLSTM", "MPORNN", "MPOGRUCell", "MPOLSTMCell", "MPORNNCell", "MPOConv1d",
                               "MPOConv2d", "MPOEmbedding", "MPOLinear")},
}
_SUBMODULES = ("atomic", "calibration", "checkpoint", "compression", "distill", "errors", "export", "io", "mpo", "nn",
               "prune", "quantization", "storage", "tensorfile")

__all__ = ["__version__", *_EXPORTS]


class _Package(types.ModuleType):
    """The import system binds an imported submodule as an attribute of its package; for the submodule
    named like the function it exports (``mpolstm.distill``), the package keeps the function, as the
    eager imports it replaces did (the module stays ``sys.modules["mpolstm.distill"]``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly (`x as x`: re-exported)
    from .compression import CompressionConfig as CompressionConfig
    from .compression import CompressionReport as CompressionReport
    from .compression import compress as compress
    from .compression import freeze_central as freeze_central
    from .compression import print_trainable_parameters as print_trainable_parameters
    from .distill import distill as distill
    from .errors import ConfigError as ConfigError
    from .io import load as load
    from .io import save as save
    from .mpo import MPO as MPO
    from .mpo import decompose as decompose
    from .mpo import factorize as factorize
    from .mpo import mpo_matmul as mpo_matmul
    from .nn import MPOGRU as MPOGRU
    from .nn import MPOLSTM as MPOLSTM
    from .nn import MPORNN as MPORNN
    from .nn import MPOConv1d as MPOConv1d
    from .nn import MPOConv2d as MPOConv2d
    from .nn import MPOEmbedding as MPOEmbedding
    from .nn import MPOGRUCell as MPOGRUCell
    from .nn import MPOLinear as MPOLinear
    from .nn import MPOLSTMCell as MPOLSTMCell
    from .nn import MPORNNCell as MPORNNCell
    from .quantization import quantize as quantize
