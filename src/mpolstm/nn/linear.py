"""MPOLinear: a drop-in nn.Linear whose weight is a Matrix Product Operator."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import mpo as mpo_math
from ..mpo import MPO, resolve_factors
from .base import SingleWeightMPO, check_positive_int
from .registry import LayerType, register

__all__ = ["MPOLinear"]


class MPOLinear(SingleWeightMPO):
    """y = x W^T + b with W (out_features, in_features) stored as an MPO.

    Args:
        in_features, out_features: as nn.Linear.
        bond_dim: cap on every internal bond (clipped to the largest useful value).
        in_factors, out_factors: factorisations of the feature sizes (default: balanced,
            ``num_cores`` factors each).
        bias: learn an additive bias.

    From-scratch initialisation: cores are Gaussian, scaled so that every entry of the
    rebuilt weight has the variance of nn.Linear's default init, 1 / (3 in_features); the
    bias is U(-1/sqrt(in), 1/sqrt(in)) as in nn.Linear.

    Shapes: input (..., in_features) -> output (..., out_features). Cores are stored as
    (D_{k-1}, i_k, j_k, D_k) with i over the input and j over the output.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bond_dim: int,
        *,
        in_factors: Sequence[int] | None = None,
        out_factors: Sequence[int] | None = None,
        num_cores: int = 4,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive_int("bond_dim", bond_dim)
        self.in_features, self.out_features = in_features, out_features
        self._start_weights(num_cores)
        factors = resolve_factors(in_features, out_features, in_factors, out_factors, num_cores)
        self._add_weight("weight", (out_features, in_features), bond_dim, factors,
                         1.0 / math.sqrt(3 * in_features), device, dtype)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        if self.bias is not None:
            bound = 1.0 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    # -- conversion -----------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, max_bond: int | None = None, rel_tol: float | None = None, *,
                    in_factors: Sequence[int] | None = None, out_factors: Sequence[int] | None = None,
                    num_cores: int = 4, mpos: Mapping[str, MPO] | None = None) -> "MPOLinear":
        """Decompose a trained nn.Linear by TT-SVD; with neither ``max_bond`` nor ``rel_tol``
        the result reproduces it exactly. ``mpos={"weight": mpo}`` uses an already decomposed
        MPO of W^T (in_features, out_features) instead. The achieved error is in ``.report``."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        if mpos is not None:
            decomposed = mpos["weight"]
            if decomposed.shape != (linear.in_features, linear.out_features):
                raise ValueError(
                    f"mpos['weight'] has shape {decomposed.shape}, expected "
                    f"{(linear.in_features, linear.out_features)} (the transposed weight)"
                )
            in_f, out_f = decomposed.in_factors, decomposed.out_factors
        else:
            in_f, out_f = resolve_factors(linear.in_features, linear.out_features, in_factors, out_factors, num_cores)
            with torch.no_grad():
                decomposed = mpo_math.decompose(linear.weight.T, in_f, out_f, max_bond=max_bond, rel_tol=rel_tol)
        layer = cls(linear.in_features, linear.out_features, 1, in_factors=in_f, out_factors=out_f,
                    bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype)
        layer._set_mpo("weight", decomposed)
        if linear.bias is not None:
            assert layer.bias is not None  # made with bias=True
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer.train(linear.training)

    @staticmethod
    def mpo_matrices(linear: nn.Linear, num_cores: int = 4) -> dict[str, tuple[Tensor, tuple]]:
        """{"weight": (W^T (in, out), default factors)} (see ``LayerType.matrices``)."""
        return {"weight": (linear.weight.detach().T,
                           resolve_factors(linear.in_features, linear.out_features, None, None, num_cores))}

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear with the rebuilt weight."""
        first = self.cores[0]
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=first.device, dtype=first.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.train(self.training)

    # -- MPO-module protocol (used by compress and io) ---------------------------------
    def _config_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def _args_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"in_features": int(config["in_features"]), "out_features": int(config["out_features"]),
                "bias": bool(config["bias"]), "in_factors": tuple(config["in_factors"]),
                "out_factors": tuple(config["out_factors"])}

    # -- use ------------------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The rebuilt dense weight, (out_features, in_features), differentiable."""
        return self._rebuild("weight")

    @property
    def num_params(self) -> int:
        return sum(c.numel() for c in self.cores) + (0 if self.bias is None else self.bias.numel())

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"MPOLinear expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}"
            )
        out = self._project(x.reshape(-1, self.in_features), "weight", self._eval_cache(), self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        bonds = mpo_math.bond_dims(self.cores)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"in_factors={self.in_factors}, out_factors={self.out_factors}, bond_dims={bonds}, "
            f"params={self.num_params}, compression={self.compression_ratio:.1f}x, bias={self.bias is not None}"
        )


register(LayerType(nn.Linear, MPOLinear, MPOLinear.from_linear, MPOLinear.to_linear, MPOLinear.mpo_matrices,
                   lambda linear, args: [("weight", args[0])], ("in_features", "out_features"), "linear",
                   lambda linear: ["weight"]))
