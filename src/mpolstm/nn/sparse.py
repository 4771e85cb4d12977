"""Sparse residuals of MPO weights: the sparse part of the hybrid layout "lowrank+sparse".

A weight W (out, in) of an MPO module may carry, besides its cores, a sparse residual P with
k entries at fixed positions: W = rebuild(cores) + P. P is a :class:`SparseResidual`
submodule named ``<weight>_sparse``: its ``values`` (k,) are a parameter (they train, e.g.
in distillation), its ``index`` (k,) the flat positions in W (row-major, int64) a buffer
(the mask stays fixed). Both are in the state_dict, so ``io.save`` / ``io.load`` keep them;
``mpo_config()`` lists each weight's k under "sparse" so ``from_config`` rebuilds the shapes.

The layers call :func:`with_sparse` where they rebuild a weight and :func:`add_sparse_product`
where they multiply by the cores without rebuilding (the factorized runtime's loop over time takes
:func:`sparse_operand` of W_hh); modules without sparse parts are unchanged. Storage counts P as pruning is counted: k float32 values plus the smaller of a
CSR and a bitmask index (``mpolstm.storage``).
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["SparseResidual", "add_sparse_product", "attach_sparse", "sparse_config", "sparse_matmul", "sparse_of",
           "sparse_operand", "sparse_params", "sparse_parts", "load_sparse_config", "with_sparse"]

SUFFIX = "_sparse"


class SparseResidual(nn.Module):
    """k entries of an (out, in) matrix at fixed flat positions ``index``; ``values`` train."""

    def __init__(self, shape: tuple[int, int], index: Tensor, values: Tensor) -> None:
        super().__init__()
        rows, cols = (int(s) for s in shape)
        index = torch.as_tensor(index).reshape(-1).to(torch.long)
        values = torch.as_tensor(values).reshape(-1)
        if index.numel() != values.numel():
            raise ValueError(f"sparse residual: {index.numel()} positions but {values.numel()} values")
        if index.is_meta:  # a shape-only module (io.load's probe): nothing to check
            pass
        elif index.numel() and (int(index.min()) < 0 or int(index.max()) >= rows * cols):
            raise ValueError(f"sparse residual positions must lie in [0, {rows * cols}) for shape {(rows, cols)}")
        if not index.is_meta and index.numel() != torch.unique(index).numel():
            raise ValueError("sparse residual positions must be distinct")
        self.shape = (rows, cols)
        self.register_buffer("index", index.to(values.device))
        self.values = nn.Parameter(values.detach().clone())

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def dense(self) -> Tensor:
        """P as a dense (out, in) matrix, differentiable in ``values``."""
        flat = self.values.new_zeros(self.shape[0] * self.shape[1])
        return flat.index_add(0, self.index, self.values).view(self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, nnz={self.nnz}"


def sparse_of(module: nn.Module, name: str) -> SparseResidual | None:
    """The sparse residual of weight ``name`` of ``module``, or None."""
    return module._modules.get(name + SUFFIX)


def sparse_parts(module: nn.Module) -> dict[str, SparseResidual]:
    """{weight name: its sparse residual} for every weight of ``module`` that has one."""
    return {key[: -len(SUFFIX)]: sub for key, sub in module._modules.items()
            if key.endswith(SUFFIX) and isinstance(sub, SparseResidual)}


def sparse_params(module: nn.Module) -> list[Tensor]:
    """The ``values`` parameters of every sparse residual of ``module`` (cache keys, counts)."""
    return [part.values for part in sparse_parts(module).values()]


def attach_sparse(module: nn.Module, name: str, index: Tensor, values: Tensor) -> SparseResidual:
    """Give weight ``name`` (out, in) of an MPO module the sparse residual (index, values),
    replacing any it had. The module's shape table (``_weight_shapes``, or in/out features
    for MPOLinear) gives the shape."""
    shape = _shape_of(module, name)
    part = SparseResidual(shape, index, values.to(_dtype_of(module)))
    module.add_module(name + SUFFIX, part)
    if hasattr(module, "_cache"):
        module._cache = None
    return part


def _shape_of(module: nn.Module, name: str) -> tuple[int, int]:
    shapes = getattr(module, "_weight_shapes", None)
    if shapes is not None:
        if name not in shapes:
            raise ValueError(f"{type(module).__name__} has no MPO weight {name!r}; its weights are {list(shapes)}")
        return tuple(shapes[name])
    if hasattr(module, "in_features") and name == "weight":
        return (module.out_features, module.in_features)
    raise ValueError(f"a sparse residual applies to the MPO weights of recurrent layers, cells, convolutions "
                     f"and MPOLinear; {type(module).__name__}.{name} is not one")


def _dtype_of(module: nn.Module) -> torch.dtype:
    first = next(iter(module.parameters()), None)
    return torch.float32 if first is None else first.dtype


def with_sparse(module: nn.Module, name: str, weight: Tensor) -> Tensor:
    """``weight`` (the rebuilt (out, in) matrix of ``name``) plus its sparse residual, if any."""
    part = sparse_of(module, name)
    return weight if part is None else weight + part.dense().to(weight.dtype)


def sparse_operand(module: nn.Module, name: str, cache: dict[str, Any] | None) -> Tensor | None:
    """P (out, in) of weight ``name`` as the operand of :func:`sparse_matmul`, None without a sparse
    part. Without an eval cache (gradients may reach the values): the dense P, differentiable. With
    one, built once and cached: P in CSR (torch's sparse-dense product, the fastest eager form
    measured, benchmarks/bench_sparse_product.py), or the dense P when ``module.sparse_csr`` is False
    (a traced export: ONNX has no sparse product, and onnxruntime multiplies a dense P faster than
    any gather / scatter form of it; the ONNX file stores it as a sparse initializer)."""
    part = sparse_of(module, name)
    if part is None:
        return None
    if cache is None:
        return part.dense()
    operands = cache.setdefault("sparse", {})
    if name not in operands:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta")
            dense = part.dense().detach()
            operands[name] = dense.to_sparse_csr() if getattr(module, "sparse_csr", True) else dense
    return operands[name]


def sparse_matmul(p: Tensor, x: Tensor) -> Tensor:
    """x (N, in) @ P^T for P (out, in) dense or CSR (TorchScript-compatible)."""
    return torch.mm(p, x.t()).t()


def add_sparse_product(module: nn.Module, name: str, x: Tensor, out: Tensor, cache: dict[str, Any] | None = None
                       ) -> Tensor:
    """``out`` (x @ rebuild(cores)^T) plus x @ P^T when weight ``name`` has a sparse part."""
    p = sparse_operand(module, name, cache)
    return out if p is None else out + sparse_matmul(p.to(x.dtype), x)


def sparse_config(module: nn.Module) -> dict[str, int]:
    """{weight: k} for ``mpo_config()`` ("sparse"); empty when the module has no sparse part."""
    return {name: part.nnz for name, part in sparse_parts(module).items()}


def load_sparse_config(module: nn.Module, config: Mapping[str, Any]) -> None:
    """Create the sparse residuals listed in ``config["sparse"]`` with placeholder positions
    and zero values (``load_state_dict`` then fills both)."""
    spec = config.get("sparse") or {}
    if not isinstance(spec, Mapping):
        raise ValueError(f"config 'sparse' must map weight names to entry counts, got {spec!r}")
    for name, count in spec.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"config 'sparse'[{name!r}] must be a non-negative integer, got {count!r}")
        attach_sparse(module, name, torch.arange(count), torch.zeros(count))
