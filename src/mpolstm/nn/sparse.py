"""Sparse residuals of MPO weights: the sparse part of the hybrid layout "lowrank+sparse".

A weight W (out, in) of an MPO module may carry, besides its cores, a sparse residual P with
k entries at fixed positions: W = rebuild(cores) + P. P is a :class:`SparseResidual`
submodule named ``<weight>_sparse``: its ``values`` (k,) are a parameter (they train, e.g.
in distillation), its ``index`` (k,) the flat positions in W (row-major) a buffer (the mask stays
fixed), held in the smallest integer type that fits out * in (:func:`index_dtype`: int16 up to
32,768 entries, else int32). Both are in the state_dict, so ``io.save`` / ``io.load`` keep them;
``mpo_config()`` lists each weight's k under "sparse" (and ``"sparse_int8": true`` for int8
values) so ``from_config`` rebuilds the shapes.

int8 values (:func:`mpolstm.quantize` rounds them with the cores): one float32 scale per residual,
the buffer ``scale`` (1,), ``values = (q.float() * scale).to(dtype)``; ``io.save`` writes q as int8.

The layers call :func:`with_sparse` where they rebuild a weight and :func:`add_sparse_product`
where they multiply by the cores without rebuilding (the factorized runtime's loop over time takes
:func:`sparse_operand` of W_hh); modules without sparse parts are unchanged. Stored as held: k values (4 bytes each, or 1 byte + one 4-byte scale in int8) and k
indices of :func:`index_dtype`; ``mpolstm.storage`` counts exactly these bytes.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence, cast

import torch
from torch import Tensor, nn

from ..mpo import dequantize_int8, quantize_int8

__all__ = ["INDEX_FORMATS", "SparseResidual", "add_sparse_product", "attach_sparse", "decode_index", "encode_index",
           "index_bytes", "index_dtype", "index_parts", "load_sparse_config", "smallest_index_format", "sparse_config",
           "sparse_matmul", "sparse_of", "sparse_operand", "sparse_params", "sparse_parts", "with_sparse"]

SUFFIX = "_sparse"


INDEX_FORMATS = ("coo", "csr", "bitmask")


def index_dtype(entries: int) -> torch.dtype:
    """The smallest signed integer type that holds every flat position of a matrix of ``entries`` entries."""
    return torch.int16 if entries <= 2**15 else torch.int32 if entries <= 2**31 else torch.int64


def index_parts(fmt: str, count: int, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{part: (shape, dtype)} of the index of ``count`` entries of a (rows, cols) matrix in ``fmt``:
    "coo" the flat row-major positions (:func:`index_dtype`), "csr" int16 column indices (int32 from 32,768 columns
    on) and int32 row pointers (rows + 1), "bitmask" one bit per entry (uint8, ceil(rows * cols / 8))."""
    rows, cols = shape
    if fmt == "coo":
        return {"positions": ((count,), index_dtype(rows * cols))}
    if fmt == "csr":
        return {"col_index": ((count,), torch.int16 if cols <= 2**15 else torch.int32),
                "row_ptr": ((rows + 1,), torch.int32)}
    if fmt == "bitmask":
        return {"mask": ((math.ceil(rows * cols / 8),), torch.uint8)}
    raise ValueError(f"unknown index format {fmt!r}; expected one of {list(INDEX_FORMATS)}")


def index_bytes(fmt: str, count: int, shape: tuple[int, int]) -> int:
    """Bytes of the index (:func:`index_parts`)."""
    return sum(math.prod(size) * dtype.itemsize for size, dtype in index_parts(fmt, count, shape).values())


def smallest_index_format(count: int, shape: tuple[int, int], formats: Sequence[str] = INDEX_FORMATS) -> str:
    """The format of ``formats`` whose index of ``count`` entries takes the fewest bytes (the earlier on a tie)."""
    return min(formats, key=lambda f: (index_bytes(f, count, shape), formats.index(f)))


def encode_index(flat: Tensor, shape: tuple[int, int], fmt: str) -> dict[str, Tensor]:
    """The index parts (:func:`index_parts`) of distinct, ascending flat positions ``flat`` (row-major)."""
    rows, cols = shape
    specs = index_parts(fmt, flat.numel(), shape)
    if flat.is_meta:
        return {name: torch.empty(size, dtype=dtype, device="meta") for name, (size, dtype) in specs.items()}
    flat = flat.long()
    if fmt == "coo":
        return {"positions": flat.to(specs["positions"][1])}
    if fmt == "csr":
        counts = torch.bincount(flat // cols, minlength=rows)
        row_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
        return {"col_index": (flat % cols).to(specs["col_index"][1]), "row_ptr": row_ptr}
    bits = torch.zeros(specs["mask"][0][0] * 8, dtype=torch.uint8, device=flat.device)
    bits[flat] = 1
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    return {"mask": (bits.reshape(-1, 8) * weights).sum(1, dtype=torch.uint8)}


def decode_index(parts: Mapping[str, Tensor], shape: tuple[int, int], fmt: str) -> Tensor:
    """The ascending flat positions (int64) of index ``parts`` in ``fmt`` (:func:`encode_index`'s inverse)."""
    rows, cols = shape
    if fmt == "coo":
        return parts["positions"].long()
    if fmt == "csr":
        ptr = parts["row_ptr"].long()
        row = torch.repeat_interleave(torch.arange(rows, device=ptr.device), ptr[1:] - ptr[:-1])
        return row * cols + parts["col_index"].long()
    mask = parts["mask"]
    bits = (mask.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=mask.device)) & 1
    return bits.reshape(-1)[: rows * cols].nonzero().reshape(-1)


class SparseResidual(nn.Module):
    """k entries of an (out, in) matrix at fixed positions; ``values`` (k,) train. The positions are
    held (and saved) as the index format ``index_format`` (default: the smallest,
    :func:`smallest_index_format`), its parts buffers of this module; ``index`` gives them as flat
    row-major positions (int64, ascending; ``values`` in that order): a non-persistent buffer, decoded
    when the module is made and after every ``load_state_dict``, so compiled and exported graphs see a
    plain tensor."""

    index: Tensor  # buffers (typed here: nn.Module.__getattr__ types them Tensor | Module)
    scale: Tensor  # once quantized

    def __init__(self, shape: tuple[int, int], index: Tensor, values: Tensor, index_format: str | None = None) -> None:
        super().__init__()
        rows, cols = (int(s) for s in shape)
        index = torch.as_tensor(index).reshape(-1).to(torch.long)
        values = torch.as_tensor(values).reshape(-1)
        if index.numel() != values.numel():
            raise ValueError(f"sparse residual: {index.numel()} positions but {values.numel()} values")
        if not index.is_meta:  # a shape-only module (io.load's probe): nothing to check
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= rows * cols):
                raise ValueError(f"sparse residual positions must lie in [0, {rows * cols}) for shape {(rows, cols)}")
            if index.numel() != torch.unique(index).numel():
                raise ValueError("sparse residual positions must be distinct")
            index, order = index.sort()
            values = values[order.to(values.device)]
        self.shape = (rows, cols)
        self.index_format = index_format or smallest_index_format(index.numel(), self.shape)
        for name, part in encode_index(index, self.shape, self.index_format).items():
            self.register_buffer(name, part.to(values.device))
        self.values = nn.Parameter(values.detach().clone())
        self.register_buffer("index", index.to(values.device), persistent=False)
        self.register_load_state_dict_post_hook(_decode_after_load)

    def _decode(self) -> None:
        """Set ``index`` from the index buffers (a shape-only module keeps its placeholder)."""
        parts = {name: cast(Tensor, self._buffers[name]) for name in index_parts(self.index_format, 0, self.shape)}
        if not self.values.is_meta:
            self._buffers["index"] = decode_index(parts, self.shape, self.index_format).to(self.values.device)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def int8(self) -> bool:
        """True once :meth:`quantize_` put the values on an int8 grid (the scale is a buffer)."""
        return "scale" in self._buffers

    def dense(self) -> Tensor:
        """P as a dense (out, in) matrix, differentiable in ``values``."""
        return self.added_to(self.values.new_zeros(self.shape))

    def added_to(self, weight: Tensor) -> Tensor:
        """``weight`` (out, in) + P, differentiable in both (a scatter-add into the weight: no dense P is
        formed, and an ONNX export holds no (out, in) constant)."""
        flat = weight.reshape(-1).scatter_add(0, self.index.long(), self.values.to(weight.dtype))
        return flat.view(weight.shape)

    @torch.no_grad()
    def quantize_(self) -> None:
        """Round the values in place onto an int8 grid with one float32 scale (max |value| / 127) and keep
        the scale as the buffer ``scale``."""
        q, scale = quantize_int8(self.values)
        self.values.copy_(dequantize_int8(q, scale, self.values.dtype))
        self.register_buffer("scale", scale.to(self.values.device))

    @torch.no_grad()
    def int8_values(self) -> tuple[Tensor, Tensor]:
        """(q int8 (k,), scale (1,)) of int8 values; ValueError when they left their grid (trained after
        quantize)."""
        q = torch.round(self.values.float() / self.scale).clamp_(-127, 127).to(torch.int8)
        if not torch.equal((q.float() * self.scale).to(self.values.dtype), self.values):
            raise ValueError("the sparse values are no longer on their int8 grid (trained or edited after "
                             "quantize); call mpolstm.quantize(model) again")
        return q.cpu(), self.scale.cpu()

    def _apply(self, fn, recurse=True):
        scale = self._buffers.get("scale")
        super()._apply(fn, recurse)
        if scale is not None and self._buffers["scale"].dtype != torch.float32:  # .to(dtype): scales stay float32
            self._buffers["scale"] = scale.to(self._buffers["scale"].device)
        return self

    def extra_repr(self) -> str:
        return f"shape={self.shape}, nnz={self.nnz}, index={self.index_format}" + (", int8" if self.int8 else "")


def _decode_after_load(module: SparseResidual, incompatible_keys: Any) -> None:
    """``load_state_dict`` filled the index buffers: decode ``index`` from them."""
    module._decode()


def sparse_of(module: nn.Module, name: str) -> SparseResidual | None:
    """The sparse residual of weight ``name`` of ``module``, or None."""
    return cast("SparseResidual | None", module._modules.get(name + SUFFIX))


def sparse_parts(module: nn.Module) -> dict[str, SparseResidual]:
    """{weight name: its sparse residual} for every weight of ``module`` that has one."""
    return {key[: -len(SUFFIX)]: sub for key, sub in module._modules.items()
            if key.endswith(SUFFIX) and isinstance(sub, SparseResidual)}


def sparse_params(module: nn.Module) -> list[Tensor]:
    """The ``values`` parameters of every sparse residual of ``module`` (cache keys, counts)."""
    return [part.values for part in sparse_parts(module).values()]


def attach_sparse(module: nn.Module, name: str, index: Tensor, values: Tensor,
                  index_format: str | None = None) -> SparseResidual:
    """Give weight ``name`` (out, in) of an MPO module the sparse residual (flat positions, values),
    replacing any it had; ``index_format`` as :class:`SparseResidual`. The module's shape table
    (``_weight_shapes``, or in/out features for MPOLinear) gives the shape."""
    shape = _shape_of(module, name)
    part = SparseResidual(shape, index, values.to(_dtype_of(module)), index_format)
    module.add_module(name + SUFFIX, part)
    if hasattr(module, "_cache"):
        cast(Any, module)._cache = None  # an MPO module's product cache (nn.Module types attributes Tensor | Module)
    return part


def _shape_of(module: nn.Module, name: str) -> tuple[int, int]:
    shapes = getattr(module, "_weight_shapes", None)
    if shapes is not None:
        if name not in shapes:
            raise ValueError(f"{type(module).__name__} has no MPO weight {name!r}; its weights are {list(shapes)}")
        return tuple(shapes[name])
    if hasattr(module, "in_features") and name == "weight":
        return (cast(int, module.out_features), cast(int, module.in_features))
    raise ValueError(f"a sparse residual applies to the MPO weights of recurrent layers, cells, convolutions "
                     f"and MPOLinear; {type(module).__name__}.{name} is not one")


def _dtype_of(module: nn.Module) -> torch.dtype:
    first = next(iter(module.parameters()), None)
    return torch.float32 if first is None else first.dtype


def with_sparse(module: nn.Module, name: str, weight: Tensor) -> Tensor:
    """``weight`` (the rebuilt (out, in) matrix of ``name``) plus its sparse residual, if any."""
    part = sparse_of(module, name)
    return weight if part is None else part.added_to(weight)


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


def sparse_config(module: nn.Module) -> dict[str, dict[str, Any]]:
    """{weight: {"sparse": k, "sparse_index": its index format} (+ ``"sparse_int8": True``)}, the
    entries of a weight's config; empty when the module has no sparse part."""
    return {name: {"sparse": part.nnz, "sparse_index": part.index_format, **({"sparse_int8": True} if part.int8 else {})}
            for name, part in sparse_parts(module).items()}


def load_sparse_config(module: nn.Module, weights: Mapping[str, Mapping[str, Any]]) -> None:
    """Create the sparse residuals a saved config lists (per weight "sparse": k, "sparse_index": its
    format, "sparse_int8": true for int8 values) with placeholder positions, zero values and unit
    scales (``load_state_dict`` then fills them)."""
    for name, spec in weights.items():
        count, fmt, int8 = spec.get("sparse"), spec.get("sparse_index"), spec.get("sparse_int8", False)
        if count is None:
            continue
        if fmt is None:
            raise ValueError(f"the sparse part of {name!r} has no 'sparse_index': it was saved by an earlier "
                             "mpolstm (int64 positions), which this version does not read; compress the model again")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"config 'sparse' of {name!r} must be a non-negative integer, got {count!r}")
        if fmt not in INDEX_FORMATS:
            raise ValueError(f"config 'sparse_index' of {name!r} must be one of {list(INDEX_FORMATS)}, got {fmt!r}")
        if not isinstance(int8, bool):
            raise ValueError(f"config 'sparse_int8' of {name!r} must be true or false, got {int8!r}")
        part = attach_sparse(module, name, torch.arange(count), torch.zeros(count), fmt)
        if int8:
            part.register_buffer("scale", torch.ones(1, device=part.values.device))
