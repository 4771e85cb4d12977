"""safetensors files as bytes: the one header reader (io, checkpoint and storage use it) and the
content digest that checkpoints carry.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON header (padded with
spaces), then the data section. :func:`read_header` checks the layout before any tensor is read:
the declared length against the file, the JSON, its padding, and every tensor's dtype, shape and
byte range against the data section; any damage is a :class:`DamagedFile` (a ValueError naming the
file).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load as st_load

__all__ = ["DamagedFile", "Header", "content_digest", "read_header", "read_tensors"]

_MAX_HEADER_BYTES = 100 << 20
_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


class DamagedFile(ValueError):
    """A file that is not a well-formed safetensors file: ``str()`` is ``"<file>: <problem>"``."""

    def __init__(self, file: Path, problem: str) -> None:
        super().__init__(f"{file}: {problem}")
        self.file, self.problem = file, problem


class Header(NamedTuple):
    """A checked safetensors header: ``tensors`` name -> (dtype, shape), ``metadata`` (str -> str),
    ``fields`` the JSON object as read, ``data_start`` the offset of the data section."""

    tensors: dict[str, tuple[str, tuple[int, ...]]]
    metadata: dict[str, str]
    fields: dict[str, Any]
    data_start: int

    def data_bytes(self, data: bytes) -> int:
        """Bytes of the data section of the file ``data``."""
        return len(data) - self.data_start


def _check_entry(name: str, info: Any, body: int, file: Path) -> tuple[str, tuple[int, ...]]:
    try:
        dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        ok = (dtype in _SIZES and all(isinstance(d, int) and d >= 0 for d in shape)
              and isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= body
              and end - start == math.prod(shape) * _SIZES[dtype])
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise DamagedFile(file, f"tensor {name!r} has an invalid entry {info!r} (body {body} bytes); truncated or "
                                "corrupt")
    return dtype, shape


def read_header(data: bytes, file: Path) -> Header:
    """The checked header of the safetensors file ``data`` (read from ``file``, named in errors)."""
    if len(data) < 8:
        raise DamagedFile(file, f"{len(data)} bytes, truncated (a safetensors file starts with an 8-byte length)")
    size = int.from_bytes(data[:8], "little")
    if size > min(len(data) - 8, _MAX_HEADER_BYTES):
        raise DamagedFile(file, f"header length {size} exceeds the file ({len(data)} bytes); truncated or not "
                                "safetensors")
    raw = data[8:8 + size]
    try:
        if not raw.startswith(b"{") or not raw.rstrip(b" ").endswith(b"}"):  # padded with spaces only
            raise ValueError
        fields = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise DamagedFile(file, "the safetensors header is not valid JSON; corrupt or not safetensors") from None
    if not isinstance(fields, dict):
        raise DamagedFile(file, "the safetensors header is not a JSON object")
    metadata = fields.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise DamagedFile(file, "the safetensors metadata is not a map of strings")
    body = len(data) - 8 - size
    tensors = {name: _check_entry(name, info, body, file) for name, info in fields.items() if name != "__metadata__"}
    return Header(tensors, metadata, fields, 8 + size)


def read_tensors(data: bytes, file: Path) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``data`` (read from ``file``, named in errors)."""
    try:
        return st_load(data)
    except Exception as exc:  # safetensors raises its own error type for malformed buffers
        raise DamagedFile(file, f"cannot be read as safetensors: {exc}") from None


def content_digest(data: bytes, header: Header, exclude: str) -> str:
    """SHA-256 of what the file ``data`` holds: its header as read (tensor entries and metadata, less
    the metadata entry ``exclude``, where the digest itself is kept) and its data section."""
    fields = dict(header.fields)
    fields["__metadata__"] = {k: v for k, v in header.metadata.items() if k != exclude}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical + b"\0" + data[header.data_start:]).hexdigest()
