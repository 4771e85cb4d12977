"""The int8 grid: symmetric int8 values with float32 scales, and the scales of an MPO core.

t ~ q * scale with q in [-127, 127]; one scale per slice along chosen dimensions (max |t| / 127),
or one for the whole tensor. An MPO core (D_l, i, j, D_r) has one scale per slice along its larger
bond (:func:`core_scale_shape`): what :func:`mpolstm.quantize` rounds cores to, ``mpolstm.save``
writes and ``mpolstm.storage`` counts. :func:`dequantize_int8` is the one expression back to
floats, so a round trip is bit-exact.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["core_scale_shape", "dequantize_int8", "quantize_core", "quantize_int8"]


def quantize_int8(t: Tensor, dims: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric int8 of ``t`` (any shape): (q int8 of t's shape, scale float32), t ~ q * scale with
    q in [-127, 127]. One scale per slice: max |t| over ``dims`` / 127, those dims kept with size 1
    (the scale broadcasts against q); ``dims=None``: one scale, shape (1,). A slice whose scale would
    be 0 (all zeros) gets 1. Raises ValueError for non-finite values."""
    x = t.detach().float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("cannot quantize non-finite values to int8")
    if x.numel() == 0:
        peak = torch.zeros(1 if dims is None else [1 if d in dims else n for d, n in enumerate(x.shape)])
    else:
        peak = x.abs().amax().reshape(1) if dims is None else x.abs().amax(dim=tuple(dims), keepdim=True)
    scale = peak / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(q.float() * scale).to(dtype)``: the one expression that turns int8 values back into floats
    (quantize, save and load all use it, so a round trip is bit-exact)."""
    return (q.float() * scale.float()).to(dtype)


def core_scale_shape(shape: Sequence[int]) -> tuple[int, int, int, int]:
    """Shape of the scales of a core (D_l, i, j, D_r): one per slice along its larger bond, (D_l, 1, 1, 1)
    when D_l > D_r, else (1, 1, 1, D_r); the edge cores (a bond of 1) thus get one scale per slice of
    their inner bond."""
    left, _, _, right = shape
    return (left, 1, 1, 1) if left > right else (1, 1, 1, right)


def quantize_core(core: Tensor) -> tuple[Tensor, Tensor]:
    """A core's int8 values and its scales of :func:`core_scale_shape` (float32)."""
    return quantize_int8(core, [d for d, n in enumerate(core_scale_shape(core.shape)) if n == 1])
