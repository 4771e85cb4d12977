"""MPOLinear: a drop-in nn.Linear whose weight is a Matrix Product Operator."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import mpo as mpo_math
from .registry import LayerType, register
from ..mpo import MPO, TruncationReport
from .sparse import add_sparse_product, load_sparse_config, sparse_config, sparse_params, with_sparse

__all__ = ["MPOLinear", "SingleWeightMPO", "resolve_factors", "init_cores_"]


def resolve_factors(
    in_features: int,
    out_features: int,
    in_factors: Sequence[int] | None,
    out_factors: Sequence[int] | None,
    num_cores: int,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Default or validate the (in, out) factorisations of a layer's weight.

    Raises ValueError when they do not multiply to the feature sizes, differ in length, or
    cannot split the matrix usefully (every core but one would have i_k = j_k = 1)."""
    in_f = tuple(in_factors) if in_factors is not None else mpo_math.factorize(in_features, num_cores)
    out_f = tuple(out_factors) if out_factors is not None else mpo_math.factorize(out_features, len(in_f))
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
            "explicitly or use fewer cores"
        )
    return in_f, out_f


def init_cores_(cores: Sequence[Tensor], target_std: float) -> None:
    """Fill cores with N(0, s^2) so that every entry of the rebuilt matrix has variance
    ``target_std**2``: Var(W) = prod_k s^2 * prod_k D_k, so s^2 = (target^2 / prod D)^(1/n)."""
    n = len(cores)
    bond_product = math.prod(mpo_math.bond_dims(cores))
    core_std = (target_std**2 / bond_product) ** (1.0 / (2 * n))
    with torch.no_grad():
        for c in cores:
            c.normal_(0.0, core_std)


class SingleWeightMPO(nn.Module):
    """Protocol part shared by layers with one MPO weight named "weight": ``self.cores``
    (nn.ParameterList) and ``self.report`` (TruncationReport or None)."""

    cores: nn.ParameterList
    report: TruncationReport | None

    def mpo_weights(self) -> dict[str, nn.ParameterList]:
        """{"weight": the cores}."""
        return {"weight": self.cores}

    @property
    def reports(self) -> dict[str, TruncationReport]:
        return {} if self.report is None else {"weight": self.report}


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
        if isinstance(bond_dim, bool) or not isinstance(bond_dim, int) or bond_dim < 1:
            raise ValueError(f"bond_dim must be a positive integer, got {bond_dim!r}")
        self.in_features, self.out_features = in_features, out_features
        self.in_factors, self.out_factors = resolve_factors(
            in_features, out_features, in_factors, out_factors, num_cores
        )
        bonds = (1, *mpo_math.capped_bond_dims(self.in_factors, self.out_factors, bond_dim), 1)
        kw = {"device": device, "dtype": dtype}
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(bonds[k], i, j, bonds[k + 1], **kw))
            for k, (i, j) in enumerate(zip(self.in_factors, self.out_factors))
        )
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.report: TruncationReport | None = None
        init_cores_(list(self.cores), 1.0 / math.sqrt(3 * in_features))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    # -- conversion -----------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        max_bond: int | None = None,
        rel_tol: float | None = None,
        *,
        in_factors: Sequence[int] | None = None,
        out_factors: Sequence[int] | None = None,
        num_cores: int = 4,
        mpos: Mapping[str, MPO] | None = None,
    ) -> "MPOLinear":
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
        layer.cores = nn.ParameterList(nn.Parameter(c.detach().contiguous()) for c in decomposed.cores)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        layer.report = decomposed.report
        return layer

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
        return linear

    # -- MPO-module protocol (used by compress and io) ---------------------------------
    def mpo_config(self) -> dict[str, Any]:
        """JSON-serialisable description from which ``from_config`` rebuilds the module."""
        return {
            "class": type(self).__name__,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "in_factors": list(self.in_factors),
            "out_factors": list(self.out_factors),
            "bond_dims": list(mpo_math.bond_dims(self.cores)),
            **({"sparse": sparse_config(self)} if sparse_config(self) else {}),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "MPOLinear":
        """A module with cores of exactly the configured shapes (values from the default init)."""
        in_f, out_f = tuple(config["in_factors"]), tuple(config["out_factors"])
        layer = cls(int(config["in_features"]), int(config["out_features"]), 1,
                    in_factors=in_f, out_factors=out_f, bias=bool(config["bias"]))
        bonds = (1, *[int(b) for b in config["bond_dims"]], 1)
        if len(bonds) != len(in_f) + 1:
            raise ValueError(f"bond_dims {config['bond_dims']} must have {len(in_f) - 1} entries for {len(in_f)} cores")
        cores = [torch.empty(bonds[k], i, j, bonds[k + 1]) for k, (i, j) in enumerate(zip(in_f, out_f))]
        init_cores_(cores, 1.0 / math.sqrt(3 * layer.in_features))
        layer.cores = nn.ParameterList(nn.Parameter(c) for c in cores)
        load_sparse_config(layer, config)
        return layer

    # -- use ------------------------------------------------------------------------
    def mpo(self) -> MPO:
        """The weight's MPO (maps in_features -> out_features), sharing the parameters."""
        return MPO(list(self.cores), self.report)

    @property
    def weight(self) -> Tensor:
        """The rebuilt dense weight, (out_features, in_features), differentiable."""
        return with_sparse(self, "weight", mpo_math.cores_to_matrix(list(self.cores), transpose=True))

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in [*self.cores, *sparse_params(self)]) + (0 if self.bias is None else self.bias.numel())

    @property
    def compression_ratio(self) -> float:
        """Dense weight entries / stored entries: cores and sparse values (biases excluded on both sides)."""
        return self.in_features * self.out_features / sum(p.numel() for p in [*self.cores, *sparse_params(self)])

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"MPOLinear expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}"
            )
        cores = list(self.cores)
        rows = x.numel() // self.in_features
        cost = mpo_math.matmul_cost(rows, cores)
        if cost["cores"] < cost["rebuild"]:
            out = add_sparse_product(self, "weight", x, mpo_math.mpo_matmul(x, cores, strategy="cores"))
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        bonds = mpo_math.bond_dims(self.cores)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"in_factors={self.in_factors}, out_factors={self.out_factors}, bond_dims={bonds}, "
            f"params={self.num_params}, compression={self.compression_ratio:.1f}x, bias={self.bias is not None}"
        )


register(LayerType(nn.Linear, MPOLinear, MPOLinear.from_linear, MPOLinear.to_linear, MPOLinear.mpo_matrices,
                   lambda linear, args: [("weight", args[0])], ("in_features", "out_features")))
