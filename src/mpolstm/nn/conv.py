"""MPOConv1d, MPOConv2d: drop-in torch.nn.Conv1d / Conv2d whose kernel is a Matrix Product Operator,
as in MPO-Net (Gao et al., Phys. Rev. Research 2, 023300 (2020)).

The kernel (out_channels, in_channels / groups, *kernel_size) is read as the matrix
W (out_channels, in_channels / groups * prod(kernel_size)) (row-major: input channel, then the
kernel positions), and the MPO represents M = W^T, (in/groups * k, out) with the input side i and
the output side j, as for every other layer. The cores are the parameters ``weight_cores.<k>``;
the bias stays dense under torch's name ``bias``. ``conv.weight`` reads the rebuilt kernel.

Execution: ``forward`` rebuilds the kernel once per call (``mpo.cores_to_matrix``, then a free
reshape) and runs torch's own convolution (``nn.Conv1d/2d._conv_forward``: F.conv1d/conv2d, with
F.pad for non-zero ``padding_mode``), so stride, padding (ints or 'same' / 'valid'), dilation,
groups, unbatched input and the error messages are torch's. In eval mode the rebuilt kernel is
cached (nn/base.py). In the factorized runtime (exports, ``set_factorized``) no kernel is formed:
a rank-D chain (layout lowrank) runs as a convolution to D channels with its first factor as the
kernel, then a 1 x 1 convolution by its second; any other chain (or groups > 1, a sparse part)
multiplies the input's patches (``F.unfold``) by its factors, each group keeping its own block of
outputs. Every argument is validated by building torch's own module on the meta device.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..mpo import MPO, default_factors
from .base import MPOWeights
from .registry import LayerType, register
from .sparse import sparse_parts

__all__ = ["MPOConv1d", "MPOConv2d", "conv_inputs"]

# torch's constructor arguments, in its order
_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias",
         "padding_mode")


def _tuple_or_str(value):
    return value if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else value


class _MPOConvNd(MPOWeights):
    """Shared part of MPOConv1d / MPOConv2d (see the module docstring)."""

    _torch_class: type[nn.modules.conv._ConvNd]
    _snake: str

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 bond_dim: int, in_factors: Sequence[int] | None = None, out_factors: Sequence[int] | None = None,
                 num_cores: int = 4) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
        # torch validates every argument (and normalises ints to tuples) on the meta device
        probe = self._torch_class(in_channels, out_channels, _tuple_or_str(kernel_size), _tuple_or_str(stride),
                                  _tuple_or_str(padding), _tuple_or_str(dilation), groups, bias, padding_mode,
                                  device="meta")
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode"):
            setattr(self, name, getattr(probe, name))
        self._reversed_padding_repeated_twice = list(probe._reversed_padding_repeated_twice)
        if min(self.kernel_size) < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError(f"{type(self).__name__}: channels and kernel_size must be positive, got "
                             f"{in_channels}, {out_channels}, {self.kernel_size}")
        self._kernel_shape = (out_channels, in_channels // groups, *self.kernel_size)
        fan_in = in_channels // groups * math.prod(self.kernel_size)
        factors = None if in_factors is None and out_factors is None else {"weight": (in_factors, out_factors)}
        # torch's kaiming_uniform_(a=sqrt(5)) init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), variance 1 / (3 fan_in)
        self._init_weights({"weight": (out_channels, fan_in)}, bond_dim, factors, num_cores,
                           1.0 / math.sqrt(3.0 * fan_in), device, dtype)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype))
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        else:
            self.register_parameter("bias", None)

    # -- conversion -------------------------------------------------------------------------
    def _torch_args(self) -> dict[str, Any]:
        args = {name: getattr(self, name) for name in _ARGS if name != "bias"}
        return {**args, "bias": self.bias is not None}

    @staticmethod
    def _args_of(conv: nn.modules.conv._ConvNd) -> dict[str, Any]:
        args = {name: getattr(conv, name) for name in _ARGS if name != "bias"}
        return {**args, "bias": conv.bias is not None}

    @classmethod
    def from_torch(cls, conv: nn.modules.conv._ConvNd, max_bond: int | None = None, rel_tol: float | None = None, *,
                   in_factors: Sequence[int] | None = None, out_factors: Sequence[int] | None = None,
                   num_cores: int = 4, mpos: Mapping[str, MPO] | None = None):
        """Decompose a trained torch convolution of this class's type (``from_conv1d``,
        ``from_conv2d``) by TT-SVD (exact with neither ``max_bond`` nor ``rel_tol``);
        ``mpos={"weight": MPO of M}`` uses a ready MPO. Error in ``.reports``; the result has the
        source's mode, dtype and device."""
        if not isinstance(conv, cls._torch_class):
            name = cls._torch_class.__name__
            raise ValueError(f"{cls.__name__}.from_{cls._snake} expects a torch.nn.{name}, got {type(conv).__name__}")
        weight = conv.weight
        fan_in = conv.weight[0].numel()
        ready = (mpos or {}).get("weight")
        if ready is not None and ready.shape == (fan_in, conv.out_channels):  # else _decompose_from says why
            in_factors, out_factors = ready.in_factors, ready.out_factors
        layer = cls(**cls._args_of(conv), device=weight.device, dtype=weight.dtype, bond_dim=1,
                    in_factors=in_factors, out_factors=out_factors, num_cores=num_cores)
        layer._decompose_from({"weight": weight}, max_bond, rel_tol, mpos)
        if conv.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(conv.bias)
        return layer.train(conv.training)

    def to_torch(self) -> nn.modules.conv._ConvNd:
        """The plain torch convolution (``to_conv1d``, ``to_conv2d``) with the rebuilt kernel."""
        first = self._cores("weight")[0]
        conv = self._torch_class(**self._torch_args(), device=first.device, dtype=first.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv.train(self.training)

    @classmethod
    def mpo_matrices(cls, conv: nn.modules.conv._ConvNd, num_cores: int = 4) -> dict[str, tuple[Tensor, tuple]]:
        """{"weight": (M = kernel.reshape(out, -1)^T, default factors)} (see ``LayerType.matrices``)."""
        matrix = conv.weight.detach().reshape(conv.out_channels, -1)
        return {"weight": (matrix.T, default_factors(matrix.shape[1], matrix.shape[0], num_cores))}

    # -- MPO-module protocol -------------------------------------------------------------------
    def _config_args(self) -> dict[str, Any]:
        return {k: (v if isinstance(v, (str, int, bool)) else list(v)) for k, v in self._torch_args().items()}

    @classmethod
    def _args_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {k: _tuple_or_str(config[k]) for k in _ARGS}

    # -- use ----------------------------------------------------------------------------------
    def _torch_weight(self, name: str) -> Tensor:
        return self._rebuild(name).reshape(self._kernel_shape)

    @property
    def weight(self) -> Tensor:
        """The rebuilt kernel (out_channels, in_channels / groups, *kernel_size), differentiable."""
        return self._torch_weight("weight")

    def kernel(self) -> Tensor:
        """The kernel the forward uses: rebuilt, or the eval-mode cached one."""
        return self._dense("weight", self._eval_cache()).reshape(self._kernel_shape)

    def forward(self, input: Tensor) -> Tensor:
        if not self.factorized:
            return self._conv_forward(input, self.kernel(), self.bias)
        cache = self._eval_cache()
        lt, r, il, ir, jl, _, rank = self._halves("weight", cache)
        if ir == 1 and jl == 1 and self.groups == 1 and not sparse_parts(self):
            # rank D: a convolution to D channels with L's kernel, then a 1 x 1 convolution by R
            hidden = self._conv_forward(input, lt.reshape(rank, *self._kernel_shape[1:]), None)
            return self._conv_forward_1x1(hidden, r.t().reshape(self.out_channels, rank, *[1] * len(self.kernel_size)))
        return self._patch_forward(input, cache)

    def _conv_forward_1x1(self, x: Tensor, kernel: Tensor) -> Tensor:
        conv = F.conv1d if len(self.kernel_size) == 1 else F.conv2d
        return conv(x, kernel, self.bias)

    def _patch_forward(self, input: Tensor, cache) -> Tensor:
        """The factorized runtime's convolution of any layout: the input's patches (:func:`conv_patches`)
        times the MPO (``_project``: its factors, never the kernel), each group its own block of outputs."""
        dims, groups = len(self.kernel_size), self.groups
        x = input.unsqueeze(0) if input.dim() == dims + 1 else input
        padded = [x.shape[2 + a] + self._reversed_padding_repeated_twice[2 * (dims - 1 - a)] +
                  self._reversed_padding_repeated_twice[2 * (dims - 1 - a) + 1] for a in range(dims)]
        spatial = [(size - self.dilation[a] * (self.kernel_size[a] - 1) - 1) // self.stride[a] + 1
                   for a, size in enumerate(padded)]
        out = self._project(conv_patches(self, x), "weight", cache)  # (N * groups * positions, out)
        n, per = x.shape[0], self.out_channels // groups
        out = out.reshape(n, groups, -1, groups, per)
        out = torch.stack([out[:, g, :, g] for g in range(groups)], 1)  # (N, groups, positions, per)
        out = out.permute(0, 1, 3, 2).reshape(n, self.out_channels, *spatial)
        if self.bias is not None:
            out = out + self.bias.reshape(-1, *[1] * dims)
        return out if input.dim() > dims + 1 else out.squeeze(0)

    def extra_repr(self) -> str:
        return f"{nn.modules.conv._ConvNd.extra_repr(self)}, {self._mpo_repr()}"


class MPOConv1d(_MPOConvNd):
    """torch.nn.Conv1d whose kernel is an MPO (see the module docstring).

    Args: torch.nn.Conv1d's (``in_channels, out_channels, kernel_size, stride=1, padding=0,
    dilation=1, groups=1, bias=True, padding_mode="zeros", device=None, dtype=None``), plus
        bond_dim: cap on every internal bond (clipped to the largest useful value).
        in_factors, out_factors: factorisations of in_channels / groups * kernel_size and of
            out_channels (default: balanced, ``num_cores`` factors, fewer when a size has too few
            prime factors).
        num_cores: default number of cores.
    From scratch the rebuilt kernel has the variance of torch's default init. To compress a trained
    layer use ``MPOConv1d.from_conv1d(conv, max_bond=..., rel_tol=...)``.
    """

    _torch_class, _snake = nn.Conv1d, "conv1d"
    _conv_forward = nn.Conv1d._conv_forward

    from_conv1d, to_conv1d = _MPOConvNd.__dict__["from_torch"], _MPOConvNd.to_torch


class MPOConv2d(_MPOConvNd):
    """torch.nn.Conv2d whose kernel is an MPO (see the module docstring and :class:`MPOConv1d`).

    Args: torch.nn.Conv2d's plus ``bond_dim``, ``in_factors``, ``out_factors``, ``num_cores``.
    To compress a trained layer use ``MPOConv2d.from_conv2d(conv, max_bond=..., rel_tol=...)``.
    """

    _torch_class, _snake = nn.Conv2d, "conv2d"
    _conv_forward = nn.Conv2d._conv_forward

    from_conv2d, to_conv2d = _MPOConvNd.__dict__["from_torch"], _MPOConvNd.to_torch


# ----------------------------------------------------------------------------- registry


def conv_patches(conv: nn.Module, input: Tensor) -> Tensor:
    """The patches the kernel multiplies, (samples, in_channels / groups * prod(kernel_size)), in
    the kernel's row-major order: ``patches @ M`` gives the convolution's outputs (before the
    bias), every output position (and group) a sample. Works for nn.Conv1d/2d and the MPO ones."""
    dims = len(conv.kernel_size)
    x = input.unsqueeze(0) if input.dim() == dims + 1 else input  # unbatched
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    if dims == 1:  # as a 2-D input of height 1
        x = x.unsqueeze(2)
        kernel, dilation, stride = (1, *conv.kernel_size), (1, *conv.dilation), (1, *conv.stride)
    else:
        kernel, dilation, stride = conv.kernel_size, conv.dilation, conv.stride
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (N, C * k, L)
    n, _, positions = cols.shape
    groups = conv.groups
    per_group = conv.in_channels // groups * math.prod(conv.kernel_size)
    return cols.reshape(n, groups, per_group, positions).permute(0, 1, 3, 2).reshape(-1, per_group)


def conv_inputs(conv: nn.Module, args: tuple) -> Iterator[tuple[str, Tensor]]:
    """The registry's ``inputs`` hook: the kernel multiplies the unfolded input patches (groups
    as extra samples), see :func:`conv_patches`."""
    yield "weight", conv_patches(conv, args[0])


_CONV_SIZES = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
               "padding_mode")
register(LayerType(nn.Conv1d, MPOConv1d, MPOConv1d.from_conv1d, MPOConv1d.to_conv1d, MPOConv1d.mpo_matrices,
                   conv_inputs, _CONV_SIZES, "conv", lambda conv: ["weight"]))
register(LayerType(nn.Conv2d, MPOConv2d, MPOConv2d.from_conv2d, MPOConv2d.to_conv2d, MPOConv2d.mpo_matrices,
                   conv_inputs, _CONV_SIZES, "conv", lambda conv: ["weight"]))
