"""What to compress and how: CompressionConfig and module selection."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from torch import nn

from ..nn.registry import is_mpo_module, supported_torch_types
from .hybrid import HYBRID
from .layouts import LAYOUTS, describe_layouts
from .output_aware import ALLOCATIONS

__all__ = ["CompressionConfig", "ModuleSettings", "select_modules"]

_OVERRIDE_KEYS = ("max_bond", "rel_tol", "num_cores", "layout", "sparse_share")


def _check_max_bond(value: Any, where: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{where}max_bond must be a positive integer or None, got {value!r}")


def _check_rel_tol(value: Any, where: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1):
        raise ValueError(f"{where}rel_tol must be a number in (0, 1) or None, got {value!r}")


def _check_num_cores(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"{where}num_cores must be an integer >= 2 (the cores of the interleaved layout; one core "
                         f"would be the dense matrix), got {value!r}")


def _check_layout(value: Any, where: str) -> None:
    if value != "auto" and value not in LAYOUTS:
        raise ValueError(f"{where}layout must be 'auto' or one of {list(LAYOUTS)}, got {value!r}")


def _check_share(value: Any, where: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or not 0 <= value <= 1):
        raise ValueError(f"{where}sparse_share must be a number in [0, 1] (the share of a weight's budget "
                         f"held by the sparse part of layout 'lowrank+sparse') or None (searched), got {value!r}")


def _check_selector(value: Any, name: str) -> None:
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{name} regex {value!r} is invalid: {exc}") from None
        return
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{name} must be None, a regex string or a non-empty list of module names, got {value!r}")


def _matches(selector: str | Sequence[str], name: str) -> bool:
    """A regex string must match the whole dotted name; a list entry matches the name or
    its dotted suffix (``"fc"`` matches ``"head.fc"``), as in PEFT."""
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    return any(name == t or name.endswith("." + t) for t in selector)


@dataclass
class CompressionConfig:
    """What to compress and how.

    target_modules: a list of dotted names (an entry also matches as a dotted suffix) or
        one regex matched against the whole name; None selects every module of a registered
        type (nn.Linear, nn.Embedding, nn.LSTM, nn.GRU, nn.RNN, the three cells, nn.Conv1d and
        nn.Conv2d: ``mpolstm.nn.registry``). Listed names must exist and be of those types;
        modules selected by the default or a regex are skipped (and listed in the report)
        when they are of another type or cannot be factorised; listed ones raise.
    exclude_modules: same forms; removed from the selection.
    max_bond, rel_tol: truncation per weight. compress needs one of these or a budget.
    num_cores: cores of the paper's interleaved layout (at least 2).
    layout: "auto" (default) searches the layouts of ``LAYOUTS`` per weight (with a budget,
        layout and bonds are chosen together by error per parameter; with ``rel_tol``, the
        layout with the fewest parameters; with only ``max_bond``, "interleaved", or "lowrank"
        with calibration); or one of LAYOUTS pinned for every weight. With calibration only
        the layouts whose input side sits in the first core are searched (whitening must keep
        the MPO form). The layouts: {layouts}.
    overrides: regex -> partial config (keys max_bond, rel_tol, num_cores, layout); every
        pattern that fully matches a module's name applies, later ones winning.
    target_ratio / max_params: global budget over the selected weights' entries: dense
        entries / MPO core entries >= target_ratio, or MPO core entries <= max_params
        (biases not counted). ``max_bond`` then caps the bonds; ``rel_tol`` is not allowed.
    max_macs: latency budget: most multiply-adds per time step at batch 1 over the selected
        weights, each weight's product with one row through its factors as deployed (the chain
        merged into two halves, ``mpo.step_macs``: a rank-r factor costs r (I + J), an interleaved
        MPO far more than its parameters). Alone or with a parameter budget: layouts and bonds
        are then chosen under both. The report shows MACs per step against dense.
    sparse_share: for layout "lowrank+sparse" (low rank plus a sparse residual, fitted on the
        whitened weights; never chosen by "auto", pin it): the share of each weight's budget
        held by the sparse part, in [0, 1]; None (default) tries 0, 0.25, 0.5 and 0.7 and keeps
        the lowest (output) error. A pinned weight gets budget in proportion to its size; with
        ``max_bond`` instead of a budget, the rank is max_bond and the share defaults to 0.5.
        Sparse entries count one stored number each, like pruning's (their index is counted
        in bytes by ``mpolstm.storage``); during distillation their values train, the
        positions stay fixed.
    allocation: "error" (default): sizes by the per-matrix (output) errors; "output" (budget and
        calibration needed): the model's calibration output error decides between that, uniform
        ranks and ranks allocated by each weight's measured output sensitivity
        (compression/output_aware.py); the report says which won and by how much.
    refit: with calibration, refit every compressed weight (sizes kept) to the inputs the
        already-compressed upstream model feeds it, module by module (compression/refit.py).
    """

    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    max_bond: int | None = None
    rel_tol: float | None = None
    num_cores: int = 4
    layout: str = "auto"
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    target_ratio: float | None = None
    max_params: int | None = None
    max_macs: int | None = None
    sparse_share: float | None = None
    allocation: str = "error"
    refit: bool = False

    def __post_init__(self) -> None:
        _check_selector(self.target_modules, "target_modules")
        _check_selector(self.exclude_modules, "exclude_modules")
        _check_max_bond(self.max_bond, "")
        _check_rel_tol(self.rel_tol, "")
        _check_num_cores(self.num_cores, "")
        _check_layout(self.layout, "")
        _check_share(self.sparse_share, "")
        if self.sparse_share is not None and self.layout != HYBRID and \
                not any(p.get("layout") == HYBRID for p in self.overrides.values() if isinstance(p, Mapping)):
            raise ValueError(f"sparse_share applies only to layout='{HYBRID}' (low rank + sparse), but layout is "
                             f"{self.layout!r} and no override pins it; drop sparse_share or set layout='{HYBRID}'")
        if not isinstance(self.refit, bool):
            raise ValueError(f"refit must be True or False, got {self.refit!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {list(ALLOCATIONS)}, got {self.allocation!r}")
        if self.allocation == "output" and not (self.target_ratio is not None or self.max_params is not None):
            raise ValueError("allocation='output' allocates a budget: give target_ratio or max_params")
        if self.allocation == "output" and self.max_macs is not None:
            raise ValueError("allocation='output' compares allocations of the parameter budget only; drop max_macs "
                             "or use allocation='error'")
        if self.target_ratio is not None and self.max_params is not None:
            raise ValueError("give at most one budget: target_ratio or max_params, not both")
        if self.target_ratio is not None and (
                isinstance(self.target_ratio, bool) or not isinstance(self.target_ratio, (int, float))
                or not math.isfinite(self.target_ratio) or self.target_ratio < 1):
            raise ValueError(f"target_ratio must be a finite number >= 1, got {self.target_ratio!r}")
        for name in ("max_params", "max_macs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.budget_mode and self.rel_tol is not None:
            raise ValueError("rel_tol cannot be combined with a budget (target_ratio/max_params/max_macs); choose one")
        if not isinstance(self.overrides, Mapping):
            raise ValueError(f"overrides must be a dict of regex -> partial config, got {type(self.overrides).__name__}")
        for pattern, partial in self.overrides.items():
            if not isinstance(pattern, str) or not isinstance(partial, Mapping):
                raise ValueError(f"overrides must map regex strings to dicts, got {pattern!r}: {partial!r}")
            _check_selector(pattern, "overrides key")
            unknown = set(partial) - set(_OVERRIDE_KEYS)
            if unknown:
                raise ValueError(f"overrides[{pattern!r}] has unknown keys {sorted(unknown)}; "
                                 f"allowed: {list(_OVERRIDE_KEYS)}")
            where = f"overrides[{pattern!r}]: "
            _check_max_bond(partial.get("max_bond"), where)
            _check_rel_tol(partial.get("rel_tol"), where)
            if "num_cores" in partial:
                _check_num_cores(partial["num_cores"], where)
            if "layout" in partial:
                _check_layout(partial["layout"], where)
            _check_share(partial.get("sparse_share"), where)
            if partial.get("sparse_share") is not None and partial.get("layout", self.layout) != HYBRID:
                raise ValueError(f"{where}sparse_share applies only to layout='{HYBRID}', but the layout there is "
                                 f"{partial.get('layout', self.layout)!r}")
            if self.budget_mode and partial.get("rel_tol") is not None:
                raise ValueError(f"{where}rel_tol cannot be combined with a budget (target_ratio/max_params)")

    @property
    def budget_mode(self) -> bool:
        return self.target_ratio is not None or self.max_params is not None or self.max_macs is not None

    def settings_for(self, name: str) -> "ModuleSettings":
        """The settings of the module called ``name``: the config's, with every matching override applied."""
        settings = {"max_bond": self.max_bond, "rel_tol": self.rel_tol, "num_cores": self.num_cores,
                    "layout": self.layout, "sparse_share": self.sparse_share}
        for pattern, partial in self.overrides.items():
            if re.fullmatch(pattern, name):
                settings.update(partial)
        return ModuleSettings(**settings)


CompressionConfig.__doc__ = CompressionConfig.__doc__.replace("{layouts}", describe_layouts())


@dataclass(frozen=True)
class ModuleSettings:
    """How one module is compressed (CompressionConfig.settings_for): bond cap, tolerance, cores of
    the paper's layout, the layout ("auto" or a key of LAYOUTS) and, for "lowrank+sparse", the
    sparse share (None: searched)."""

    max_bond: int | None
    rel_tol: float | None
    num_cores: int
    layout: str
    sparse_share: float | None = None


def _supported_names() -> str:
    return ", ".join(f"nn.{t.__name__}" for t in supported_torch_types())


def select_modules(model: nn.Module, config: CompressionConfig) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, named in a target list) for every module to replace. Modules matched
    only by the default or a regex are skipped (and reported) when they cannot be factorised;
    named ones raise."""
    named = [(n, m) for n, m in model.named_modules() if n]
    supported = supported_torch_types()
    if isinstance(model, supported):
        raise ValueError(f"compress replaces submodules of a model; the model itself is of type {type(model).__name__}: "
                         f"use mpolstm.nn.MPO* .from_<torch>() for a single layer")
    target = config.target_modules
    if isinstance(target, (list, tuple)):
        for t in target:
            if not any(_matches([t], n) for n, _ in named):
                raise ValueError(f"target_modules entry {t!r} matches no module of the model "
                                 f"(names look like {[n for n, _ in named][:5]})")
    chosen = []
    for name, module in named:
        if is_mpo_module(module) or any(name.startswith(c + ".") for c, _, _ in chosen):
            continue
        if target is not None and not _matches(target, name):
            continue
        explicit = isinstance(target, (list, tuple))  # named, not matched by a pattern
        if config.exclude_modules is not None and _matches(config.exclude_modules, name):
            continue
        if not isinstance(module, supported):
            if explicit:
                raise ValueError(f"target module {name!r} is of type {type(module).__name__}; compress handles "
                                 f"{_supported_names()}")
            continue
        chosen.append((name, module, explicit))
    if target is not None and not chosen:
        raise ValueError(f"target_modules={target!r} selects no module of a supported type ({_supported_names()})")
    return chosen


