"""Cached ``.npy`` arrays that hold no file handle until they are read.

A ``np.memmap`` keeps a file descriptor (and a mapping) open for as long as it lives, so
a training pool of 2,000 memory-mapped volumes holds 4,000 descriptors and maps pages
of all of them. :class:`LazyNpy` keeps only the path, shape and dtype; reading it maps
the file through a small process-wide cache of the most recently used
(:data:`MAX_OPEN_ARRAYS`) maps, so handles and mapped memory stay bounded whatever
the cohort size.

It supports what medssl's samplers, evaluators and viewers do with volume arrays:
``shape``/``dtype``/``ndim``, slicing (which returns an in-memory copy) and
``np.asarray`` (which reads the whole array).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

__all__ = ["LazyNpy", "MAX_OPEN_ARRAYS", "open_array_count"]

MAX_OPEN_ARRAYS = int(os.environ.get("MEDSSL_MAX_OPEN_ARRAYS", "64"))

_maps: OrderedDict[str, np.memmap] = OrderedDict()
_lock = threading.Lock()


def open_array_count() -> int:
    """How many cached arrays are mapped right now (at most :data:`MAX_OPEN_ARRAYS`)."""
    return len(_maps)


class LazyNpy:
    """A read-only ``.npy`` file of known shape and dtype, mapped only while it is being read.

    Args:
        path: the ``.npy`` file.
        shape, dtype: what the file must hold (checked whenever it is mapped).
        owner: a name for error messages (e.g. the cache entry).
    """

    __slots__ = ("path", "shape", "dtype", "owner", "offset")

    def __init__(
        self, path: str | os.PathLike, shape: tuple[int, ...], dtype: Any, owner: str = "", offset: int | None = None
    ) -> None:
        self.path = os.fspath(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.owner = owner or self.path
        self.offset = offset  # where the data starts (from the header); None: parse the header when mapping

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
        with _lock:
            mm = _maps.get(self.path)
            if mm is not None:
                _maps.move_to_end(self.path)
                return mm
        if self.offset is not None and os.path.getsize(self.path) == self.offset + self.nbytes:
            # header already read when the entry was opened: skip parsing it again on every map
            mm = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
        else:
            mm = np.load(self.path, mmap_mode="r", allow_pickle=False)
        if mm.shape != self.shape or mm.dtype != self.dtype:
            from medssl.data.cache import CacheEntryError

            raise CacheEntryError(
                self.owner, f"{self.path} now holds {mm.shape} {mm.dtype}, not {self.shape} {self.dtype}: the entry "
                "was rebuilt while in use; load it again",
            )  # fmt: skip
        with _lock:
            _maps[self.path] = mm
            _maps.move_to_end(self.path)
            while len(_maps) > max(1, MAX_OPEN_ARRAYS):
                _maps.popitem(last=False)  # unmapped (and its descriptor closed) once no reader holds it
        return mm
