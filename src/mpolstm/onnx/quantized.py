"""The interpreter's integer operators of dynamically quantized graphs (onnxruntime's ``quantize_dynamic``,
which ``mpolstm compress --int8`` uses): DynamicQuantizeLinear and MatMulInteger, exact as ONNX defines
them. They compute but do not differentiate (integer outputs): distillation runs on float graphs.
"""

from __future__ import annotations

import torch

from .ops import register_ops

__all__: list[str] = []


def _dynamic_quantize_linear(ctx, xs, a):
    """x -> (uint8 y, float scale, uint8 zero point) over the range of x and 0."""
    x = xs[0].float()
    low, high = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
    scale = torch.where(high == low, torch.ones_like(high), high - low) / 255.0
    zero = torch.round(torch.clamp(-low / scale, 0.0, 255.0))
    y = torch.clamp(torch.round(x / scale) + zero, 0.0, 255.0)
    return y.to(torch.uint8), scale.to(xs[0].dtype), zero.to(torch.uint8)


def _offset(x: torch.Tensor, zero: torch.Tensor | None, axis: int) -> torch.Tensor:
    """x - zero point as float64 (exact for 8-bit products summed over < 2^37 terms); a 1-D zero
    point runs along ``axis`` (A's rows, B's columns)."""
    x = x.double()
    if zero is None:
        return x
    zero = zero.double()
    if zero.dim() == 1 and zero.numel() > 1:
        zero = zero.reshape(-1, 1) if axis == -2 else zero
    return x - zero


def _matmul_integer(ctx, xs, a):
    """(A - a_zero_point) @ (B - b_zero_point) in int32."""
    left = _offset(xs[0], xs[2] if len(xs) > 2 else None, -2)
    right = _offset(xs[1], xs[3] if len(xs) > 3 else None, -1)
    return torch.matmul(left, right).round().to(torch.int32)


register_ops({"DynamicQuantizeLinear": _dynamic_quantize_linear, "MatMulInteger": _matmul_integer})
