"""Weights as they are stored: their bytes, the compact formats, and int8 MPO cores.

Formats, per weight tensor (biases are not counted, as in the parameter counts):

- ``float32``: 4 bytes an entry (a dense matrix, one MPO core).
- ``int8``: 1 byte an entry and a float32 scale (symmetric per-tensor quantization, zero point 0):
  an MPO core quantized by :func:`quantize_int8`. torch's dynamically quantized LSTM
  (``torch.ao.nn.quantized.dynamic.LSTM``) stores its affine zero point as well: ``int8-affine``,
  1 byte an entry + 8 bytes.
- ``csr``: a pruned matrix as float32 non-zero values, int16 column indices (int32 from 32,768
  columns on) and int32 row pointers (rows + 1).
- ``bitmask``: float32 non-zero values and one bit per entry (uint8, ``ceil(rows * cols / 8)`` bytes).

A matrix with zeros takes the smallest of float32, csr and bitmask. :func:`pack_weights` gives the
tensors of that stored form, :func:`save_packed` writes them with safetensors, and the file's data
section then has exactly :func:`packed_bytes` bytes (:func:`file_data_bytes` reads it back).
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
from .nn.registry import is_mpo_module
from .nn.sparse import sparse_parts

__all__ = ["FORMATS", "quantize_int8", "quantized_rnn_weights", "dequantize_int8", "round_to_int8_", "sparse_bytes", "pack_matrix",
           "unpack_matrix", "pack_weights", "packed_bytes", "save_packed", "file_data_bytes"]

FORMATS = ("float32", "int8", "int8-affine", "csr", "bitmask")


def quantize_int8(t: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-tensor int8: t (any shape) -> (q int8 of t's shape, scale float32 (1,)),
    t ~ q * scale with q in [-127, 127]; scale = max|t| / 127 (1 for an all-zero tensor)."""
    peak = t.detach().abs().max().float() if t.numel() else torch.tensor(0.0)
    scale = (peak / 127 if peak > 0 else torch.tensor(1.0)).reshape(1).to(torch.float32)
    q = torch.round(t.detach().float() / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    """q int8, scale (1,) -> float32 q * scale."""
    return q.float() * scale


@torch.no_grad()
def round_to_int8_(tensors: Iterable[Tensor]) -> None:
    """Replace each tensor's values by their int8 rounding (``dequantize(quantize(t))``), in place.

    A tensor so rounded quantizes back to the same int8 values, so a model whose MPO cores were
    rounded is stored losslessly by :func:`pack_weights` with ``int8_cores=True``."""
    for t in tensors:
        t.copy_(dequantize_int8(*quantize_int8(t)).to(t.dtype))


def _index_dtype(cols: int) -> torch.dtype:
    return torch.int16 if cols <= 2**15 else torch.int32


def sparse_bytes(matrix: Tensor) -> dict[str, int]:
    """Bytes of a (rows, cols) matrix in each float format: {"float32", "csr", "bitmask": bytes}."""
    rows, cols = matrix.shape
    nnz = int(torch.count_nonzero(matrix))
    index = torch.empty((), dtype=_index_dtype(cols)).element_size()
    return {"float32": 4 * rows * cols, "csr": nnz * (4 + index) + 4 * (rows + 1),
            "bitmask": 4 * nnz + math.ceil(rows * cols / 8)}


def pack_matrix(matrix: Tensor) -> tuple[str, dict[str, Tensor]]:
    """A float matrix (rows, cols) in its smallest format: (format, {part: tensor}); the parts are
    "values" (float32), plus "col_index" and "row_ptr" (csr) or "mask" (bitmask, uint8 bits)."""
    if matrix.dim() != 2:
        raise ValueError(f"pack_matrix expects a 2-D matrix, got shape {tuple(matrix.shape)}")
    sizes = sparse_bytes(matrix)
    fmt = min(sizes, key=lambda k: (sizes[k], k != "float32"))
    m = matrix.detach().to(torch.float32).cpu()
    if fmt == "float32":
        return fmt, {"values": m.contiguous()}
    nonzero = m != 0
    values = m[nonzero]
    if fmt == "csr":
        counts = nonzero.sum(1)
        row_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
        col_index = nonzero.nonzero()[:, 1].to(_index_dtype(m.shape[1]))
        return fmt, {"values": values, "col_index": col_index, "row_ptr": row_ptr}
    bits = torch.zeros(math.ceil(m.numel() / 8) * 8, dtype=torch.uint8)
    bits[: m.numel()] = nonzero.reshape(-1).to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    mask = (bits.reshape(-1, 8) * weights).sum(1, dtype=torch.uint8)
    return fmt, {"values": values, "mask": mask}


def unpack_matrix(fmt: str, parts: dict[str, Tensor], shape: Sequence[int]) -> Tensor:
    """The float32 matrix of ``shape`` from :func:`pack_matrix`'s parts (or an int8 core's "q"/"scale")."""
    rows, cols = shape
    if fmt == "float32":
        return parts["values"].reshape(rows, cols)
    if fmt == "int8":
        return dequantize_int8(parts["q"], parts["scale"])
    out = torch.zeros(rows * cols, dtype=torch.float32)
    if fmt == "csr":
        ptr = parts["row_ptr"].long()
        row = torch.repeat_interleave(torch.arange(rows), ptr[1:] - ptr[:-1])
        out[row * cols + parts["col_index"].long()] = parts["values"]
        return out.reshape(rows, cols)
    if fmt == "bitmask":
        bits = (parts["mask"].unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
        keep = bits.reshape(-1)[: rows * cols].bool()
        out[keep] = parts["values"]
        return out.reshape(rows, cols)
    raise ValueError(f"unknown storage format {fmt!r}; expected one of {list(FORMATS)}")


def quantized_rnn_weights(module: nn.Module) -> dict[str, Tensor] | None:
    """The quantized weights of a torch.ao dynamically quantized RNN, else None."""
    weight_bias = getattr(module, "_weight_bias", None)
    if weight_bias is None or not type(module).__module__.startswith("torch.ao.nn.quantized"):
        return None
    return dict(weight_bias()["weight"])


def pack_weights(model: nn.Module, names: Sequence[str], *, int8_cores: bool = False
                 ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The stored form of the weights of the named modules: ({key: tensor}, {weight: format}).

    MPO modules store their cores (float32, or int8 + scale with ``int8_cores``) and any sparse
    residual (layout "lowrank+sparse") as a pruned matrix is stored; torch's
    dynamically quantized RNNs their int8 weights, scale and zero point; any other module each
    ``weight*`` parameter in its smallest float format (:func:`pack_matrix`). Keys are
    ``<module>.<weight>[.core<k>].<part>``."""
    tensors: dict[str, Tensor] = {}
    formats: dict[str, str] = {}
    for name in names:
        module = model.get_submodule(name)
        quantized = quantized_rnn_weights(module)
        if is_mpo_module(module):
            for weight, cores in module.mpo_weights().items():
                formats[f"{name}.{weight}"] = "int8" if int8_cores else "float32"
                for k, core in enumerate(cores):
                    key = f"{name}.{weight}.core{k}"
                    if int8_cores:
                        tensors[f"{key}.q"], tensors[f"{key}.scale"] = quantize_int8(core)
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
                fmt, parts = pack_matrix(getattr(module, weight))
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
