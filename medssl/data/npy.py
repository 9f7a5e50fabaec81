"""Cached ``.npy`` arrays that hold no file handle until they are read.

A ``np.memmap`` keeps a file descriptor (and a mapping) open for as long as it lives, so
a training pool of 2,000 memory-mapped volumes holds 4,000 descriptors and maps pages
of all of them. :class:`LazyNpy` keeps only the path, shape and dtype; reading it maps
the file through a small process-wide cache of the most recently used
(:data:`MAX_OPEN_ARRAYS`) maps, so handles and mapped memory stay bounded whatever
the cohort size.

The cache is keyed by the file's identity (device, inode, size, modification time) as
it was when the entry was opened, not by its path: a cache entry rebuilt in place gets
new files under the same paths, and a volume opened after the rebuild must map the new
files, never a map of the old ones still held for an earlier reader. A volume opened
before the rebuild whose map was dropped meanwhile gets a :class:`CacheEntryError` (its
shape and meta describe the old build) instead of the new build's voxels.

It supports what medssl's samplers, evaluators and viewers do with volume arrays:
``shape``/``dtype``/``ndim``, slicing (which returns an in-memory copy) and
``np.asarray`` (which reads the whole array). Code that gathers scattered voxels (fancy
indexing) calls :func:`readable` instead: the map itself, so only the touched pages are read.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from medssl.data.errors import CacheEntryError

__all__ = ["LazyNpy", "MAX_OPEN_ARRAYS", "file_identity", "open_array_count", "readable"]

MAX_OPEN_ARRAYS = int(os.environ.get("MEDSSL_MAX_OPEN_ARRAYS", "64"))

_maps: OrderedDict[tuple, np.memmap] = OrderedDict()
_lock = threading.Lock()


def file_identity(path: str | os.PathLike) -> tuple[int, int, int, int]:
    """``(device, inode, size, mtime_ns)`` of a file: which build of it this is."""
    return _identity(os.stat(path))


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (int(st.st_dev), int(st.st_ino), int(st.st_size), int(st.st_mtime_ns))


def open_array_count() -> int:
    """How many cached arrays are mapped right now (at most :data:`MAX_OPEN_ARRAYS`)."""
    return len(_maps)


def readable(data: Any) -> np.ndarray:
    """An array to index without copying it: a :class:`LazyNpy`'s read-only memory map, anything else as an array.

    ``np.asarray`` of a :class:`LazyNpy` copies the whole volume (5 MB for a demo subject), which a
    2.5D sampler gathering a few thousand voxels did ~190 times per step. Use the result within one
    call and do not keep it: a kept view would hold the map (and its file descriptor) open.
    """
    return data._map() if isinstance(data, LazyNpy) else np.asarray(data)


class LazyNpy:
    """A read-only ``.npy`` file of known shape and dtype, mapped only while it is being read.

    Args:
        path: the ``.npy`` file.
        shape, dtype: what the file must hold (checked whenever it is mapped).
        owner: a name for error messages (e.g. the cache entry).
        offset: where the data starts (from the header); None: parse the header when mapping.
        identity: :func:`file_identity` of the file this array must come from (taken now if
            not given); a file replaced since then is an error when mapped, not other data.
    """

    __slots__ = ("path", "shape", "dtype", "owner", "offset", "identity")

    def __init__(
        self, path: str | os.PathLike, shape: tuple[int, ...], dtype: Any, owner: str = "", offset: int | None = None,
        identity: tuple[int, int, int, int] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.owner = owner or self.path
        self.offset = offset
        self.identity = tuple(identity) if identity is not None else file_identity(self.path)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyNpy({self.path!r}, shape={self.shape}, dtype={self.dtype})"

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.array(self._map()[key])  # a copy: no view keeps the map (and its handle) alive

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = np.array(self._map())
        return out if dtype is None else out.astype(dtype, copy=False)

    def _map(self) -> np.memmap:
        key = (self.path, self.identity)
        with _lock:
            mm = _maps.get(key)
            if mm is not None:
                _maps.move_to_end(key)
                return mm
        with open(self.path, "rb") as f:  # identity, header and map from one open file: no swap in between
            if _identity(os.fstat(f.fileno())) != self.identity:
                self._rebuilt("was replaced since it was opened")
            offset = self.offset
            if offset is None or self.identity[2] != offset + self.nbytes:
                shape, dtype, offset = _read_npy_header(f)
                if shape != self.shape or dtype != self.dtype:
                    self._rebuilt(f"now holds {shape} {dtype}, not {self.shape} {self.dtype}")
            mm = np.memmap(f, dtype=self.dtype, mode="r", offset=offset, shape=self.shape)
        with _lock:
            _maps[key] = mm
            _maps.move_to_end(key)
            while len(_maps) > max(1, MAX_OPEN_ARRAYS):
                _maps.popitem(last=False)  # unmapped (and its descriptor closed) once no reader holds it
        return mm

    def _rebuilt(self, what: str) -> None:
        raise CacheEntryError(
            self.owner, f"{self.path} {what}: the entry was rebuilt while in use; load it again",
        )  # fmt: skip


def _read_npy_header(f: Any) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of an open ``.npy`` file (C order only)."""
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(f)
    if fortran_order:
        raise ValueError(f"{getattr(f, 'name', f)}: stored in Fortran order; medssl writes C order")
    return tuple(int(s) for s in shape), np.dtype(dtype), f.tell()
