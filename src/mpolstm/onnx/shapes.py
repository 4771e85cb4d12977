"""The interpreter's shape, indexing and reduction operators (ONNX semantics, torch calls).

Shape arithmetic (Shape, Gather, Concat, ConstantOfShape, Slice ...) runs on int64 tensors as
ONNX does; values that set a shape are read back as Python ints (``.tolist()``). Operators whose
attributes became inputs in a later operator set (Squeeze, Unsqueeze, Split, Slice, Pad, the
reductions) read whichever form the model's operator set uses.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from .ops import register_ops

__all__: list[str] = []


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
    axis = a.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
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


def _reduce(kind: str, since: int) -> callable:
    def run(ctx, xs, a):
        x = xs[0]
        axes = _axes(ctx, xs, a, 1, since)
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        dims = tuple(ax % x.dim() for ax in axes)
        if kind == "sum":
            return x.sum(dims, keepdim=keep)
        if kind == "mean":
            return x.mean(dims, keepdim=keep)
        if kind == "l2":
            return x.square().sum(dims, keepdim=keep).sqrt()
        fn = torch.amax if kind == "max" else torch.amin
        return fn(x, dims, keepdim=keep)
    return run


def _arg(fn) -> callable:
    def run(ctx, xs, a):
        x = xs[0]
        if a.get("select_last_index", 0):
            raise ValueError("select_last_index=1 is not supported")
        return fn(x, dim=a.get("axis", 0), keepdim=bool(a.get("keepdims", 1)))
    return run


def _pad(ctx, xs, a):
    x = xs[0]
    if ctx.opset < 11:
        pads, value = a["pads"], a.get("value", 0.0)
    else:
        pads = _ints(xs[1])
        value = xs[2].item() if len(xs) > 2 and xs[2] is not None and xs[2].numel() else 0.0
        if len(xs) > 3 and xs[3] is not None:
            raise ValueError("Pad with an axes input is not supported")
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(a.get("mode", "constant"))
    if mode is None:
        raise ValueError(f"Pad mode {a.get('mode')!r} is not supported")
    rank = x.dim()
    torch_pads = [p for axis in reversed(range(rank)) for p in (pads[axis], pads[axis + rank])]
    return F.pad(x, torch_pads, mode=mode, value=value) if mode == "constant" else F.pad(x, torch_pads, mode=mode)


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
    "ArgMax": _arg(torch.argmax),
    "ArgMin": _arg(torch.argmin),
    "Pad": _pad,
})
