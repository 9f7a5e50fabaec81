"""Context-prediction samplers (Blendowski, Nickisch, Heinrich, MICCAI 2019) and 2.5D patch cutting.

**Planar (2.5D) patches.** For orientation ``o`` the patch's normal is array axis ``o`` and its two
in-plane axes are ``geometry.plane_axes(o)`` (``(1, 2)``, ``(0, 2)``, ``(0, 1)``); on the RAS-oriented
grids medssl caches, ``o = 0, 1, 2`` are the sagittal, coronal and axial planes. That one helper fixes
the tensor layout of every planar patch, the partner's shift and the regression target alike:

- patch ``(C * n_slices, S, S)``: channel ``c * n_slices + k`` is image channel ``c`` at slice ``k``
  along the normal (increasing index); tensor axis -2 runs along the first in-plane axis, axis -1
  along the second;
- offset target ``(Delta1, Delta2)``: the partner's shift along the first and second in-plane axis.

The authors' code mixed these up for two of the three axes (their "through-plane" offset moved the
patch in-plane), so Reg2D and Heatmap were trained on different targets;
``tests/sampling/test_context.py`` proves, on an oblique anisotropic grid, that a shift in world mm
appears as the intended ``(Delta1, Delta2)`` and moves the patch content along the intended tensor axes.

**Units: the paper's, through the patch half-width.** Blendowski et al. normalise every image axis to
``[-1, 1]``; their planar patch has side 0.8 there (half-width 0.4). medssl cuts patches of ``S x S``
in-plane voxels by ``n_slices`` adjacent slices **of the cached grid** (isotropic in medssl: the demo's
3 mm grid makes the paper's 42 x 42 x 3 patch 126 x 126 x 9 mm, close to the paper's "approx.
117 x 97 x 9 mm"; the authors sized patches in normalised image coordinates, so their physical patch
differed per axis) and expresses every offset in **patch half-widths** (``S / 2`` voxels along that
axis: 21 voxels = 63 mm on the demo grid). One of the paper's image units is 2.5 half-widths, so:

=======================================  ===================  ===========================================
the paper (image units, axis [-1, 1])    half-widths          demo grid (S = 42 at 3 mm)
=======================================  ===================  ===========================================
in-plane offsets, start: +-[0.25, 0.3]   +-[0.625, 0.75]      +-[13, 16] voxels = +-[39, 48] mm
in-plane offsets, end: +-[0, 0.7]        +-[0, 1.75]          +-[0, 37] voxels = +-[0, 111] mm
normal displacement 0.125 - 0.25         0.3125 - 0.625       7 - 13 voxels = 21 - 39 mm (slabs of 3)
heatmap grid i/9 in [-1, 1]              +-2.5                +-52.5 voxels = +-158 mm
anchor centres in [-0.5, 0.5] per axis   the central half of each axis (module text below)
=======================================  ===================  ===========================================

The normal displacement is at least ``n_slices`` voxels, so the partner slab never overlaps the
anchor's. The target is the offset actually applied after rounding the shift to whole voxels, so
targets are exact.

**Anchors** are uniform in the **central half of each axis** (the paper's rule, for the 2.5D pairs and
the Doersch cubes alike): of the body's bounding box when ``foreground_only`` (the paper's images were
crops around the body; medssl's demo volumes are too, so there it is the array's central half), and on
the body itself. That is about 12.5 % of a demo volume (``anchor_eligible_share`` in every batch). A
volume whose central half holds no body voxel uses its whole body instead; the batch says so per row
(``anchor_fallback``), and the methods log the rate. Anchors are drawn from **every** volume of the pool
(the authors' sampling reached only the first 8 of 63 volumes). Partners are **not** restricted: where
one leaves the image, its content there is the per-channel minimum (the background), as in every
evaluation cut (:mod:`medssl.sampling.patches`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from medssl.data.npy import readable
from medssl.data.volume import Volume
from medssl.geometry import box_centres_mm, boxes_for_centres, plane_axes
from medssl.sampling.base import PatchBatch, PatchSampler
from medssl.sampling.patches import extract_patches, padding_values
from medssl.sampling.regions import BODY, foreground_mask, valid_centres

__all__ = [
    "NORMAL_GAP_HW",
    "OFFSET_END_HW",
    "OFFSET_START_HW",
    "ORIENTATIONS",
    "ContextPairSampler",
    "NeighbourPairSampler",
    "PointInputSampler",
    "central_half",
    "curriculum_range",
    "neighbour_direction",
    "planar_patches",
    "point_values",
    "triplanar_patches",
]

# Orientation o has its normal along array axis o (RAS grids: x, y, z).
ORIENTATIONS = ("sagittal", "coronal", "axial")
_MAX_CACHED_VOLUMES = 100_000  # bound on cached centre tables (one per volume)


# ---------------------------------------------------------------------------- cutting


def _gather(data: np.ndarray, coords: Sequence[np.ndarray], fill: np.ndarray | None) -> np.ndarray:
    """``(C, *shape)`` float32 values of ``data (C, X, Y, Z)`` at integer voxel coordinates.

    ``coords``: three small int arrays broadcastable to ``shape`` (one per array axis; each varies along
    its own output axes only). Outside the image the value is ``fill`` (default: the per-channel
    minimum). One flat ``take`` per channel over a broadcast index, no Python loop over points; the
    inside test runs on the small per-axis arrays, and the full-size mask only when a point is outside.
    """
    arr = readable(data)  # a LazyNpy's map: only the gathered pages are read, not a copy of the volume
    spatial = arr.shape[1:]
    strides = (spatial[1] * spatial[2], spatial[2], 1)
    index_type = np.int32 if arr[0].size < np.iinfo(np.int32).max else np.int64
    coords = [np.asarray(c, dtype=np.int64) for c in coords]
    inside_axis = [(c >= 0) & (c < n) for c, n in zip(coords, spatial)]
    outside = not all(m.all() for m in inside_axis)
    flat = sum((np.clip(c, 0, n - 1) * st).astype(index_type) for c, n, st in zip(coords, spatial, strides))
    out = arr.reshape(arr.shape[0], -1)[:, flat].astype(np.float32, copy=False)  # (C, *shape)
    if outside:
        inside = inside_axis[0] & inside_axis[1] & inside_axis[2]
        values = padding_values(arr) if fill is None else np.asarray(fill, dtype=np.float32)
        out = np.where(inside, out, values.reshape(-1, *([1] * flat.ndim)))
    return out


def planar_patches(data: np.ndarray, centres_vox: np.ndarray, normal_axis: int, size_vox: int,
                   n_slices: int = 3, fill: np.ndarray | None = None) -> np.ndarray:
    """``(N, C * n_slices, S, S)`` float32 planar patches of ``data (C, X, Y, Z)`` around centre voxels ``(N, 3)``.

    The patch at centre voxel ``c`` holds slices ``c_n + k - n_slices // 2`` (``k = 0 .. n_slices - 1``)
    along the normal and voxels ``c_a + i - S // 2`` along each in-plane axis (the centre-voxel rule of
    :mod:`medssl.geometry`); layout in the module docstring. Padded with ``fill`` (default: the
    per-channel minimum) outside the image.
    """
    (a, b), n = plane_axes(normal_axis)
    centres = np.asarray(centres_vox, dtype=np.int64).reshape(-1, 3)
    size = int(size_vox)
    along = {n: np.arange(n_slices) - n_slices // 2, a: np.arange(size) - size // 2, b: np.arange(size) - size // 2}
    out_dim = {n: 1, a: 2, b: 3}  # output (N, slice, first in-plane axis, second in-plane axis)
    coords = []
    for axis in range(3):
        shape = [len(centres), 1, 1, 1]
        shape[out_dim[axis]] = len(along[axis])
        coords.append((centres[:, axis, None] + along[axis][None, :]).reshape(shape))
    values = _gather(data, coords, fill)  # (C, N, n_slices, S, S)
    return np.ascontiguousarray(np.moveaxis(values, 0, 1)).reshape(len(centres), -1, size, size)


def triplanar_patches(data: np.ndarray, centres_vox: np.ndarray, size_vox: int, n_slices: int = 3,
                      fill: np.ndarray | None = None) -> np.ndarray:
    """``(N, 3, C * n_slices, S, S)``: the three orthogonal planar patches around each centre voxel.

    ``out[:, o]`` is :func:`planar_patches` with normal axis ``o``: the input of the 2.5D descriptor.
    """
    arr = readable(data)  # a LazyNpy's map: not a copy of the volume per call
    fill = padding_values(data) if fill is None else fill
    return np.stack([planar_patches(arr, centres_vox, o, size_vox, n_slices, fill) for o in range(3)], axis=1)


def point_values(data: np.ndarray, centres_vox: np.ndarray, offsets_vox: np.ndarray,
                 fill: np.ndarray | None = None) -> np.ndarray:
    """``(N, C, K)`` float32 intensities at ``centre + offset`` for ``K`` voxel offsets ``(K, 3)``; outside the image
    ``fill`` (default: the per-channel minimum)."""
    centres = np.asarray(centres_vox, dtype=np.int64).reshape(-1, 3)
    offsets = np.asarray(offsets_vox, dtype=np.int64).reshape(-1, 3)
    values = _gather(data, [centres[:, k, None] + offsets[None, :, k] for k in range(3)], fill)  # (C, N, K)
    return np.ascontiguousarray(np.moveaxis(values, 0, 1))


# ---------------------------------------------------------------------------- the curriculum


# The paper's curriculum and normal displacement in patch half-widths (module docstring: image units x 2.5).
OFFSET_START_HW = (0.625, 0.75)
OFFSET_END_HW = (0.0, 1.75)
NORMAL_GAP_HW = (0.3125, 0.625)


def curriculum_range(progress: float, start: Sequence[float] = OFFSET_START_HW,
                     end: Sequence[float] = OFFSET_END_HW) -> tuple[float, float]:
    """``(lo, hi)``: in-plane offset magnitudes at training ``progress`` in ``[0, 1]`` (clipped).

    Blendowski et al. draw each offset uniformly from ``+-[0.25, 0.3]`` image units at the start, widening
    to ``+-[0, 0.7]`` at the end, i.e. ``+-[0.625, 0.75]`` to ``+-[0, 1.75]`` patch half-widths (the
    defaults); medssl interpolates both bounds linearly in progress. Units: patch half-widths.
    """
    p = float(np.clip(progress, 0.0, 1.0))
    return start[0] + p * (end[0] - start[0]), start[1] + p * (end[1] - start[1])


# ---------------------------------------------------------------------------- anchor centres


def central_half(vol: Volume, mask: np.ndarray | None) -> np.ndarray:
    """``(X, Y, Z)`` bool: voxels whose centre lies in the central half of each axis (the paper's ``[-0.5, 0.5]^3``).

    The axes are those of ``mask``'s bounding box when a mask is given (the body: the paper's images were
    crops around it), else of the whole array. A box of ``L`` voxels from ``lo`` spans ``[lo, lo + L)``;
    voxel ``i`` (centre ``i + 0.5``) is central when ``lo + L / 4 <= i + 0.5 <= lo + 3 L / 4``.
    """
    shape = np.asarray(vol.shape_vox)
    if mask is not None and np.any(mask):
        idx = np.nonzero(mask)
        lo = np.array([i.min() for i in idx])
        length = np.array([i.max() for i in idx]) - lo + 1
    else:
        lo, length = np.zeros(3, dtype=np.int64), shape
    first = np.ceil(lo + length / 4 - 0.5).astype(np.int64)
    last = np.floor(lo + 3 * length / 4 - 0.5).astype(np.int64)
    out = np.zeros(vol.shape_vox, dtype=bool)
    out[tuple(slice(max(f, 0), min(t, n - 1) + 1) for f, t, n in zip(first, last, shape))] = True
    return out


class _CentreTable:
    """Allowed anchor centre voxels of each volume (flat indices), computed once per volume.

    ``foreground_only``: on the body (or ``region``). ``central``: and in the central half of each axis
    (:func:`central_half`). A volume where the two do not meet uses its whole body: a **fallback**, which
    :meth:`info` reports so the samplers can put it into the batch (and the methods into the log).
    """

    def __init__(self, foreground_only: bool, region: str, central: bool = False) -> None:
        self.foreground_only, self.region, self.central = foreground_only, region, central
        self._cache: dict[tuple, tuple[np.ndarray, float, bool]] = {}

    def draw(self, vol: Volume, n: int, rng: np.random.Generator) -> np.ndarray:
        """``(n, 3)`` int64 centre voxels, uniform over the allowed ones."""
        flat = self._allowed(vol)[0]
        picks = flat[rng.integers(0, flat.size, size=n)]
        return np.stack(np.unravel_index(picks, vol.shape_vox), axis=1).astype(np.int64)

    def info(self, vol: Volume) -> tuple[float, bool]:
        """``(eligible share, fallback)``: the share of the volume's voxels that may be an anchor under the
        rule (0 when the rule left none), and whether the volume fell back to its whole body."""
        _, share, fallback = self._allowed(vol)
        return share, fallback

    def _allowed(self, vol: Volume) -> tuple[np.ndarray, float, bool]:
        key = (vol.case_id, id(vol.data), vol.shape_vox)
        if key not in self._cache:
            mask = foreground_mask(vol, self.region) if self.foreground_only else None
            allowed = valid_centres(vol, (1, 1, 1), mask)  # raises EmptyForegroundError on an empty mask
            fallback = False
            if self.central:
                central = allowed & central_half(vol, mask)
                fallback = not central.any()
                allowed = allowed if fallback else central
            share = 0.0 if fallback else float(np.count_nonzero(allowed)) / allowed.size
            if len(self._cache) >= _MAX_CACHED_VOLUMES:
                self._cache.clear()
            self._cache[key] = (np.flatnonzero(allowed), share, fallback)
        return self._cache[key]

    def batch_info(self, vol: Volume, n: int) -> dict[str, np.ndarray]:
        """The per-row extras of ``n`` anchors from ``vol``: ``anchor_eligible_share`` and ``anchor_fallback``."""
        share, fallback = self.info(vol)
        return {"anchor_eligible_share": np.full(n, share, dtype=np.float32),
                "anchor_fallback": np.full(n, fallback, dtype=bool)}


def _choose_volumes(volumes: Sequence[Volume], volumes_per_batch: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the batch's volumes: a uniform draw without replacement from the WHOLE pool."""
    return rng.choice(len(volumes), size=min(volumes_per_batch, len(volumes)), replace=False)


# ---------------------------------------------------------------------------- 2.5D pairs


class ContextPairSampler(PatchSampler):
    """Anchor and partner planar patches for all three orientations (Reg2D and Heatmap).

    For each anchor centre voxel (uniform in the central half of each axis, on the body; module
    docstring), ``patches_per_volume`` from each of up to ``volumes_per_batch`` volumes, and each
    orientation ``o``: the partner is the planar patch moved along the normal by ``Delta0`` (uniform in
    ``normal_gap_hw`` half-widths, at least ``n_slices`` voxels so the slabs never overlap, random sign)
    and in-plane by ``(Delta1, Delta2)``, each drawn uniformly from ``+-[lo, hi]`` = :func:`curriculum_range`
    at ``progress``, in patch half-widths. Partners are padded with the background where they leave the
    image.

    ``sampler(volumes, rng, progress=1.0) -> PatchBatch`` with

    - ``patches``: ``(N, 3, C * n_slices, S, S)`` anchors (:func:`triplanar_patches`, the 2.5D
      descriptor's input at the anchor centre);
    - ``centres_mm``/``boxes_vox``: world mm and voxel box of the anchor's bounding cube ``S^3``;
    - ``extras["partners"]``: ``(N, 3, C * n_slices, S, S)``, orientation ``o``'s partner in ``[:, o]``;
    - ``extras["offsets"]``: ``(N, 3, 2)`` float32 realised ``(Delta1, Delta2)`` in half-widths;
    - ``extras["half_width_mm"]``: ``(N, 3, 2)`` the half-width along each in-plane axis in mm;
    - ``extras["normal_shift_mm"]``: ``(N, 3)`` signed ``Delta0`` in mm;
    - ``extras["partner_centres_mm"]``: ``(N, 3, 3)`` world mm of each partner's bounding-cube centre
      (same convention as ``centres_mm``, so differences are the exact shift);
    - ``extras["anchor_eligible_share"]`` ``(N,)`` and ``extras["anchor_fallback"]`` ``(N,)`` bool: the
      anchor rule's share of the row's volume and whether that volume fell back to its whole body.
    """

    def __init__(
        self,
        size_vox: int = 42,
        n_slices: int = 3,
        volumes_per_batch: int = 8,
        patches_per_volume: int = 1,
        normal_gap_hw: Sequence[float] = NORMAL_GAP_HW,
        offset_start: Sequence[float] = OFFSET_START_HW,
        offset_end: Sequence[float] = OFFSET_END_HW,
        foreground_only: bool = True,
        region: str = BODY,
    ) -> None:
        # A volume needs room for the anchor slab and, along each axis, a disjoint one (partners are padded).
        super().__init__(3 * int(n_slices))
        if int(size_vox) < 2 or int(n_slices) < 1 or min(volumes_per_batch, patches_per_volume) < 1:
            raise ValueError(f"need size_vox >= 2, n_slices >= 1 and positive batch sizes; got size_vox={size_vox}, "
                             f"n_slices={n_slices}, volumes_per_batch={volumes_per_batch}, "
                             f"patches_per_volume={patches_per_volume}")
        if not 0 < normal_gap_hw[0] <= normal_gap_hw[1]:
            raise ValueError(f"normal_gap_hw must be (lo, hi) with 0 < lo <= hi, got {tuple(normal_gap_hw)}")
        for name, (lo, hi) in (("offset_start", offset_start), ("offset_end", offset_end)):
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be (lo, hi) with 0 <= lo <= hi half-widths, got {(lo, hi)}")
        self.size_vox, self.n_slices = int(size_vox), int(n_slices)
        self.volumes_per_batch, self.patches_per_volume = int(volumes_per_batch), int(patches_per_volume)
        self.normal_gap_hw = (float(normal_gap_hw[0]), float(normal_gap_hw[1]))
        self.offset_start, self.offset_end = tuple(offset_start), tuple(offset_end)
        self._centres = _CentreTable(foreground_only, region, central=True)
        self._progress = 1.0

    @property
    def half_width_vox(self) -> float:
        """The unit of every offset: half the patch side, ``S / 2`` voxels."""
        return self.size_vox / 2.0

    def __call__(self, volumes: Sequence[Volume], rng: np.random.Generator, progress: float = 1.0) -> PatchBatch:
        """Validate (the base class), then draw with the curriculum at ``progress`` in ``[0, 1]``."""
        self._progress = float(progress)
        return super().__call__(volumes, rng)

    def _sample(self, volumes: Sequence[Volume], rng: np.random.Generator) -> PatchBatch:
        chosen = _choose_volumes(volumes, self.volumes_per_batch, rng)
        lo, hi = curriculum_range(self._progress, self.offset_start, self.offset_end)
        parts = [self._pairs(volumes[int(vi)], rng, lo, hi) for vi in chosen]
        P = self.patches_per_volume
        cat = lambda key: torch.from_numpy(np.concatenate([p[key] for p in parts]))  # noqa: E731
        return PatchBatch(
            patches=cat("anchors"),
            centres_mm=cat("centres_mm"),
            boxes_vox=cat("boxes_vox"),
            volume_index=torch.from_numpy(np.repeat(np.arange(len(chosen), dtype=np.int64), P)),
            case_ids=[volumes[int(i)].case_id for i in chosen],
            extras={k: cat(k) for k in ("partners", "offsets", "half_width_mm", "normal_shift_mm", "partner_centres_mm",
                                        "anchor_eligible_share", "anchor_fallback")},
        )

    def _pairs(self, vol: Volume, rng: np.random.Generator, lo: float, hi: float) -> dict[str, np.ndarray]:
        P, S, ns = self.patches_per_volume, self.size_vox, self.n_slices
        spacing = vol.spacing_mm
        centres = self._centres.draw(vol, P, rng)  # (P, 3)
        cube = (S, S, S)
        partner_c = np.empty((P, 3, 3), dtype=np.int64)
        offsets = np.empty((P, 3, 2), dtype=np.float32)
        half_width_mm = np.empty((P, 3, 2), dtype=np.float32)
        normal_shift_mm = np.empty((P, 3), dtype=np.float32)
        for o in range(3):
            (a, b), n = plane_axes(o)
            shift = np.zeros((P, 3), dtype=np.int64)
            shift[:, n] = self._normal_shift(P, rng)
            magnitude = rng.uniform(lo, hi, size=(P, 2))
            sign = np.where(rng.random((P, 2)) < 0.5, -1.0, 1.0)
            in_plane = np.rint(sign * magnitude * self.half_width_vox).astype(np.int64)  # (P, 2) voxels
            shift[:, a], shift[:, b] = in_plane[:, 0], in_plane[:, 1]
            partner_c[:, o] = centres + shift
            offsets[:, o] = in_plane / self.half_width_vox  # the realised target, exact
            half_width_mm[:, o] = self.half_width_vox * spacing[[a, b]]
            normal_shift_mm[:, o] = shift[:, n] * spacing[n]
        fill = padding_values(vol.data)
        boxes = boxes_for_centres(centres, cube)
        partner_boxes = boxes_for_centres(partner_c.reshape(-1, 3), cube)
        return {
            "anchors": triplanar_patches(vol.data, centres, S, ns, fill),
            "partners": np.stack([planar_patches(vol.data, partner_c[:, o], o, S, ns, fill) for o in range(3)], axis=1),
            "centres_mm": box_centres_mm(vol.affine, boxes).astype(np.float32),
            "boxes_vox": boxes,
            "offsets": offsets,
            "half_width_mm": half_width_mm,
            "normal_shift_mm": normal_shift_mm,
            "partner_centres_mm": box_centres_mm(vol.affine, partner_boxes).reshape(P, 3, 3).astype(np.float32),
            **self._centres.batch_info(vol, P),
        }

    def _normal_shift(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``(n,)`` signed ``Delta0`` in voxels: ``normal_gap_hw`` half-widths, at least ``n_slices``, random sign."""
        gap = np.rint(rng.uniform(*self.normal_gap_hw, size=n) * self.half_width_vox).astype(np.int64)
        gap = np.maximum(gap, self.n_slices)  # disjoint slabs
        return np.where(rng.random(n) < 0.5, -gap, gap)


# ---------------------------------------------------------------------------- 3D Doersch pairs


def neighbour_direction(label: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(array axis, sign)`` of a 6-neighbour class: class ``2 * axis`` is ``-axis``, ``2 * axis + 1`` is ``+axis``."""
    label = np.asarray(label)
    return label // 2, np.where(label % 2 == 1, 1, -1)


class NeighbourPairSampler(PatchSampler):
    """An anchor cube and one of its 6 face neighbours, with jitter (3D extension of Doersch et al.).

    The partner's centre moves along array axis ``k`` by ``+-(S + gap + j)`` voxels and along the two
    other axes by ``j'``, with ``j, j'`` uniform integers in ``+-jitter`` (Blendowski et al.: jitter
    "to avoid e.g. line continuation hints"). ``gap >= jitter``, so the cubes never overlap. Gap and
    jitter are given in mm and converted with each axis's spacing. The class label is
    ``2 * k + (1 if the move is towards +k else 0)`` (:func:`neighbour_direction`), uniform over the 6.

    Anchor centres are uniform in the central half of each axis, on the body (the paper's rule, as for
    the 2.5D pairs; module docstring); neighbours that leave the image are padded with the background.
    (medssl first required all 6 neighbours inside, which left 0.9-1.7 % of a demo volume against the
    paper's 12.5 %.) ``extras["anchor_eligible_share"]`` and ``extras["anchor_fallback"]`` say per row how
    much of its volume the rule allowed and whether the volume fell back to its whole body.

    ``sampler(volumes, rng) -> PatchBatch`` with ``patches (N, C, S, S, S)`` anchors,
    ``extras["partners"]`` of the same shape, ``extras["labels"] (N,)`` int64 and
    ``extras["partner_centres_mm"] (N, 3)``.

    The batch holds ``2 N`` distinct cubes (anchors and partners): :attr:`cubes_per_pair`.
    """

    cubes_per_pair = 2

    def __init__(self, size_vox: int = 25, volumes_per_batch: int = 8, patches_per_volume: int = 1,
                 gap_mm: float = 6.0, jitter_mm: float = 6.0, foreground_only: bool = True, region: str = BODY) -> None:
        super().__init__(size_vox)
        if gap_mm < 0 or jitter_mm < 0 or min(volumes_per_batch, patches_per_volume) < 1:
            raise ValueError(f"need gap_mm >= 0, jitter_mm >= 0 and positive batch sizes; got {gap_mm}, {jitter_mm}, "
                             f"{volumes_per_batch}, {patches_per_volume}")
        self.size_vox = int(size_vox)
        self.volumes_per_batch, self.patches_per_volume = int(volumes_per_batch), int(patches_per_volume)
        self.gap_mm, self.jitter_mm = float(gap_mm), float(jitter_mm)
        self._centres = _CentreTable(foreground_only, region, central=True)

    def _gap_jitter_vox(self, vol: Volume) -> tuple[np.ndarray, np.ndarray]:
        jitter = np.rint(self.jitter_mm / vol.spacing_mm).astype(np.int64)
        return np.maximum(np.rint(self.gap_mm / vol.spacing_mm).astype(np.int64), jitter), jitter

    def _sample(self, volumes: Sequence[Volume], rng: np.random.Generator) -> PatchBatch:
        chosen = _choose_volumes(volumes, self.volumes_per_batch, rng)
        parts = [self._pairs(volumes[int(vi)], rng) for vi in chosen]
        cat = lambda key: torch.from_numpy(np.concatenate([p[key] for p in parts]))  # noqa: E731
        return PatchBatch(
            patches=cat("anchors"),
            centres_mm=cat("centres_mm"),
            boxes_vox=cat("boxes_vox"),
            volume_index=torch.from_numpy(np.repeat(np.arange(len(chosen), dtype=np.int64), self.patches_per_volume)),
            case_ids=[volumes[int(i)].case_id for i in chosen],
            extras={k: cat(k) for k in ("partners", "labels", "partner_centres_mm", "anchor_eligible_share",
                                        "anchor_fallback")},
        )

    def _pairs(self, vol: Volume, rng: np.random.Generator) -> dict[str, np.ndarray]:
        P, S = self.patches_per_volume, self.size_vox
        gap, jitter = self._gap_jitter_vox(vol)
        centres = self._centres.draw(vol, P, rng)
        labels = rng.integers(0, 6, size=P)
        axis, sign = neighbour_direction(labels)
        move = rng.integers(-jitter, jitter + 1, size=(P, 3))  # jitter on every axis
        rows = np.arange(P)
        move[rows, axis] += sign * (S + gap[axis])
        partner_c = centres + move
        boxes = boxes_for_centres(centres, (S, S, S))
        return {
            "anchors": extract_patches(vol.data, centres, (S, S, S)),
            "partners": extract_patches(vol.data, partner_c, (S, S, S)),
            "labels": labels.astype(np.int64),
            "centres_mm": box_centres_mm(vol.affine, boxes).astype(np.float32),
            "boxes_vox": boxes,
            "partner_centres_mm": box_centres_mm(vol.affine, boxes_for_centres(partner_c, (S, S, S))).astype(np.float32),
            **self._centres.batch_info(vol, P),
        }


# ---------------------------------------------------------------------------- plain inputs


class PointInputSampler(PatchSampler):
    """Centre voxels on the body with a method's own input cut there (the untrained baselines' val batches).

    ``cut(data, centres_vox) -> (P, ...)`` is the method's ``cut_inputs``; ``patches`` holds what it
    returns, ``centres_mm``/``boxes_vox`` refer to the bounding cube ``input_size_vox``.
    """

    def __init__(self, cut: Callable[[np.ndarray, np.ndarray], np.ndarray], input_size_vox: Sequence[int],
                 volumes_per_batch: int, patches_per_volume: int, foreground_only: bool = True, region: str = BODY) -> None:
        super().__init__(1)  # inputs are padded outside the image: any volume will do
        self.cut, self.input_size_vox = cut, tuple(int(s) for s in input_size_vox)
        self.volumes_per_batch, self.patches_per_volume = int(volumes_per_batch), int(patches_per_volume)
        self._centres = _CentreTable(foreground_only, region)

    def _sample(self, volumes: Sequence[Volume], rng: np.random.Generator) -> PatchBatch:
        chosen = _choose_volumes(volumes, self.volumes_per_batch, rng)
        centres = [self._centres.draw(volumes[int(vi)], self.patches_per_volume, rng) for vi in chosen]
        boxes = [boxes_for_centres(c, self.input_size_vox) for c in centres]
        return PatchBatch(
            patches=torch.from_numpy(np.concatenate([self.cut(volumes[int(vi)].data, c) for vi, c in zip(chosen, centres)])),
            centres_mm=torch.from_numpy(np.concatenate(
                [box_centres_mm(volumes[int(vi)].affine, bx) for vi, bx in zip(chosen, boxes)]).astype(np.float32)),
            boxes_vox=torch.from_numpy(np.concatenate(boxes)),
            volume_index=torch.from_numpy(np.repeat(np.arange(len(chosen), dtype=np.int64), self.patches_per_volume)),
            case_ids=[volumes[int(i)].case_id for i in chosen],
        )
