"""Magnitude-pruning baselines at an exact number of non-zeros: one-shot (layer-wise, global) and AGP.

Weights are named by their qualified parameter name, e.g. ``"lstm.weight_hh_l0"`` or ``"fc.weight"``.
Prunable: the weights of every module type in the layer registry (``mpolstm.nn.registry``: each entry's
``kind`` and ``weight_names``): ``weight_*`` of nn.LSTM / nn.GRU / nn.RNN (``weight_ih_l{k}[_reverse]``,
``weight_hh_l{k}[_reverse]``, ``weight_hr_l{k}[_reverse]``), ``weight_ih`` / ``weight_hh`` of
nn.LSTMCell / nn.GRUCell / nn.RNNCell, ``weight`` of nn.Linear and nn.Embedding, and the kernel
``weight`` of nn.Conv1d / nn.Conv2d. Masks are applied with
``torch.nn.utils.prune.custom_from_mask`` (parameter ``<name>_orig`` and buffer ``<name>_mask``;
the forward pre-hook recomputes ``<name> = orig * mask``), so masked entries stay zero through any
optimizer step and fine-tuning needs nothing else. Pruning again replaces the mask in place.

Selection keeps the ``k`` entries of largest magnitude; ties are broken deterministically by
position (earlier weight in the given order, then lower flat index, wins). Exactly ``k`` mask
entries are kept; :func:`count_nonzero` counts the effective weights (equal to ``k`` unless kept
entries are exactly zero).

nn.LSTM / nn.GRU / nn.RNN pitfall: their forward reads ``_flat_weights``, a cached list of the weight
tensors. Every mask change here re-assigns the weight attribute (RNNBase.__setattr__ updates
``_flat_weights``) and :func:`make_permanent` re-initialises the flat weights (and re-flattens
for cuDNN), so the forward always uses the masked weights.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from .nn.registry import KINDS, layer_type

__all__ = [
    "KINDS",
    "prunable_weights",
    "prune_layerwise",
    "prune_global",
    "prune_to",
    "make_permanent",
    "count_nonzero",
    "sparsity_report",
    "num_weights",
    "agp_sparsity",
    "agp_nonzeros",
    "AGPPruner",
]



def prunable_weights(model: nn.Module, kinds: Sequence[str] = ("rnn",)) -> list[str]:
    """Qualified names of the prunable weights of ``model`` of the given kinds (module order).

    Kinds: "rnn" (input and recurrent weights of LSTM/GRU/RNN and of their cells), "linear",
    "embedding", "conv" (Conv1d/Conv2d kernels)."""
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown weight kinds {bad}; expected a subset of {KINDS}")
    names = []
    for mod_name, mod in model.named_modules():
        entry = layer_type(mod)
        if entry is not None and entry.kind in kinds:
            prefix = f"{mod_name}." if mod_name else ""
            names += [prefix + w for w in entry.weight_names(mod)]
    return names


def _resolve(model: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Module, str]]:
    if isinstance(names, str):
        raise ValueError(f"names must be a sequence of weight names, got the string {names!r}")
    if not names:
        raise ValueError("no weights to prune: names is empty")
    if len(set(names)) != len(names):
        raise ValueError(f"weight names must be unique, got {list(names)}")
    modules = dict(model.named_modules())
    out = []
    for name in names:
        mod_name, _, attr = name.rpartition(".")
        mod = modules.get(mod_name)
        if mod is None:
            raise ValueError(f"weight {name!r}: model has no module {mod_name!r}")
        entry = layer_type(mod)
        if entry is None or attr not in entry.weight_names(mod):
            raise ValueError(f"weight {name!r} is not prunable: expected weight_* of nn.LSTM/nn.GRU/nn.RNN, "
                             f"weight_ih/weight_hh of their cells, or weight of nn.Linear/nn.Embedding/"
                             f"nn.Conv1d/nn.Conv2d (got {type(mod).__name__}.{attr})")
        out.append((name, mod, attr))
    return out


def _is_pruned(mod: nn.Module, attr: str) -> bool:
    return f"{attr}_mask" in mod._buffers and f"{attr}_orig" in mod._parameters


def _effective(mod: nn.Module, attr: str) -> Tensor:
    """The weight the forward uses (orig * mask when pruned), computed now (not the cached attribute)."""
    if _is_pruned(mod, attr):
        return getattr(mod, f"{attr}_orig") * getattr(mod, f"{attr}_mask")
    return getattr(mod, attr)


def _refresh(mod: nn.Module, attr: str) -> None:
    # re-assigning goes through RNNBase.__setattr__, which updates _flat_weights
    setattr(mod, attr, getattr(mod, f"{attr}_orig") * getattr(mod, f"{attr}_mask"))


def _set_mask(mod: nn.Module, attr: str, mask: Tensor) -> None:
    if _is_pruned(mod, attr):
        with torch.no_grad():
            getattr(mod, f"{attr}_mask").copy_(mask)
    else:
        torch_prune.custom_from_mask(mod, attr, mask)
    _refresh(mod, attr)


def _top_k_masks(scores: Sequence[Tensor], k: int) -> list[Tensor]:
    """Boolean masks keeping the k largest scores over all tensors; ties: earlier position first."""
    flat = torch.cat([s.detach().reshape(-1) for s in scores])
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    return [m.view_as(s) for m, s in zip(keep.split([s.numel() for s in scores]), scores)]


def _check_count(nonzeros: int, total: int) -> None:
    if isinstance(nonzeros, bool) or not isinstance(nonzeros, int) or not 0 <= nonzeros <= total:
        raise ValueError(f"nonzeros must be an int in [0, {total}] (the size of the chosen weights), got {nonzeros!r}")


def num_weights(model: nn.Module, names: Sequence[str]) -> int:
    """Total number of entries of the named weights."""
    return sum(_effective(m, a).numel() for _, m, a in _resolve(model, names))


def _layer_shares(sizes: Sequence[int], nonzeros: int) -> list[int]:
    """Split ``nonzeros`` in proportion to ``sizes`` (largest remainder; ties to the earlier weight)."""
    total = sum(sizes)
    exact = [nonzeros * n / total for n in sizes]
    shares = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[: nonzeros - sum(shares)]:
        shares[i] += 1
    return shares


@torch.no_grad()
def prune_layerwise(model: nn.Module, names: Sequence[str], nonzeros: int) -> dict[str, int]:
    """Keep ``nonzeros`` entries in total, the same fraction of every named weight (largest
    magnitudes within each weight). Returns the kept count per weight (sums to ``nonzeros``)."""
    targets = _resolve(model, names)
    sizes = [_effective(m, a).numel() for _, m, a in targets]
    _check_count(nonzeros, sum(sizes))
    kept = {}
    for (name, mod, attr), k in zip(targets, _layer_shares(sizes, nonzeros)):
        (mask,) = _top_k_masks([_effective(mod, attr).abs()], k)
        _set_mask(mod, attr, mask)
        kept[name] = k
    return kept


@torch.no_grad()
def prune_global(model: nn.Module, names: Sequence[str], nonzeros: int) -> dict[str, int]:
    """Keep the ``nonzeros`` entries of largest magnitude across all named weights (one global
    L1 threshold). Returns the kept count per weight (sums to ``nonzeros``)."""
    targets = _resolve(model, names)
    weights = [_effective(m, a) for _, m, a in targets]
    _check_count(nonzeros, sum(w.numel() for w in weights))
    masks = _top_k_masks([w.abs().float() for w in weights], nonzeros)
    kept = {}
    for (name, mod, attr), mask in zip(targets, masks):
        _set_mask(mod, attr, mask)
        kept[name] = int(mask.sum())
    return kept


def prune_to(model: nn.Module, names: Sequence[str], nonzeros: int, method: str = "layerwise") -> dict[str, int]:
    """:func:`prune_layerwise` (``method="layerwise"``) or :func:`prune_global` (``"global"``)."""
    if method == "layerwise":
        return prune_layerwise(model, names, nonzeros)
    if method == "global":
        return prune_global(model, names, nonzeros)
    raise ValueError(f"unknown pruning method {method!r}; expected 'layerwise' or 'global'")


def make_permanent(model: nn.Module) -> list[str]:
    """Remove every pruning reparametrisation, leaving plain parameters with zeros where masked.

    Returns the qualified names made permanent. LSTM/GRU/RNN flat weights are re-initialised."""
    done = []
    for mod_name, mod in model.named_modules():
        hooks = [h for h in mod._forward_pre_hooks.values() if isinstance(h, torch_prune.BasePruningMethod)]
        for hook in hooks:
            attr = hook._tensor_name
            _refresh(mod, attr)  # make the attribute current with orig * mask before removal
            torch_prune.remove(mod, attr)
            done.append(f"{mod_name}.{attr}" if mod_name else attr)
        if hooks and isinstance(mod, nn.RNNBase):
            mod._init_flat_weights()
    return done


@torch.no_grad()
def sparsity_report(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, tuple[int, int]]:
    """``{name: (non-zeros, entries)}`` of the effective named weights (default: every prunable weight)."""
    names = prunable_weights(model, KINDS) if names is None else names
    return {n: (int(torch.count_nonzero(w := _effective(m, a))), w.numel()) for n, m, a in _resolve(model, names)}


def count_nonzero(model: nn.Module, names: Sequence[str] | None = None) -> int:
    """Non-zero entries of the effective named weights (default: every prunable weight)."""
    return sum(nnz for nnz, _ in sparsity_report(model, names).values())


def agp_sparsity(t: float, *, final: float, start: float, end: float, initial: float = 0.0) -> float:
    """Zhu & Gupta's cubic schedule: s_t = s_f + (s_i - s_f) (1 - (t - start) / (end - start))^3,
    clamped to s_i before ``start`` and s_f from ``end`` on."""
    if not (0.0 <= initial <= 1.0 and 0.0 <= final <= 1.0):
        raise ValueError(f"sparsities must be in [0, 1], got initial={initial}, final={final}")
    if end < start:
        raise ValueError(f"AGP end ({end}) must be >= start ({start})")
    if t >= end:
        return final
    if t <= start:
        return initial
    return final + (initial - final) * (1.0 - (t - start) / (end - start)) ** 3


def agp_nonzeros(t: float, total: int, target: int, *, start: float, end: float, initial_sparsity: float = 0.0) -> int:
    """Non-zeros to keep at time ``t`` under the cubic schedule, as an int: ``target`` exactly
    from ``end`` on, ``round(total * (1 - initial_sparsity))`` up to ``start``, non-increasing."""
    _check_count(target, total)
    keep0 = round(total * (1.0 - initial_sparsity))
    if keep0 < target:
        raise ValueError(f"initial_sparsity={initial_sparsity} keeps {keep0} < target {target} non-zeros")
    if t >= end:
        return target
    progress = agp_sparsity(t, final=1.0, start=start, end=end, initial=0.0)  # 0 -> 1 along the cubic
    return int(round(target + (keep0 - target) * (1.0 - progress)))


class AGPPruner:
    """Gradual magnitude pruning (AGP) during :func:`~mpolstm.harness.training.fit`, ending at exactly ``nonzeros``.

    A fit callback (it follows :class:`mpolstm.harness.training.Callback`'s protocol without importing it).

    ``unit="epoch"``: at the start of epoch e (0-based) the weights are pruned to
    ``agp_nonzeros(e, ...)``; the final count holds from epoch ``end`` on. ``unit="step"``: after
    optimizer step s (1-based) with ``start <= s <= end`` and ``(s - start) % frequency == 0`` or
    ``s == end``. ``method``: "layerwise" or "global" for each pruning step. The model counts as
    ready (best-weight tracking, early stopping) once the final count is reached. Masks live in
    the model's state_dict, so a checkpoint carries them; on fit start every named weight gets a
    mask (all ones until pruning starts) so that fresh and resumed runs have the same structure.
    Each epoch's record gets ``nonzeros``."""

    def __init__(
        self,
        names: Sequence[str],
        nonzeros: int,
        *,
        start: int,
        end: int,
        unit: str = "epoch",
        frequency: int = 1,
        method: str = "layerwise",
        initial_sparsity: float = 0.0,
    ) -> None:
        if unit not in ("epoch", "step"):
            raise ValueError(f"AGPPruner unit must be 'epoch' or 'step', got {unit!r}")
        if method not in ("layerwise", "global"):
            raise ValueError(f"AGPPruner method must be 'layerwise' or 'global', got {method!r}")
        if not 0 <= start <= end:
            raise ValueError(f"AGPPruner needs 0 <= start <= end, got start={start}, end={end}")
        if frequency < 1:
            raise ValueError(f"AGPPruner frequency must be >= 1, got {frequency}")
        self.names, self.nonzeros, self.start, self.end = list(names), nonzeros, start, end
        self.unit, self.frequency, self.method, self.initial_sparsity = unit, frequency, method, initial_sparsity

    def schedule(self, t: int, total: int) -> int:
        """Non-zeros at epoch/step ``t``."""
        return agp_nonzeros(t, total, self.nonzeros, start=self.start, end=self.end,
                            initial_sparsity=self.initial_sparsity)

    def _prune(self, model: nn.Module, t: int) -> None:
        prune_to(model, self.names, self.schedule(t, num_weights(model, self.names)), self.method)

    def on_fit_start(self, state: Any) -> None:
        total = num_weights(state.model, self.names)
        _check_count(self.nonzeros, total)
        agp_nonzeros(self.end, total, self.nonzeros, start=self.start, end=self.end,
                     initial_sparsity=self.initial_sparsity)  # validates initial_sparsity vs target
        for _, mod, attr in _resolve(state.model, self.names):
            if not _is_pruned(mod, attr):
                _set_mask(mod, attr, torch.ones_like(_effective(mod, attr), dtype=torch.bool))

    def on_epoch_start(self, state: Any) -> None:
        if self.unit == "epoch" and state.epoch >= self.start:
            self._prune(state.model, state.epoch)

    def on_batch_end(self, state: Any) -> None:
        s = state.step
        if self.unit == "step" and self.start <= s <= self.end and ((s - self.start) % self.frequency == 0 or s == self.end):
            self._prune(state.model, s)

    def on_epoch_end(self, state: Any) -> None:
        state.record["nonzeros"] = count_nonzero(state.model, self.names)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore: the schedule depends only on the epoch/step, the masks on the model."""

    def ready(self, state: Any) -> bool:
        return (state.epoch if self.unit == "epoch" else state.step) >= self.end
