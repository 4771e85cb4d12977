"""The one registry of torch module type -> MPO module type, and the one replace-by-name helper.

Each MPO layer file registers itself once (``register(LayerType(...))`` at its end); compress,
calibration, io, export and prune look types up here and nowhere else. Lookup follows the
module's MRO, so a subclass of nn.LSTM is handled as an nn.LSTM.

The MPO-module protocol every registered ``mpo_type`` follows (docs/architecture.md):
``mpo_weights() -> {torch weight name: cores}``, ``reports``, ``mpo_config()`` /
``from_config(cfg)``, and the two conversions held here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from torch import Tensor, nn

__all__ = ["KINDS", "LayerType", "MPOModule", "register", "layer_type", "layer_type_of_mpo", "mpo_class",
           "supported_torch_types", "registered_mpo_names", "register_auxiliary", "is_mpo_module", "replace_module"]


@dataclass(frozen=True)
class LayerType:
    """How one torch module type maps to its MPO module type.

    from_torch(module, max_bond=None, rel_tol=None, *, num_cores=4, mpos=None) -> MPO module:
        decompose (exact with neither bound), or take ready MPOs of named weights (``mpos``).
    to_torch(mpo_module) -> the plain torch module with the rebuilt weights (dense export).
    matrices(module, num_cores=4) -> {weight name: (M, (in_factors, out_factors))}: each weight as
        the matrix its MPO represents (W^T, or an embedding's padded table) with its default
        layout, without decomposing (compress searches layouts from these).
    inputs(module, args) -> iterable of (weight name, what it multiplies): a (samples, features)
        tensor, or a 1-D tensor of row indices for a table lookup; called by a forward hook
        with the module's positional arguments (calibration).
    size_attrs: constructor sizes that must agree between a saved MPO module and the torch
        module it replaces when loading.
    kind: one of KINDS, how pruning groups the type ("rnn" for recurrent layers and cells).
    weight_names(module) -> the names of the module's weight matrices (what compress and prune act on).
    """

    torch_type: type[nn.Module]
    mpo_type: type[nn.Module]
    from_torch: Callable[..., nn.Module]
    to_torch: Callable[..., nn.Module]  # (its mpo_type module) -> nn.Module
    matrices: Callable[..., dict]
    inputs: Callable[[nn.Module, tuple], Iterable[tuple[str, Tensor]]]
    size_attrs: tuple[str, ...]
    kind: str
    weight_names: Callable[[nn.Module], list[str]]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")


KINDS = ("rnn", "linear", "embedding", "conv")
_BY_TORCH: dict[type[nn.Module], LayerType] = {}
_BY_MPO: dict[str, LayerType] = {}
_AUXILIARY: dict[str, type[nn.Module]] = {}  # MPO-protocol modules that convert no torch type (shared.py)


def register(entry: LayerType) -> LayerType:
    """Add ``entry``; a torch type or MPO class name registered twice is a ValueError."""
    if entry.torch_type in _BY_TORCH or entry.mpo_type.__name__ in _BY_MPO:
        raise ValueError(f"{entry.torch_type.__name__} / {entry.mpo_type.__name__} is already registered")
    _BY_TORCH[entry.torch_type] = entry
    _BY_MPO[entry.mpo_type.__name__] = entry
    return entry


def layer_type(module: nn.Module) -> LayerType | None:
    """The entry for a torch module (by its MRO), None if its type is not registered."""
    for cls in type(module).__mro__:
        if cls in _BY_TORCH:
            return _BY_TORCH[cls]
    return None


def layer_type_of_mpo(module: nn.Module) -> LayerType | None:
    """The entry whose MPO type ``module`` is (by its MRO), None for other modules."""
    for cls in type(module).__mro__:
        entry = _BY_MPO.get(cls.__name__)
        if entry is not None and entry.mpo_type is cls:
            return entry
    return None


def register_auxiliary(cls: type[nn.Module]) -> type[nn.Module]:
    """Make an MPO-protocol class that stands in for a torch module without converting one (a
    layer using another layer's MPO) loadable by name; it must define ``torch_type``."""
    _AUXILIARY[cls.__name__] = cls
    return cls


def mpo_class(name: str) -> type[nn.Module] | None:
    """The registered MPO class called ``name`` (as saved in configs), or None."""
    if not isinstance(name, str):
        return None
    entry = _BY_MPO.get(name)
    return entry.mpo_type if entry is not None else _AUXILIARY.get(name)


def supported_torch_types() -> tuple[type[nn.Module], ...]:
    return tuple(_BY_TORCH)


def registered_mpo_names() -> list[str]:
    return sorted([*_BY_MPO, *_AUXILIARY])


class MPOModule(nn.Module):
    """The MPO-module protocol (see the module docstring), as a type: every MPO layer (``nn.base``)
    and every layer that uses another's MPO (``nn.shared``) derives from it, so "is this an MPO
    module" is :func:`is_mpo_module`, one isinstance check."""

    def mpo_weights(self) -> dict[str, nn.ParameterList]:
        """torch weight name -> its cores (the MPO of W^T); empty for a layer using another's MPO."""
        raise NotImplementedError

    @property
    def reports(self) -> dict:
        """weight name -> the TruncationReport of its decomposition."""
        raise NotImplementedError

    def mpo_config(self) -> dict[str, Any]:
        """JSON-serialisable description from which ``from_config`` rebuilds the module."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "MPOModule":
        """A module with exactly the configured shapes (``io.load`` then loads the weights)."""
        raise NotImplementedError


def is_mpo_module(module: nn.Module) -> bool:
    """True for modules that follow the MPO-module protocol (:class:`MPOModule`)."""
    return isinstance(module, MPOModule)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Set the submodule at dotted ``name`` of ``model`` to ``new``; returns the old one."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent)
    old = getattr(owner, child)
    setattr(owner, child, new)
    return old
