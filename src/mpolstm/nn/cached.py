"""The part of the multi-weight MPO modules (recurrent layers, cells, convolutions) that keeps
rebuilt weights cached in ``self._cache`` and knows its weights' dense shapes.

Subclasses set ``self._weight_shapes`` ({weight name: (out, in)}) and ``self._cache`` and define
``_core_params()``. The cache is dropped on ``train()``, ``.to()``/``.double()`` (``_apply``) and
is never copied (``__getstate__``).
"""

from __future__ import annotations

from torch import nn

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
        """Dense weight entries / MPO core entries (biases excluded on both sides)."""
        dense = sum(o * i for o, i in self._weight_shapes.values())
        return dense / sum(p.numel() for p in self._core_params())
