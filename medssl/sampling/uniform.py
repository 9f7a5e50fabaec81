"""Uniform random patches: the ISImed sampler.

ISImed (the ISImed paper, sec. 2) draws 16 random 32^3 patches from each of 64 images per
batch and regresses the physical distance between patch centres. This sampler draws
volumes without replacement, then boxes that lie fully inside each volume, optionally
with the centre voxel on the body (``foreground_only``), and reports every centre in world millimetres
(from the affine, never from crop metadata).

Cropping is plain numpy slicing straight from the (possibly memory-mapped, read-only)
arrays into one preallocated batch buffer. A MONAI ``RandSpatialCropSamplesd`` chain does
the same job per patch through dictionaries, metadata tracking and copies, which is
many times slower (``benchmarks/sampling.py`` measures it); the crop itself needs none
of that.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch

from medssl.data.volume import Volume
from medssl.geometry import box_centres_mm, boxes_for_centres
from medssl.sampling.base import PatchBatch, PatchSampler
from medssl.sampling.patches import copy_patches
from medssl.sampling.regions import BODY, foreground_mask, valid_centres

__all__ = ["UniformPatchSampler"]

# Bound on the memory of the cached centre tables (least recently used volumes are dropped first):
# 4 bytes per allowed centre voxel, so ~2,000 real CTs would otherwise hold hundreds of MB.
_CENTRE_CACHE_BYTES = 256 * 2**20


class UniformPatchSampler(PatchSampler):
    """Random boxes fully inside each volume, ``patches_per_volume`` from each of up to
    ``volumes_per_batch`` volumes drawn without replacement.

    Args:
        patch_size_vox: patch edge in voxels (int) or 3 ints.
        volumes_per_batch: volumes per batch; fewer when the pool is smaller.
        patches_per_volume: patches drawn from each chosen volume.
        foreground_only: put each patch's centre voxel (the centre-voxel rule of
            :mod:`medssl.geometry`) on the foreground.
        region: what "foreground" means (:func:`medssl.sampling.regions.foreground_mask`):
            ``"body"`` (default, the body mask from intensity), ``"label"`` or an aux key.

    Returns (from ``sampler(volumes, rng)``) a :class:`PatchBatch` with ``patches``
    ``(N, C, Sx, Sy, Sz)`` float32, ``centres_mm`` ``(N, 3)`` (``affine @`` the box's geometric
    centre ``(x0 + x1 - 1) / 2``), ``boxes_vox`` ``(N, 6)``, ``volume_index`` ``(N,)`` into
    ``case_ids``. Patches of one volume are contiguous in the batch. The same ``rng`` state
    gives the same batch.

    The allowed centres of each volume are computed once and cached on the sampler (keyed by
    case id, array identity and shape), so later steps only draw indices; the cache is bounded
    (256 MB, least recently used volumes dropped first), so huge cohorts do not grow it without end.
    """

    def __init__(
        self,
        patch_size_vox: int | Sequence[int],
        volumes_per_batch: int,
        patches_per_volume: int,
        foreground_only: bool = False,
        region: str = BODY,
    ) -> None:
        super().__init__(patch_size_vox)
        if int(volumes_per_batch) < 1 or int(patches_per_volume) < 1:
            raise ValueError(
                f"volumes_per_batch and patches_per_volume must be >= 1, got {volumes_per_batch} and {patches_per_volume}"
            )
        self.volumes_per_batch = int(volumes_per_batch)
        self.patches_per_volume = int(patches_per_volume)
        self.foreground_only = bool(foreground_only)
        self.region = region
        # (case_id, id(data), shape, region) -> flat indices (int32/int64) of allowed centre voxels, LRU order
        self._centre_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def _sample(self, volumes: Sequence[Volume], rng: np.random.Generator) -> PatchBatch:
        n_channels = volumes[0].n_channels  # the same for all (checked by PatchSampler.__call__)
        n_vol = min(self.volumes_per_batch, len(volumes))
        chosen = rng.choice(len(volumes), size=n_vol, replace=False)
        P = self.patches_per_volume
        size = np.asarray(self.patch_size_vox)

        patches = np.empty((n_vol * P, n_channels, *self.patch_size_vox), dtype=np.float32)
        boxes = np.empty((n_vol * P, 6), dtype=np.int64)
        centres_mm = np.empty((n_vol * P, 3), dtype=np.float64)
        for slot, vi in enumerate(chosen):
            vol = volumes[int(vi)]
            rows = slice(slot * P, (slot + 1) * P)
            boxes[rows] = boxes_for_centres(self._draw_centres(vol, rng), size)
            copy_patches(vol.data, boxes[rows], out=patches[rows])
            centres_mm[rows] = box_centres_mm(vol.affine, boxes[rows])

        return PatchBatch(
            patches=torch.from_numpy(patches),
            centres_mm=torch.from_numpy(centres_mm.astype(np.float32)),
            boxes_vox=torch.from_numpy(boxes),
            volume_index=torch.from_numpy(np.repeat(np.arange(n_vol, dtype=np.int64), P)),
            case_ids=[volumes[int(i)].case_id for i in chosen],
        )

    def _draw_centres(self, vol: Volume, rng: np.random.Generator) -> np.ndarray:
        """``(P, 3)`` int64 centre voxels whose box lies inside ``vol`` (on the foreground if asked)."""
        candidates = self._allowed_centres(vol)
        picks = candidates[rng.integers(0, candidates.size, size=self.patches_per_volume)]
        return np.stack(np.unravel_index(picks, vol.shape_vox), axis=1).astype(np.int64)

    def _allowed_centres(self, vol: Volume) -> np.ndarray:
        """Flat indices (into the volume grid) of allowed centre voxels, cached per volume."""
        key = (vol.case_id, id(vol.data), vol.shape_vox, self.foreground_only, self.region)
        cached = self._centre_cache.get(key)
        if cached is not None:
            self._centre_cache.move_to_end(key)
            return cached
        mask = foreground_mask(vol, self.region) if self.foreground_only else None
        flat = np.flatnonzero(valid_centres(vol, self.patch_size_vox, mask))
        flat = flat.astype(np.int32 if flat[-1] < np.iinfo(np.int32).max else np.int64)
        self._centre_cache[key] = flat
        while len(self._centre_cache) > 1 and sum(a.nbytes for a in self._centre_cache.values()) > _CENTRE_CACHE_BYTES:
            self._centre_cache.popitem(last=False)  # least recently used volume first
        return flat

