"""Uniform random patches: the ISImed sampler.

ISImed (the ISImed paper, sec. 2) draws 16 random 32^3 patches from each of 64 images per
batch and regresses the physical distance between patch centres. This sampler draws
volumes without replacement, then boxes that lie fully inside each volume, optionally
with the centre voxel on the foreground, and reports every centre in world millimetres
(from the affine, never from crop metadata).

Cropping is plain numpy slicing straight from the (possibly memory-mapped, read-only)
arrays into one preallocated batch buffer. A MONAI ``RandSpatialCropSamplesd`` chain does
the same job per patch through dictionaries, metadata tracking and copies, which is
many times slower (``benchmarks/sampling.py`` measures it); the crop itself needs none
of that.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from medssl.data.errors import EmptyForegroundError, LabelGridMismatchError
from medssl.data.volume import Volume
from medssl.geometry import box_centres_mm
from medssl.sampling.base import PatchBatch, PatchSampler

__all__ = ["UniformPatchSampler"]

# Bound on cached foreground tables (one per volume); far above any cohort we train on.
_MAX_CACHED_VOLUMES = 100_000


class UniformPatchSampler(PatchSampler):
    """Random boxes fully inside each volume, ``patches_per_volume`` from each of up to
    ``volumes_per_batch`` volumes drawn without replacement.

    Args:
        patch_size_vox: patch edge in voxels (int) or 3 ints.
        volumes_per_batch: volumes per batch; fewer when the pool is smaller.
        patches_per_volume: patches drawn from each chosen volume.
        foreground_only: put each patch's centre voxel on the foreground.
        foreground_label_key: which map defines the foreground when ``foreground_only``:
            ``None`` uses ``volume.label > 0`` when the volume has a label and otherwise
            "any channel above that channel's minimum" (i.e. not the padding/air floor);
            ``"label"`` forces ``volume.label``; any other string names ``volume.aux[key]``.

    Returns (from ``sampler(volumes, rng)``) a :class:`PatchBatch` with ``patches``
    ``(N, C, Sx, Sy, Sz)`` float32, ``centres_mm`` ``(N, 3)`` (``affine @`` the box's centre
    voxel ``(x0 + x1 - 1) / 2``), ``boxes_vox`` ``(N, 6)``, ``volume_index`` ``(N,)`` into
    ``case_ids``. Patches of one volume are contiguous in the batch. The same ``rng`` state
    gives the same batch.

    The foreground centre candidates of each volume are computed once and cached on the
    sampler (keyed by case id, array identity and shape), so later steps only draw indices.
    """

    def __init__(
        self,
        patch_size_vox: int | Sequence[int],
        volumes_per_batch: int,
        patches_per_volume: int,
        foreground_only: bool = False,
        foreground_label_key: str | None = None,
    ) -> None:
        super().__init__(patch_size_vox)
        if int(volumes_per_batch) < 1 or int(patches_per_volume) < 1:
            raise ValueError(
                f"volumes_per_batch and patches_per_volume must be >= 1, got {volumes_per_batch} and {patches_per_volume}"
            )
        self.volumes_per_batch = int(volumes_per_batch)
        self.patches_per_volume = int(patches_per_volume)
        self.foreground_only = bool(foreground_only)
        self.foreground_label_key = foreground_label_key
        # (case_id, id(data), shape) -> flat indices (int32/int64) of allowed centre voxels
        # within the grid of valid centres (shape = volume shape - patch size + 1).
        self._centre_cache: dict[tuple, np.ndarray] = {}

    def _sample(self, volumes: Sequence[Volume], rng: np.random.Generator) -> PatchBatch:
        n_channels = volumes[0].n_channels
        for v in volumes:
            if v.n_channels != n_channels:
                raise ValueError(
                    f"{v.source or v.case_id}: has {v.n_channels} channels but {volumes[0].case_id} has {n_channels}; "
                    "all volumes in a pool need the same channels"
                )
        n_vol = min(self.volumes_per_batch, len(volumes))
        chosen = rng.choice(len(volumes), size=n_vol, replace=False)
        P = self.patches_per_volume
        sx, sy, sz = self.patch_size_vox

        patches = np.empty((n_vol * P, n_channels, sx, sy, sz), dtype=np.float32)
        boxes = np.empty((n_vol * P, 6), dtype=np.int64)
        centres_mm = np.empty((n_vol * P, 3), dtype=np.float64)
        for slot, vi in enumerate(chosen):
            vol = volumes[int(vi)]
            starts = self._draw_starts(vol, rng)  # (P, 3)
            rows = slice(slot * P, (slot + 1) * P)
            boxes[rows, :3] = starts
            boxes[rows, 3:] = starts + np.asarray(self.patch_size_vox)
            for k, (x0, y0, z0) in enumerate(starts):
                # Plain slicing of a memmap reads only the touched pages; copying into the
                # preallocated buffer casts to float32 and yields a writable, contiguous batch.
                patches[slot * P + k] = vol.data[:, x0 : x0 + sx, y0 : y0 + sy, z0 : z0 + sz]
            centres_mm[rows] = box_centres_mm(vol.affine, boxes[rows])

        return PatchBatch(
            patches=torch.from_numpy(patches),
            centres_mm=torch.from_numpy(centres_mm.astype(np.float32)),
            boxes_vox=torch.from_numpy(boxes),
            volume_index=torch.from_numpy(np.repeat(np.arange(n_vol, dtype=np.int64), P)),
            case_ids=[volumes[int(i)].case_id for i in chosen],
        )

    def _draw_starts(self, vol: Volume, rng: np.random.Generator) -> np.ndarray:
        """``(P, 3)`` int64 box starts with the whole box inside ``vol``."""
        n_starts = np.asarray(vol.shape_vox) - np.asarray(self.patch_size_vox) + 1  # valid starts per axis
        if not self.foreground_only:
            return rng.integers(0, n_starts, size=(self.patches_per_volume, 3), dtype=np.int64)
        candidates = self._foreground_starts(vol, n_starts)
        picks = candidates[rng.integers(0, candidates.size, size=self.patches_per_volume)]
        return np.stack(np.unravel_index(picks, tuple(n_starts)), axis=1).astype(np.int64)

    def _foreground_starts(self, vol: Volume, n_starts: np.ndarray) -> np.ndarray:
        """Flat indices (into the grid of valid starts) of boxes whose centre voxel is foreground."""
        key = (vol.case_id, id(vol.data), vol.shape_vox, self.foreground_label_key)
        cached = self._centre_cache.get(key)
        if cached is not None:
            return cached
        mask = self._foreground_mask(vol)
        if mask.shape != vol.shape_vox:
            raise LabelGridMismatchError(
                vol.source or vol.case_id, f"foreground map shape {mask.shape} differs from image shape {vol.shape_vox}"
            )
        # The centre voxel of a box starting at x0 is x0 + (S - 1) // 2 (the lower of the two
        # middle voxels for even S), so valid centres are a shifted window of the mask.
        off = [(s - 1) // 2 for s in self.patch_size_vox]
        window = mask[
            off[0] : off[0] + n_starts[0],
            off[1] : off[1] + n_starts[1],
            off[2] : off[2] + n_starts[2],
        ]
        flat = np.flatnonzero(window)
        if flat.size == 0:
            raise EmptyForegroundError(
                vol.source or vol.case_id,
                f"no foreground voxel can be a patch centre with patch size {self.patch_size_vox} "
                f"(volume shape {vol.shape_vox}, foreground voxels in the whole volume: {int(mask.sum())})",
            )
        flat = flat.astype(np.int32 if flat[-1] < np.iinfo(np.int32).max else np.int64)
        if len(self._centre_cache) >= _MAX_CACHED_VOLUMES:  # volumes reloaded many times: start over
            self._centre_cache.clear()
        self._centre_cache[key] = flat
        return flat

    def _foreground_mask(self, vol: Volume) -> np.ndarray:
        key = self.foreground_label_key
        if key is None:
            if vol.label is not None:
                return np.asarray(vol.label) > 0
            data = np.asarray(vol.data)
            floor = data.reshape(data.shape[0], -1).min(axis=1)
            return np.any(data > floor[:, None, None, None], axis=0)
        if key == "label":
            if vol.label is None:
                raise EmptyForegroundError(vol.source or vol.case_id, "foreground_label_key='label' but it has no label")
            return np.asarray(vol.label) > 0
        if key not in vol.aux:
            raise EmptyForegroundError(
                vol.source or vol.case_id,
                f"foreground_label_key={key!r} is not among its label maps {sorted(vol.aux)}",
            )
        return np.asarray(vol.aux[key]) > 0
