"""The part of the multi-weight MPO modules (recurrent layers, cells, convolutions) that keeps
rebuilt weights cached in ``self._cache`` and knows its weights' dense shapes.

Subclasses set ``self._weight_shapes`` ({weight name: (out, in)}) and ``self._cache`` and define
``_core_params()`` and ``_cores(name)``; ``self.reports`` holds the TruncationReport per weight. The cache is dropped on ``train()``, ``.to()``/``.double()`` (``_apply``) and
is never copied (``__getstate__``).
"""

from __future__ import annotations

from torch import nn

from ..mpo import MPO
from .sparse import sparse_params

Factors = tuple[tuple[int, ...], tuple[int, ...]]

__all__ = ["CachedCores"]


class CachedCores(nn.Module):
    """Cache invalidation and size accounting shared by MPORNN/LSTM/GRU, the cells and convolutions."""

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self._cache = None
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__()
        state["_cache"] = None
        return state

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def compression_ratio(self) -> float:
        """Dense weight entries / stored entries: MPO cores and sparse residual values (biases excluded)."""
        dense = sum(o * i for o, i in self._weight_shapes.values())
        return dense / sum(p.numel() for p in [*self._core_params(), *sparse_params(self)])

    def mpo_weights(self) -> dict[str, nn.ParameterList]:
        """torch weight name -> its cores (the MPO of W^T: input side i, output side j)."""
        return {name: self._modules[f"{name}_cores"] for name in self._weight_shapes}

    @property
    def factors(self) -> dict[str, Factors]:
        """weight name -> (in_factors, out_factors) of its MPO (read from the cores)."""
        return {name: (tuple(c.shape[1] for c in cores), tuple(c.shape[2] for c in cores))
                for name, cores in self.mpo_weights().items()}

    def mpo(self, name: str) -> MPO:
        """The MPO of weight ``name`` (maps its input to its output), sharing the parameters."""
        if name not in self._weight_shapes:
            raise KeyError(f"{name!r} is not an MPO weight; they are {list(self._weight_shapes)}")
        return MPO(self._cores(name), self.reports.get(name))
