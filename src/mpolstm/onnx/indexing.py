"""The interpreter's indexing operators (ONNX semantics, torch calls): cumulative sums, triangles,
gathers and scatters by index, top-k, one-hot, non-zero positions, depth <-> space."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from .ops import register_ops

__all__: list[str] = []


def _axis(x: Tensor, axis: int) -> int:
    return axis % max(x.dim(), 1)


def _cumsum(ctx, xs, a):
    x = xs[0]
    axis = _axis(x, int(xs[1].reshape(-1)[0]))
    y = x.flip(axis) if a.get("reverse", 0) else x
    out = y.cumsum(axis).to(x.dtype)
    if a.get("exclusive", 0):
        out = torch.cat([torch.zeros_like(y.narrow(axis, 0, 1)), out.narrow(axis, 0, y.shape[axis] - 1)], axis)
    return out.flip(axis) if a.get("reverse", 0) else out


def _trilu(ctx, xs, a):
    k = int(xs[1].reshape(-1)[0]) if len(xs) > 1 and xs[1] is not None else 0
    return torch.triu(xs[0], k) if a.get("upper", 1) else torch.tril(xs[0], k)


def _index(index: Tensor, size: int) -> Tensor:
    return torch.where(index < 0, index + size, index).long()


def _gather_elements(ctx, xs, a):
    x, index = xs
    axis = _axis(x, a.get("axis", 0))
    return torch.gather(x, axis, _index(index, x.shape[axis]))


def _gather_nd(ctx, xs, a):
    """GatherND: slices of ``x`` at the index tuples in ``indices``' last axis, per batch entry."""
    x, indices, b = xs[0], xs[1].long(), a.get("batch_dims", 0)
    k = indices.shape[-1]
    xs_b, idx_b = x.reshape(-1, *x.shape[b:]), indices.reshape(-1, *indices.shape[b:])
    picked = []
    for xi, ii in zip(xs_b, idx_b):
        flat = ii.reshape(-1, k)
        flat = torch.where(flat < 0, flat + torch.tensor(xi.shape[:k]), flat)
        picked.append(xi[tuple(flat.T)].reshape(*ii.shape[:-1], *xi.shape[k:]))
    out = torch.stack(picked)
    return out.reshape(*x.shape[:b], *out.shape[1:])


def _compress(ctx, xs, a):
    x, keep = xs
    if "axis" not in a:
        x, axis = x.reshape(-1), 0
    else:
        axis = _axis(x, a["axis"])
    return x.index_select(axis, torch.nonzero(keep.reshape(-1)).reshape(-1))


def _reverse_sequence(ctx, xs, a):
    """Each batch entry's first ``lengths[k]`` time steps reversed, the rest kept."""
    x, lengths = xs
    batch, time = a.get("batch_axis", 1), a.get("time_axis", 0)
    steps, rows = torch.arange(x.shape[time]), []
    for k, n in enumerate(lengths.tolist()):
        order = torch.where(steps < n, n - 1 - steps, steps)
        rows.append(x.select(batch, k).index_select(time - (time > batch), order))
    return torch.stack(rows, batch)


def _topk(ctx, xs, a):
    x, k = xs[0], int(xs[1].reshape(-1)[0])
    axis = _axis(x, a.get("axis", -1))
    largest = bool(a.get("largest", 1))
    # ONNX: of equal values the lower index first; a stable sort gives that order
    order = torch.sort(x, dim=axis, descending=largest, stable=True).indices.narrow(axis, 0, k)
    return [torch.gather(x, axis, order), order]


def _one_hot(ctx, xs, a):
    index, depth, values = xs[0], int(xs[1].reshape(-1)[0]), xs[2]
    index = torch.where(index < 0, index + depth, index).long()
    valid = (index >= 0) & (index < depth)
    hot = F.one_hot(index.clamp(0, depth - 1), depth).bool() & valid.unsqueeze(-1)
    out = torch.where(hot, values[1], values[0])
    return out.movedim(-1, a.get("axis", -1) % out.dim())


SCATTER = {"none": None, "add": torch.add, "mul": torch.mul, "max": torch.maximum, "min": torch.minimum}


def _reduction(a: dict):
    if a.get("reduction", "none") not in SCATTER:
        raise ValueError(f"reduction {a.get('reduction')!r} (expected none, add, mul, max or min)")
    return SCATTER[a.get("reduction", "none")]


def _scatter_elements(ctx, xs, a):
    x, index, updates = xs
    axis, fn = _axis(x, a.get("axis", 0)), _reduction(a)
    index = _index(index, x.shape[axis])
    if fn is None:
        return x.scatter(axis, index, updates)
    reduce = {torch.add: "sum", torch.mul: "prod", torch.maximum: "amax", torch.minimum: "amin"}[fn]
    return x.scatter_reduce(axis, index, updates, reduce, include_self=True)


def _scatter_nd(ctx, xs, a):
    """ScatterND: ``updates`` written (or combined by ``reduction``) at the index tuples of ``indices``."""
    x, indices, updates = xs
    fn, out, k = _reduction(a), x.clone(), indices.shape[-1]
    places = indices.reshape(-1, k).tolist()
    for place, update in zip(places, updates.reshape(-1, *x.shape[k:])):
        at = tuple(p + x.shape[d] if p < 0 else p for d, p in enumerate(place))
        out[at] = update if fn is None else fn(out[at], update)
    return out


def _depth_to_space(ctx, xs, a):
    x, bs = xs[0], a["blocksize"]
    b, c, h, w = x.shape
    if a.get("mode", "DCR") == "DCR":
        y = x.reshape(b, bs, bs, c // bs ** 2, h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(b, c // bs ** 2, bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(b, c // bs ** 2, h * bs, w * bs)


def _space_to_depth(ctx, xs, a):
    x, bs = xs[0], a["blocksize"]
    b, c, h, w = x.shape
    y = x.reshape(b, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(b, c * bs ** 2, h // bs, w // bs)


register_ops({
    "CumSum": _cumsum,
    "Trilu": _trilu,
    "GatherElements": _gather_elements,
    "TopK": _topk,
    "GatherND": _gather_nd,
    "Compress": _compress,
    "ReverseSequence": _reverse_sequence,
    "OneHot": _one_hot,
    "NonZero": lambda ctx, xs, a: torch.nonzero(xs[0]).T.contiguous(),
    "ScatterElements": _scatter_elements,
    "ScatterND": _scatter_nd,
    "DepthToSpace": _depth_to_space,
    "SpaceToDepth": _space_to_depth,
})
