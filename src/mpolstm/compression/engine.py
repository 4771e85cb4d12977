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

import math
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..calibration import Calibration, check_calibration, collect_moments, collect_moments_split, whitening
from ..mpo import MPO, canonicalize, central_core, step_macs
from ..nn.registry import is_mpo_module, layer_type, replace_module
from ..nn.shared import shared_for
from ..nn.sparse import sparse_of
from ..storage import mpo_stored, packed_bytes
from .checks import (
    MIN_DECIDE,
    SYNTHETIC,
    OutputCheck,
    OutputRecorder,
    batch_errors,
    batch_outputs,
    synthetic_batches,
    total_error,
)
from .config import CompressionConfig, ModuleSettings, select_modules
from .fit import Fit, mpo_module
from .layouts import LAYOUTS, Target, fit_like
from .output_aware import (
    DEFAULT,
    AllocationChoice,
    choose_allocation,
    sensitivity_allocation,
    split_calibration,
    substituted,
)
from .refit import sequential_refit
from .report import CompressionReport, ModuleReport, WeightReport
from .sizing import Sizing
from .tolerance import smallest_within

__all__ = ["compress", "freeze_central"]

HELD_OUT = "held-out calibration batches"
# The compressed model's squared output error on the first held-out batch must match the decision's
# measurement with the same matrices to this relative tolerance for the others to be reused.
REUSE_AGREEMENT = 1e-3
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


def _weight_report(old: nn.Module, new: nn.Module, rebuilt_module: nn.Module, target: Target,
                   layout: str) -> WeightReport:
    """Sizes, bonds and errors of one weight as ``new`` holds it: ``rebuilt_module`` is ``new`` as a
    torch module."""
    dense = getattr(old, target.weight).detach().double()
    rebuilt = getattr(rebuilt_module, target.weight).detach().double()
    sparse = sparse_of(new, target.weight)
    held = Fit(layout, MPO([c.detach().double() for c in new.mpo_weights()[target.weight]]),
               *(() if sparse is None else (sparse.index, sparse.values.detach().double())))
    mpo, norm = held.mpo, float(dense.norm())
    return WeightReport(
        shape=tuple(dense.shape), dense_params=dense.numel(), mpo_params=held.params, bond_dims=mpo.bond_dims,
        rel_error=float((dense - rebuilt).norm()) / norm if norm > 0 else 0.0,
        entropy=tuple(float(x) for x in mpo.entanglement_entropy()), layout=layout,
        output_error=target.output_error(held.matrix()), sparse_params=held.nnz, dense_macs=target.dense_macs,
        macs=step_macs(mpo.in_factors, mpo.out_factors, mpo.bond_dims, target.lookup) + held.nnz,
        stored_bytes=packed_bytes(mpo_stored(new)[target.weight][1]))


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
        macs = old.weight.numel() if isinstance(old, nn.Linear) else 0  # a lookup multiplies nothing
        reports.append(ModuleReport(name=name, old_class=type(old).__name__, new_class=type(new).__name__,
                                    params_before=sum(p.numel() for p in old.parameters()),
                                    params_after=sum(p.numel() for p in new.parameters()), weights={},
                                    dense_macs=macs, macs=macs))
        replace_module(model, name, new)


def _check_calibrated(calibration, what: str) -> None:
    if calibration is None:
        raise ValueError(f"{what} works on the model's calibration data: give calibration=")


def _check_sized(config: CompressionConfig, chosen: list[tuple[str, nn.Module, bool]]) -> None:
    for name, module, _ in chosen:
        settings = config.settings_for(name)
        kind = LAYOUTS.get(settings.layout)
        if kind is not None and kind.sized is not None and isinstance(module, nn.Embedding):
            raise ValueError(f"layout {kind.name!r} applies to linear, recurrent, cell and convolution weights, "
                             f"not to the embedding {name!r}; exclude it or give it another layout in overrides")
        if kind is not None and kind.sized is not None and settings.rel_tol is not None:
            raise ValueError(f"layout {kind.name!r} of module {name!r} needs a budget or max_bond; rel_tol does not "
                             "apply to it")
    config.check_sized([name for name, _, _ in chosen])


def _check_batches(model: nn.Module, config: CompressionConfig, calibration: Calibration | None,
                   validation: Any) -> tuple[list, list, str]:
    """(the fit half, the batches the model's output error is measured and decided on, what they are)."""
    if calibration is not None:
        check_calibration(calibration)
    if config.allocation == "output":
        _check_calibrated(calibration, "allocation='output'")
        fit_half, held_out = split_calibration(calibration)
        if validation is None:
            return fit_half, held_out, HELD_OUT
    if validation is not None:
        batches = [validation] if isinstance(validation, Tensor) else list(validation)
        if not batches:
            raise ValueError("validation= must hold at least one batch (a tensor, a tuple of inputs or a callable)")
        whole = [] if calibration is None else [calibration] if callable(calibration) and \
            not isinstance(calibration, Tensor) else list(calibration)
        return whole, batches, "validation batches"
    if calibration is None:
        return [], synthetic_batches(model), SYNTHETIC
    if callable(calibration) and not isinstance(calibration, (Tensor, nn.Module)):
        return [], [calibration], "calibration inputs (not held out: a callable calibration cannot be split)"
    batches = [calibration] if isinstance(calibration, Tensor) else list(calibration)
    if len(batches) < 2:
        return batches, batches, "calibration batch (not held out: give 2 or more batches, or validation=)"
    return batches[0::2], batches[1::2], HELD_OUT


def _allocated(model: nn.Module, config: CompressionConfig, sizing: Sizing, budget: int | None,
               calibrated: bool, batches: tuple[list, list, str], reference: list
               ) -> tuple[list[Fit], AllocationChoice | None, dict[int, tuple[float, float]]]:
    """The budget's fits, when calibrated the held-out decision among the allocations
    (compression/output_aware.py), and the kept fits' errors per held-out batch it measured."""
    fits = sizing.allocate(budget, config.max_macs)
    if not calibrated or config.allocation == "per-matrix":
        return fits, None, {}
    fit_half, held_out, source = batches
    if "not held out" in source or len(held_out) < MIN_DECIDE:
        return fits, AllocationChoice(DEFAULT, {}, len(fit_half), len(held_out) if "not held out" not in source else 0,
                                      note=f"not decided: too little held-out data (at least {MIN_DECIDE} held-out "
                                           f"batches decide: {2 * MIN_DECIDE} or more calibration batches, every "
                                           "second held out, or validation= batches)"), {}
    plain = [replace(t, whitening=None) for t in sizing.targets]
    settings = dict(zip((t.module for t in plain), sizing.settings))
    candidates = {"uniform": None if config.max_macs is not None else sizing.uniform(budget),
                  "weight error": None if config.refit else Sizing(plain, settings).allocate(budget, config.max_macs),
                  DEFAULT: fits}
    if config.allocation == "output":
        candidates["output sensitivity"] = sensitivity_allocation(model, sizing, fits, budget, fit_half)
    return choose_allocation(model, sizing.targets, candidates, held_out, reference, len(fit_half))


def compress(model: nn.Module, config: CompressionConfig | None = None, *, calibration: Calibration | None = None,
             validation: Any = None, evaluate: Callable[[nn.Module], float] | None = None,
             max_drop: float | None = None) -> tuple[nn.Module, CompressionReport]:
    """Replace the selected layers of ``model`` (in place) by MPO layers.

    ``calibration``: an iterable of batches (each a tensor or a tuple of the model's positional
    inputs) or a callable that runs the model; the layers' inputs are recorded with hooks
    (mpolstm.calibration) and the output error on them is minimised instead of the weight
    error. With a budget, the allocation is then chosen on held-out batches (the odd-numbered
    calibration batches, or ``validation``: batches of the same forms) between the simpler ones
    (compression/output_aware.py). The report gives the compressed model's output error on
    those batches (without calibration: a synthetic-input estimate). With held-out calibration
    batches the fits are sized, decided and measured whitened on the even-numbered batches only
    (the figure is then an out-of-sample one), and the model written is that fit redone on every
    batch at the same layouts and sizes (as cross-validation estimates, then refits on all data). Returns the same model and
    a CompressionReport. See CompressionConfig.

    Tolerance mode (``config.max_output_error``, or ``evaluate``: model -> a metric, higher better,
    with ``max_drop``: the drop allowed from the original's): the largest ratio within it, found by
    measuring candidates (compression/tolerance.py); the model passed is then left unchanged and a
    compressed copy returned."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"compress expects an nn.Module, got {type(model).__name__}")
    config = CompressionConfig() if config is None else config
    if not isinstance(config, CompressionConfig):
        raise ValueError(f"config must be a CompressionConfig, got {type(config).__name__}")
    if config.max_output_error is not None or evaluate is not None or max_drop is not None:
        _check_tolerance_mode(config, evaluate, max_drop)
        return smallest_within(compress, model, config, calibration, validation, evaluate, max_drop)
    chosen = select_modules(model, config)
    _check_sized(config, chosen)
    followers = _ties(model, chosen)
    chosen = [c for c in chosen if c[0] not in followers]
    if config.refit:
        _check_calibrated(calibration, "refit=True")
    batches = _check_batches(model, config, calibration, validation)
    # the batches the report measures on never shape the fit it measures: with held-out calibration
    # batches the fits are sized, decided and measured on the fit half, then redone on every batch
    fit_on = batches[0] if batches[2] == HELD_OUT else calibration
    redo = batches[2] == HELD_OUT
    moments, everything, reference = _moments(model, {n: m for n, m, _ in chosen}, batches, fit_on)
    targets, modules, skipped = _all_targets(config, chosen, moments)
    if not targets and config.budget_mode:
        raise ValueError("the budget applies to no weight: no selected module could be compressed")

    with torch.no_grad():
        fits, budget, choice, measured = _fits(model, config, targets, modules, batches, calibration, fit_on,
                                               reference)
        source, errors = batches[2], []
        if redo:  # measured, then redone on every batch
            errors = _fit_half_errors(model, targets, fits, batches[1], reference, measured)
            targets, fits, source = _redone(model, config, [c for c in chosen if c[0] in modules], everything,
                                            (targets, fits, choice), batches)
    reports = _replace(model, modules, targets, fits, skipped)
    _tie_followers(model, followers, modules, reports)
    if not redo:
        errors = _output_errors(model, batches[1], reference, measured if len(reports) == len(modules) else {})
    check = OutputCheck(total_error(errors), len(errors), source, tuple(total_error([e]) for e in errors)) \
        if errors else None
    return model, CompressionReport(reports, skipped, budget, choice, max_macs=config.max_macs, output_check=check)


def _fits(model: nn.Module, config: CompressionConfig, targets: list[Target], modules: dict[str, nn.Module],
          batches: tuple[list, list, str], calibration: Any, fit_on: Any, reference: list
          ) -> tuple[list[Fit], int | None, AllocationChoice | None, dict[int, tuple[float, float]]]:
    """(the fits, the parameter budget, the held-out decision, the kept fits' errors per held-out batch
    it measured): sized by the budget (and decided, when calibrated) or by the bonds / tolerances, then
    refitted with ``config.refit``."""
    sizing = Sizing(targets, {name: config.settings_for(name) for name in modules})
    budget, choice, measured = None, None, {}
    if config.budget_mode:
        budget = _budget(config, targets)
        fits, choice, measured = _allocated(model, config, sizing, budget, calibration is not None, batches, reference)
    else:
        fits = sizing.bounded()
    if config.refit:
        fits, measured = sequential_refit(model, targets, fits, fit_on, passes=REFIT_PASSES), {}
    return fits, budget, choice, measured


def _moments(model: nn.Module, selected: dict[str, nn.Module], batches: tuple[list, list, str], fit_on: Any
             ) -> tuple[dict, dict, list]:
    """(the moments the fits are sized and decided on, those of every calibration batch: the same unless
    batches are held out, the original's outputs on the batches the report measures on). With held-out
    calibration batches the original's outputs are recorded as those batches run for the moments."""
    if batches[2] == HELD_OUT:
        recorder = OutputRecorder()
        moments, everything = collect_moments_split(model, selected, batches[0], recorder.batches(batches[1]),
                                                    watch=recorder.hook)
        return moments, everything, recorder.outputs()
    moments = collect_moments(model, selected, fit_on) if fit_on is not None else {}
    return moments, moments, batch_outputs(model, batches[1])


def _budget(config: CompressionConfig, targets: list[Target]) -> int | None:
    """The parameter budget: ``max_params``, or the targets' dense entries / ``target_ratio``."""
    if config.max_params is not None:
        return config.max_params
    dense = sum(t.dense_params for t in targets)
    return int(dense / config.target_ratio) if config.target_ratio is not None else None


def _fit_half_errors(model: nn.Module, targets: list[Target], fits: list[Fit], held_out: list, reference: list,
                     measured: dict[int, tuple[float, float]]) -> list[tuple[float, float]]:
    """Per held-out batch (||y' - y||^2, ||y||^2) of the model with ``fits`` written into its weights
    (the batches the decision already measured are not run again)."""
    rest = [i for i in range(len(held_out)) if i not in measured]
    if rest:
        with substituted(model, targets, fits):
            measured = {**measured, **dict(zip(rest, batch_errors(model, [held_out[i] for i in rest],
                                                                  [reference[i] for i in rest])))}
    return [measured[i] for i in range(len(held_out))]


def _redone(model: nn.Module, config: CompressionConfig, chosen: list[tuple[str, nn.Module, bool]], moments: dict,
            kept: tuple[list[Target], list[Fit], AllocationChoice | None], batches: tuple[list, list, str]
            ) -> tuple[list[Target], list[Fit], str]:
    """The targets whitened on every calibration batch, the fits redone on them in the same layouts and
    sizes (and refitted, with ``config.refit``), and what the output check then describes. The
    weight-error allocation, fitted without whitening, is kept as it is."""
    targets, fits, choice = kept
    full, _, _ = _all_targets(config, chosen, moments)
    assert [(t.module, t.weight) for t in full] == [(t.module, t.weight) for t in targets]  # the same weights
    if choice is not None and choice.chosen == "weight error":
        return full, fits, HELD_OUT
    fits = [fit_like(t, f) for t, f in zip(full, fits)]
    every = batches[0] + batches[1]
    if config.refit:
        fits = sequential_refit(model, full, fits, every, passes=REFIT_PASSES)
    return full, fits, (f"{HELD_OUT} (by the fit on the other {len(batches[0])}; the model written is that fit "
                        f"redone on all {len(every)}, same sizes)")


def _output_errors(model: nn.Module, held_out: list, reference: list, measured: dict[int, tuple[float, float]]
                   ) -> list[tuple[float, float]]:
    """Per held-out batch (||y' - y||^2, ||y||^2) of the compressed model. Batches the decision already
    ran with the same matrices written into the dense weights (``measured``) are not run again once the
    first batch, run through the compressed model, agrees with its measurement (to float rounding)."""
    if not held_out:
        return []
    first = batch_errors(model, held_out[:1], reference[:1])
    if 0 not in measured or not math.isclose(first[0][0], measured[0][0], rel_tol=REUSE_AGREEMENT, abs_tol=1e-12):
        return first + batch_errors(model, held_out[1:], reference[1:])
    rest = [i for i in range(1, len(held_out)) if i not in measured]
    again = dict(zip(rest, batch_errors(model, [held_out[i] for i in rest], [reference[i] for i in rest])))
    return first + [again[i] if i in again else measured[i] for i in range(1, len(held_out))]


def _check_tolerance_mode(config: CompressionConfig, evaluate: Any, max_drop: Any) -> None:
    if (evaluate is None) != (max_drop is None):
        raise ValueError("evaluate= (model -> metric, higher better) and max_drop= (the drop allowed) go together")
    if evaluate is not None and not callable(evaluate):
        raise ValueError(f"evaluate must be a callable taking the model and returning a number, got "
                         f"{type(evaluate).__name__}")
    if max_drop is not None and (isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or max_drop < 0):
        raise ValueError(f"max_drop must be a number >= 0 (the metric drop allowed), got {max_drop!r}")
    if evaluate is not None and config.max_output_error is not None:
        raise ValueError("give max_output_error or evaluate= with max_drop=, not both")
    if config.target_ratio is not None or config.max_params is not None or config.max_macs is not None:
        raise ValueError("tolerance mode finds the budget itself: drop target_ratio / max_params / max_macs")


def _all_targets(config: CompressionConfig, chosen: list[tuple[str, nn.Module, bool]], moments: dict
                 ) -> tuple[list[Target], dict[str, nn.Module], list[tuple[str, str]]]:
    """(every weight as a Target, the modules they belong to, the modules skipped with why)."""
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
    return targets, modules, skipped


def _replace(model: nn.Module, modules: dict[str, nn.Module], targets: list[Target], fits: list[Fit],
             skipped: list[tuple[str, str]]) -> list[ModuleReport]:
    """Swap in the MPO modules (modules whose fits would not be smaller stay dense)."""
    by_module: dict[str, list[tuple[Target, Fit]]] = {}
    for target, fit in zip(targets, fits):
        by_module.setdefault(target.module, []).append((target, fit))
    reports = []
    for name, module in modules.items():
        items = by_module[name]
        size = sum(fit.params for _, fit in items)
        dense = sum(t.dense_params for t, _ in items)
        if size >= dense:
            skipped.append((name, f"kept dense: its MPO would have {size:,} entries, not fewer than the dense "
                                  f"{dense:,}"))
            continue
        new = mpo_module(module, {t.weight: fit for t, fit in items})
        rebuilt = layer_type(module).to_torch(new)
        weights = {t.weight: _weight_report(module, new, rebuilt, t, fit.layout) for t, fit in items}
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
