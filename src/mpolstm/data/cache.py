"""Cache directory and atomic file writes.

Datasets are built on first use and cached as ``.npz`` archives (loaded with
``allow_pickle=False``) under :func:`cache_dir`: an explicit argument, else the environment
variable ``MPOLSTM_CACHE``, else ``~/.cache/mpolstm``. Every write goes to a temporary file in
the destination directory, is flushed and fsync'ed, then renamed over the target with
``os.replace``, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Callable, Iterator, Mapping

import numpy as np

__all__ = ["CACHE_ENV", "cache_dir", "atomic_open", "atomic_write_bytes", "save_arrays", "load_arrays", "cached_arrays"]

CACHE_ENV = "MPOLSTM_CACHE"


def cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory (created if missing): ``path``, else $MPOLSTM_CACHE, else ~/.cache/mpolstm."""
    chosen = path if path is not None else os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mpolstm"
    out = Path(chosen).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"cache directory {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem allows opening a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on clean exit flush, fsync and rename it to ``path``.

    If the body raises, the temporary file is removed and ``path`` is left untouched."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open mode must be 'wb' or 'w', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + os.replace)."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def save_arrays(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> None:
    """Save numeric arrays as an uncompressed ``.npz`` archive, atomically."""
    for name, arr in arrays.items():
        if np.asarray(arr).dtype == object:
            raise ValueError(f"array {name!r} has dtype object; only numeric/string arrays can be cached")
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
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
