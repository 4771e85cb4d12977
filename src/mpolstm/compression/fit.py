"""What compress produces for one weight, in every layout: :class:`Fit`, the MPO of M (I, J) (= W^T)
plus a sparse part (empty except for layouts that keep one, "lowrank+sparse"), and the one
factor balancing every whitened fit uses.

The engine, the sequential refit and output-aware allocation handle every layout through this
type: ``params`` (stored numbers), ``matrix()`` (M', what the model computes with) and the
layout's name (how to fit another matrix the same way: ``layouts.fit_like``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

from ..mpo import MPO
from ..nn.registry import layer_type
from ..nn.sparse import attach_sparse

__all__ = ["Fit", "balance_first_bond", "mpo_module"]


def _no_entries(dtype: torch.dtype) -> Tensor:
    return torch.zeros(0, dtype=dtype)


@dataclass
class Fit:
    """One weight as compressed. ``mpo``: the MPO of M (I, J) = W^T; ``index`` / ``values``: the
    sparse part, k flat positions in the torch weight (out, in) = M^T (row-major, sorted) and
    their values (k = 0 for layouts without one); ``share``: the sparse part's share of the
    stored numbers it was fitted with (None for layouts without one); ``error``: the fitter's
    relative (whitened) error of M', when it measured one."""

    layout: str
    mpo: MPO
    index: Tensor = field(default_factory=lambda: _no_entries(torch.long))
    values: Tensor = field(default_factory=lambda: _no_entries(torch.float64))
    share: float | None = None
    error: float | None = None

    @property
    def nnz(self) -> int:
        return self.index.numel()

    @property
    def params(self) -> int:
        """Stored numbers: the cores' entries plus the sparse values."""
        return self.mpo.num_params + self.nnz

    def matrix(self) -> Tensor:
        """M' (I, J) in float64: the MPO's matrix plus the sparse part."""
        m = self.mpo.to_matrix().to(torch.float64)
        if not self.nnz:
            return m
        rows, cols = m.shape
        flat = m.T.reshape(-1).index_add(0, self.index, self.values.to(torch.float64))
        return flat.reshape(cols, rows).T


def balance_first_bond(cores: list[Tensor]) -> list[Tensor]:
    """The cores with every channel of the first bond rescaled to the same norm in the first core
    and in the second (the matrix is unchanged). A whitened fit (S^{-1} folded into the first
    core, or singular values split between two factors) is otherwise badly scaled for gradient
    training."""
    if len(cores) < 2:
        return list(cores)
    first, second = cores[0], cores[1]
    left = first.flatten(0, 2).norm(dim=0)  # (D_1,)
    right = second.flatten(1).norm(dim=1)
    scale = torch.where((left > 0) & (right > 0), (right / left.clamp_min(1e-300)).sqrt(), torch.ones_like(left))
    return [first * scale, second / scale[:, None, None, None], *cores[2:]]


def mpo_module(module: nn.Module, fits: Mapping[str, Fit]) -> nn.Module:
    """The MPO module of the torch ``module`` with each weight set from its Fit (cores cast to the
    module's dtype and device, the sparse parts attached), in the module's train/eval mode."""
    like = next(iter(module.parameters()))
    entry = layer_type(module)
    assert entry is not None, f"{type(module).__name__} has no MPO layer type"
    with torch.no_grad():
        new = entry.from_torch(module, mpos={
            name: MPO([c.to(device=like.device, dtype=like.dtype) for c in fit.mpo.cores], fit.mpo.report)
            for name, fit in fits.items()})
        for name, fit in fits.items():
            if fit.nnz:
                attach_sparse(new, name, fit.index.to(like.device), fit.values.to(like))
    return new.train(module.training)
