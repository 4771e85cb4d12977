"""The interpreter's shape, indexing and reduction operators (ONNX semantics, torch calls).

Shape arithmetic (Shape, Gather, Concat, ConstantOfShape, Slice ...) runs on int64 tensors as
ONNX does; values that set a shape are read back as Python ints (``.tolist()``). Operators whose
attributes became inputs in a later operator set (Squeeze, Unsqueeze, Split, Slice, Pad, the
reductions) read whichever form the model's operator set uses.
"""

from __future__ import annotations

import math
from typing import Callable, overload

import torch
from torch import Tensor
from torch.nn import functional as F

from .ops import register_ops

__all__: list[str] = []


@overload
def _ints(x: Tensor) -> list[int]: ...
@overload
def _ints(x: None) -> None: ...
def _ints(x: Tensor | None) -> list[int] | None:
    return None if x is None else [int(v) for v in x.reshape(-1).tolist()]


def _axes(ctx, xs, a, index: int, since: int, key: str = "axes") -> list[int] | None:
    """An axes list read from the attribute (before opset ``since``) or the input at ``index``."""
    if ctx.opset < since:
        return a.get(key)
    return _ints(xs[index]) if len(xs) > index else None


def _transpose(ctx, xs, a):
    x = xs[0]
    return x.permute(*a.get("perm", list(range(x.dim()))[::-1]))


def _reshape(ctx, xs, a):
    x, shape = xs[0], _ints(xs[1])
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _flatten(ctx, xs, a):
    x = xs[0]
    axis = a.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _squeeze(ctx, xs, a):
    x, axes = xs[0], _axes(ctx, xs, a, 1, 13)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(ax % x.dim() for ax in axes))


def _unsqueeze(ctx, xs, a):
    x, axes = xs[0], _axes(ctx, xs, a, 1, 13)
    rank = x.dim() + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(ax)
    return x


def _concat(ctx, xs, a):
    return torch.cat([x for x in xs if x is not None], dim=a["axis"])


def _split(ctx, xs, a):
    x, axis = xs[0], a.get("axis", 0)
    sizes = _axes(ctx, xs, a, 1, 13, "split")
    if sizes is None:
        parts = a["num_outputs"]  # set from the node's outputs when the model does not give it
        chunk = -(-x.shape[axis] // parts)
        sizes = [min(chunk, x.shape[axis] - k * chunk) for k in range(parts)]
    return list(torch.split(x, sizes, dim=axis))


def _slice(ctx, xs, a):
    x = xs[0]
    if ctx.opset < 10:
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        starts, ends = _ints(xs[1]), _ints(xs[2])
        axes = _ints(xs[3]) if len(xs) > 3 else None
        steps = _ints(xs[4]) if len(xs) > 4 else None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for start, end, axis, step in zip(starts, ends, axes, steps):
        dim = x.shape[axis]
        start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
        index = torch.arange(start, end, step, device=x.device)
        x = x.index_select(axis % x.dim(), index)
    return x


def _gather(ctx, xs, a):
    x, index = xs
    axis = a.get("axis", 0) % x.dim()
    index = torch.where(index < 0, index + x.shape[axis], index).long()
    picked = x.index_select(axis, index.reshape(-1))
    return picked.reshape((*x.shape[:axis], *index.shape, *x.shape[axis + 1:]))


def _shape(ctx, xs, a):
    dims = list(xs[0].shape)
    start, end = a.get("start", 0), a.get("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64)


def _constant_of_shape(ctx, xs, a):
    value = a.get("value", torch.zeros(1))
    dtype = ctx.float_dtype if value.dtype == torch.float32 else value.dtype
    return torch.full(_ints(xs[0]), value.reshape(-1)[0].item(), dtype=dtype)


def _constant(ctx, xs, a):
    if "value" in a:
        value = a["value"]
        return value.to(ctx.float_dtype) if value.dtype == torch.float32 else value.clone()
    for key, dtype in (("value_float", ctx.float_dtype), ("value_floats", ctx.float_dtype),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in a:
            return torch.tensor(a[key], dtype=dtype)
    raise ValueError(f"a Constant with {sorted(a)} is not supported (numbers only)")


def _expand(ctx, xs, a):
    x = xs[0]
    return x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(xs[1]))))


def _range(ctx, xs, a):
    start, limit, delta = (x.item() for x in xs)
    return torch.arange(start, limit, delta, dtype=xs[0].dtype)


def _prod(x: Tensor, dims: tuple[int, ...], keep: bool) -> Tensor:
    for d in dims:
        x = x.prod(d, keepdim=True)
    return x if keep else x.squeeze(dims)


REDUCERS = {
    "sum": lambda x, d, k: x.sum(d, keepdim=k),
    "mean": lambda x, d, k: x.mean(d, keepdim=k),
    "max": lambda x, d, k: torch.amax(x, d, keepdim=k),
    "min": lambda x, d, k: torch.amin(x, d, keepdim=k),
    "prod": _prod,
    "l1": lambda x, d, k: x.abs().sum(d, keepdim=k),
    "l2": lambda x, d, k: x.square().sum(d, keepdim=k).sqrt(),
    "sumsquare": lambda x, d, k: x.square().sum(d, keepdim=k),
    "logsum": lambda x, d, k: x.sum(d, keepdim=k).log(),
    "logsumexp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}


def _reduce(kind: str, since: int) -> Callable:
    """A Reduce* operator (axes an attribute before opset ``since``, then an input)."""
    def run(ctx, xs, a):
        x = xs[0]
        axes = _axes(ctx, xs, a, 1, since)
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        dims = tuple(ax % x.dim() for ax in axes)
        if kind in ("max", "min") and x.numel() == 0:  # over an empty set: -inf / +inf, as ONNX says
            shape = [1 if d in dims else n for d, n in enumerate(x.shape)] if keep else \
                [n for d, n in enumerate(x.shape) if d not in dims]
            fill = (kind == "min") if x.dtype == torch.bool else float("-inf" if kind == "max" else "inf")
            return torch.full(shape, fill, dtype=x.dtype)
        out = REDUCERS[kind](x, dims, keep)
        return out.to(x.dtype) if kind in ("sum", "prod", "l1", "sumsquare") else out
    return run


def _arg(fn) -> Callable:
    def run(ctx, xs, a):
        x, axis, keep = xs[0], a.get("axis", 0) % max(xs[0].dim(), 1), bool(a.get("keepdims", 1))
        if a.get("select_last_index", 0):  # the last of equal values: the first in the flipped tensor
            return x.shape[axis] - 1 - fn(x.flip(axis), dim=axis, keepdim=keep)
        return fn(x, dim=axis, keepdim=keep)
    return run


def _pad_index(n: int, begin: int, end: int, mode: str) -> Tensor:
    """Source positions along an axis of ``n`` padded by ``begin`` / ``end`` (negative: cropped)."""
    i = torch.arange(-begin, n + end)
    if mode == "edge":
        return i.clamp(0, n - 1)
    if mode == "wrap":
        return i % n
    period = 2 * (n - 1)  # reflect: mirror about the first and last positions
    if period == 0:
        raise ValueError("Pad: reflect needs an axis of at least 2 to mirror (as onnxruntime)")
    i = i.abs() % period
    return torch.where(i < n, i, period - i)


def _pad(ctx, xs, a):
    """Pad in every mode (constant, reflect, edge, wrap) along any axes of any rank."""
    x = xs[0]
    if ctx.opset < 11:
        pads, value, axes = a["pads"], a.get("value", 0.0), None
    else:
        pads = _ints(xs[1])
        value = xs[2].item() if len(xs) > 2 and xs[2] is not None and xs[2].numel() else 0.0
        axes = _ints(xs[3]) if len(xs) > 3 and xs[3] is not None else None
    rank, mode = x.dim(), a.get("mode", "constant")
    axes = list(range(rank)) if axes is None else [ax % rank for ax in axes]
    if mode not in ("constant", "reflect", "edge", "wrap") or len(pads) != 2 * len(axes):
        raise ValueError(f"Pad: mode {mode!r} with {len(pads)} pads for axes {axes} (expected constant, "
                         "reflect, edge or wrap, two pads an axis)")
    if mode == "constant":
        full = [0] * 2 * rank
        for k, axis in enumerate(axes):
            full[2 * (rank - 1 - axis)], full[2 * (rank - 1 - axis) + 1] = pads[k], pads[k + len(axes)]
        return F.pad(x, full, value=value)
    for k, axis in enumerate(axes):
        begin, end = pads[k], pads[k + len(axes)]
        if begin or end:
            x = x.index_select(axis, _pad_index(x.shape[axis], begin, end, mode).to(x.device))
    return x


register_ops({
    "Transpose": _transpose,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "Shape": _shape,
    "Size": lambda ctx, xs, a: torch.tensor(xs[0].numel(), dtype=torch.int64),
    "ConstantOfShape": _constant_of_shape,
    "Constant": _constant,
    "Expand": _expand,
    "Tile": lambda ctx, xs, a: xs[0].repeat(*_ints(xs[1])),
    "Range": _range,
    "ReduceSum": _reduce("sum", 13),
    "ReduceMean": _reduce("mean", 18),
    "ReduceMax": _reduce("max", 18),
    "ReduceMin": _reduce("min", 18),
    "ReduceL2": _reduce("l2", 18),
    "ReduceL1": _reduce("l1", 18),
    "ReduceProd": _reduce("prod", 18),
    "ReduceSumSquare": _reduce("sumsquare", 18),
    "ReduceLogSum": _reduce("logsum", 18),
    "ReduceLogSumExp": _reduce("logsumexp", 18),
    "ArgMax": _arg(torch.argmax),
    "ArgMin": _arg(torch.argmin),
    "Pad": _pad,
})
