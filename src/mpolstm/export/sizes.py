"""Weight bytes: what a written file holds (:func:`file_weight_bytes`, every format of WRITERS) and
what a model holds at run time in the factorized runtime (:func:`runtime_weight_bytes`), so a file
can be checked against its model: each weight once, factors and never a rebuilt dense kernel.

Per format, the weights are: ONNX, the initializers and Constant tensors of every graph (a sparse
initializer as the dense tensor onnxruntime makes of it); TorchScript, the tensor records of the zip
(``data/`` and ``constants/``); ExecuTorch, the program's constant buffers and its named data (the
XNNPACK delegate's weights); AOTInductor, the constants blob compiled into the package's library
(its ``_binary_constants_bin`` symbols).
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..mpo import prepare_halves
from ..nn.base import MPOWeights
from ..nn.sparse import sparse_parts

__all__ = ["file_weight_bytes", "runtime_weight_bytes"]


def runtime_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights ``model`` holds in the factorized runtime (what an export holds): each MPO
    weight's chain merged into two halves (``mpo.prepare_halves``), a sparse part as the dense matrix
    the traced graph multiplies, and every other floating-point parameter and buffer once (biases,
    dense layers); the cores, int8 scales and sparse parts' own tensors are not counted again."""
    total, counted = 0, set()
    for module in model.modules():
        if not isinstance(module, MPOWeights):
            continue
        for cores in module.mpo_weights().values():
            with torch.no_grad():
                halves = prepare_halves(list(cores))
            total += sum(t.numel() * t.element_size() for t in halves[:2])
            counted |= {id(c) for c in cores}
        for part in sparse_parts(module).values():
            total += part.values.element_size() * part.shape[0] * part.shape[1]
            counted |= {id(t) for t in part.parameters()} | {id(t) for t in part.buffers()}
        counted |= {id(t) for name, t in module.named_buffers() if "_scales." in name or name.startswith("scales.")}
    seen = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in counted and id(t) not in seen and t.is_floating_point():
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def file_weight_bytes(path: str | os.PathLike) -> int:
    """Bytes of the weights the exported file ``path`` holds (module docstring); the format is read
    from the file itself (ONNX, TorchScript, ExecuTorch .pte, AOTInductor .pt2)."""
    path = Path(path)
    data = path.read_bytes()
    if data[4:6] == b"ET":  # an ExecuTorch flatbuffer: "ET" and a version at bytes 4-7
        return _pte_bytes(data)
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            libraries = [n for n in names if "/aotinductor/" in n and n.endswith(".so")]
            if libraries:
                return sum(_elf_blob_bytes(archive.read(n)) for n in libraries)
            return sum(archive.getinfo(n).file_size for n in names
                       if ("/data/" in n or "/constants/" in n) and not n.endswith(".pkl"))
    from ..onnxgraph import onnx_modules, weight_bytes

    onnx, _ = onnx_modules()
    return weight_bytes(onnx.load_from_string(data))


def _pte_bytes(data: bytes) -> int:
    """An ExecuTorch program's constant buffers plus its named data (the delegate's weights)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary(data)
    named = sum(len(b) for b in pte.named_data.buffers) if pte.named_data is not None else 0
    return named + sum(len(b.storage) for b in pte.program.constant_buffer)


def _elf_blob_bytes(library: bytes) -> int:
    """Size of the constants blob an AOTInductor library embeds: its symbols ``_binary_constants_bin_end``
    minus ``_binary_constants_bin_start`` (a 64-bit little-endian ELF file's symbol table); 0 without."""
    shoff, = struct.unpack_from("<Q", library, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", library, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", library, shoff + k * shentsize) for k in range(shnum)]
    values = {}
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind not in (2, 11):  # SHT_SYMTAB, SHT_DYNSYM
            continue
        strings = sections[link][4]
        for at in range(offset, offset + size, entsize):
            name_at, _, _, _, value, _ = struct.unpack_from("<IBBHQQ", library, at)
            end = library.index(b"\0", strings + name_at)
            name = library[strings + name_at:end]
            if name in (b"_binary_constants_bin_start", b"_binary_constants_bin_end"):
                values[name] = value
    return values.get(b"_binary_constants_bin_end", 0) - values.get(b"_binary_constants_bin_start", 0)
