"""int8 cores of an MPO layer: the scales it keeps and the values io writes.

:func:`mpolstm.quantize` rounds every core in place onto the int8 grid of ``mpo.int8`` (one float32
scale per slice along the core's larger bond, :func:`~mpolstm.mpo.core_scale_shape`), core =
``(q.float() * scale).to(dtype)`` with q in [-127, 127]. The scales are buffers of a small module
per weight, ``<weight>_scales.<k>`` (``scales.<k>``) beside ``<weight>_cores.<k>``, so they follow
``state_dict`` and deepcopy, and stay float32 under ``.to(dtype)``. The config of such a layer
carries ``"int8": true`` and ``from_config`` creates placeholder scales (``nn.base``). Compute stays
in float on the dequantized cores. A sparse residual (layout "lowrank+sparse", ``nn.sparse``) is rounded
too, with one float32 scale of its own (``<weight>_sparse.scale``), and io writes its values as int8.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..mpo import core_scale_shape, dequantize_int8, quantize_core
from .sparse import SUFFIX as SPARSE
from .sparse import sparse_parts

__all__ = ["Int8Cores", "Scales"]


class Scales(nn.Module):
    """The float32 scales of one weight's int8 cores as buffers "0", "1", ... (kept float32 by ``.to``)."""

    def __init__(self, scales: Sequence[Tensor]) -> None:
        super().__init__()
        for k, scale in enumerate(scales):
            self.register_buffer(str(k), scale.detach().to(torch.float32).contiguous())

    def _apply(self, fn, recurse=True):
        for key, buf in self._buffers.items():
            moved = fn(buf)
            self._buffers[key] = moved if moved.dtype == torch.float32 else buf.to(moved.device)
        return self


class Int8Cores:
    """The int8 part of :class:`~mpolstm.nn.base.MPOWeights` (its weights ``_weight_shapes``, cores
    ``_cores(name)`` under ``_cores_attr(name)``)."""

    @property
    def int8(self) -> bool:
        """True once :func:`mpolstm.quantize` put the cores on int8 grids (their scales are buffers)."""
        return all(self._scales_attr(name) in self._modules for name in self._weight_shapes)

    def _scales_attr(self, name: str) -> str:
        return self._cores_attr(name).removesuffix("cores") + "scales"

    def _set_scales(self, scales: Mapping[str, Sequence[Tensor]]) -> None:
        for name, values in scales.items():
            setattr(self, self._scales_attr(name), Scales(values))

    def _int8_config(self) -> dict[str, Any]:
        """The config's part: ``{"int8": True}`` for an int8 module, else nothing."""
        return {"int8": True} if self.int8 else {}

    def _load_int8_config(self, config: Mapping[str, Any]) -> None:
        """Placeholder scales (ones) for every core when ``config`` has ``"int8": true``."""
        flag = config.get("int8", False)
        if not isinstance(flag, bool):
            raise ValueError(f"config field 'int8' must be true or false, got {flag!r}")
        if flag:
            self._set_scales({name: [torch.ones(core_scale_shape(c.shape), device=c.device)
                                     for c in self._cores(name)] for name in self._weight_shapes})

    @torch.no_grad()
    def _quantize_int8_(self) -> None:
        """Round every core in place onto its int8 grid (``mpo.quantize_core``) and keep the scales."""
        scales = {}
        for name in self._weight_shapes:
            scales[name] = []
            for core in self._cores(name):
                q, scale = quantize_core(core)
                core.copy_(dequantize_int8(q, scale, core.dtype))
                scales[name].append(scale)
        self._set_scales(scales)
        for part in sparse_parts(self).values():  # a hybrid's sparse values: one scale each
            part.quantize_()

    def _int8_keys(self) -> dict[str, str]:
        """{state_dict key of each core (and of int8 sparse values): that of its scales} of an int8 module
        (io reads and writes these)."""
        keys = {f"{self._cores_attr(n)}.{k}": f"{self._scales_attr(n)}.{k}"
                for n in self._weight_shapes for k in range(len(self._cores(n)))}
        return keys | {f"{n}{SPARSE}.values": f"{n}{SPARSE}.scale" for n, p in sparse_parts(self).items() if p.int8}

    @torch.no_grad()
    def _int8_values(self) -> dict[str, tuple[Tensor, Tensor]]:
        """{core key: (q int8, scales)} of an int8 module, the q from its stored scales; ValueError when
        a core is no longer on its grid (trained or replaced after quantize)."""
        out = {}
        for name in self._weight_shapes:
            scales = list(self._modules[self._scales_attr(name)]._buffers.values())
            cores = self._cores(name)
            for k, core in enumerate(cores):
                scale = scales[k] if len(scales) == len(cores) else None
                q = None
                if scale is not None and tuple(scale.shape) == core_scale_shape(core.shape):
                    q = torch.round(core.float() / scale).clamp_(-127, 127).to(torch.int8)
                if q is None or not torch.equal(dequantize_int8(q, scale, core.dtype), core):
                    raise ValueError(f"{type(self).__name__}: {self._cores_attr(name)}.{k} is no longer on its "
                                     "int8 grid (trained or edited after quantize); call mpolstm.quantize(model) "
                                     "again")
                out[f"{self._cores_attr(name)}.{k}"] = (q.cpu(), scale.cpu())
        for name, part in sparse_parts(self).items():
            if part.int8:
                try:
                    out[f"{name}{SPARSE}.values"] = part.int8_values()
                except ValueError as exc:
                    raise ValueError(f"{type(self).__name__}: {name}{SPARSE}: {exc}") from None
        return out
