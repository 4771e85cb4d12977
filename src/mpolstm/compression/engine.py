"""compress(): replace the selected layers of a model by MPO layers, within a size budget.

Every selected weight becomes a ``Target``: its matrix M in the layer's MPO convention (read
from the registered exact conversion, so every layer type is handled alike), its paper
layout and, with calibration, the whitening by its inputs' second moment.

Budget mode (``target_ratio`` / ``max_params`` and / or ``max_macs``): for every target and
candidate layout the exact singular spectra give an error-versus-cost curve; ``mpo.allocation.allocate``
picks one point (layout + bonds) per weight so that sum_W numel(W) * err_W^2 is smallest
under the budgets (err: relative weight error, or relative output error when calibrated), no
bond going to 1 unless the budget forces it and no weight growing past its dense size. Each
target is then decomposed in its chosen layout with those bonds.

Bound mode (``max_bond`` / ``rel_tol``): each weight is decomposed under the bound; a module
whose MPO would not be smaller than the dense layer stays dense, and the report says why.
The report's errors are measured exactly on the rebuilt torch weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..calibration import Calibration, collect_moments, whitening
from ..mpo import MPO, canonicalize, central_core, step_macs
from ..mpo.allocation import allocate
from ..nn.registry import is_mpo_module, layer_type, replace_module
from ..nn.shared import shared_for
from ..nn.sparse import attach_sparse, sparse_of
from ..storage import mpo_stored, packed_bytes
from .config import CompressionConfig, ModuleSettings, select_modules
from .hybrid import HYBRID, HybridFit, bound_params, fit_target, whitened_error
from .layouts import Candidate, Target, bound_default, decompose_target, output_error
from .output_aware import choose_allocation
from .refit import sequential_refit
from .report import CompressionReport, ModuleReport, WeightReport

__all__ = ["compress", "freeze_central"]

# A bond is not cut below this (or its largest useful value) unless the budget forces it.
FLOOR_BOND = 2
# Refit passes per module: the second refits a recurrent module on its own refitted states
# (g2p-en at 10x, uniform rank 19, 1,000 words: agreement 0.093 without refit, 0.087 / 0.109 / 0.101
# with 1 / 2 / 3 passes).
REFIT_PASSES = 2


def _targets(name: str, module: nn.Module, settings: ModuleSettings, moments: dict[str, Tensor]) -> list[Target]:
    """The weights of one module as targets (M and the paper layout from the registry)."""
    matrices = layer_type(module).matrices(module, num_cores=settings.num_cores)
    targets = []
    for wname, (matrix, factors) in matrices.items():
        matrix = matrix.detach().to(torch.float64)
        pair = None
        if wname in moments:
            moment = moments[wname]
            if moment.shape[0] < matrix.shape[0]:  # an embedding's padding rows: never looked up
                moment = torch.cat([moment, moment.new_zeros(matrix.shape[0] - moment.shape[0])])
            pair = whitening(moment)
        targets.append(Target(name, wname, matrix, factors, getattr(module, wname).numel(), pair,
                              layer_type(module).kind == "embedding"))
    return targets


def _budget_mpos(targets: list[Target], settings: dict[str, ModuleSettings], budget: int | None,
                 max_macs: int | None) -> list[tuple[str, MPO | HybridFit]]:
    """(layout name, MPO or HybridFit) per target: layout and bonds allocated together under the
    parameter ``budget`` and / or ``max_macs``. Weights pinned to the hybrid layout get their
    share of the parameter budget in proportion to their size (uniform ratio); the others share
    what is left by the allocator."""
    out: list[tuple[str, MPO | HybridFit] | None] = [None] * len(targets)
    total = sum(t.dense_params for t in targets)
    for i, t in enumerate(targets):
        if settings[t.module].layout == HYBRID:
            if budget is None:
                raise ValueError(f"layout {HYBRID!r} needs a parameter budget (target_ratio or max_params)")
            out[i] = (HYBRID, fit_target(t, int(budget * t.dense_params / total), settings[t.module].sparse_share))
    rest = [i for i, o in enumerate(out) if o is None]
    hybrid = sum(o[1].params for o in out if o is not None)  # a rank-r + sparse product: MACs = entries
    budget = None if budget is None else budget - hybrid
    max_macs = None if max_macs is None else max_macs - hybrid
    candidates = [[Candidate.of(targets[i], name, f, settings[targets[i].module].max_bond)
                   for name, f in targets[i].candidates(settings[targets[i].module].layout).items()] for i in rest]
    sizes = [targets[i].dense_params for i in rest]
    points = allocate([[c.model for c in cs] for cs in candidates], scales=sizes, limits=sizes, max_params=budget,
                      floor=FLOOR_BOND, max_macs=max_macs) if rest else []
    for i, cs, point in zip(rest, candidates, points):
        pick = cs[point.option]
        out[i] = (pick.name, decompose_target(targets[i], pick.factors, list(point.bonds)))
    return out


def _bound_mpo(target: Target, settings: ModuleSettings) -> tuple[str, MPO | HybridFit]:
    """(layout name, MPO or HybridFit) of one target under max_bond / rel_tol."""
    layout = settings.layout
    if layout == HYBRID:
        params = bound_params(tuple(target.matrix.shape), settings.max_bond, settings.sparse_share)
        return HYBRID, fit_target(target, params, settings.sparse_share)
    if layout == "auto" and settings.rel_tol is None:
        layout = bound_default(target.whitening is not None)
    options = {name: decompose_target(target, f, settings.max_bond, settings.rel_tol)
               for name, f in target.candidates(layout).items()}
    return min(options.items(), key=lambda kv: kv[1].num_params)


def _weight_report(old: nn.Module, new: nn.Module, rebuilt_module: nn.Module, target: Target,
                   layout: str) -> WeightReport:
    """Sizes, bonds and errors of one weight: ``rebuilt_module`` is ``new`` as a torch module."""
    dense = getattr(old, target.weight).detach().double()
    rebuilt = getattr(rebuilt_module, target.weight).detach().double()
    cores = [c.detach().double() for c in new.mpo_weights()[target.weight]]
    mpo = MPO(cores)
    sparse = sparse_of(new, target.weight)
    nnz = 0 if sparse is None else sparse.nnz
    norm = float(dense.norm())
    return WeightReport(
        shape=tuple(dense.shape), dense_params=dense.numel(), mpo_params=mpo.num_params + nnz, bond_dims=mpo.bond_dims,
        rel_error=float((dense - rebuilt).norm()) / norm if norm > 0 else 0.0,
        entropy=tuple(float(x) for x in mpo.entanglement_entropy()), layout=layout,
        output_error=output_error(target, mpo) if sparse is None else whitened_error(target, rebuilt),
        sparse_params=nnz, dense_macs=target.dense_macs,
        macs=step_macs(mpo.in_factors, mpo.out_factors, mpo.bond_dims, target.lookup) + nnz,
        stored_bytes=packed_bytes(mpo_stored(new)[target.weight][1]))


def _cast(mpo: MPO, like: Tensor) -> MPO:
    return MPO([c.to(device=like.device, dtype=like.dtype) for c in mpo.cores], mpo.report)


def _ties(model: nn.Module, chosen: list[tuple[str, nn.Module, bool]]) -> dict[str, str]:
    """{follower module: owner module} for selected modules whose parameters are shared: the
    first sharer in selection order owns the MPO. Sharing with an unselected module, or of any
    parameter but the weight of an nn.Linear / nn.Embedding, is a ValueError naming both."""
    holders: dict[int, list[tuple[str, str]]] = {}
    for mname, module in model.named_modules():
        for attr, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((mname, attr))
    order = [n for n, _, _ in chosen]
    followers: dict[str, str] = {}
    for name, module, _ in chosen:
        for attr, p in module._parameters.items():
            sharers = [h for h in holders.get(id(p), []) if h[0] != name] if p is not None else []
            if not sharers:
                continue
            outside = [h for h in sharers if h[0] not in order]
            if outside:
                raise ValueError(f"module {name!r} shares its {attr} with module {outside[0][0]!r} "
                                 f"({outside[0][1]}), which is not selected; select both or neither")
            for other, other_attr in sharers:
                if (attr, other_attr) != ("weight", "weight") or shared_for(module) is None or \
                        shared_for(model.get_submodule(other)) is None:
                    raise ValueError(f"modules {name!r} and {other!r} share {attr}/{other_attr}; compress keeps "
                                     "ties only between the weights of nn.Linear and nn.Embedding layers")
            owner = min([name] + [o for o, _ in sharers], key=order.index)
            if owner != name:
                followers[name] = owner
    return followers


def _tie_followers(model: nn.Module, followers: dict[str, str], modules: dict[str, nn.Module],
                   reports: list[ModuleReport]) -> None:
    """Replace every follower whose owner became an MPO module by a Shared* layer using it."""
    replaced = {r.name for r in reports}
    for name, owner in followers.items():
        if owner not in replaced:
            continue  # the owner stayed dense: the tie is untouched
        old = model.get_submodule(name)
        new = shared_for(old).tie(old, model.get_submodule(owner), owner)
        new.train(old.training)
        reports.append(ModuleReport(name=name, old_class=type(old).__name__, new_class=type(new).__name__,
                                    params_before=sum(p.numel() for p in old.parameters()),
                                    params_after=sum(p.numel() for p in new.parameters()), weights={}))
        replace_module(model, name, new)


def _check_output_allocation(calibration, targets: list[Target], settings: dict[str, ModuleSettings],
                             what: str) -> None:
    if calibration is None:
        raise ValueError(f"{what} works on the model's calibration data: give calibration=")
    hybrid = sorted({t.module for t in targets if settings[t.module].layout == HYBRID})
    if hybrid:
        raise ValueError(f"{what} does not apply to layout {HYBRID!r}, which module(s) {hybrid} are pinned to")


def _check_sized(config: CompressionConfig, chosen: list[tuple[str, nn.Module, bool]]) -> None:
    for name, module, _ in chosen:
        settings = config.settings_for(name)
        if settings.layout == HYBRID and isinstance(module, nn.Embedding):
            raise ValueError(f"layout {HYBRID!r} applies to linear, recurrent, cell and convolution weights, "
                             f"not to the embedding {name!r}; exclude it or give it another layout in overrides")
        if settings.layout == HYBRID and settings.rel_tol is not None:
            raise ValueError(f"layout {HYBRID!r} of module {name!r} needs a budget or max_bond; rel_tol does not "
                             "apply to it")
    config.check_sized([name for name, _, _ in chosen])


def compress(model: nn.Module, config: CompressionConfig | None = None, *,
             calibration: Calibration | None = None) -> tuple[nn.Module, CompressionReport]:
    """Replace the selected layers of ``model`` (in place) by MPO layers.

    ``calibration``: an iterable of batches (each a tensor or a tuple of the model's positional
    inputs) or a callable that runs the model; the layers' inputs are recorded with hooks
    (mpolstm.calibration) and the output error on them is minimised instead of the weight
    error. Returns the same model and a CompressionReport. See CompressionConfig."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"compress expects an nn.Module, got {type(model).__name__}")
    config = CompressionConfig() if config is None else config
    if not isinstance(config, CompressionConfig):
        raise ValueError(f"config must be a CompressionConfig, got {type(config).__name__}")
    chosen = select_modules(model, config)
    _check_sized(config, chosen)
    followers = _ties(model, chosen)
    chosen = [c for c in chosen if c[0] not in followers]
    moments = collect_moments(model, {n: m for n, m, _ in chosen}, calibration) if calibration is not None else {}

    targets, modules, skipped = [], {}, []
    for name, module, explicit in chosen:
        try:
            with torch.no_grad():
                found = _targets(name, module, config.settings_for(name), moments.get(name, {}))
        except ValueError as exc:
            if explicit:
                raise ValueError(f"module {name!r}: {exc}") from None
            skipped.append((name, str(exc)))
            continue
        targets += found
        modules[name] = module
    if not targets and config.budget_mode:
        raise ValueError("the budget applies to no weight: no selected module could be compressed")

    settings = {name: config.settings_for(name) for name in modules}
    budget, choice = None, None
    with torch.no_grad():
        if config.budget_mode:
            dense = sum(t.dense_params for t in targets)
            budget = config.max_params if config.max_params is not None else \
                int(dense / config.target_ratio) if config.target_ratio is not None else None
            results = _budget_mpos(targets, settings, budget, config.max_macs)
            if config.allocation == "output":
                _check_output_allocation(calibration, targets, settings, "allocation='output'")
                results, choice = choose_allocation(model, targets, results, budget, calibration)
        else:
            results = [_bound_mpo(t, settings[t.module]) for t in targets]
        if config.refit:
            _check_output_allocation(calibration, targets, settings, "refit=True")
            results = sequential_refit(model, targets, results, calibration, passes=REFIT_PASSES)
    reports = _replace(model, modules, targets, results, skipped)
    _tie_followers(model, followers, modules, reports)
    return model, CompressionReport(reports, skipped, budget, choice, max_macs=config.max_macs)


def _replace(model: nn.Module, modules: dict[str, nn.Module], targets: list[Target],
             results: list[tuple[str, MPO | HybridFit]], skipped: list[tuple[str, str]]) -> list[ModuleReport]:
    """Swap in the MPO modules (modules whose MPOs would not be smaller stay dense); a hybrid
    fit's sparse part is attached to its weight."""
    by_module: dict[str, list[tuple[Target, str, MPO | HybridFit]]] = {}
    for target, (layout, mpo) in zip(targets, results):
        by_module.setdefault(target.module, []).append((target, layout, mpo))
    reports = []
    for name, module in modules.items():
        items = by_module[name]
        size = sum(m.params if isinstance(m, HybridFit) else m.num_params for _, _, m in items)
        dense = sum(t.dense_params for t, _, _ in items)
        if size >= dense:
            skipped.append((name, f"kept dense: its MPO would have {size:,} entries, not fewer than the dense "
                                  f"{dense:,}"))
            continue
        like = next(iter(module.parameters()))
        with torch.no_grad():
            new = layer_type(module).from_torch(
                module, mpos={t.weight: _cast(m.mpo if isinstance(m, HybridFit) else m, like) for t, _, m in items})
            for t, _, m in items:
                if isinstance(m, HybridFit) and m.index.numel():
                    attach_sparse(new, t.weight, m.index.to(like.device), m.values.to(like))
        new.train(module.training)
        rebuilt = layer_type(module).to_torch(new)
        weights = {t.weight: _weight_report(module, new, rebuilt, t, layout) for t, layout, _ in items}
        reports.append(ModuleReport(
            name=name, old_class=type(module).__name__, new_class=type(new).__name__,
            params_before=sum(p.numel() for p in module.parameters()),
            params_after=sum(p.numel() for p in new.parameters()), weights=weights))
        replace_module(model, name, new)
    return reports


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
