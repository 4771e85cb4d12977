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
- ``coo``: a pruned matrix's values with their flat positions in the smallest integer type that fits
  (int16 up to 32,768 entries, else int32); only the sparse residuals below use it.

The sparse residual of a hybrid weight (layout "lowrank+sparse") is stored as the model holds it and
``mpolstm.save`` writes it: its k values (float32, or int8 + one float32 scale) and the smallest of
the coo, csr and bitmask indices for k entries (``mpolstm.nn.sparse``), chosen when it is made.

A matrix with zeros takes the smallest of float32, csr and bitmask (with int8 values: of int8,
csr-int8 and bitmask-int8). :func:`pack_weights` gives the tensors of that stored form,
:func:`save_packed` writes them with safetensors, and the file's data section then has exactly
:func:`packed_bytes` bytes (:func:`file_data_bytes` reads it back).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence, cast

import torch
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn

from .atomic import atomic_write_bytes
from .mpo import dequantize_int8, quantize_core, quantize_int8
from .nn.base import MPOWeights
from .nn.registry import MPOModule, is_mpo_module
from .nn.sparse import SparseResidual, decode_index, encode_index, index_bytes, index_parts, sparse_parts
from .tensorfile import read_header

__all__ = ["FORMATS", "mpo_stored", "quantize_int8", "quantized_rnn_weights", "dequantize_int8", "round_to_int8_", "sparse_bytes",
           "pack_matrix", "unpack_matrix", "pack_weights", "packed_bytes", "save_packed", "file_data_bytes"]

FORMATS = ("float32", "int8", "int8-affine", "csr", "bitmask", "csr-int8", "bitmask-int8", "coo", "coo-int8")


@torch.no_grad()
def round_to_int8_(tensors: Iterable[Tensor]) -> None:
    """Replace each tensor's values by their per-tensor int8 rounding (one scale each), in place: a
    matrix so rounded is stored losslessly by :func:`pack_matrix` with ``int8=True``. (MPO cores:
    :func:`mpolstm.quantize`.)"""
    for t in tensors:
        t.copy_(dequantize_int8(*quantize_int8(t), t.dtype))


def sparse_bytes(matrix: Tensor, int8: bool = False) -> dict[str, int]:
    """Bytes of a (rows, cols) matrix in each format: {"float32", "csr", "bitmask": bytes}, or with
    ``int8`` (values of its int8 rounding, one 4-byte scale) {"int8", "csr-int8", "bitmask-int8": bytes}."""
    rows, cols = matrix.shape
    nnz = int(torch.count_nonzero(quantize_int8(matrix)[0] if int8 else matrix))
    value, scale, suffix = (1, 4, "-int8") if int8 else (4, 0, "")
    return {"int8" if int8 else "float32": value * rows * cols + scale,
            **{f"{fmt}{suffix}": value * nnz + index_bytes(fmt, nnz, (rows, cols)) + scale
               for fmt in ("csr", "bitmask")}}


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
    flat = m.reshape(-1).nonzero().reshape(-1)
    rows, cols = m.shape  # 2-D (checked above)
    return fmt, {"values": m.reshape(-1)[flat], **encode_index(flat, (rows, cols), fmt.removesuffix("-int8")),
                 **extra}


def unpack_matrix(fmt: str, parts: dict[str, Tensor], shape: Sequence[int]) -> Tensor:
    """The float32 matrix of ``shape`` from :func:`pack_matrix`'s parts (or an int8 core's "q"/"scale")."""
    rows, cols = shape
    if fmt == "float32":
        return parts["values"].reshape(rows, cols)
    if fmt == "int8":
        return dequantize_int8(parts["q"], parts["scale"])
    if fmt not in ("csr", "bitmask", "csr-int8", "bitmask-int8", "coo", "coo-int8"):
        raise ValueError(f"unknown storage format {fmt!r}; expected one of {list(FORMATS)}")
    values = dequantize_int8(parts["values"], parts["scale"]) if fmt.endswith("-int8") else parts["values"]
    out = torch.zeros(rows * cols, dtype=torch.float32)
    out[decode_index(parts, (rows, cols), fmt.removesuffix("-int8"))] = values.float()
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
    mpo = cast(MPOModule, module)  # an MPO module (nn.Module.__getattr__ types mpo_weights as Tensor | Module)
    return {w: [quantize_core(core) for core in cores] for w, cores in mpo.mpo_weights().items()}


def mpo_stored(module: nn.Module, int8: bool = False) -> dict[str, tuple[dict[str, str], dict[str, Tensor]]]:
    """Each MPO weight of ``module`` as stored: {weight: ({"": "float32" or "int8", ".sparse": its
    residual's format}, {key: tensor})}, keys ``core<k>.values`` (float32) or ``core<k>.q`` and
    ``core<k>.scale`` (``int8``: the module's own grid, or rounded as :func:`mpolstm.quantize` would),
    and ``sparse.<part>`` for a sparse residual (:func:`pack_weights`)."""
    out = {}
    for weight, cores in (_int8_cores(module) if int8 else cast(MPOModule, module).mpo_weights()).items():
        tensors: dict[str, Tensor] = {}
        for k, core in enumerate(cores):
            if int8:
                tensors[f"core{k}.q"], tensors[f"core{k}.scale"] = core
            else:
                tensors[f"core{k}.values"] = core.detach().to(torch.float32).cpu().contiguous()
        formats = {"": "int8" if int8 else "float32"}
        part = sparse_parts(module).get(weight)
        if part is not None:
            formats[".sparse"], sparse = _sparse_stored(part, int8)
            tensors.update({f"sparse.{key}": t for key, t in sparse.items()})
        out[weight] = (formats, tensors)
    return out


def pack_weights(model: nn.Module, names: Sequence[str], *, int8_cores: bool = False, int8_values: bool = False
                 ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The stored form of the weights of the named modules: ({key: tensor}, {weight: format}).

    MPO modules store their cores (float32, or with ``int8_cores`` int8 + scales per slice, as
    :func:`mpolstm.quantize` gives and ``mpolstm.save`` writes them) and any sparse residual
    (layout "lowrank+sparse") as the model holds it (values, int8 with ``int8_cores``, and its index:
    coo, csr or bitmask, whichever is smallest); torch's dynamically quantized
    RNNs their int8 weights, scale and zero point; any other module each ``weight*`` parameter in
    its smallest format (:func:`pack_matrix`, int8 values with ``int8_values``). Keys are
    ``<module>.<weight>[.core<k>].<part>``."""
    tensors: dict[str, Tensor] = {}
    formats: dict[str, str] = {}
    for name in names:
        module = model.get_submodule(name)
        quantized = quantized_rnn_weights(module)
        if is_mpo_module(module):
            for weight, (weight_formats, parts) in mpo_stored(module, int8_cores).items():
                formats.update({f"{name}.{weight}{suffix}": fmt for suffix, fmt in weight_formats.items()})
                tensors.update({f"{name}.{weight}.{key}": t for key, t in parts.items()})
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


def _sparse_stored(part: SparseResidual, int8: bool) -> tuple[str, dict[str, Tensor]]:
    """A sparse residual as the model holds it and ``mpolstm.save`` writes it: (its index format,
    {"values", index parts}), or with ``int8`` (format + "-int8", {"values" int8, "scale", index
    parts}): its own grid when quantized, else rounded as :func:`mpolstm.quantize` would."""
    index = {name: part.get_buffer(name).detach().cpu().contiguous()
             for name in index_parts(part.index_format, part.nnz, part.shape)}
    if not int8:
        return part.index_format, {"values": part.values.detach().to(torch.float32).cpu().contiguous(), **index}
    q, scale = part.int8_values() if part.int8 else quantize_int8(part.values)
    return f"{part.index_format}-int8", {"values": q.contiguous(), "scale": scale, **index}


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
    data = path.read_bytes()
    return read_header(data, path).data_bytes(data)
