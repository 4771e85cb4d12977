"""Layers that use another MPO module's weight: tied parameters stay tied after compression.

A model that ties two layers to one parameter (a word LM whose output layer reuses the input
embedding, ``decoder.weight = encoder.weight``) is compressed into ONE MPO: the first layer
(the owner) becomes an MPO module, and every other layer that shared the parameter becomes a
``SharedLinear`` / ``SharedEmbedding`` that computes with the owner's rebuilt weight
(``owner.weight``, the torch weight's shape) and holds only its own bias. Gradients of both uses
reach the owner's cores, so training keeps them tied; the MPO is counted once everywhere.

The owner is referenced, not registered as a submodule (its parameters belong to the owner's
place in the model): ``owner_name`` is its dotted name, and ``bind(model)`` re-resolves it (after
``io.load`` or ``copy.deepcopy`` of a sub-module). ``mpo_weights()`` is empty.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .registry import MPOModule, register_auxiliary

__all__ = ["SharedLayer", "SharedLinear", "SharedEmbedding", "SHARED_TYPES", "shared_for"]


class SharedLayer(MPOModule):
    """The part shared by both kinds: the owner reference and the MPO-module protocol."""

    torch_type: type[nn.Module]  # the torch layer it stands in for (set by each kind)

    def __init__(self, owner_name: str) -> None:
        super().__init__()
        self.owner_name = owner_name
        self._owner: tuple[nn.Module, ...] = ()  # a tuple: not a registered submodule

    @property
    def owner(self) -> nn.Module:
        if not self._owner:
            raise RuntimeError(f"{type(self).__name__} is not bound to its owner {self.owner_name!r}; "
                               "call bind(model)")
        return self._owner[0]

    def bind(self, model: nn.Module) -> None:
        """Point at the module called ``owner_name`` in ``model``."""
        self._owner = (model.get_submodule(self.owner_name),)

    @property
    def weight(self) -> Tensor:
        """The owner's rebuilt weight, in this layer's torch shape."""
        return cast(Tensor, self.owner.weight)  # nn.Module.__getattr__ types it Tensor | Module

    def mpo_weights(self) -> dict[str, nn.ParameterList]:
        return {}

    @property
    def reports(self) -> dict:
        return {}

    # dense(weight): the plain torch layer using ``weight`` (the owner's dense parameter: tied again),
    # defined by each subclass
    dense: Callable[[nn.Parameter], nn.Module]


@register_auxiliary
class SharedLinear(SharedLayer):
    """nn.Linear whose weight (out_features, in_features) is the owner's ``weight``."""

    torch_type = nn.Linear

    def __init__(self, owner_name: str, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(owner_name)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def tie(cls, linear: nn.Linear, owner: nn.Module, owner_name: str) -> "SharedLinear":
        layer = cls(owner_name, linear.in_features, linear.out_features, linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        if linear.bias is not None:
            assert layer.bias is not None  # made with bias=True
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        layer._owner = (owner,)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        factors = self._rank_factors()
        if factors is None:
            return F.linear(x, self.weight, self.bias)
        left, right = factors
        return F.linear(F.linear(x, right), left, self.bias)

    def _rank_factors(self) -> tuple[Tensor, Tensor] | None:
        """In the factorized runtime, an owner of rank D (two cores, no padding row or sparse part): the
        weight (out, in) as left (out, D) @ right (D, in), views of the owner's cores (so a file holds
        them once, beside the owner's own use); else None (the owner's rebuilt weight)."""
        owner = self.owner
        if not getattr(owner, "factorized", False) or getattr(owner, "padding_row", None) is not None or \
                any(name.endswith("_sparse") for name, _ in owner.named_children()):
            return None
        (cores,) = cast(MPOModule, owner).mpo_weights().values()  # factorized: an MPO module
        if len(cores) != 2 or cores[0].shape[2] != 1 or cores[1].shape[1] != 1:
            return None
        m_left, m_right = cores[0][0, :, 0, :], cores[1][:, 0, :, 0]  # the MPO's matrix M = m_left @ m_right
        if hasattr(owner, "num_embeddings"):  # M is the (padded) table: the weight is its first rows
            return m_left[:self.out_features], m_right
        return m_right.t(), m_left.t()  # M = W^T of the owning linear layer

    def dense(self, weight: nn.Parameter) -> nn.Linear:
        """A plain nn.Linear using ``weight`` (the owner's dense parameter: tied again)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight = weight
        if self.bias is not None:
            with torch.no_grad():
                linear.bias.copy_(self.bias)
        return linear

    def mpo_config(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "owner": self.owner_name, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "SharedLinear":
        return cls(str(config["owner"]), int(config["in_features"]), int(config["out_features"]),
                   bool(config["bias"]))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight of {self.owner_name!r}"


@register_auxiliary
class SharedEmbedding(SharedLayer):
    """nn.Embedding whose table (num_embeddings, embedding_dim) is the owner's ``weight``."""

    torch_type = nn.Embedding

    def __init__(self, owner_name: str, num_embeddings: int, embedding_dim: int,
                 padding_idx: int | None = None) -> None:
        super().__init__(owner_name)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx

    @classmethod
    def tie(cls, embedding: nn.Embedding, owner: nn.Module, owner_name: str) -> "SharedEmbedding":
        layer = cls(owner_name, embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx)
        layer._owner = (owner,)
        return layer

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight, self.padding_idx)

    def dense(self, weight: nn.Parameter) -> nn.Embedding:
        """A plain nn.Embedding using ``weight`` (the owner's dense parameter: tied again)."""
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                           device=weight.device, dtype=weight.dtype)
        emb.weight = weight
        return emb

    def mpo_config(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "owner": self.owner_name, "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "padding_idx": self.padding_idx}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "SharedEmbedding":
        return cls(str(config["owner"]), int(config["num_embeddings"]), int(config["embedding_dim"]),
                   config["padding_idx"])

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, table of {self.owner_name!r}"


SHARED_TYPES = {nn.Linear: SharedLinear, nn.Embedding: SharedEmbedding}


def shared_for(module: nn.Module) -> type[SharedLayer] | None:
    """The Shared* class that can stand in for ``module`` (an nn.Linear or nn.Embedding)."""
    for cls in type(module).__mro__:
        if cls in SHARED_TYPES:
            return SHARED_TYPES[cls]
    return None
