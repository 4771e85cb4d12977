"""Atomic file writes, the one helper every writer of the package uses.

Every write goes to a temporary file in the destination directory, is flushed and fsync'ed,
then renamed over the target with ``os.replace`` and the directory is fsync'ed, so a crash
never leaves a half-written file under the final name. Temporary files and folders are created
with the permissions ``open()`` and ``os.mkdir`` give (0o666 / 0o777 less the umask), not
``tempfile``'s private 0o600 / 0o700, so what is written can be shared as any other file.

One rule for every output (``mpolstm.save``, the exports, every CLI command that writes a model or a
file): a target that exists is refused (:func:`check_target`) unless ``overwrite`` is given; an
empty folder counts as absent. With ``overwrite`` the target is replaced whole: a folder is filled
under a temporary name beside it (:func:`atomic_folder`) and swapped in, the old one deleted, so no
file of the old folder survives. Missing parent folders are created.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import IO, Callable, Iterator, TypeVar

__all__ = ["atomic_folder", "atomic_open", "atomic_write_bytes", "check_target", "fsync_dir", "make_temp_dir"]

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
        with os.fdopen(fd, mode, encoding="utf-8" if mode == "w" else None) as fh:
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


def check_target(path: str | os.PathLike[str], overwrite: bool = False, folder: bool = True) -> bool:
    """Whether ``path`` holds something that writing there would replace (a file, or a folder that is not
    empty); ValueError when it does and ``overwrite`` is false, or when it is a file where a ``folder`` is
    written (or the reverse)."""
    target = Path(path)
    if not (target.exists() or target.is_symlink()):
        return False
    if folder and not target.is_dir():
        raise ValueError(f"{target} exists and is not a folder; the output is a folder: choose another path")
    if not folder and target.is_dir():
        raise ValueError(f"{target} is a folder; the output is a single file: choose a file name")
    if folder and not any(target.iterdir()):
        return False
    if not overwrite:
        raise ValueError(f"{target} already exists; choose a new path, or pass overwrite=True to replace it")
    return True


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """A new empty folder beside ``path`` to fill; on a clean exit it replaces ``path`` whole (an existing
    one, refused by :func:`check_target` unless ``overwrite``, is moved aside and deleted: none of its files
    survive). Missing parents are created; if the body raises, ``path`` is left as it was."""
    target = Path(path)
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target)
    try:
        yield tmp
        fsync_dir(tmp)
        old = None
        if target.exists():
            old = make_temp_dir(target)
            os.replace(target, old)  # over the empty folder just made: the old target, whole, out of the way
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
