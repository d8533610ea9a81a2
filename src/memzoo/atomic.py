"""Atomic writes (memzoo's one implementation, used by checkpoints, exports, caches and tools): a file or a whole folder appears complete under its final name, or not at all.

A file is written under a temporary name in its own folder, flushed and fsync'ed, then ``os.replace``'d onto its
final name (an atomic rename on POSIX and Windows filesystems), and the folder is fsync'ed so the rename itself is
durable. A folder is built under a temporary name next to its destination and renamed into place the same way; an
earlier folder it replaces is moved aside first and deleted only after the new one is in place.

Files and folders get the permissions of any new file (``0666`` / ``0777`` minus the umask), not the private ones of
temporary files. A temporary file ``.<name>.<random>.partial`` is locked (``flock``) by its writer while it is
written, so :func:`remove_stale_partials` can tell the leftovers of a killed writer from files being written now.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows: no flock, stale partial files are left alone
    fcntl = None

PARTIAL_SUFFIX = ".partial"
# a partial file younger than this is never removed: its writer may not have locked it yet
STALE_AFTER_S = 30.0


def current_umask() -> int:
    """The process's umask (read without changing it where ``/proc`` tells it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _lock(fd: int) -> None:
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def remove_stale_partials(folder: str | os.PathLike, young: list[Path] | None = None) -> list[Path]:
    """Deletes the ``.*.partial`` files in ``folder`` left by killed writers (unlocked and older than
    :data:`STALE_AFTER_S`); returns them. Files being written (locked) and folders are left alone. Files younger
    than :data:`STALE_AFTER_S` are kept too (their writer may not hold the lock yet); they are appended to
    ``young`` when it is given, so the caller can say so."""
    removed = []
    if fcntl is None or not Path(folder).is_dir():
        return removed
    for path in Path(folder).glob(f".*{PARTIAL_SUFFIX}"):
        try:
            if not path.is_file():
                continue
            if time.time() - path.stat().st_mtime < STALE_AFTER_S:
                if young is not None:
                    young.append(path)
                continue
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live writer holds it
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
        finally:
            os.close(fd)
    return removed


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
    if not path.parent.is_dir():  # else mkstemp's error names its hidden temporary file
        raise FileNotFoundError(f"cannot write {path}: its folder {str(path.parent)!r} does not exist (create it "
                                f"first, or write elsewhere)")
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    _lock(fd)  # held until the file is closed: marks it as being written (see remove_stale_partials)
    os.chmod(temp_name, 0o666 & ~current_umask())
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
    the caller decides beforehand whether replacing it is allowed. The folder's files get the umask's permissions
    for new files, whatever their writers chose. On an exception the staging folder is deleted
    and ``destination`` is untouched.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=PARTIAL_SUFFIX, dir=destination.parent))
    os.chmod(staging, 0o777 & ~current_umask())
    try:
        yield staging
        file_mode = 0o666 & ~current_umask()
        for file in staging.rglob("*"):
            if file.is_file():
                os.chmod(file, file_mode)  # some writers (safetensors) create private files
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
