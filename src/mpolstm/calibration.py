"""Input second moments of the weights to compress, recorded from calibration data with hooks.

What a weight's output error depends on is the distribution of the inputs it multiplies: for
y = W x, E||(W - W') x||^2 = ||(W - W') C^{1/2}||_F^2 with C = E[x x^T]. ``collect_moments``
records C for every selected weight while the caller's data runs through the model:

- nn.Linear: x is the module input (every leading axis is a sample).
- nn.Embedding: the input is a one-hot row selector, so C is diagonal: how often each row is
  looked up (the MPO convention's input side of a table is its rows).
- nn.LSTM / nn.GRU: W_ih of layer l multiplies x_t of layer l (the module input for l = 0, the
  previous layer's output otherwise) and W_hh multiplies h_{t-1} (the initial state at t = 0),
  at every step, layer and direction. A forward hook receives the module's input and re-runs it
  one layer and direction at a time with the module's own weights to read those sequences
  (padded positions of a PackedSequence are left out). W_hr (proj_size > 0) is not recorded.

Hooks are removed and the model's train/eval flags restored afterwards; parameters are never
touched. ``whitening(C)`` gives the damped square root used by ``compress(calibration=...)``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

__all__ = ["Calibration", "apply_whitening", "collect_moments", "whitening"]

Calibration = Iterable[Any] | Callable[[nn.Module], Any]

# Relative eigenvalue floor of the damped second moment: C + DAMPING * mean(eig C) * I.
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
        return self.sum / max(self.count, 1)


def _rnn_sequences(rnn: nn.RNNBase, args: tuple) -> Iterable[tuple[str, Tensor]]:
    """(weight name, its input vectors (samples, features)) for every layer and direction."""
    x, hx = args[0], args[1] if len(args) > 1 else None
    mask = None
    if isinstance(x, PackedSequence):
        x, lengths = pad_packed_sequence(x, batch_first=True)
        mask = torch.arange(x.shape[1])[None, :] < lengths[:, None]  # (N, T)
    elif x.dim() == 2:  # unbatched (T, F)
        x = x.unsqueeze(0)
    elif not rnn.batch_first:
        x = x.transpose(0, 1)
    h0_all, c0_all = hx if isinstance(rnn, nn.LSTM) and hx is not None else (hx, None)
    if h0_all is not None and h0_all.dim() == 2:
        h0_all, c0_all = h0_all.unsqueeze(1), None if c0_all is None else c0_all.unsqueeze(1)
    lstm = isinstance(rnn, nn.LSTM)
    directions = 2 if rnn.bidirectional else 1
    real_hidden = rnn.proj_size or rnn.hidden_size
    layer_input = x  # (N, T, F), batch first from here on
    for layer in range(rnn.num_layers):
        outputs = []
        for d in range(directions):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            single = (nn.LSTM if lstm else nn.GRU)(layer_input.shape[-1], rnn.hidden_size, 1, bias=rnn.bias,
                                                   batch_first=True, **({"proj_size": rnn.proj_size} if lstm else {}))
            single.to(device=layer_input.device, dtype=layer_input.dtype)
            with torch.no_grad():
                for name in single._flat_weights_names:
                    getattr(single, name).copy_(getattr(rnn, name.replace("_l0", sfx)))
            seq = layer_input.flip(1) if d else layer_input
            k = layer * directions + d
            h0 = None if h0_all is None else h0_all[k : k + 1]
            state = h0 if h0 is None or not lstm else (h0, c0_all[k : k + 1])
            if d and mask is not None:  # reverse each sequence within its own length
                seq = torch.stack([torch.cat([s[:n].flip(0), s[n:]]) for s, n in
                                   zip(layer_input, mask.sum(1))])
            with torch.no_grad():
                out, _ = single(seq, state)
            start = torch.zeros_like(out[:, :1]) if h0 is None else h0.transpose(0, 1)
            previous = torch.cat([start, out[:, :-1]], 1)  # h_{t-1}
            keep = mask if mask is not None else torch.ones(out.shape[:2], dtype=torch.bool)
            yield f"weight_ih{sfx}", seq[keep]
            yield f"weight_hh{sfx}", previous[keep]
            if d and mask is not None:
                out = torch.stack([torch.cat([o[:n].flip(0), o[n:]]) for o, n in zip(out, mask.sum(1))])
            elif d:
                out = out.flip(1)
            outputs.append(out[..., :real_hidden])
        layer_input = torch.cat(outputs, -1)


def _run(model: nn.Module, calibration: Calibration) -> int:
    """Run the calibration data through ``model``; returns the number of batches run."""
    if callable(calibration) and not isinstance(calibration, (Tensor, nn.Module)):
        calibration(model)
        return 1
    if isinstance(calibration, (str, bytes, Mapping)) or not isinstance(calibration, Iterable):
        raise ValueError("calibration must be an iterable of batches (a tensor or a tuple of model "
                         f"inputs each) or a callable that runs the model, got {type(calibration).__name__}")
    batches = [calibration] if isinstance(calibration, Tensor) else calibration
    count = 0
    for batch in batches:
        inputs = batch if isinstance(batch, (tuple, list)) and not isinstance(batch, PackedSequence) else (batch,)
        if not inputs or not all(isinstance(x, (Tensor, PackedSequence)) for x in inputs):
            raise ValueError("each calibration batch must be a tensor or a tuple/list of tensors (the model's "
                             f"positional inputs), got {type(batch).__name__}")
        try:
            model(*inputs)
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            raise ValueError(f"calibration batch {count} failed in the model: {exc}") from exc
        count += 1
    return count


@torch.no_grad()
def collect_moments(model: nn.Module, targets: Mapping[str, nn.Module], calibration: Calibration
                    ) -> dict[str, dict[str, Tensor]]:
    """{module name: {weight name: C (features, features), or its diagonal (features,) for an
    embedding, float64}} for the ``targets``
    (nn.Linear, nn.Embedding, nn.LSTM, nn.GRU) while ``calibration`` runs ``model`` in eval
    mode. Raises ValueError for bad calibration input or when a target saw no data."""
    moments: dict[str, dict[str, _Moments]] = {name: {} for name in targets}

    def hook_for(name: str, module: nn.Module):
        def hook(mod: nn.Module, args: tuple, output: Any) -> None:
            slots = moments[name]
            if isinstance(mod, nn.Embedding):
                rows = torch.bincount(args[0].reshape(-1).cpu(), minlength=mod.num_embeddings)
                slots.setdefault("weight", _Moments()).add_counts(rows[: mod.num_embeddings])
            elif isinstance(mod, nn.Linear):
                slots.setdefault("weight", _Moments()).add(args[0])
            else:
                for weight, vectors in _rnn_sequences(mod, args):
                    slots.setdefault(weight, _Moments()).add(vectors)
        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [module.register_forward_hook(hook_for(name, module)) for name, module in targets.items()]
    try:
        model.eval()
        batches = _run(model, calibration)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.train(mode)
    empty = [name for name, slots in moments.items() if not slots or all(s.count == 0 for s in slots.values())]
    if batches == 0 or empty:
        raise ValueError(f"calibration ran no data through module(s) {empty or list(targets)}; "
                         "give batches that reach them")
    return {name: {w: s.mean() for w, s in slots.items()} for name, slots in moments.items()}


def whitening(moment: Tensor) -> tuple[Tensor, Tensor]:
    """(S, S^{-1}) with S = (C + DAMPING * mean(eig C) * I)^{1/2}, symmetric, float64; for a
    diagonal C given as a vector, S and S^{-1} are vectors too."""
    c = moment.double()
    if c.dim() == 1:
        eig = c.clamp_min(0.0)
    else:
        eig, vec = torch.linalg.eigh((c + c.T) / 2)
        eig = eig.clamp_min(0.0)
    floor = DAMPING * float(eig.mean()) if float(eig.mean()) > 0 else 1.0
    root = (eig + floor).sqrt()
    if c.dim() == 1:
        return root, 1.0 / root
    return (vec * root) @ vec.T, (vec / root) @ vec.T


def apply_whitening(s: Tensor, matrix: Tensor) -> Tensor:
    """S @ matrix for a full S (rows, rows) or a diagonal S given as a vector (rows,)."""
    return s[:, None] * matrix if s.dim() == 1 else s @ matrix
