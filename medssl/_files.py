"""File helpers: atomic writes, temporary names that say who wrote them, and content hashes.

Atomic writes: a reader sees the old file or the new one, never half of one.

Everything medssl writes that someone may read later (caches, checkpoints,
manifests, patch sets, maps, reports) goes through these helpers: the data is
written to a temporary name in the destination folder (same filesystem) and
moved into place with ``os.replace``; on any error the temporary file is removed
and the destination is untouched.

Temporary names carry the writer: ``.<name>.<host>.<pid>.<random>.tmp[suffix]``. A
writer killed with SIGKILL cannot clean up, so the next write into the same folder
(of any file: an epoch checkpoint's temp is swept by the next ``last.pt``) deletes
temporary files whose writer is gone (same host, process no longer alive), and those of
any writer once they are older than :data:`STALE_TEMP_SECONDS`. Only names of exactly
this form are ever deleted: a user's own ``.notes.tmp`` is not medssl's to remove.

New files and folders get the permissions the process's umask allows (like
``open()`` and ``mkdir`` do), not ``tempfile``'s private 0600/0700.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

__all__ = [
    "STALE_TEMP_SECONDS",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_save_npy",
    "replace_dir",
    "file_sha256",
    "temp_path",
    "make_temp_dir",
    "remove_stale_temps",
]

# Temporary files of writers on other hosts (or of unknown writers) older than this are leftovers.
STALE_TEMP_SECONDS = 24 * 3600
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"
_TEMP_TAG = re.compile(r"\.(?P<host>[A-Za-z0-9_]+)\.(?P<pid>\d+)\.(?P<rand>[0-9a-f]{12})\.tmp")
# a whole name made by temp_path: ".<name>.<host>.<pid>.<random>.tmp" plus an optional suffix (".npy", ".nii.gz")
_TEMP_NAME = re.compile(r"^\..+" + _TEMP_TAG.pattern + r"(\.[A-Za-z0-9.]+)?$")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def temp_path(folder: str | os.PathLike, prefix: str, suffix: str = "") -> Path:
    """A fresh name ``<folder>/<prefix>.<host>.<pid>.<random>.tmp<suffix>`` (nothing is created)."""
    return Path(folder) / f"{prefix}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp{suffix}"


def make_temp_dir(folder: str | os.PathLike, prefix: str) -> Path:
    """Create and return an empty folder named by :func:`temp_path` (mode from the umask)."""
    path = temp_path(folder, prefix)
    path.mkdir(parents=False)
    return path


def _writer_gone(host: str, pid: int) -> bool:
    """True if the process ``pid`` on this host has ended (a zombie counts as ended)."""
    if host != _HOST:
        return False  # another machine sharing the folder: only the age rule applies
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists but belongs to someone else
    try:  # Linux: a killed child its parent has not reaped yet is a zombie
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def is_stale_temp(path: Path) -> bool:
    """True if ``path`` is a medssl temporary name whose writer is gone or that is older than the limit."""
    m = _TEMP_NAME.match(path.name)
    if m is None:
        return False  # not a name medssl makes
    try:
        age_s = time.time() - path.lstat().st_mtime
    except FileNotFoundError:
        return False
    return age_s > STALE_TEMP_SECONDS or _writer_gone(m["host"], int(m["pid"]))


def remove_stale_temps(folder: str | os.PathLike, prefix: str = ".") -> list[Path]:
    """Delete the stale temporary files/folders in ``folder`` whose names start with ``prefix``.

    Only names made by :func:`temp_path` are considered (see :func:`is_stale_temp`). Returns what was removed.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix) or ".tmp" not in entry.name:
            continue
        path = Path(entry.path)
        if not is_stale_temp(path):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass  # another process cleaned it first
        except OSError:
            pass  # not ours to remove after all (permissions); never fatal for the writer
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is deleted.

    ``suffix`` ends the temporary name, for writers that pick the format from the
    extension (nibabel: ``".nii.gz"``; ``np.save`` appends ``".npy"`` unless present).
    Stale temporary files of dead writers in the same folder (of any name) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    tmp = temp_path(path.parent, f".{path.name}", suffix)
    # O_EXCL: never write through someone else's file; mode 0o666 & ~umask like open() (mkstemp would give 0600)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview, fsync: bool = False) -> Path:
    """Write ``data`` atomically; ``fsync`` also forces it to disk before the rename (checkpoints)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """``np.save`` without pickles, atomically."""
    with atomic_path(path, ".npy") as tmp:
        np.save(tmp, array, allow_pickle=False)
    return Path(path)


def replace_dir(stage: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Move the finished folder ``stage`` to ``dest``, replacing an existing ``dest``.

    A folder cannot be ``os.replace``d onto a non-empty one, so an existing ``dest``
    is first renamed aside (``.old-<name>.<host>.<pid>...tmp``) and put back if the swap
    fails; it is deleted only after the new folder is in place.
    """
    stage, dest = Path(stage), Path(dest)
    if not dest.exists():
        os.replace(stage, dest)
        return
    old = temp_path(dest.parent, f".old-{dest.name}")
    os.replace(dest, old)
    try:
        os.replace(stage, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)
