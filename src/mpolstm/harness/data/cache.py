"""The data cache directory.

Datasets are built on first use and cached as ``.npz`` archives (loaded with
``allow_pickle=False``) under :func:`cache_dir`: an explicit argument, else the environment
variable ``MPOLSTM_CACHE``, else ``~/.cache/mpolstm``. Every write is atomic
(:mod:`mpolstm.atomic`), so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ...atomic import atomic_write_bytes

__all__ = ["CACHE_ENV", "cache_dir", "save_arrays", "load_arrays", "cached_arrays"]

CACHE_ENV = "MPOLSTM_CACHE"


def cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory (created if missing): ``path``, else $MPOLSTM_CACHE, else ~/.cache/mpolstm."""
    chosen = path if path is not None else os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mpolstm"
    out = Path(chosen).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"cache directory {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_arrays(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> None:
    """Save numeric arrays as an uncompressed ``.npz`` archive, atomically."""
    for name, arr in arrays.items():
        if np.asarray(arr).dtype == object:
            raise ValueError(f"array {name!r} has dtype object; only numeric/string arrays can be cached")
    buf = io.BytesIO()
    named: dict[str, Any] = {k: np.asarray(v) for k, v in arrays.items()}  # (savez's stub also types allow_pickle)
    np.savez(buf, **named)
    atomic_write_bytes(path, buf.getvalue())


def load_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load an ``.npz`` archive written by :func:`save_arrays` (never unpickles)."""
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def cached_arrays(
    name: str, build: Callable[[], Mapping[str, np.ndarray]], directory: str | os.PathLike[str] | None = None
) -> dict[str, np.ndarray]:
    """Return the arrays cached as ``<cache>/<name>.npz``, building and caching them on a miss.

    An unreadable (e.g. truncated) cache file is rebuilt rather than trusted."""
    path = cache_dir(directory) / f"{name}.npz"
    if path.exists():
        try:
            return load_arrays(path)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            pass
    arrays = {k: np.asarray(v) for k, v in build().items()}
    save_arrays(path, arrays)
    return arrays
