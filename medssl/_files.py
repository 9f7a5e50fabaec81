"""File helpers: atomic writes and content hashes.

Atomic writes: a reader sees the old file or the new one, never half of one.

Everything medssl writes that someone may read later (caches, checkpoints,
manifests, patch sets, maps, reports) goes through these helpers: the data is
written to a temporary name in the destination folder (same filesystem) and
moved into place with ``os.replace``; on any error the temporary file is removed
and the destination is untouched.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_save_npy", "replace_dir", "file_sha256"]


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is deleted.

    ``suffix`` ends the temporary name, for writers that pick the format from the
    extension (nibabel: ``".nii.gz"``; ``np.save`` appends ``".npy"`` unless present).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
    is first renamed aside and put back if the swap fails; it is deleted only after
    the new folder is in place.
    """
    stage, dest = Path(stage), Path(dest)
    if not dest.exists():
        os.replace(stage, dest)
        return
    old = dest.with_name(f".old-{dest.name}-{uuid.uuid4().hex}")  # the cache sweeps stale ".old-*" folders
    os.replace(dest, old)
    try:
        os.replace(stage, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)
