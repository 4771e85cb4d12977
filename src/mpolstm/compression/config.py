"""What to compress and how: CompressionConfig and module selection."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from torch import nn

from ..errors import ConfigError, must_be, one_of
from ..nn.registry import is_mpo_module, supported_torch_types
from .hybrid import HYBRID
from .layouts import LAYOUTS, describe_layouts

__all__ = ["CompressionConfig", "ConfigError", "ModuleSettings", "select_modules"]

# allocation (compression/output_aware.py): "error": the held-out decision among uniform / weight error /
# per-matrix (when calibrated with batches); "output": also the sensitivity-weighted allocation;
# "per-matrix": the per-matrix allocation, no decision.
ALLOCATIONS = ("error", "output", "per-matrix")
_OVERRIDE_KEYS = ("max_bond", "rel_tol", "num_cores", "layout", "sparse_share")
_BUDGETS = ("target_ratio", "max_params", "max_macs")
_SIZES = (*_BUDGETS, "max_bond", "rel_tol")  # the fields that size a compression


def _check_max_bond(value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise must_be("max_bond", "a positive integer", value, optional=True)


def _check_rel_tol(value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1):
        raise must_be("rel_tol", "a number in (0, 1)", value, optional=True)


def _check_num_cores(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise must_be("num_cores", "an integer >= 2 (the cores of the interleaved layout; one core would be the "
                      "dense matrix)", value)


def _check_share_layout(share: Any, layout: str, where: str = "", pinned_elsewhere: bool = False) -> None:
    """``sparse_share`` only with the layout it sizes ("lowrank+sparse"), here or pinned by an override."""
    if share is not None and layout != HYBRID and not pinned_elsewhere:
        raise ConfigError("sparse_share", lambda n: (
            f"{where}{n('sparse_share')} applies only to layout '{HYBRID}' (low rank + sparse), but the layout is "
            f"{layout!r}{'' if where else ' and no override pins it'}: drop {n('sparse_share')} or set "
            f"{n.given('layout', HYBRID)}"))


def _check_layout(value: Any) -> None:
    if value != "auto" and value not in LAYOUTS:
        raise must_be("layout", f"'auto' or one of {list(LAYOUTS)}", value)


def _check_share(value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or not 0 <= value <= 1):
        raise ConfigError("sparse_share", lambda n: (
            f"{n('sparse_share')} must be a number in [0, 1] (the share of a weight's budget held by the sparse part "
            f"of layout 'lowrank+sparse'){' or None (searched)' if n.api else ''}, got {value!r}"))


def _check_selector(value: Any, name: str) -> None:
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(name, lambda n, exc=exc: f"{n(name)} regex {value!r} is invalid: {exc}") from None
        return
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(name, lambda n: f"{n(name)} must be {'None, ' if n.api else ''}a regex string or a "
                                          f"non-empty list of module names, got {value!r}")


def _check_budgets(config: "CompressionConfig") -> None:
    """target_ratio, max_params, max_macs: their values, and the rules that combine them."""
    if config.target_ratio is not None and config.max_params is not None:
        raise ConfigError("max_params", lambda n: f"give at most one budget: {n('target_ratio')} or "
                                                  f"{n('max_params')}, not both")
    ratio = config.target_ratio
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                              or not math.isfinite(ratio) or ratio <= 1):
        # 1 compresses nothing, and no MPO both holds the dense weight's entries and equals it (full bond
        # needs more): refused rather than a same-size model with an error in every weight
        raise must_be("target_ratio", "a finite number above 1 (1 compresses nothing)", ratio)
    for name in ("max_params", "max_macs"):
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise must_be(name, "a positive integer", value)
    given = [b for b in _BUDGETS if getattr(config, b) is not None]
    if given and config.rel_tol is not None:
        raise ConfigError("rel_tol", lambda n: f"{n('rel_tol')} cannot be combined with " + (
            "a budget (target_ratio/max_params/max_macs)" if n.api else one_of([n(b) for b in given])) + "; choose one")


def _check_tolerance(config: "CompressionConfig") -> None:
    value = config.max_output_error
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise must_be("max_output_error", "a positive number (the model's relative output error allowed)", value)
    given = [b for b in _BUDGETS if getattr(config, b) is not None]
    if given:
        raise ConfigError("max_output_error", lambda n: f"{n('max_output_error')} finds the budget itself: drop "
                                                        f"{one_of([n(b) for b in given])}")


def _check_allocation(config: "CompressionConfig") -> None:
    if config.allocation not in ALLOCATIONS:
        raise must_be("allocation", f"one of {list(ALLOCATIONS)}", config.allocation)
    if config.allocation == "output" and config.target_ratio is None and config.max_params is None:
        raise ConfigError("allocation", lambda n: f"allocation='output' allocates a budget: give "
                                                  f"{one_of(n.offered(['target_ratio', 'max_params']))}")
    if config.allocation == "output" and config.max_macs is not None:
        raise ConfigError("max_macs", lambda n: "allocation='output' compares allocations of the parameter budget "
                                                f"only; drop {n('max_macs')} or use allocation='error'")


def _check_overrides(config: "CompressionConfig") -> None:
    """Each override: a regex -> a partial config of known keys with valid values."""
    if not isinstance(config.overrides, Mapping):
        raise must_be("overrides", "a dict of regex -> partial config", type(config.overrides).__name__)
    for pattern, partial in config.overrides.items():
        if not isinstance(pattern, str) or not isinstance(partial, Mapping):
            raise ConfigError("overrides", lambda n, p=pattern, v=partial: f"{n('overrides')} must map regex "
                                                                           f"strings to dicts, got {p!r}: {v!r}")
        unknown = sorted(set(partial) - set(_OVERRIDE_KEYS))
        if unknown:
            raise ConfigError("overrides", lambda n, p=pattern, u=unknown: f"{n('overrides')}[{p!r}] has unknown "
                                                                           f"keys {u}; allowed: {list(_OVERRIDE_KEYS)}")
        try:
            _check_selector(pattern, "overrides key")
            _check_max_bond(partial.get("max_bond"))
            _check_rel_tol(partial.get("rel_tol"))
            if "num_cores" in partial:
                _check_num_cores(partial["num_cores"])
            if "layout" in partial:
                _check_layout(partial["layout"])
            _check_share(partial.get("sparse_share"))
            _check_share_layout(partial.get("sparse_share"), partial.get("layout", config.layout))
        except ConfigError as exc:
            raise ConfigError("overrides", lambda n, p=pattern, exc=exc: f"{n('overrides')}[{p!r}]: {exc}") from None
        if config.budget_mode and partial.get("rel_tol") is not None:
            raise ConfigError("overrides", lambda n, p=pattern: f"{n('overrides')}[{p!r}]: rel_tol cannot be "
                                                                "combined with a budget (target_ratio/max_params/max_macs)")


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
        entries / MPO core entries >= target_ratio (above 1: 1 compresses nothing and is refused),
        or MPO core entries <= max_params (biases not counted). ``max_bond`` then caps the bonds; ``rel_tol`` is not allowed.
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
    allocation: with a budget and calibration as batches, which allocation is kept is decided on
        held-out batches (the odd-numbered ones, or ``validation=``): "error" (default) compares
        uniform ratios, the weight-error allocation (what compress does without
        calibration) and the per-matrix calibrated one, fitted on the
        even-numbered batches only (so the reported error is measured on inputs that fit never saw),
        and the kept one is then redone on every batch at the same sizes; "output" adds the sensitivity-weighted allocation (one model run per weight on the
        even-numbered batches); the per-matrix allocation is kept unless another's output error
        beats it beyond the batches' noise (a paired t-test; with fewer than 3
        held-out batches the per-matrix allocation is kept and the report says so).
        "per-matrix": the per-matrix allocation without the decision (compression/output_aware.py).
    max_output_error: tolerance mode (instead of target_ratio / max_params): the largest ratio whose
        model output error ||y' - y|| / ||y|| on held-out (or ``validation=``) batches is at most
        this with 90% confidence (its upper bound over the batches, ``OutputCheck.upper_bound``), found by compressing and measuring candidates (compression/tolerance.py); the
        report gives the curve ratio -> error. ``compress(..., evaluate=fn, max_drop=d)`` does the
        same with your metric.
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
    max_output_error: float | None = None

    def __post_init__(self) -> None:
        """Every field checked; a bad one is a :class:`~mpolstm.errors.ConfigError` naming it."""
        _check_selector(self.target_modules, "target_modules")
        _check_selector(self.exclude_modules, "exclude_modules")
        _check_max_bond(self.max_bond)
        _check_rel_tol(self.rel_tol)
        _check_num_cores(self.num_cores)
        _check_layout(self.layout)
        _check_share(self.sparse_share)
        _check_share_layout(self.sparse_share, self.layout, pinned_elsewhere=any(
            isinstance(p, Mapping) and p.get("layout") == HYBRID for p in self.overrides.values()))
        if not isinstance(self.refit, bool):
            raise must_be("refit", "True or False", self.refit)
        _check_allocation(self)
        _check_budgets(self)
        _check_tolerance(self)
        _check_overrides(self)

    @property
    def budget_mode(self) -> bool:
        return (self.target_ratio is not None or self.max_params is not None or self.max_macs is not None
                or self.max_output_error is not None)

    def check_sized(self, names: Sequence[str]) -> None:
        """Every module called one of ``names`` gets a size: a budget, or max_bond / rel_tol (its
        own or an override's); a ConfigError naming the first that gets none."""
        if self.budget_mode:
            return
        for name in names:
            settings = self.settings_for(name)
            if settings.max_bond is None and settings.rel_tol is None:
                raise ConfigError("target_ratio", lambda n, name=name: (
                    f"compress needs a size for module {name!r}: give target_ratio, max_params, max_bond or rel_tol "
                    "(an exact MPO is larger than the dense layer; for an exact drop-in use "
                    "mpolstm.nn.MPO<Layer>.from_<torch>())" if n.api else
                    f"give a size: {one_of(n.offered(_SIZES))} (module {name!r} has none; an exact MPO is larger "
                    "than the dense layer)"))

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
                shown = [n for n, _ in named][:5]
                raise ConfigError("target_modules", lambda n, t=t, shown=shown: f"{n('target_modules')} entry {t!r} "
                                                                              f"matches no module of the model "
                                                                              f"(names look like {shown})")
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
                kind = type(module).__name__
                raise ConfigError("target_modules", lambda n, name=name, kind=kind: (
                    f"target module {name!r} is of type {kind}; compress handles {_supported_names()}"))
            continue
        chosen.append((name, module, explicit))
    if target is not None and not chosen:
        raise ConfigError("target_modules", lambda n: f"{n.given('target_modules', target)} selects no module of a "
                                                      f"supported type ({_supported_names()})")
    return chosen


