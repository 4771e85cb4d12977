"""Weights as they are stored: their bytes, the compact formats, and int8 MPO cores.

Formats, per weight tensor (biases are not counted, as in the parameter counts):

- ``float32``: 4 bytes an entry (a dense matrix, one MPO core).
- ``int8``: 1 byte an entry and float32 scales (symmetric, zero point 0). An MPO core has one scale
  per slice along its larger bond (:func:`mpolstm.quantize`, the form ``mpolstm.save`` writes); a
  matrix one scale (:func:`quantize_int8`). torch's dynamically quantized LSTM
  (``torch.ao.nn.quantized.dynamic.LSTM``) stores its affine zero point as well: ``int8-affine``,
  1 byte an entry + 8 bytes.
- ``csr``: a pruned matrix as float32 non-zero values, int16 column indices (int32 from 32,768
  columns on) and int32 row pointers (rows + 1).
- ``bitmask``: float32 non-zero values and one bit per entry (uint8, ``ceil(rows * cols / 8)`` bytes).
- ``csr-int8`` / ``bitmask-int8``: the same with int8 values and one float32 scale per matrix.

A matrix with zeros takes the smallest of float32, csr and bitmask (with int8 values: of int8,
csr-int8 and bitmask-int8). :func:`pack_weights` gives the tensors of that stored form,
:func:`save_packed` writes them with safetensors, and the file's data section then has exactly
:func:`packed_bytes` bytes (:func:`file_data_bytes` reads it back).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn

from .atomic import atomic_write_bytes
from .mpo import dequantize_int8, quantize_core, quantize_int8
from .nn.base import MPOWeights
from .nn.registry import is_mpo_module
from .nn.sparse import sparse_parts

__all__ = ["FORMATS", "quantize_int8", "quantized_rnn_weights", "dequantize_int8", "round_to_int8_", "sparse_bytes",
           "pack_matrix", "unpack_matrix", "pack_weights", "packed_bytes", "save_packed", "file_data_bytes"]

FORMATS = ("float32", "int8", "int8-affine", "csr", "bitmask", "csr-int8", "bitmask-int8")


@torch.no_grad()
def round_to_int8_(tensors: Iterable[Tensor]) -> None:
    """Replace each tensor's values by their per-tensor int8 rounding (one scale each), in place: a
    matrix so rounded is stored losslessly by :func:`pack_matrix` with ``int8=True``. (MPO cores:
    :func:`mpolstm.quantize`.)"""
    for t in tensors:
        t.copy_(dequantize_int8(*quantize_int8(t), t.dtype))


def _index_dtype(cols: int) -> torch.dtype:
    return torch.int16 if cols <= 2**15 else torch.int32


def sparse_bytes(matrix: Tensor, int8: bool = False) -> dict[str, int]:
    """Bytes of a (rows, cols) matrix in each format: {"float32", "csr", "bitmask": bytes}, or with
    ``int8`` (values of its int8 rounding, one 4-byte scale) {"int8", "csr-int8", "bitmask-int8": bytes}."""
    rows, cols = matrix.shape
    nnz = int(torch.count_nonzero(quantize_int8(matrix)[0] if int8 else matrix))
    index = torch.empty((), dtype=_index_dtype(cols)).element_size()
    value, scale, suffix = (1, 4, "-int8") if int8 else (4, 0, "")
    return {"int8" if int8 else "float32": value * rows * cols + scale,
            f"csr{suffix}": nnz * (value + index) + 4 * (rows + 1) + scale,
            f"bitmask{suffix}": value * nnz + math.ceil(rows * cols / 8) + scale}


def pack_matrix(matrix: Tensor, int8: bool = False) -> tuple[str, dict[str, Tensor]]:
    """A matrix (rows, cols) in its smallest format (:func:`sparse_bytes`): (format, {part: tensor}); the
    parts are "values" (float32, or int8 with ``int8``), plus "col_index" and "row_ptr" (csr) or "mask"
    (bitmask, uint8 bits), plus "scale" (float32 (1,)) with ``int8``; a dense int8 matrix is "q" and
    "scale"."""
    if matrix.dim() != 2:
        raise ValueError(f"pack_matrix expects a 2-D matrix, got shape {tuple(matrix.shape)}")
    sizes = sparse_bytes(matrix, int8)
    fmt = min(sizes, key=lambda k: (sizes[k], k not in ("float32", "int8")))  # dense on a tie
    m = matrix.detach().to(torch.float32).cpu()
    extra = {}
    if int8:
        m, scale = quantize_int8(m)
        extra = {"scale": scale}
        if fmt == "int8":
            return fmt, {"q": m.contiguous(), **extra}
    if fmt == "float32":
        return fmt, {"values": m.contiguous()}
    nonzero = m != 0
    values = m[nonzero]
    if fmt.startswith("csr"):
        counts = nonzero.sum(1)
        row_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
        col_index = nonzero.nonzero()[:, 1].to(_index_dtype(m.shape[1]))
        return fmt, {"values": values, "col_index": col_index, "row_ptr": row_ptr, **extra}
    bits = torch.zeros(math.ceil(m.numel() / 8) * 8, dtype=torch.uint8)
    bits[: m.numel()] = nonzero.reshape(-1).to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    mask = (bits.reshape(-1, 8) * weights).sum(1, dtype=torch.uint8)
    return fmt, {"values": values, "mask": mask, **extra}


def unpack_matrix(fmt: str, parts: dict[str, Tensor], shape: Sequence[int]) -> Tensor:
    """The float32 matrix of ``shape`` from :func:`pack_matrix`'s parts (or an int8 core's "q"/"scale")."""
    rows, cols = shape
    if fmt == "float32":
        return parts["values"].reshape(rows, cols)
    if fmt == "int8":
        return dequantize_int8(parts["q"], parts["scale"])
    if fmt not in ("csr", "bitmask", "csr-int8", "bitmask-int8"):
        raise ValueError(f"unknown storage format {fmt!r}; expected one of {list(FORMATS)}")
    values = dequantize_int8(parts["values"], parts["scale"]) if fmt.endswith("-int8") else parts["values"]
    out = torch.zeros(rows * cols, dtype=torch.float32)
    if fmt.startswith("csr"):
        ptr = parts["row_ptr"].long()
        row = torch.repeat_interleave(torch.arange(rows), ptr[1:] - ptr[:-1])
        out[row * cols + parts["col_index"].long()] = values
        return out.reshape(rows, cols)
    bits = (parts["mask"].unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
    out[bits.reshape(-1)[: rows * cols].bool()] = values
    return out.reshape(rows, cols)


def quantized_rnn_weights(module: nn.Module) -> dict[str, Tensor] | None:
    """The quantized weights of a torch.ao dynamically quantized RNN, else None."""
    weight_bias = getattr(module, "_weight_bias", None)
    if weight_bias is None or not type(module).__module__.startswith("torch.ao.nn.quantized"):
        return None
    return dict(weight_bias()["weight"])


def _int8_cores(module: nn.Module) -> dict[str, list[tuple[Tensor, Tensor]]]:
    """weight -> [(q, scales)] per core: an int8 module's own (ValueError when off its grids), any
    other MPO module's as :func:`mpolstm.quantize` would round them."""
    if isinstance(module, MPOWeights) and module.int8:
        stored = module._int8_values()
        return {w: [stored[f"{module._cores_attr(w)}.{k}"] for k in range(len(cores))]
                for w, cores in module.mpo_weights().items()}
    return {w: [quantize_core(core) for core in cores] for w, cores in module.mpo_weights().items()}


def pack_weights(model: nn.Module, names: Sequence[str], *, int8_cores: bool = False, int8_values: bool = False
                 ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The stored form of the weights of the named modules: ({key: tensor}, {weight: format}).

    MPO modules store their cores (float32, or with ``int8_cores`` int8 + scales per slice, as
    :func:`mpolstm.quantize` gives and ``mpolstm.save`` writes them) and any sparse residual
    (layout "lowrank+sparse") as a pruned matrix is stored; torch's dynamically quantized
    RNNs their int8 weights, scale and zero point; any other module each ``weight*`` parameter in
    its smallest format (:func:`pack_matrix`, int8 values with ``int8_values``). Keys are
    ``<module>.<weight>[.core<k>].<part>``."""
    tensors: dict[str, Tensor] = {}
    formats: dict[str, str] = {}
    for name in names:
        module = model.get_submodule(name)
        quantized = quantized_rnn_weights(module)
        if is_mpo_module(module):
            cores = _int8_cores(module) if int8_cores else module.mpo_weights()
            for weight, parts in cores.items():
                formats[f"{name}.{weight}"] = "int8" if int8_cores else "float32"
                for k, core in enumerate(parts):
                    key = f"{name}.{weight}.core{k}"
                    if int8_cores:
                        tensors[f"{key}.q"], tensors[f"{key}.scale"] = core
                    else:
                        tensors[f"{key}.values"] = core.detach().to(torch.float32).cpu().contiguous()
            for weight, part in sparse_parts(module).items():  # as a pruned matrix: values + index
                fmt, parts = pack_matrix(part.dense().detach())
                formats[f"{name}.{weight}.sparse"] = fmt
                tensors.update({f"{name}.{weight}.sparse.{p}": t for p, t in parts.items()})
        elif quantized is not None:
            for weight, q in quantized.items():
                formats[f"{name}.{weight}"] = "int8-affine"
                tensors[f"{name}.{weight}.q"] = q.int_repr().contiguous()
                tensors[f"{name}.{weight}.scale"] = torch.tensor([q.q_scale()], dtype=torch.float32)
                tensors[f"{name}.{weight}.zero_point"] = torch.tensor([q.q_zero_point()], dtype=torch.int32)
        else:
            for param_name, param in module.named_parameters(recurse=False):
                weight = param_name.removesuffix("_orig")  # pruned: the effective weight is orig * mask
                if not weight.startswith("weight") or param.dim() != 2:
                    continue
                fmt, parts = pack_matrix(getattr(module, weight), int8=int8_values)
                formats[f"{name}.{weight}"] = fmt
                tensors.update({f"{name}.{weight}.{part}": t for part, t in parts.items()})
    if not formats:
        raise ValueError(f"none of the modules {list(names)} has weights to pack")
    return tensors, formats


def packed_bytes(tensors: dict[str, Tensor]) -> int:
    """Bytes of the packed tensors' data."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def save_packed(tensors: dict[str, Tensor], formats: dict[str, str], path: str | Path) -> Path:
    """Write packed tensors to a safetensors file (formats in its metadata), atomically."""
    path = Path(path)
    atomic_write_bytes(path, safetensors_save(tensors, metadata={"formats": json.dumps(formats)}))
    return path


def file_data_bytes(path: str | Path) -> int:
    """Bytes of a safetensors file's tensor data (the file less its 8-byte length and JSON header)."""
    path = Path(path)
    with path.open("rb") as fh:
        (header,) = struct.unpack("<Q", fh.read(8))
    return path.stat().st_size - 8 - header
