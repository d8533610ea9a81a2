"""Atomic writes (memzoo's one implementation, used by checkpoints, exports, caches and tools): a file or a whole folder appears complete under its final name, or not at all.

A file is written under a temporary name in its own folder, flushed and fsync'ed, then ``os.replace``'d onto its
final name (an atomic rename on POSIX and Windows filesystems), and the folder is fsync'ed so the rename itself is
durable. A folder is built under a temporary name next to its destination and renamed into place the same way; an
earlier folder it replaces is moved aside first and deleted only after the new one is in place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def fsync_directory(path: str | os.PathLike) -> None:
    """Makes renames and new entries in folder ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Opens a file (``mode`` ``"wb"``, or ``"w"`` for UTF-8 text) that replaces ``path`` only when the ``with``
    block completes without an exception.

    On an exception the temporary file is deleted and ``path`` keeps its earlier content (or stays absent).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file writes whole files: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    fsync_directory(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as handle:
        handle.write(data)


@contextlib.contextmanager
def staging_directory(destination: str | os.PathLike) -> Iterator[Path]:
    """A fresh empty folder next to ``destination``; when the ``with`` block succeeds it becomes ``destination``.

    An existing ``destination`` is replaced only then (moved aside, the new folder renamed in, the old one deleted);
    the caller decides beforehand whether replacing it is allowed. On an exception the staging folder is deleted
    and ``destination`` is untouched.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent))
    try:
        yield staging
        for file in staging.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        fsync_directory(staging)
        _move_into_place(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _move_into_place(staging: Path, destination: Path) -> None:
    if not destination.exists():
        os.rename(staging, destination)
    elif destination.is_dir() and not any(destination.iterdir()):
        destination.rmdir()
        os.rename(staging, destination)
    else:
        aside = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".replaced", dir=destination.parent))
        aside.rmdir()
        os.rename(destination, aside)
        try:
            os.rename(staging, destination)
        except BaseException:
            os.rename(aside, destination)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    fsync_directory(destination.parent)
