"""The interpreter's arithmetic and neural-network operators, as torch calls with ONNX semantics.

Each operator is ``fn(ctx, inputs, attrs) -> Tensor | list[Tensor]``: ``inputs`` in the node's order
(None for an omitted optional input), ``attrs`` the node's attributes as Python values, ``ctx`` the
operator-set version and the float dtype the module computes in. ``OPS`` (this file and
``shapes.py``) is the whole vocabulary; a graph with any other operator is refused when it is read.
Every operator is differentiable where torch's is, so distillation runs through the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from .reader import DTYPES, FLOAT

__all__ = ["Ctx", "OPS", "dtype_of", "register_ops"]


@dataclass(frozen=True)
class Ctx:
    """What an operator needs besides its inputs: the operator-set version, the float dtype
    that ONNX FLOAT maps to (float32, or float64 after ``model.double()``) and, for control flow
    (``control.py``), the model's ``run(step, inputs, ctx)``, a dict that keeps the values its
    subgraphs make (or None) and ``explore``: run the branch an ``If`` does not take as well
    (to record its values: the writer exports the layers inside it)."""

    opset: int
    float_dtype: torch.dtype = torch.float32
    run: Callable[..., list] | None = None
    record: dict[str, Any] | None = None
    explore: bool = False


OPS: dict[str, Callable] = {}


def register_ops(table: dict[str, Callable]) -> None:
    OPS.update(table)


def dtype_of(ctx: Ctx, onnx_type: int) -> torch.dtype:
    if onnx_type == FLOAT:
        return ctx.float_dtype
    if onnx_type not in DTYPES:
        raise ValueError(f"element type {onnx_type} is not supported")
    return DTYPES[onnx_type]


def _unary(fn: Callable[[Tensor], Tensor]) -> Callable:
    return lambda ctx, xs, a: fn(xs[0])


def _div(ctx, xs, a):
    x, y = xs
    return x / y if x.is_floating_point() else torch.div(x, y, rounding_mode="trunc")


def _pow(ctx, xs, a):
    return torch.pow(xs[0], xs[1]).to(xs[0].dtype)


def _fold(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable:
    def run(ctx, xs, a):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out
    return run


def _clip(ctx, xs, a):
    x = xs[0]
    if ctx.opset < 11:
        low, high = a.get("min"), a.get("max")
    else:
        low = None if len(xs) < 2 or xs[1] is None else xs[1].to(x.dtype)
        high = None if len(xs) < 3 or xs[2] is None else xs[2].to(x.dtype)
    return x if low is None and high is None else torch.clamp(x, low, high)


def _softmax(log: bool) -> Callable:
    def run(ctx, xs, a):
        x = xs[0]
        fn = F.log_softmax if log else F.softmax
        if ctx.opset >= 13:
            return fn(x, dim=a.get("axis", -1))
        axis = a.get("axis", 1) % max(x.dim(), 1)  # before opset 13: over the flattened trailing axes
        return fn(x.reshape(*x.shape[:axis], -1), dim=-1).reshape(x.shape)
    return run


def _gemm(ctx, xs, a):
    x, w = xs[0], xs[1]
    x = x.T if a.get("transA", 0) else x
    w = w.T if a.get("transB", 0) else w
    out = a.get("alpha", 1.0) * (x @ w) if a.get("alpha", 1.0) != 1.0 else x @ w
    if len(xs) > 2 and xs[2] is not None:
        out = out + (a.get("beta", 1.0) * xs[2] if a.get("beta", 1.0) != 1.0 else xs[2])
    return out


def _cast(ctx, xs, a):
    return xs[0].to(dtype_of(ctx, a["to"]))


def _dropout(ctx, xs, a):
    if len(xs) > 2 and xs[2] is not None and bool(xs[2]):
        raise ValueError("training_mode=True (random dropout) is not supported (inference only)")
    return [xs[0], torch.ones_like(xs[0], dtype=torch.bool)]  # inference: the identity


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (x.dim() - 2)


def _batch_norm(ctx, xs, a):
    """Inference: the running statistics; training_mode=1: the batch's, and the updated running ones."""
    x, scale, bias, mean, var = xs[:5]
    shape = _channel_shape(x)
    if a.get("training_mode", 0):
        dims = [d for d in range(x.dim()) if d != 1]
        batch_mean, batch_var = x.mean(dims), x.var(dims, unbiased=False)
        momentum = a.get("momentum", 0.9)
        y = _batch_norm(ctx, [x, scale, bias, batch_mean, batch_var], {"epsilon": a.get("epsilon", 1e-5)})
        return [y, mean * momentum + batch_mean * (1 - momentum), var * momentum + batch_var * (1 - momentum)]
    inv = torch.rsqrt(var.reshape(shape) + a.get("epsilon", 1e-5))
    return (x - mean.reshape(shape)) * inv * scale.reshape(shape) + bias.reshape(shape)


def _group_norm(ctx, xs, a):
    """GroupNormalization: scale and bias per channel (opset 21), per group before."""
    x, scale, bias, groups = xs[0], xs[1], xs[2], a["num_groups"]
    if ctx.opset < 21:
        scale, bias = (t.repeat_interleave(x.shape[1] // groups) for t in (scale, bias))
    return F.group_norm(x, groups, scale, bias, a.get("epsilon", 1e-5))


def _mean_variance_normalization(ctx, xs, a):
    x, dims = xs[0], tuple(a.get("axes", [0, 2, 3]))
    mean = x.mean(dims, keepdim=True)
    return (x - mean) / (x.square().mean(dims, keepdim=True) - mean.square()).sqrt()


def _eye_like(ctx, xs, a):
    x = xs[0]
    dtype = dtype_of(ctx, a["dtype"]) if "dtype" in a else x.dtype
    rows, cols = x.shape
    return (torch.arange(cols)[None, :] - torch.arange(rows)[:, None] == a.get("k", 0)).to(dtype)


def _layer_norm(ctx, xs, a):
    x = xs[0]
    axis = a.get("axis", -1) % x.dim()
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    inv_std = torch.rsqrt(var + a.get("epsilon", 1e-5))
    out = (x - mean) * inv_std * xs[1]
    return [out if len(xs) < 3 or xs[2] is None else out + xs[2], mean, inv_std]


def _instance_norm(ctx, xs, a):
    x, scale, bias = xs
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    shape = _channel_shape(x)
    return (x - mean) * torch.rsqrt(var + a.get("epsilon", 1e-5)) * scale.reshape(shape) + bias.reshape(shape)


def _pool_pads(a: dict, x: Tensor, kernel, strides, dilations) -> list[int]:
    """ONNX pads [begin..., end...] of a pool: explicit, VALID (none) or SAME_UPPER / SAME_LOWER."""
    spatial, auto = x.dim() - 2, a.get("auto_pad", "NOTSET")
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        return [0] * 2 * spatial if auto == "VALID" else list(a.get("pads", [0] * 2 * spatial))
    total = [max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
             for n, k, s, d in zip(x.shape[2:], kernel, strides, dilations)]
    begin = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
    return begin + [t - b for t, b in zip(total, begin)]


def _dilated_average(x: Tensor, kernel, strides, dilations, pads: list[int], ceil: bool, include: bool) -> Tensor:
    """AveragePool with dilations (torch's pools have none): sums by a grouped convolution of ones,
    divided by the cells counted (the padded input, or only the input's with count_include_pad=0)."""
    spatial = x.dim() - 2
    widths = [p for k in reversed(range(spatial)) for p in (pads[k], pads[k + spatial])]
    padded = F.pad(x, widths)
    cells = torch.ones_like(padded[:1, :1]) if include else F.pad(torch.ones_like(x[:1, :1]), widths)
    extra = []  # ceil_mode: a last, partial window
    for n, k, s, d in zip(padded.shape[2:], kernel, strides, dilations):
        span = (k - 1) * d + 1
        out = (-(-(n - span) // s) if ceil else (n - span) // s) + 1
        extra.append(max((out - 1) * s + span - n, 0))
    grow = [p for k in reversed(range(spatial)) for p in (0, extra[k])]
    padded, cells = F.pad(padded, grow), F.pad(cells, grow)
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    ones = torch.ones((x.shape[1], 1, *kernel), dtype=x.dtype)
    sums = conv(padded, ones, None, strides, 0, dilations, x.shape[1])
    return sums / conv(cells, ones[:1], None, strides, 0, dilations)


def _pool(kind: str) -> Callable:
    def run(ctx, xs, a):
        x = xs[0]
        spatial = x.dim() - 2
        if spatial not in (1, 2, 3):
            raise ValueError(f"{kind}Pool: only 1-D, 2-D and 3-D pooling are supported")
        kernel = tuple(a["kernel_shape"])
        strides = tuple(a.get("strides", [1] * spatial))
        dilations = tuple(a.get("dilations", [1] * spatial))
        pads = _pool_pads(a, x, kernel, strides, dilations)
        ceil, include = bool(a.get("ceil_mode", 0)), bool(a.get("count_include_pad", 0))
        if kind == "Average" and any(d != 1 for d in dilations):
            return _dilated_average(x, kernel, strides, dilations, pads, ceil, include)
        torch_pads = tuple(pads[:spatial])
        if pads[:spatial] != pads[spatial:] or any(2 * p > k for p, k in zip(pads, kernel)):
            # asymmetric, SAME or wide: pad first (-inf for max; for an average, divide by the cells counted)
            widths = [p for k in reversed(range(spatial)) for p in (pads[k], pads[k + spatial])]
            mask = F.pad(torch.ones_like(x[:1, :1]), widths) if kind == "Average" and not include else None
            x, torch_pads = F.pad(x, widths, value=float("-inf") if kind == "Max" else 0.0), (0,) * spatial
        if kind == "Max":
            fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[spatial - 1]
            return fn(x, kernel, strides, torch_pads, dilations, ceil)
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[spatial - 1]
        if torch_pads == (0,) * spatial and any(pads) and not include:
            return fn(x, kernel, strides, 0, ceil, True) / fn(mask, kernel, strides, 0, ceil, True)
        return fn(x, kernel, strides, torch_pads, ceil, include)
    return run


def _global_pool(reduce: str) -> Callable:
    def run(ctx, xs, a):
        x = xs[0]
        dims = tuple(range(2, x.dim()))
        return x.mean(dims, keepdim=True) if reduce == "mean" else x.amax(dims, keepdim=True)
    return run


def _conv_transpose(ctx, xs, a):
    """ONNX ConvTranspose: torch's without padding, then output_padding appended, pads cropped, bias."""
    x, w = xs[0], xs[1]
    spatial = x.dim() - 2
    if spatial not in (1, 2, 3):
        raise ValueError("ConvTranspose: only 1-D, 2-D and 3-D convolutions are supported")
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[spatial - 1]
    strides = list(a.get("strides", [1] * spatial))
    out = fn(x, w, None, strides, 0, 0, a.get("group", 1), list(a.get("dilations", [1] * spatial)))
    extra = list(a.get("output_padding", [0] * spatial))
    out = F.pad(out, [p for e in reversed(extra) for p in (0, e)])
    full, pads = list(out.shape[2:]), list(a.get("pads", [0] * 2 * spatial))
    wanted, auto = a.get("output_shape"), a.get("auto_pad", "NOTSET")
    if wanted is None and auto in ("SAME_UPPER", "SAME_LOWER"):
        wanted = [n * s for n, s in zip(x.shape[2:], strides)]
    if wanted is None:
        begin, size = pads[:spatial], [f - pads[k] - pads[k + spatial] for k, f in enumerate(full)]
    else:  # ONNX's reference: SAME_* centre the output in the full one, otherwise it starts at pads' begin
        size, total = list(wanted[-spatial:]), [f - o for f, o in zip(full, wanted[-spatial:])]
        begin = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total] \
            if auto in ("SAME_UPPER", "SAME_LOWER") else pads[:spatial]
    out = F.pad(out, [p for k in reversed(range(spatial)) for p in (0, max(0, begin[k] + size[k] - full[k]))])
    for axis in range(spatial):
        out = out.narrow(axis + 2, begin[axis], size[axis])
    return out if len(xs) < 3 or xs[2] is None else out + xs[2].reshape(_channel_shape(out))


def _einsum(ctx, xs, a):
    return torch.einsum(a["equation"].replace(" ", ""), *xs)


def _mod(ctx, xs, a):
    x, y = xs
    return torch.fmod(x, y) if a.get("fmod", 0) else torch.remainder(x, y)


def _is_inf(ctx, xs, a):
    x = xs[0]
    return (torch.isposinf(x) & bool(a.get("detect_positive", 1))) | (torch.isneginf(x) & bool(a.get("detect_negative", 1)))


def _shrink(ctx, xs, a):
    x, bias, lambd = xs[0], a.get("bias", 0.0), a.get("lambd", 0.5)
    return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))


def _hardmax(ctx, xs, a):
    x = xs[0]
    if ctx.opset < 13:  # before opset 13: over the flattened trailing axes
        axis = a.get("axis", 1) % max(x.dim(), 1)
        return _hardmax(Ctx(13), [x.reshape(*x.shape[:axis], -1)], {"axis": -1}).reshape(x.shape)
    axis = a.get("axis", -1) % x.dim()
    return torch.zeros_like(x).scatter(axis, x.argmax(axis, keepdim=True), 1)


def _lp_normalization(ctx, xs, a):
    x = xs[0]
    norm = torch.linalg.vector_norm(x, a.get("p", 2), dim=a.get("axis", -1), keepdim=True)
    return torch.where(norm == 0, torch.zeros_like(x), x / norm)


def _bit_shift(ctx, xs, a):
    x, y = xs
    return torch.bitwise_left_shift(x, y) if a["direction"] == "LEFT" else torch.bitwise_right_shift(x, y)


def _leaky_relu(ctx, xs, a):
    return F.leaky_relu(xs[0], a.get("alpha", 0.01))


def _elu(ctx, xs, a):
    return F.elu(xs[0], a.get("alpha", 1.0))


def _selu(ctx, xs, a):
    x = xs[0]
    alpha, gamma = a.get("alpha", 1.67326319217681884765625), a.get("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


def _hard_sigmoid(ctx, xs, a):
    return torch.clamp(a.get("alpha", 0.2) * xs[0] + a.get("beta", 0.5), 0, 1)


def _gelu(ctx, xs, a):
    return F.gelu(xs[0], approximate=a.get("approximate", "none"))


def _prelu(ctx, xs, a):
    return torch.where(xs[0] >= 0, xs[0], xs[0] * xs[1])


register_ops({
    "Add": lambda ctx, xs, a: xs[0] + xs[1],
    "Sub": lambda ctx, xs, a: xs[0] - xs[1],
    "Mul": lambda ctx, xs, a: xs[0] * xs[1],
    "Div": _div,
    "Pow": _pow,
    "Sum": _fold(torch.add),
    "Max": _fold(torch.maximum),
    "Min": _fold(torch.minimum),
    "Mean": lambda ctx, xs, a: _fold(torch.add)(ctx, xs, a) / len(xs),
    "Equal": lambda ctx, xs, a: torch.eq(xs[0], xs[1]),
    "Less": lambda ctx, xs, a: torch.lt(xs[0], xs[1]),
    "LessOrEqual": lambda ctx, xs, a: torch.le(xs[0], xs[1]),
    "Greater": lambda ctx, xs, a: torch.gt(xs[0], xs[1]),
    "GreaterOrEqual": lambda ctx, xs, a: torch.ge(xs[0], xs[1]),
    "And": lambda ctx, xs, a: torch.logical_and(xs[0], xs[1]),
    "Or": lambda ctx, xs, a: torch.logical_or(xs[0], xs[1]),
    "Not": _unary(torch.logical_not),
    "Where": lambda ctx, xs, a: torch.where(xs[0], xs[1], xs[2]),
    "Relu": _unary(torch.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Sqrt": _unary(torch.sqrt),
    "Abs": _unary(torch.abs),
    "Neg": _unary(torch.neg),
    "Reciprocal": _unary(torch.reciprocal),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Round": _unary(torch.round),
    "Sign": _unary(torch.sign),
    "Erf": _unary(torch.erf),
    "Sin": _unary(torch.sin),
    "Cos": _unary(torch.cos),
    "Tan": _unary(torch.tan),
    "Asin": _unary(torch.asin),
    "Acos": _unary(torch.acos),
    "Atan": _unary(torch.atan),
    "Sinh": _unary(torch.sinh),
    "Cosh": _unary(torch.cosh),
    "Asinh": _unary(torch.asinh),
    "Acosh": _unary(torch.acosh),
    "Atanh": _unary(torch.atanh),
    "IsNaN": _unary(torch.isnan),
    "IsInf": _is_inf,
    "Mod": _mod,
    "Xor": lambda ctx, xs, a: torch.logical_xor(xs[0], xs[1]),
    "BitwiseAnd": lambda ctx, xs, a: torch.bitwise_and(xs[0], xs[1]),
    "BitwiseOr": lambda ctx, xs, a: torch.bitwise_or(xs[0], xs[1]),
    "BitwiseXor": lambda ctx, xs, a: torch.bitwise_xor(xs[0], xs[1]),
    "BitwiseNot": _unary(torch.bitwise_not),
    "BitShift": _bit_shift,
    "Celu": lambda ctx, xs, a: F.celu(xs[0], a.get("alpha", 1.0)),
    "ThresholdedRelu": lambda ctx, xs, a: torch.where(xs[0] > a.get("alpha", 1.0), xs[0], torch.zeros_like(xs[0])),
    "Mish": _unary(F.mish),
    "Shrink": _shrink,
    "Hardmax": _hardmax,
    "LpNormalization": _lp_normalization,
    "Det": _unary(torch.linalg.det),
    "Softplus": _unary(F.softplus),
    "Softsign": _unary(F.softsign),
    "HardSwish": _unary(F.hardswish),
    "Identity": _unary(lambda x: x),
    "LeakyRelu": _leaky_relu,
    "Elu": _elu,
    "Selu": _selu,
    "HardSigmoid": _hard_sigmoid,
    "Gelu": _gelu,
    "PRelu": _prelu,
    "Clip": _clip,
    "Softmax": _softmax(log=False),
    "LogSoftmax": _softmax(log=True),
    "MatMul": lambda ctx, xs, a: torch.matmul(xs[0], xs[1]),
    "Einsum": _einsum,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "Cast": _cast,
    "CastLike": lambda ctx, xs, a: xs[0].to(xs[1].dtype),
    "Dropout": _dropout,
    "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm,
    "InstanceNormalization": _instance_norm,
    "GroupNormalization": _group_norm,
    "MeanVarianceNormalization": _mean_variance_normalization,
    "EyeLike": _eye_like,
    "MaxPool": _pool("Max"),
    "AveragePool": _pool("Average"),
    "GlobalAveragePool": _global_pool("mean"),
    "GlobalMaxPool": _global_pool("max"),
})
