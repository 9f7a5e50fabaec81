"""Cutting patches out of volumes: plain copies inside the grid, constant padding outside.

:func:`copy_patches` is the training path (boxes always inside, straight from memmaps).
:func:`extract_patches` serves evaluation, where the same centres are embedded by
methods with different input sizes, so a box may reach outside the image: outside
voxels get a constant, the per-channel minimum of the volume (the background level
after intensity scaling, e.g. air in CT). Edge replication would smear tissue at the
border into the outside and make border patches look like another anatomy; a constant
background reads as "edge of the field of view", which is what it is. The dense grids of
:mod:`medssl.evaluate.dense` pad the same way.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from medssl.data.npy import LazyNpy, readable
from medssl.geometry import boxes_for_centres

__all__ = ["copy_patches", "extract_patches", "padding_values"]


def copy_patches(data: np.ndarray, boxes_vox: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Copy the voxels of half-open boxes ``(N, 6)`` (inside the volume) of ``data (C, X, Y, Z)`` into ``out (N, C, *S)``.

    Plain slicing of a memmap reads only the touched pages; copying into the preallocated
    buffer casts to float32 and yields a writable, contiguous batch.
    """
    for k, (x0, y0, z0, x1, y1, z1) in enumerate(boxes_vox):
        out[k] = data[:, x0:x1, y0:y1, z0:z1]
    return out


def padding_values(data: np.ndarray) -> np.ndarray:
    """``(C,)`` float32: the per-channel minimum, the constant outside the image.

    For a cached volume (:class:`~medssl.data.npy.LazyNpy`) it is computed once per file build: the
    2.5D samplers ask for it for every volume of every batch, and a pass over a whole volume cost more
    than cutting its patches.
    """
    key = (data.path, data.identity) if isinstance(data, LazyNpy) else None
    if key is not None and key in _PADDING:
        return _PADDING[key].copy()
    d = readable(data)  # a LazyNpy's map, not a copy of the volume
    values = d.reshape(d.shape[0], -1).min(axis=1).astype(np.float32)
    if key is not None:
        if len(_PADDING) >= 4096:
            _PADDING.clear()
        _PADDING[key] = values.copy()
    return values


_PADDING: dict[tuple, np.ndarray] = {}  # (path, file identity) -> padding values of a LazyNpy


def extract_patches(data: np.ndarray, centres_vox: np.ndarray, size_vox: Sequence[int]) -> np.ndarray:
    """``(N, C, *size)`` float32 patches of ``data (C, X, Y, Z)`` at centre voxels ``(N, 3)``, padded where outside."""
    size = tuple(int(s) for s in size_vox)
    boxes = boxes_for_centres(np.asarray(centres_vox).reshape(-1, 3), size)
    shape = np.asarray(data.shape[1:])
    out = np.empty((len(boxes), data.shape[0], *size), dtype=np.float32)
    inside = np.all(boxes[:, :3] >= 0, axis=1) & np.all(boxes[:, 3:] <= shape, axis=1)
    if inside.all():
        return copy_patches(data, boxes, out)
    fill = padding_values(data)
    for k, box in enumerate(boxes):
        if inside[k]:
            x0, y0, z0, x1, y1, z1 = box
            out[k] = data[:, x0:x1, y0:y1, z0:z1]
            continue
        out[k] = fill[:, None, None, None]
        lo, hi = np.maximum(box[:3], 0), np.minimum(box[3:], shape)
        if np.all(hi > lo):
            src = data[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
            d = lo - box[:3]
            out[k, :, d[0] : d[0] + src.shape[1], d[1] : d[1] + src.shape[2], d[2] : d[2] + src.shape[3]] = src
    return out
