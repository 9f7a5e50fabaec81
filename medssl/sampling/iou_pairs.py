"""Pairs of crops whose IoU lies in an interval: the positives of IoU-based SimSiam.

Algorithm 1 of the thesis (Konieczkowicz, AGH MSc thesis 2023, ch. 3): draw crop 1; draw up to
``r1 = 30`` candidates for crop 2 and accept the first whose IoU with crop 1 lies in
``[iou_min, iou_max]``; otherwise redraw crop 1, up to ``r2 = 4`` rounds; on failure return the
last pair and count it. Never more than ``r1 * r2`` candidates per pair, so it cannot loop.

**IoU unit.** IoU is computed from the voxel corners of the two boxes
(:func:`medssl.geometry.box_iou_3d`). Both boxes live on the same grid, and an affine map
multiplies every volume by the same ``|det A|``, which cancels in the ratio, so the voxel IoU
*is* the IoU of the two boxes in world mm on any grid, isotropic or not (tested on an
anisotropic oblique grid). What anisotropy changes is the crop's physical shape: a cube in
voxels is a cube in mm only on isotropic grids, which the cache provides after resampling.

**Crop 2 draw.** ``crop2_draw="analytic"`` (default) draws crop 2's offset from crop 1
uniformly among the offsets whose IoU lies in the interval (a table computed once per crop
sizes), then keeps the first of up to ``r1`` such candidates that fits in the volume. Given
crop 1 this is the same distribution as Algorithm 1's accepted candidates (uniform over the
positions in the interval that fit; tested), but it does not depend on luck: in 3D the interval
is a tiny share of all positions, so rejection with ``r1 * r2 = 120`` candidates falls back on
many pairs, and the fallbacks, with any IoU, then make up much of the run. Measured on the demo
cohort (32^3 crops at 3 mm, crop 1 on the body, 3,200 pairs per interval): rejection fell back on
13 % of the [0.3, 0.6] pairs and 83 % of the [0.6, 1] pairs, the analytic draw on none (the thesis,
in 2D, saw under 0.5 %). ``crop2_draw="rejection"`` is Algorithm 1 as published (use it to
reproduce the thesis).
When ``iou_min == 0`` the interval contains every non-overlapping position and has no
bounded offset table; both settings then draw by rejection, which accepts most candidates.

**Options beyond the thesis** (which used 2D slices, equal square crops and no foreground
constraint): ``crop1_on_body`` puts crop 1's centre voxel on the body mask
(:func:`medssl.sampling.regions.foreground_mask`), crop 2 only has to fit in the volume;
``crop2_size_vox`` gives crop 2 another size (both are resized to ``output_size_vox``);
``spatial_dims=2`` cuts both crops from the same axial slice (boxes one voxel thick in z),
the thesis setting.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medssl.data.volume import Volume
from medssl.geometry import as_size, box_centres_mm, box_iou_3d, boxes_for_centres, centre_window
from medssl.sampling.base import PatchBatch, PatchSampler
from medssl.sampling.patches import copy_patches
from medssl.sampling.regions import BODY, check_fits
from medssl.sampling.uniform import UniformPatchSampler

__all__ = ["IoUPairSampler", "CROP2_DRAWS", "IOU_HIST_EDGES", "interval_offsets", "iou_histogram_logs",
           "max_pair_iou", "pair_rows"]

CROP2_DRAWS = ("analytic", "rejection")
# Fixed bins of the realised-IoU histogram in metrics.jsonl: exactly 0 (disjoint crops), then (0, 0.1], ..., (0.9, 1].
IOU_HIST_EDGES = np.round(np.linspace(0.0, 1.0, 11), 1)
_MAX_CACHED_VOLUMES = 100_000


def pair_rows(n_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of crop 1 and crop 2 of each pair in a batch: pair ``k`` is rows ``2k`` and ``2k + 1``."""
    k = np.arange(int(n_pairs))
    return 2 * k, 2 * k + 1


def iou_histogram_logs(iou: np.ndarray) -> dict[str, float]:
    """Share of pairs per fixed IoU bin, as log keys: ``iou_hist_0`` (IoU exactly 0), ``iou_hist_0.0_0.1`` for
    (0, 0.1], ..., ``iou_hist_0.9_1.0`` for (0.9, 1]. The shares sum to 1; ``fit`` averages them over its log window.
    """
    iou = np.asarray(iou, dtype=np.float64).ravel()
    if iou.size == 0:
        raise ValueError("iou_histogram_logs needs at least one IoU")
    out = {"iou_hist_0": float(np.mean(iou == 0.0))}
    for lo, hi in zip(IOU_HIST_EDGES[:-1], IOU_HIST_EDGES[1:]):
        out[f"iou_hist_{lo:.1f}_{hi:.1f}"] = float(np.mean((iou > lo) & (iou <= hi)))
    return out


def interval_offsets(size1_vox: Sequence[int], size2_vox: Sequence[int], iou_min: float, iou_max: float) -> np.ndarray:
    """``(M, 3)`` int64 offsets ``start2 - start1`` whose boxes' IoU lies in ``[iou_min, iou_max]`` (``iou_min > 0``).

    Only overlapping offsets can have a positive IoU: along axis ``a`` they run over
    ``-size2[a] < d < size1[a]``. The IoU of each is the corner formula of
    :func:`medssl.geometry.box_iou_3d`, so the table and the sampler's check agree exactly.
    """
    if not iou_min > 0:
        raise ValueError(f"interval_offsets needs iou_min > 0 (the region is unbounded otherwise), got {iou_min}")
    s1, s2 = np.asarray(size1_vox, dtype=np.int64), np.asarray(size2_vox, dtype=np.int64)
    axes = [np.arange(-s2[a] + 1, s1[a]) for a in range(3)]
    # overlap along each axis of [0, s1) and [d, d + s2): separable, so a (n_x, n_y, n_z) grid
    # instead of a list of boxes (96^3 crops have 7 million overlapping offsets)
    ov = [np.clip(np.minimum(s1[a], d + s2[a]) - np.maximum(0, d), 0, None).astype(np.float64)
          for a, d in enumerate(axes)]
    inter = ov[0][:, None, None] * ov[1][None, :, None] * ov[2][None, None, :]
    iou = inter / (np.prod(s1) + np.prod(s2) - inter)  # the corner formula of box_iou_3d, exact on integers
    idx = np.argwhere((iou >= iou_min) & (iou <= iou_max))
    return np.stack([axes[a][idx[:, a]] for a in range(3)], axis=1).astype(np.int64)


def max_pair_iou(size1_vox: Sequence[int], size2_vox: Sequence[int]) -> float:
    """The largest IoU two boxes of these sizes can have (one inside the other along every axis)."""
    s1, s2 = np.asarray(size1_vox, dtype=np.float64), np.asarray(size2_vox, dtype=np.float64)
    inter = np.prod(np.minimum(s1, s2))
    return float(inter / (np.prod(s1) + np.prod(s2) - inter))


@dataclass
class _Pairs:
    """Boxes of the pairs of one volume: ``box1, box2 (P, 6)``, ``iou (P,)``, ``fallback (P,)`` bool."""

    box1: np.ndarray
    box2: np.ndarray
    iou: np.ndarray
    fallback: np.ndarray


class IoUPairSampler(PatchSampler):
    """Crop pairs with IoU in ``[iou_min, iou_max]`` (thesis Algorithm 1), ``pairs_per_volume`` from each volume.

    Args:
        crop_size_vox: crop 1's size in voxels (int: a cube, or a square in 2D; else 3 ints, or 2 in 2D).
        iou_min, iou_max: the interval (inclusive); ``[0, 0]`` asks for disjoint crops, ``[0, 1]`` is
            plain random cropping.
        volumes_per_batch: volumes per batch, drawn without replacement (fewer if the pool is smaller).
        pairs_per_volume: pairs from each chosen volume (each pair is two crops, two rows of the batch).
        crop2_size_vox: crop 2's size (``None``: crop 1's).
        output_size_vox: the size both crops are resized to (``None``: crop 1's size); trilinear
            (bilinear in 2D) when a crop has another size.
        crop1_on_body: crop 1's centre voxel on the foreground (``region``, default the body mask).
        region: what "foreground" means (:func:`medssl.sampling.regions.foreground_mask`).
        max_crop2_draws: ``r1``, candidates for crop 2 per crop 1 (thesis: 30).
        max_crop1_draws: ``r2``, rounds of crop 1 before a pair falls back (thesis: 4).
        crop2_draw: ``"analytic"`` (default) or ``"rejection"`` (Algorithm 1); see the module docstring.
        spatial_dims: 3, or 2 for both crops on one axial slice (z) of the volume.

    Returns (``sampler(volumes, rng)``) a :class:`PatchBatch` with ``N = 2 * pairs`` rows: pair ``k`` is
    rows ``2k`` (crop 1) and ``2k + 1`` (crop 2) (:func:`pair_rows`); ``patches (N, C, *output_size)``,
    each crop's own ``boxes_vox`` and ``centres_mm``, and in ``extras``: ``pair_iou`` ``(P,)`` float64
    (realised IoU, from the corners) and ``pair_fallback`` ``(P,)`` bool (the pair is Algorithm 1's
    returned-on-failure pair, its IoU may lie outside the interval). The same ``rng`` state gives the
    same batch.
    """

    def __init__(
        self,
        crop_size_vox: int | Sequence[int],
        iou_min: float = 0.3,
        iou_max: float = 0.6,
        *,
        volumes_per_batch: int,
        pairs_per_volume: int,
        crop2_size_vox: int | Sequence[int] | None = None,
        output_size_vox: int | Sequence[int] | None = None,
        crop1_on_body: bool = False,
        region: str = BODY,
        max_crop2_draws: int = 30,
        max_crop1_draws: int = 4,
        crop2_draw: str = "analytic",
        spatial_dims: int = 3,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if not 0.0 <= iou_min <= iou_max <= 1.0:
            raise ValueError(f"need 0 <= iou_min <= iou_max <= 1, got [{iou_min}, {iou_max}]")
        if crop2_draw not in CROP2_DRAWS:
            raise ValueError(f"crop2_draw must be one of {CROP2_DRAWS}, got {crop2_draw!r}")
        for name, v in (("volumes_per_batch", volumes_per_batch), ("pairs_per_volume", pairs_per_volume),
                        ("max_crop2_draws", max_crop2_draws), ("max_crop1_draws", max_crop1_draws)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.spatial_dims = int(spatial_dims)
        self.crop1_box_vox = _box_size(crop_size_vox, self.spatial_dims, "crop_size_vox")
        self.crop2_box_vox = (self.crop1_box_vox if crop2_size_vox is None
                              else _box_size(crop2_size_vox, self.spatial_dims, "crop2_size_vox"))
        out = self.crop1_box_vox if output_size_vox is None else _box_size(output_size_vox, self.spatial_dims,
                                                                           "output_size_vox")
        self.output_size_vox: tuple[int, ...] = out[: self.spatial_dims]
        # the box every volume must hold (check_fits in PatchSampler.__call__)
        super().__init__(tuple(max(a, b) for a, b in zip(self.crop1_box_vox, self.crop2_box_vox)))
        self.iou_min, self.iou_max = float(iou_min), float(iou_max)
        self.volumes_per_batch, self.pairs_per_volume = int(volumes_per_batch), int(pairs_per_volume)
        self.crop1_on_body, self.region = bool(crop1_on_body), region
        self.r1, self.r2 = int(max_crop2_draws), int(max_crop1_draws)
        self.crop2_draw = crop2_draw
        self.max_iou = max_pair_iou(self.crop1_box_vox, self.crop2_box_vox)
        if self.iou_min > self.max_iou:
            warnings.warn(f"IoUPairSampler: crops of {self.crop1_box_vox} and {self.crop2_box_vox} voxels reach at most "
                          f"IoU {self.max_iou:.3f} < iou_min = {self.iou_min}; every pair will fall back", stacklevel=2)
        offsets = (interval_offsets(self.crop1_box_vox, self.crop2_box_vox, self.iou_min, self.iou_max)
                   if crop2_draw == "analytic" and self.iou_min > 0 else None)
        self._offsets = offsets if offsets is not None and len(offsets) else None
        # crop 1 is a uniform patch: the same allowed-centre rule, and its bounded per-volume cache
        self._crop1 = UniformPatchSampler(self.crop1_box_vox, volumes_per_batch=1, patches_per_volume=1,
                                          foreground_only=self.crop1_on_body, region=region)

    @property
    def draws_analytically(self) -> bool:
        """True when crop 2 comes from the interval's offset table (``crop2_draw="analytic"`` and ``iou_min > 0``)."""
        return self._offsets is not None

    # ------------------------------------------------------------------ batch

    def _sample(self, volumes: Sequence[Volume], rng: np.random.Generator) -> PatchBatch:
        c = volumes[0].n_channels  # the same for all (checked by PatchSampler.__call__)
        n_vol = min(self.volumes_per_batch, len(volumes))
        chosen = rng.choice(len(volumes), size=n_vol, replace=False)
        P = self.pairs_per_volume
        patches = np.empty((2 * n_vol * P, c, *self.output_size_vox), dtype=np.float32)
        boxes = np.empty((2 * n_vol * P, 6), dtype=np.int64)
        centres_mm = np.empty((2 * n_vol * P, 3), dtype=np.float64)
        ious, fallbacks = np.empty(n_vol * P), np.empty(n_vol * P, dtype=bool)
        for slot, vi in enumerate(chosen):
            vol = volumes[int(vi)]
            pairs = self.draw_pairs(vol, rng)
            rows = slice(2 * slot * P, 2 * (slot + 1) * P)
            boxes[rows][0::2], boxes[rows][1::2] = pairs.box1, pairs.box2
            patches[rows][0::2] = self._cut(vol, pairs.box1, self.crop1_box_vox)
            patches[rows][1::2] = self._cut(vol, pairs.box2, self.crop2_box_vox)
            centres_mm[rows] = box_centres_mm(vol.affine, boxes[rows])
            ious[slot * P:(slot + 1) * P], fallbacks[slot * P:(slot + 1) * P] = pairs.iou, pairs.fallback
        return PatchBatch(
            patches=torch.from_numpy(patches),
            centres_mm=torch.from_numpy(centres_mm.astype(np.float32)),
            boxes_vox=torch.from_numpy(boxes),
            volume_index=torch.from_numpy(np.repeat(np.arange(n_vol, dtype=np.int64), 2 * P)),
            case_ids=[volumes[int(i)].case_id for i in chosen],
            extras={"pair_iou": torch.from_numpy(ious), "pair_fallback": torch.from_numpy(fallbacks)},
        )

    def _cut(self, vol: Volume, boxes: np.ndarray, box_size: tuple[int, int, int]) -> np.ndarray:
        """``(P, C, *output_size)`` crops of ``boxes`` (all of ``box_size``), resized when the sizes differ."""
        crops = copy_patches(vol.data, boxes, np.empty((len(boxes), vol.n_channels, *box_size), dtype=np.float32))
        if self.spatial_dims == 2:
            crops = crops[..., 0]  # (P, C, Sx, Sy): the slice
        if tuple(crops.shape[2:]) == self.output_size_vox:
            return crops
        # All crops of one kind share a size: one batched interpolation (what MONAI's Resize does per image).
        mode = "trilinear" if self.spatial_dims == 3 else "bilinear"
        return F.interpolate(torch.from_numpy(crops), size=self.output_size_vox, mode=mode,
                             align_corners=False).numpy()

    # ------------------------------------------------------------------ Algorithm 1

    def draw_pairs(self, vol: Volume, rng: np.random.Generator, n_pairs: int | None = None) -> _Pairs:
        """Boxes of ``n_pairs`` (default ``pairs_per_volume``) pairs in ``vol``, vectorised over pairs.

        Every pair runs Algorithm 1 on its own: rounds of (crop 1, ``r1`` crop 2 candidates); a pair
        that found a crop 2 keeps it, the others redraw crop 1 in the next round; after ``r2`` rounds
        the rest return their last candidate pair with ``fallback = True``.
        """
        check_fits(vol, self.patch_size_vox)
        n = self.pairs_per_volume if n_pairs is None else int(n_pairs)
        box1 = np.zeros((n, 6), np.int64)
        box2 = np.zeros((n, 6), np.int64)
        iou = np.zeros(n)
        todo = np.arange(n)
        for _ in range(self.r2):
            b1 = self._draw_crop1(vol, len(todo), rng)  # (T, 6)
            cand = self._crop2_candidates(vol, b1, rng)  # (T, r1, 6)
            cand_iou = box_iou_3d(b1[:, None], cand)  # (T, r1)
            ok = (cand_iou >= self.iou_min) & (cand_iou <= self.iou_max) & _fits(cand, vol.shape_vox)
            pick = np.where(ok.any(axis=1), ok.argmax(axis=1), self.r1 - 1)  # first accepted, else the last
            box1[todo], box2[todo] = b1, cand[np.arange(len(todo)), pick]
            iou[todo] = cand_iou[np.arange(len(todo)), pick]
            todo = todo[~ok.any(axis=1)]
            if len(todo) == 0:
                break
        fallback = np.zeros(n, dtype=bool)
        fallback[todo] = True
        if len(todo) and self.draws_analytically:
            # the last analytic candidate may lie outside the volume: fall back to a random crop 2 that fits
            box2[todo] = self._uniform_crop2(vol, box1[todo], 1, rng)[:, 0]
            iou[todo] = box_iou_3d(box1[todo], box2[todo])
        return _Pairs(box1, box2, iou, fallback)

    def _draw_crop1(self, vol: Volume, n: int, rng: np.random.Generator) -> np.ndarray:
        allowed = self._crop1._allowed_centres(vol)  # flat indices of allowed centre voxels
        picks = allowed[rng.integers(0, allowed.size, size=n)]
        centres = np.stack(np.unravel_index(picks, vol.shape_vox), axis=1).astype(np.int64)
        return boxes_for_centres(centres, self.crop1_box_vox)

    def _crop2_candidates(self, vol: Volume, box1: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``(T, r1, 6)`` crop 2 candidates for each crop 1 ``(T, 6)``."""
        if not self.draws_analytically:
            return self._uniform_crop2(vol, box1, self.r1, rng)
        d = self._offsets[rng.integers(0, len(self._offsets), size=(len(box1), self.r1))]  # (T, r1, 3)
        start = box1[:, None, :3] + d
        return np.concatenate([start, start + np.asarray(self.crop2_box_vox)], axis=-1)

    def _uniform_crop2(self, vol: Volume, box1: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """``(T, k, 6)`` crop 2 boxes uniform over the positions that fit (2D: on crop 1's slice)."""
        window = centre_window(vol.shape_vox, self.crop2_box_vox)
        lo = np.array([w.start for w in window])
        hi = np.array([w.stop for w in window])
        centres = rng.integers(lo, hi, size=(len(box1), k, 3))
        if self.spatial_dims == 2:
            centres[..., 2] = box1[:, None, 2]  # same axial slice as crop 1 (boxes are 1 voxel thick in z)
        return boxes_for_centres(centres.reshape(-1, 3), self.crop2_box_vox).reshape(len(box1), k, 6)


def _fits(boxes: np.ndarray, shape_vox: Sequence[int]) -> np.ndarray:
    """``(...)`` bool: the half-open boxes ``(..., 6)`` lie inside a grid of ``shape_vox``."""
    return np.all(boxes[..., :3] >= 0, axis=-1) & np.all(boxes[..., 3:] <= np.asarray(shape_vox), axis=-1)


def _box_size(size: int | Sequence[int], spatial_dims: int, name: str) -> tuple[int, int, int]:
    """A crop size as the 3D box it occupies (2D crops are one voxel thick in z)."""
    s = as_size(size, name, dims=spatial_dims)
    return (*s, 1) if spatial_dims == 2 else s  # type: ignore[return-value]
