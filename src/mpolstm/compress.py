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
import heapq
import json
import math
import re
from dataclasses import asdict, dataclass, field
from io import StringIO
from typing import Any, Callable, Mapping, Sequence

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from . import nn as mpo_nn
from .mpo import MPO, TruncationReport

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

# torch class -> (MPO class name in mpolstm.nn, classmethod that converts); io.load uses it too
CONVERTERS: tuple[tuple[type[nn.Module], str, str], ...] = (
    (nn.Linear, "MPOLinear", "from_linear"),
    (nn.Embedding, "MPOEmbedding", "from_embedding"),
    (nn.LSTM, "MPOLSTM", "from_lstm"),
    (nn.GRU, "MPOGRU", "from_gru"),
)
_OVERRIDE_KEYS = ("max_bond", "rel_tol", "num_cores")


def is_mpo_module(module: nn.Module) -> bool:
    """True for modules that follow the MPO-module protocol."""
    return callable(getattr(module, "mpo_weights", None)) and callable(getattr(module, "mpo_config", None))


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

    def __rich__(self) -> Table:
        table = Table(title=f"MPO compression: {self.dense_params:,} -> {self.mpo_params:,} weight entries "
                            f"({self.ratio:.1f}x)")
        for col in ("module", "weight", "shape", "bonds", "params", "ratio", "rel. error", "max entropy"):
            table.add_column(col, justify="left" if col in ("module", "weight") else "right")
        for m in self.modules:
            for wname, w in m.weights.items():
                table.add_row(
                    f"{m.name} ({m.new_class})", wname, f"{w.shape[0]}x{w.shape[1]}", str(w.bond_dims),
                    f"{w.dense_params:,} -> {w.mpo_params:,}", f"{w.dense_params / w.mpo_params:.1f}x",
                    "-" if w.rel_error is None else f"{w.rel_error:.4f}",
                    f"{max(w.entropy):.3f}" if w.entropy else "-",
                )
        if self.skipped:
            table.caption = "skipped: " + "; ".join(f"{name} ({reason})" for name, reason in self.skipped)
        return table

    def __str__(self) -> str:
        console = Console(file=StringIO(), width=160, color_system=None)
        console.print(self)
        return console.file.getvalue()


def print_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Print "trainable params: T || all params: A || trainable%: P" and return (T, A)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    percent = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}")
    return trainable, total


# ----------------------------------------------------------------------------- selection


def _converter(module: nn.Module, name: str):
    """The ``MPOxxx.from_<torch>`` classmethod for a supported torch module."""
    for torch_cls, mpo_name, method in CONVERTERS:
        if isinstance(module, torch_cls):
            mpo_cls = getattr(mpo_nn, mpo_name, None)
            if mpo_cls is None:
                raise ValueError(f"module {name!r} is an nn.{torch_cls.__name__}; compressing it needs "
                                 f"mpolstm.nn.{mpo_name}, which this installation does not provide")
            return getattr(mpo_cls, method)
    raise ValueError(f"module {name!r} is of type {type(module).__name__}; compress handles "
                     "nn.Linear, nn.Embedding, nn.LSTM and nn.GRU")


def _select(model: nn.Module, config: CompressionConfig) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, named in a target list) for every module to replace. Modules matched
    only by the default or a regex are skipped (and reported) when they cannot be factorised;
    named ones raise."""
    named = [(n, m) for n, m in model.named_modules() if n]
    supported = tuple(c for c, _, _ in CONVERTERS)
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
                                 f"nn.Linear, nn.Embedding, nn.LSTM and nn.GRU")
            continue
        chosen.append((name, module, explicit))
    if target is not None and not chosen:
        raise ValueError(f"target_modules={target!r} selects no nn.Linear/Embedding/LSTM/GRU module of the model")
    return chosen


# ----------------------------------------------------------------------------- budget


def _allocate_bonds(
    spectra: list[list[Tensor]], sizes: list[list[int]], caps: list[list[int]], limits: list[int], budget: int
) -> list[list[int]]:
    """Greedy bond allocation over several MPOs under a total parameter budget.

    spectra[w][b]: singular values at bond b of weight w; sizes[w][k] = i_k j_k; caps[w][b]:
    starting (largest) bond; limits[w]: most parameters weight w may keep (its dense size),
    also the weight of its squared relative error in the objective (see the module docstring).
    The squared relative error of a weight is estimated as 1 - prod_b kept_b, kept_b being
    the fraction of ||W||^2 in the singular values kept at bond b (the independent-bonds
    estimate; the sum of discarded fractions is a looser upper bound). Repeatedly shrinks
    the bond whose next step adds the least estimated error per parameter saved, keeping D_b <= D_{b-1} i_b j_b and D_b <= D_{b+1} i_{b+1} j_{b+1} (larger bonds only
    waste parameters); first within each weight down to its limit, then across all weights
    down to the budget. Raises ValueError when even all-ones bonds exceed the budget."""
    kept = []  # kept[w][b][r]: fraction of ||W||^2 kept at bond b with r singular values
    for spec in spectra:
        rows = []
        for s in spec:
            energy = torch.cat([s.new_zeros(1, dtype=torch.float64), (s.double() ** 2).cumsum(0)])
            rows.append((energy / energy[-1] if energy[-1] > 0 else energy + 1).tolist())
        kept.append(rows)
    bonds = [list(c) for c in caps]

    def params(w: int) -> int:
        d = [1, *bonds[w], 1]
        return sum(d[k] * p * d[k + 1] for k, p in enumerate(sizes[w]))

    def clip(w: int) -> None:  # enforce the feasibility bounds from both sides
        d, p = bonds[w], sizes[w]
        for b in range(len(d)):
            d[b] = min(d[b], (d[b - 1] if b else 1) * p[b])
        for b in reversed(range(len(d))):
            d[b] = min(d[b], (d[b + 1] if b + 1 < len(d) else 1) * p[b + 1])

    def fraction(w: int, b: int, rank: int) -> float:
        cum = kept[w][b]
        return cum[min(rank, len(cum) - 1)]

    def step(w: int, b: int) -> float | None:
        """Added weighted squared relative error per parameter saved by shrinking bond b by one."""
        d = [1, *bonds[w], 1]
        if d[b + 1] <= 1:
            return None
        saved = d[b] * sizes[w][b] + sizes[w][b + 1] * d[b + 2]
        others = math.prod(fraction(w, c, r) for c, r in enumerate(bonds[w]) if c != b)
        lost = others * (fraction(w, b, d[b + 1]) - fraction(w, b, d[b + 1] - 1))
        return limits[w] * lost / saved

    for w in range(len(bonds)):
        clip(w)
    total = sum(params(w) for w in range(len(bonds)))
    version = [0] * len(bonds)

    def steps(w: int) -> list[tuple[float, int, int, int]]:
        return [(s, w, b, version[w]) for b in range(len(bonds[w])) if (s := step(w, b)) is not None]

    def shrink(heap: list[tuple[float, int, int, int]], over: Callable[[], bool]) -> None:
        nonlocal total
        while over() and heap:
            _, w, b, ver = heapq.heappop(heap)
            if ver != version[w]:
                continue
            before = params(w)
            bonds[w][b] -= 1
            clip(w)
            total += params(w) - before
            version[w] += 1
            for entry in steps(w):
                heapq.heappush(heap, entry)

    def _fill(slack: int) -> None:
        """Spend what the last shrink steps left over: grow the bond with the largest
        estimated error reduction per parameter that still fits."""
        while True:
            best = None
            for w, d in enumerate(bonds):
                for b in range(len(d)):
                    full = [1, *d, 1]
                    grown = full[b + 1] + 1
                    if (grown > caps[w][b] or grown > full[b] * sizes[w][b]
                            or grown > full[b + 2] * sizes[w][b + 1]):
                        continue
                    cost = full[b] * sizes[w][b] + sizes[w][b + 1] * full[b + 2]
                    others = math.prod(fraction(w, c, r) for c, r in enumerate(d) if c != b)
                    gain = limits[w] * others * (fraction(w, b, grown) - fraction(w, b, grown - 1))
                    if cost <= slack and gain > 0 and (best is None or gain / cost > best[0]):
                        best = (gain / cost, w, b, cost)
            if best is None:
                return
            _, w, b, cost = best
            bonds[w][b] += 1
            slack -= cost

    for w in range(len(bonds)):
        own = steps(w)
        heapq.heapify(own)
        shrink(own, lambda w=w: params(w) > limits[w])
    heap = [entry for w in range(len(bonds)) for entry in steps(w)]
    heapq.heapify(heap)
    shrink(heap, lambda: total > budget)
    if total > budget:
        raise ValueError(f"the budget of {budget:,} MPO parameters is below the smallest possible "
                         f"({total:,}, every bond 1); raise max_params or lower target_ratio")
    _fill(budget - total)
    return bonds


def _budget_mpos(
    exact: dict[str, dict[str, MPO]], max_bonds: dict[str, int | None], budget: int
) -> dict[str, dict[str, MPO]]:
    """Allocate bonds across all exact MPOs under ``budget`` core entries, then truncate."""
    flat = [(name, wname, m) for name, weights in exact.items() for wname, m in weights.items()]
    caps, sizes, spectra = [], [], []
    for name, _, m in flat:
        cap = max_bonds[name]
        caps.append([b if cap is None else min(b, cap) for b in m.bond_dims])
        sizes.append([i * j for i, j in zip(m.in_factors, m.out_factors)])
        spectra.append(m.spectra())
    limits = [math.prod(m.shape) for _, _, m in flat]
    bonds = _allocate_bonds(spectra, sizes, caps, limits, budget)
    result: dict[str, dict[str, MPO]] = {}
    for (name, wname, m), b in zip(flat, bonds):
        result.setdefault(name, {})[wname] = m.truncate(max_bond=[max(1, int(x)) for x in b])
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
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return model, CompressionReport(reports, skipped, budget)


# ----------------------------------------------------------------------------- MPOP fine-tuning


def _qr_keep(a: Tensor) -> tuple[Tensor, Tensor]:
    """a (m, n) = q (m, n) @ r (n, n) with orthonormal (or zero-padded) columns of q; keeps
    the column count even when m < n, so core shapes never change."""
    m, n = a.shape
    q, r = torch.linalg.qr(a)
    if m >= n:
        return q, r
    return torch.cat([q, q.new_zeros(m, n - m)], 1), torch.cat([r, r.new_zeros(n - m, n)], 0)


def _canonical_same_shapes(cores: list[Tensor], center: int) -> list[Tensor]:
    """Mixed-canonical form centred on ``center`` with every core keeping its shape."""
    cores = list(cores)
    for k in range(center):
        d, i, j, e = cores[k].shape
        q, r = _qr_keep(cores[k].reshape(d * i * j, e))
        cores[k] = q.reshape(d, i, j, e)
        cores[k + 1] = (r @ cores[k + 1].reshape(e, -1)).reshape(cores[k + 1].shape)
    for k in range(len(cores) - 1, center, -1):
        d, i, j, e = cores[k].shape
        q, r = _qr_keep(cores[k].reshape(d, i * j * e).T)
        cores[k] = q.T.reshape(d, i, j, e)
        cores[k - 1] = (cores[k - 1].reshape(-1, d) @ r.T).reshape(cores[k - 1].shape)
    return cores


def central_core(shapes: Sequence[Sequence[int]]) -> int:
    """Index of the central tensor: the core with the most entries (ties: nearest the middle)."""
    n = len(shapes)
    return max(range(n), key=lambda k: (math.prod(shapes[k]), -abs(k - (n - 1) / 2)))


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
                canonical = _canonical_same_shapes([p.detach().double() for p in params], center)
                for p, c in zip(params, canonical):
                    p.copy_(c)
            for k, p in enumerate(params):
                p.requires_grad_(k != center)
                counts["central_params" if k == center else "auxiliary_params"] += p.numel()
            counts["mpos"] += 1
    return counts
