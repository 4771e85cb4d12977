"""Sequential refit: fit each compressed weight to what the already-compressed model feeds it.

Whitened truncation fits every weight to the *original* model's inputs X. Once the weights
upstream are compressed, a weight sees other inputs X_c, and its errors add to theirs. After
the sizes are chosen, ``CompressionConfig(refit=True)`` (SVD-LLM-like) goes through the
compressed modules in order; for each it runs the calibration through the original model and
through the model whose earlier modules are already refitted, pairs the inputs each weight
multiplies (X_o, X_c: same calls, same order), and refits the weight M (in, out) to

    min ||X_c M' - X_o M||_F  with M' in its chosen layout and bonds:
    M* = S^{-2} C_co M  (least squares),   M' = S^{-1} trunc(S M*),   S = (C_cc + damping)^{1/2}

with C_cc = X_c^T X_c and C_co = X_c^T X_o (``calibration.whitening``: the one damping rule), so the
compressed weight also corrects the error that reaches it; every layout is refitted at its size
(``layouts.fit_like``: the same bonds, or the same stored numbers and sparse share). Table lookups
(embeddings) see the same rows either way and are kept.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch import Tensor, nn

from ..calibration import Calibration, apply_whitening, run_hooked, whitening
from ..nn.registry import layer_type, layer_type_of_mpo, replace_module
from .fit import Fit, mpo_module
from .layouts import Target, fit_like

__all__ = ["paired_moments", "sequential_refit"]


@torch.no_grad()
def _inputs(model: nn.Module, name: str, calibration: Calibration) -> dict[str, list[Tensor]]:
    """What every weight of module ``name`` multiplies, call by call, while the calibration runs."""
    module = model.get_submodule(name)
    entry = layer_type(module) or layer_type_of_mpo(module)  # torch, or already refitted
    assert entry is not None, f"refit: {type(module).__name__} has no MPO layer type"
    seen: dict[str, list[Tensor]] = {}

    def hook(mod: nn.Module, args: tuple, output: Any) -> None:
        for weight, x in entry.inputs(mod, args):
            if x.dim() > 1:
                seen.setdefault(weight, []).append(x.detach().reshape(-1, x.shape[-1]).double())

    run_hooked(model, calibration, [(module, hook)])
    return seen


def paired_moments(original: nn.Module, current: nn.Module, name: str, calibration: Calibration
                   ) -> dict[str, tuple[Tensor, Tensor]]:
    """{weight: (C_cc, C_co)} of module ``name``: second moments of the inputs in ``current``
    and their cross moments with the matching inputs in ``original``."""
    got_o, got_c = _inputs(original, name, calibration), _inputs(current, name, calibration)
    out = {}
    for weight, xs_o in got_o.items():
        xs_c = got_c.get(weight, [])
        if len(xs_c) != len(xs_o) or any(a.shape != b.shape for a, b in zip(xs_c, xs_o)):
            raise ValueError(f"refit: module {name!r} saw different inputs in the original and the compressed "
                             "model; the calibration must run both the same way")
        count = max(sum(x.shape[0] for x in xs_c), 1)
        gram = functools.reduce(torch.add, (c.T @ c for c in xs_c))  # xs_c is not empty (xs_o has one per call)
        cross = functools.reduce(torch.add, (c.T @ o for c, o in zip(xs_c, xs_o)))
        out[weight] = (gram / count, cross / count)
    return out


def _refit(target: Target, moments: tuple[Tensor, Tensor], fit: Fit) -> Fit:
    c_cc, c_co = moments
    s, s_inv = whitening(c_cc)
    best = apply_whitening(s_inv, apply_whitening(s_inv, c_co @ target.matrix))  # (C_cc + damping)^{-1} C_co M
    return fit_like(Target(target.module, target.weight, best, target.interleaved, target.dense_params, (s, s_inv)),
                    fit)


def sequential_refit(model: nn.Module, targets: list[Target], fits: list[Fit], calibration: Calibration,
                     passes: int = 1) -> list[Fit]:
    """The fits with every weight refitted in module order (see the module docstring); the
    model itself is left as it is (the refit runs on a copy). ``passes`` > 1 refits each module
    again on the inputs its own refitted version produces (a recurrent weight's inputs depend on it)."""
    current = copy.deepcopy(model)
    out = list(fits)
    for name in dict.fromkeys(t.module for t in targets):
        mine = [i for i, t in enumerate(targets) if t.module == name]
        for _ in range(passes):
            moments = paired_moments(model, current, name, calibration)
            for i in mine:
                if targets[i].weight in moments:
                    out[i] = _refit(targets[i], moments[targets[i].weight], out[i])
            replace_module(current, name, mpo_module(model.get_submodule(name), {targets[i].weight: out[i] for i in mine}))
    return out
