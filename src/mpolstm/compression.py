"""Whole-model compression: replace Linear/Embedding/LSTM/GRU layers by MPO layers.

    model, report = compress(model, CompressionConfig(target_ratio=20))
    print(report)
    freeze_central(model)            # MPOP lightweight fine-tuning
    print_trainable_parameters(model)

Modules are replaced in place (like PEFT and torch.nn.utils.prune). Every MPO module
follows the protocol in docs/architecture.md (``mpo_weights``, ``from_<torch>(...,
mpos=...)``), which is all this file relies on.

Budget mode (``target_ratio`` or ``max_params``): every selected weight is decomposed
exactly in float64, the singular spectrum at each of its bonds is read, and bonds are
shrunk one step at a time across ALL weights, always taking the step that adds the least
estimated error per parameter saved, until the budget holds; what the last steps free is
spent again on the most useful bonds. The objective is the sum over weights of
numel(W) * ||W - W'||^2 / ||W||^2 = ||W - W'||^2 / mean(W^2): the squared error of every
entry relative to its own matrix's scale. Layers of different scale count alike, and a
large matrix counts in proportion to its size (with a plain sum of relative errors, a small
matrix such as an LSTM's 1024x28 input weight would take the budget and leave the 1024x256
recurrent weight at bond 1). Each MPO is
then truncated to its allocated bonds by one SVD sweep, and the exact achieved error is
reported.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .mpo import MPO, TruncationReport, canonicalize, central_core
from .mpo.allocation import Layout, allocate
from .nn.registry import is_mpo_module, layer_type, replace_module, supported_torch_types

__all__ = [
    "CompressionConfig",
    "CompressionReport",
    "ModuleReport",
    "WeightReport",
    "compress",
    "freeze_central",
    "print_trainable_parameters",
    "is_mpo_module",
    "central_core",
]

_OVERRIDE_KEYS = ("max_bond", "rel_tol", "num_cores")


# ----------------------------------------------------------------------------- config


def _check_max_bond(value: Any, where: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{where}max_bond must be a positive integer or None, got {value!r}")


def _check_rel_tol(value: Any, where: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1):
        raise ValueError(f"{where}rel_tol must be a number in (0, 1) or None, got {value!r}")


def _check_num_cores(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}num_cores must be a positive integer, got {value!r}")


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
        one regex matched against the whole name; None selects every nn.Linear,
        nn.Embedding, nn.LSTM and nn.GRU. Listed names must exist and be of those types;
        modules selected by the default or a regex are skipped (and listed in the report)
        when they are of another type or cannot be factorised; listed ones raise.
    exclude_modules: same forms; removed from the selection.
    max_bond, rel_tol: truncation per weight (with neither and no budget: exact).
    num_cores: cores per MPO.
    overrides: regex -> partial config (keys max_bond, rel_tol, num_cores); every pattern
        that fully matches a module's name applies, later ones winning.
    target_ratio / max_params: global budget over the selected weights' entries: dense
        entries / MPO core entries >= target_ratio, or MPO core entries <= max_params
        (biases not counted). ``max_bond`` then caps the bonds; ``rel_tol`` is not allowed.
    """

    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    max_bond: int | None = None
    rel_tol: float | None = None
    num_cores: int = 4
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    target_ratio: float | None = None
    max_params: int | None = None

    def __post_init__(self) -> None:
        _check_selector(self.target_modules, "target_modules")
        _check_selector(self.exclude_modules, "exclude_modules")
        _check_max_bond(self.max_bond, "")
        _check_rel_tol(self.rel_tol, "")
        _check_num_cores(self.num_cores, "")
        if self.target_ratio is not None and self.max_params is not None:
            raise ValueError("give at most one budget: target_ratio or max_params, not both")
        if self.target_ratio is not None and (
                isinstance(self.target_ratio, bool) or not isinstance(self.target_ratio, (int, float))
                or not math.isfinite(self.target_ratio) or self.target_ratio < 1):
            raise ValueError(f"target_ratio must be a finite number >= 1, got {self.target_ratio!r}")
        if self.max_params is not None and (
                isinstance(self.max_params, bool) or not isinstance(self.max_params, int) or self.max_params < 1):
            raise ValueError(f"max_params must be a positive integer, got {self.max_params!r}")
        if self.budget_mode and self.rel_tol is not None:
            raise ValueError("rel_tol cannot be combined with a budget (target_ratio/max_params); choose one")
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
            if self.budget_mode and partial.get("rel_tol") is not None:
                raise ValueError(f"{where}rel_tol cannot be combined with a budget (target_ratio/max_params)")

    @property
    def budget_mode(self) -> bool:
        return self.target_ratio is not None or self.max_params is not None

    def settings_for(self, name: str) -> dict[str, Any]:
        """max_bond, rel_tol and num_cores for the module called ``name``."""
        settings = {"max_bond": self.max_bond, "rel_tol": self.rel_tol, "num_cores": self.num_cores}
        for pattern, partial in self.overrides.items():
            if re.fullmatch(pattern, name):
                settings.update(partial)
        return settings


# ----------------------------------------------------------------------------- report


@dataclass
class WeightReport:
    """One compressed weight. shape: the torch weight's (out, in), or (rows, dim) for an
    embedding; entropy: entanglement entropy at each bond of the compressed MPO."""

    shape: tuple[int, int]
    dense_params: int
    mpo_params: int
    bond_dims: tuple[int, ...]
    rel_error: float | None
    entropy: tuple[float, ...]


@dataclass
class ModuleReport:
    """One replaced module; params count every parameter (cores and biases)."""

    name: str
    old_class: str
    new_class: str
    params_before: int
    params_after: int
    weights: dict[str, WeightReport]


@dataclass
class CompressionReport:
    """Result of ``compress``: one entry per replaced module, plus skipped modules
    (name, reason) and the budget used (max MPO core entries, or None)."""

    modules: list[ModuleReport]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    budget: int | None = None

    @property
    def dense_params(self) -> int:
        return sum(w.dense_params for m in self.modules for w in m.weights.values())

    @property
    def mpo_params(self) -> int:
        return sum(w.mpo_params for m in self.modules for w in m.weights.values())

    @property
    def ratio(self) -> float:
        """Dense entries / MPO core entries over the compressed weights."""
        return self.dense_params / self.mpo_params if self.mpo_params else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "modules": [asdict(m) for m in self.modules],
            "skipped": [list(s) for s in self.skipped],
            "budget": self.budget,
            "dense_params": self.dense_params,
            "mpo_params": self.mpo_params,
            "ratio": self.ratio,
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def rows(self) -> list[tuple[str, ...]]:
        """One row of strings per compressed weight, under ``REPORT_COLUMNS``."""
        return [
            (f"{m.name} ({m.new_class})", wname, f"{w.shape[0]}x{w.shape[1]}", str(w.bond_dims),
             f"{w.dense_params:,} -> {w.mpo_params:,}", f"{w.dense_params / w.mpo_params:.1f}x",
             "-" if w.rel_error is None else f"{w.rel_error:.4f}", f"{max(w.entropy):.3f}" if w.entropy else "-")
            for m in self.modules for wname, w in m.weights.items()
        ]

    @property
    def title(self) -> str:
        return f"MPO compression: {self.dense_params:,} -> {self.mpo_params:,} weight entries ({self.ratio:.1f}x)"

    def __str__(self) -> str:
        rows = [REPORT_COLUMNS, *self.rows()]
        widths = [max(len(r[c]) for r in rows) for c in range(len(REPORT_COLUMNS))]
        lines = [self.title]
        for r in rows:
            lines.append("  ".join(v.ljust(w) if c < 2 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths))))
        if self.skipped:
            lines.append("skipped: " + "; ".join(f"{name} ({reason})" for name, reason in self.skipped))
        return "\n".join(lines) + "\n"


REPORT_COLUMNS = ("module", "weight", "shape", "bonds", "params", "ratio", "rel. error", "max entropy")


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print "trainable params: T || all params: A || trainable%: P" and return (T, A)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    percent = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}")
    return trainable, total


# ----------------------------------------------------------------------------- selection


def _supported_names() -> str:
    return ", ".join(f"nn.{t.__name__}" for t in supported_torch_types())


def _converter(module: nn.Module, name: str):
    """The registered ``from_torch`` conversion for a supported torch module."""
    entry = layer_type(module)
    if entry is None:
        raise ValueError(f"module {name!r} is of type {type(module).__name__}; compress handles {_supported_names()}")
    return entry.from_torch


def _select(model: nn.Module, config: CompressionConfig) -> list[tuple[str, nn.Module, bool]]:
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


# ----------------------------------------------------------------------------- budget


def _budget_mpos(
    exact: dict[str, dict[str, MPO]], max_bonds: dict[str, int | None], budget: int
) -> dict[str, dict[str, MPO]]:
    """Allocate bonds across all exact MPOs under ``budget`` core entries, then truncate."""
    flat = [(name, wname, m) for name, weights in exact.items() for wname, m in weights.items()]
    layouts = []
    for name, _, m in flat:
        cap = max_bonds[name]
        caps = [b if cap is None else min(b, cap) for b in m.bond_dims]
        sizes = [i * j for i, j in zip(m.in_factors, m.out_factors)]
        layouts.append([Layout.from_spectra(sizes, caps, m.spectra())])
    sizes = [math.prod(m.shape) for _, _, m in flat]
    chosen = allocate(layouts, scales=sizes, limits=sizes, budget=budget)
    result: dict[str, dict[str, MPO]] = {}
    for (name, wname, m), point in zip(flat, chosen):
        result.setdefault(name, {})[wname] = m.truncate(max_bond=list(point.bonds))
    return result


# ----------------------------------------------------------------------------- compress


def _weight_report(old: nn.Module, wname: str, cores: Sequence[Tensor], report: TruncationReport | None) -> WeightReport:
    weight = getattr(old, wname)
    with torch.no_grad():
        detached = MPO([c.detach().double() for c in cores])
        entropy = tuple(float(x) for x in detached.entanglement_entropy())
    return WeightReport(
        shape=tuple(weight.shape), dense_params=weight.numel(), mpo_params=detached.num_params,
        bond_dims=detached.bond_dims, rel_error=None if report is None else report.rel_error, entropy=entropy,
    )


def _cast(mpo: MPO, like: Tensor) -> MPO:
    return MPO([c.to(device=like.device, dtype=like.dtype) for c in mpo.cores], mpo.report)


def compress(model: nn.Module, config: CompressionConfig | None = None) -> tuple[nn.Module, CompressionReport]:
    """Replace the selected layers of ``model`` (in place) by MPO layers.

    Returns the same model and a CompressionReport. See CompressionConfig for selection,
    truncation and the global budget."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"compress expects an nn.Module, got {type(model).__name__}")
    config = CompressionConfig() if config is None else config
    if not isinstance(config, CompressionConfig):
        raise ValueError(f"config must be a CompressionConfig, got {type(config).__name__}")

    converted: dict[str, nn.Module] = {}
    exact: dict[str, dict[str, MPO]] = {}  # budget mode: exact float64 MPOs per module
    todo, skipped = [], []
    for name, module, explicit in _select(model, config):
        convert = _converter(module, name)
        settings = config.settings_for(name)
        try:
            with torch.no_grad():
                if config.budget_mode:
                    full = convert(copy.deepcopy(module).to(torch.float64), num_cores=settings["num_cores"])
                    exact[name] = {w: MPO([c.detach() for c in cores]) for w, cores in full.mpo_weights().items()}
                else:
                    converted[name] = convert(module, settings["max_bond"], settings["rel_tol"],
                                              num_cores=settings["num_cores"])
        except ValueError as exc:
            if explicit:
                raise ValueError(f"module {name!r}: {exc}") from None
            skipped.append((name, str(exc)))
            continue
        todo.append((name, module, convert, settings))

    budget = None
    if config.budget_mode:
        if not todo:
            raise ValueError("the budget applies to no weight: no selected module could be compressed")
        dense = sum(getattr(module, w).numel() for name, module, _, _ in todo for w in exact[name])
        budget = config.max_params if config.max_params is not None else int(dense / config.target_ratio)
        mpos = _budget_mpos(exact, {name: s["max_bond"] for name, _, _, s in todo}, budget)
        for name, module, convert, settings in todo:
            like = next(iter(module.parameters()))
            with torch.no_grad():
                converted[name] = convert(module, num_cores=settings["num_cores"],
                                          mpos={w: _cast(m, like) for w, m in mpos[name].items()})

    reports = []
    for name, module, _, _ in todo:
        new = converted[name]
        new.train(module.training)
        weights = {w: _weight_report(module, w, cores, new.reports.get(w)) for w, cores in new.mpo_weights().items()}
        reports.append(ModuleReport(
            name=name, old_class=type(module).__name__, new_class=type(new).__name__,
            params_before=sum(p.numel() for p in module.parameters()),
            params_after=sum(p.numel() for p in new.parameters()), weights=weights))
        replace_module(model, name, new)
    return model, CompressionReport(reports, skipped, budget)


# ----------------------------------------------------------------------------- MPOP fine-tuning


def freeze_central(model: nn.Module) -> dict[str, int]:
    """MPOP lightweight fine-tuning: put every MPO of every MPO module in ``model`` in
    mixed-canonical form centred on its central tensor (in place, shapes and the
    represented weights unchanged), freeze the central cores (requires_grad=False) and
    leave the auxiliary cores trainable. Other parameters are left as they are.

    Returns {"mpos": MPOs processed, "central_params": entries frozen,
    "auxiliary_params": core entries left trainable}."""
    counts = {"mpos": 0, "central_params": 0, "auxiliary_params": 0}
    for module in model.modules():
        if not is_mpo_module(module):
            continue
        for cores in module.mpo_weights().values():
            params = list(cores)
            center = central_core([p.shape for p in params])
            with torch.no_grad():
                canonical = canonicalize([p.detach().double() for p in params], center, keep_shapes=True)
                for p, c in zip(params, canonical):
                    p.copy_(c)
            for k, p in enumerate(params):
                p.requires_grad_(k != center)
                counts["central_params" if k == center else "auxiliary_params"] += p.numel()
            counts["mpos"] += 1
    return counts
