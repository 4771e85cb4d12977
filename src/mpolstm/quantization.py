"""int8 cores: :func:`quantize` rounds every MPO core of a model onto an int8 grid, in place.

Each core (D_l, i, j, D_r) gets one float32 scale per slice along its larger bond (D_l scales of
shape (D_l, 1, 1, 1) when D_l > D_r, else D_r of shape (1, 1, 1, D_r)): s = max |slice| / 127
(1 for an all-zero slice), q = round(core / s) clamped to [-127, 127], and the core becomes
``(q.float() * s).to(dtype)``. The scales are buffers ``<weight>_scales.<k>`` of the module
(``scales.<k>`` for MPOLinear / MPOEmbedding) and its config records ``"int8": true``;
:func:`mpolstm.save` then writes q as int8 with the scales (1 byte an entry + 4 bytes a scale, the
bytes :mod:`mpolstm.storage` counts), and :func:`mpolstm.load` restores the cores bit-exactly. The sparse
residual of a hybrid weight (layout "lowrank+sparse") is rounded too, with one float32 scale per residual
(``<weight>_sparse.scale``), and written as int8 values beside its index.

The model keeps computing in its float dtype on the dequantized cores (no int8 kernel). Training after
quantize moves the cores off their grids: ``save`` then refuses, and calling :func:`quantize` again
puts them back.

Why per slice along the larger bond: on g2p-en's four trained GRU matrices (examples/g2p) the error
that rounding adds to the rebuilt weights is 1.3-1.6x lower than with one scale per core (and below
one scale per slice of the right bond), for 0.2-4% more bytes at 10x-30x (8% for a 3 KB layer at
100x); docs/results.md ("int8 cores") has the numbers and benchmarks/bench_int8.py the commands.
"""

from __future__ import annotations

from torch import nn

from .nn.base import MPOWeights

__all__ = ["quantize"]


def quantize(model: nn.Module, bits: int = 8) -> nn.Module:
    """Round every core (and sparse residual) of every MPO module of ``model`` (or of ``model`` itself, an
    MPO layer) onto its int8 grid in place, keeping the float32 scales as buffers; returns ``model``.

    Raises ValueError when ``bits`` is not 8, when ``model`` has no MPO module, or when a core holds
    non-finite values (nothing is changed then)."""
    if isinstance(bits, bool) or bits != 8:
        raise ValueError(f"bits must be 8 (int8 cores with float32 scales), got {bits!r}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"quantize expects an nn.Module, got {type(model).__name__}")
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, MPOWeights)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no MPO module to quantize (none of its layers is "
                         "compressed)")
    for name, module in modules:
        for weight in module._weight_shapes:
            for k, core in enumerate(module._cores(weight)):
                if not bool(core.isfinite().all()):
                    raise ValueError(f"{name or type(module).__name__}: core {k} of {weight} has non-finite "
                                     "values; cannot quantize")
    for _, module in modules:
        module._quantize_int8_()
    return model
