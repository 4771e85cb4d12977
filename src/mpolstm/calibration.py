"""Input second moments of the weights to compress, recorded from calibration data with hooks.

What a weight's output error depends on is the distribution of the inputs it multiplies: for
y = W x, E||(W - W') x||^2 = ||(W - W') C^{1/2}||_F^2 with C = E[x x^T]. ``collect_moments``
records C for every selected weight while the caller's data runs through the model. What
each weight multiplies is told by its layer type's ``inputs`` hook in the registry
(``mpolstm.nn.registry``): nn.Linear its input; nn.Embedding a one-hot row selector, so C is
diagonal (how often each row is looked up); nn.LSTM / nn.GRU / nn.RNN x_t and h_{t-1} at every
step, layer and direction (mpolstm.nn.rnn_inputs.recurrent_inputs); the cells x for weight_ih and the
given state h (zeros without one) for weight_hh; Conv1d / Conv2d the unfolded input patches.
Arguments passed by keyword (``cell(x, hx=h)``) are bound to the forward's signature, so they
count as if passed by position.

Hooks are removed and the model's train/eval flags restored afterwards; parameters are never
touched. ``whitening(C)`` gives the damped square root used by ``compress(calibration=...)``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Mapping, Sequence, cast

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .errors import ConfigError, FieldNames, must_be
from .nn.registry import layer_type

__all__ = ["Calibration", "Moments", "apply_whitening", "batch_axis", "check_calibration", "collect_moments", "collect_moments_split",
           "damping", "run_hooked", "whitening"]

Calibration = Iterable[Any] | Callable[[nn.Module], Any]

# Relative eigenvalue floor of the damped second moment: C + DAMPING * mean(eig C) * I (see damping).
DAMPING = 1e-2


class _Moments:
    """Running sum of x^T x (or of row counts for embeddings) over samples, in float64."""

    def __init__(self) -> None:
        self.sum: Tensor | None = None
        self.count = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        gram = x.T @ x
        self.sum = gram if self.sum is None else self.sum + gram
        self.count += x.shape[0]

    def add_counts(self, counts: Tensor) -> None:
        """One-hot inputs: only the diagonal of x^T x is non-zero; it is kept as a vector."""
        counts = counts.double()
        self.sum = counts if self.sum is None else self.sum + counts
        self.count += int(counts.sum())

    def mean(self) -> Tensor:
        assert self.sum is not None, "no inputs were added"
        return self.sum / max(self.count, 1)

    def merged(self, other: "_Moments") -> "_Moments":
        both = _Moments()
        both.sum = self.sum if other.sum is None else other.sum if self.sum is None else self.sum + other.sum
        both.count = self.count + other.count
        return both


def check_calibration(calibration: Any) -> None:
    """ValueError unless ``calibration`` is a callable or an iterable of batches (not one tensor, a
    string or a mapping)."""
    if callable(calibration) and not isinstance(calibration, (Tensor, nn.Module)):
        return
    if isinstance(calibration, (str, bytes, Mapping)) or not isinstance(calibration, Iterable):
        raise must_be("calibration", "an iterable of batches (a tensor, a tuple of model inputs or a callable that "
                      "runs the model, each) or a callable that runs the model", type(calibration).__name__)
    if isinstance(calibration, Tensor):
        shape = tuple(calibration.shape)
        raise ConfigError("calibration", lambda n: f"{n('calibration')} is one tensor {shape}: pass a list of batches"
                          f"{', e.g. [x] for one batch' if n.api else ' (a file of inputs holds one batch)'} (a bare "
                          "tensor would be ambiguous: one batch, or batches along dim 0)")


def _run(model: nn.Module, calibration: Calibration) -> int:
    """Run the calibration data through ``model``; returns the number of batches run."""
    if callable(calibration) and not isinstance(calibration, (Tensor, nn.Module)):
        calibration(model)
        return 1
    check_calibration(calibration)
    batches = cast(Iterable[Any], calibration)
    count = 0
    for batch in batches:
        if callable(batch) and not isinstance(batch, (Tensor, nn.Module)):  # runs the model on its batch
            batch(model)
            count += 1
            continue
        inputs = batch if isinstance(batch, (tuple, list)) and not isinstance(batch, PackedSequence) else (batch,)
        if not inputs or not all(isinstance(x, (Tensor, PackedSequence)) for x in inputs):
            raise ConfigError("calibration", _not_a_batch(type(batch).__name__))
        try:
            model(*inputs)
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            raise ConfigError("calibration", _failed_batch(count, exc)) from exc
        count += 1
    return count


def _not_a_batch(kind: str) -> Callable[[FieldNames], str]:
    return lambda n: (f"each {n('calibration')} batch must be a tensor, a tuple/list of tensors (the model's "
                      f"positional inputs) or a callable that runs the model, got {kind}")


def _failed_batch(count: int, exc: Exception) -> Callable[[FieldNames], str]:
    return lambda n: f"{n('calibration')} batch {count} failed in the model: {exc}"


def run_hooked(model: nn.Module, calibration: Calibration, hooks: Sequence[tuple[nn.Module, Callable]],
               with_kwargs: bool = False) -> int:
    """Run ``calibration`` through ``model`` in eval mode with each (module, forward hook) attached;
    afterwards the hooks are removed and every module's train/eval mode is restored. Returns the
    number of batches run."""
    modes = {m: m.training for m in model.modules()}
    handles = [module.register_forward_hook(hook, with_kwargs=with_kwargs) for module, hook in hooks]
    try:
        model.eval()
        return _run(model, calibration)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.train(mode)


def batch_axis(model: nn.Module, inputs: tuple[Tensor, ...]) -> int:
    """The axis of one batch of ``inputs`` (the model's positional inputs) that indexes independent
    samples: 1 where the model run on the second half along axis 1 gives the whole run's outputs for
    it and along axis 0 does not (a time-first recurrent model: axis 0 is time, and a later stretch
    run from zero states differs), else 0. Runs the model (eval mode, no grad) up to four times."""

    def first(out: Any) -> Any:
        return out[0] if isinstance(out, (tuple, list)) else out

    def separable(axis: int) -> bool:
        n = inputs[0].shape[axis] if inputs[0].dim() > axis else 0
        if n < 2 or any(x.dim() <= axis or x.shape[axis] != n for x in inputs):
            return False
        try:
            with torch.no_grad():
                whole = first(model(*inputs))
                half = first(model(*(x.narrow(axis, n // 2, n - n // 2) for x in inputs)))
        except (RuntimeError, ValueError, IndexError, TypeError):  # not an axis the model takes halves of
            return False
        if not isinstance(whole, Tensor) or not isinstance(half, Tensor):
            return False
        parts = [whole.narrow(e, n // 2, n - n // 2) for e in range(whole.dim()) if whole.shape[e] == n]
        return any(p.shape == half.shape and torch.allclose(half, p, rtol=1e-4, atol=1e-5) for p in parts)

    training = model.training
    model.eval()
    try:
        return 1 if not separable(0) and separable(1) else 0
    finally:
        model.train(training)


Moments = dict[str, dict[str, Tensor]]


def collect_moments(model: nn.Module, targets: Mapping[str, nn.Module], calibration: Calibration) -> Moments:
    """{module name: {weight name: C (features, features), or its diagonal (features,) for a
    table, float64}} for the ``targets`` (registered types; each type's ``inputs`` hook says
    what every weight multiplies) while ``calibration`` runs ``model`` in eval mode. Raises
    ValueError for bad calibration input or when a target saw no data."""
    return _means(_sums(model, targets, calibration))


def collect_moments_split(model: nn.Module, targets: Mapping[str, nn.Module], first: Calibration,
                          second: Calibration, watch: Callable | None = None) -> tuple[Moments, Moments]:
    """(the moments of ``first``, those of ``first`` and ``second`` together): each batch run once;
    ``watch``: a forward hook (with kwargs) on ``model`` itself while ``second`` runs."""
    a, b = _sums(model, targets, first), _sums(model, targets, second, [(model, watch)] if watch else [])
    both = {name: {w: m.merged(b[name].get(w, _Moments())) for w, m in slots.items()} for name, slots in a.items()}
    return _means(a), _means(both)


def _means(sums: dict[str, dict[str, _Moments]]) -> Moments:
    return {name: {w: s.mean() for w, s in slots.items()} for name, slots in sums.items()}


@torch.no_grad()
def _sums(model: nn.Module, targets: Mapping[str, nn.Module], calibration: Calibration,
          extra: Sequence[tuple[nn.Module, Callable]] = ()) -> dict[str, dict[str, _Moments]]:
    moments: dict[str, dict[str, _Moments]] = {name: {} for name in targets}

    def hook_for(name: str, module: nn.Module):
        entry = layer_type(module)
        assert entry is not None, f"{type(module).__name__} is not a registered type"  # targets are registered
        inputs = entry.inputs

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            slots = moments[name]
            if kwargs:  # e.g. cell(x, hx=h): the state the registry's hook reads by position
                args = inspect.signature(mod.forward).bind(*args, **kwargs).args
            for weight, seen in inputs(mod, args):
                slot = slots.setdefault(weight, _Moments())
                if seen.dim() == 1:  # row indices of a table lookup (one-hot inputs)
                    slot.add_counts(torch.bincount(seen.cpu(), minlength=cast(Tensor, mod.weight).shape[0]))
                else:
                    slot.add(seen)
        return hook

    batches = run_hooked(model, calibration, [*((module, hook_for(name, module)) for name, module in targets.items()),
                                              *extra], with_kwargs=True)
    empty = [name for name, slots in moments.items() if not slots or all(s.count == 0 for s in slots.values())]
    if batches == 0 or empty:
        modules = empty or list(targets)
        raise ConfigError("calibration", lambda n: f"{n('calibration')} ran no data through module(s) {modules}; "
                                                   "give batches that reach them")
    return moments


def damping(eigenvalues: Tensor) -> float:
    """What is added to every eigenvalue of a second moment C before it is inverted or rooted:
    DAMPING * mean(eig C), or DAMPING itself when C is 0 (inputs without energy: S is then a
    multiple of I, and no fit depends on which). The one damping rule (whitening, refit)."""
    mean = float(eigenvalues.clamp_min(0.0).mean()) if eigenvalues.numel() else 0.0
    return DAMPING * (mean if mean > 0 else 1.0)


def whitening(moment: Tensor) -> tuple[Tensor, Tensor]:
    """(S, S^{-1}) with S = (C + damping(eig C) I)^{1/2} (:func:`damping`), symmetric, float64; for
    a diagonal C given as a vector, S and S^{-1} are vectors too."""
    c = moment.double()
    if c.dim() == 1:
        eig = c.clamp_min(0.0)
    else:
        eig, vec = torch.linalg.eigh((c + c.T) / 2)
        eig = eig.clamp_min(0.0)
    root = (eig + damping(eig)).sqrt()
    if c.dim() == 1:
        return root, 1.0 / root
    return (vec * root) @ vec.T, (vec / root) @ vec.T


def apply_whitening(s: Tensor, matrix: Tensor) -> Tensor:
    """S @ matrix for a full S (rows, rows) or a diagonal S given as a vector (rows,)."""
    return s[:, None] * matrix if s.dim() == 1 else s @ matrix
