"""MPO bonds of a model, TT-rounding them in place, and the cubic bond schedule of row (f)."""

from __future__ import annotations

import math
from typing import Mapping, Sequence, cast

import torch
from torch import nn

from ...mpo import MPO, bond_dims
from ...nn.registry import MPOModule
from ..training import Callback, TrainState

__all__ = ["Bonds", "mpo_bonds", "mpo_entries", "truncate_bonds", "BondSchedule"]

Bonds = dict[str, dict[str, tuple[int, ...]]]
"""{module name: {weight name: internal bond dims}}."""


def _mpo(model: nn.Module, name: str) -> MPOModule:
    """The named MPO module (nn.Module.get_submodule types it a plain Module)."""
    return cast(MPOModule, model.get_submodule(name))


def mpo_bonds(model: nn.Module, names: Sequence[str]) -> Bonds:
    """{module name: {weight name: internal bond dims}} of the named MPO modules."""
    return {
        n: {w: bond_dims(cores) for w, cores in _mpo(model, n).mpo_weights().items()}
        for n in names
    }


def mpo_entries(model: nn.Module, names: Sequence[str]) -> int:
    """Entries of every MPO core of the named MPO modules."""
    return sum(c.numel() for n in names for cores in _mpo(model, n).mpo_weights().values() for c in cores)


@torch.no_grad()
def truncate_bonds(model: nn.Module, bonds: Mapping[str, Mapping[str, Sequence[int]]]) -> None:
    """TT-round each named MPO weight (in place) to at most the given internal bonds."""
    for name, weights in bonds.items():
        cores_by_weight = _mpo(model, name).mpo_weights()
        for wname, caps in weights.items():
            cores = cores_by_weight[wname]
            current = bond_dims(cores)
            if all(c <= b for c, b in zip(current, caps)):
                continue
            rounded = MPO([c.detach() for c in cores]).truncate(max_bond=list(caps))
            for k, core in enumerate(rounded.cores):
                cores[k] = nn.Parameter(core.contiguous())


class BondSchedule(Callback):
    """Shrink MPO bonds on Zhu & Gupta's cubic schedule during :func:`~mpolstm.harness.training.fit`.

    At the start of epoch e the bonds of every weight are
    ``target + ceil((initial - target) * (1 - e / end)^3)`` (per bond), reaching ``target`` at
    epoch ``end`` (``end=0``: at once); each shrink is a TT-rounding of the current cores, so training continues from
    the best approximation. On resume the bonds of the last completed epoch are re-applied before
    the checkpoint is loaded."""

    def __init__(self, target: Bonds, end: int) -> None:
        if end < 0:
            raise ValueError(f"BondSchedule end must be >= 0 epochs, got {end}")
        self.target, self.end = target, end
        self.initial: Bonds | None = None

    def bonds_at(self, epoch: int) -> Bonds:
        remaining = 0.0 if epoch >= self.end else (1.0 - epoch / self.end) ** 3
        initial = self.initial
        assert initial is not None  # read in on_fit_start
        return {
            n: {w: tuple(t + math.ceil((max(i, t) - t) * remaining) for i, t in zip(initial[n][w], tgt))
                for w, tgt in weights.items()}
            for n, weights in self.target.items()
        }

    def on_fit_start(self, state: TrainState) -> None:
        self.initial = mpo_bonds(state.model, list(self.target))
        if state.resumed and state.epoch > 0:
            truncate_bonds(state.model, self.bonds_at(state.epoch - 1))

    def on_epoch_start(self, state: TrainState) -> None:
        truncate_bonds(state.model, self.bonds_at(state.epoch))

    def on_epoch_end(self, state: TrainState) -> None:
        state.record["mpo_params"] = mpo_entries(state.model, list(self.target))

    def ready(self, state: TrainState) -> bool:
        return state.epoch >= self.end
