"""Atomic file writes, the one helper every writer of the package uses.

Every write goes to a temporary file in the destination directory, is flushed and fsync'ed,
then renamed over the target with ``os.replace`` and the directory is fsync'ed, so a crash
never leaves a half-written file under the final name. Temporary files and folders are created
with the permissions ``open()`` and ``os.mkdir`` give (0o666 / 0o777 less the umask), not
``tempfile``'s private 0o600 / 0o700, so what is written can be shared as any other file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import IO, Callable, Iterator, TypeVar

__all__ = ["atomic_open", "atomic_write_bytes", "fsync_dir", "make_temp_dir"]

T = TypeVar("T")


def _create_temp(target: Path, create: Callable[[Path], T]) -> tuple[Path, T]:
    """``create(path)`` for a new ``.<name>.<random>.tmp`` beside ``target``; retried on a name clash."""
    for _ in range(100):
        path = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            return path, create(path)
        except FileExistsError:
            continue
    raise FileExistsError(f"{target.parent}: could not create a temporary name for {target.name}")


def make_temp_dir(target: str | os.PathLike[str]) -> Path:
    """A new, empty folder beside ``target`` (mode 0o777 less the umask, as ``os.mkdir``), to fill
    and then rename to ``target``."""
    return _create_temp(Path(target), lambda path: os.mkdir(path, 0o777))[0]


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory (makes a rename in it durable); a no-op where the filesystem refuses."""
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
    tmp, fd = _create_temp(target, lambda path: os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
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
    fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + os.replace)."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)
