"""Voxel <-> world geometry, boxes and plane axes (pure numpy).

Conventions used everywhere in medssl:

- An affine is a ``(4, 4)`` matrix mapping a voxel index ``(i, j, k)`` to world
  millimetres (RAS+): ``xyz_mm = affine @ [i, j, k, 1]``. Voxel centres sit at
  integer indices.
- A box is half-open in voxels, ``[x0, y0, z0, x1, y1, z1)``: it holds the
  voxels ``x0 .. x1 - 1`` (and likewise for y, z). Its geometric centre is
  ``(x0 + x1 - 1) / 2`` (a half-integer for even sizes); that is what
  ``centres_mm`` of every patch means.
- **The centre-voxel rule** (one rule for every sampler, evaluation set and dense
  grid): a patch of size ``S`` "at" integer voxel ``c`` is the box starting at
  ``c - S // 2``, so ``c`` is the box's middle voxel for odd ``S`` and the upper of
  the two middle voxels for even ``S`` (:func:`box_start_for_centre`,
  :func:`centre_voxel_of_box`). Foreground tests and labels look at ``c``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "as_size",
    "vox_to_world",
    "world_to_vox",
    "spacing_from_affine",
    "crop_affine",
    "box_centres_vox",
    "box_centres_mm",
    "box_iou_3d",
    "plane_axes",
    "check_affine",
    "box_start_for_centre",
    "centre_voxel_of_box",
    "boxes_for_centres",
    "centre_window",
    "moment_alignment",
    "apply_affine_mm",
]

# Smallest voxel size (mm) we accept as non-zero; real scanners are >= 0.01 mm.
_MIN_SPACING_MM = 1e-6
# |det| of the column-normalised rotation part below this means the axes are (nearly) parallel.
_MIN_NORMALISED_DET = 1e-6


def _points(points: ArrayLike, name: str) -> np.ndarray:
    """``(3,)`` or ``(N, 3)`` -> ``(N, 3)`` float64."""
    p = np.asarray(points, dtype=np.float64)
    if p.ndim == 1:
        p = p[None, :]
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3) or (3,), got {np.shape(points)}")
    return p


def _affine(affine: ArrayLike) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine must have shape (4, 4), got {a.shape}")
    return a


def vox_to_world(affine: ArrayLike, ijk: ArrayLike) -> np.ndarray:
    """Voxel indices -> world millimetres.

    Args:
        affine: ``(4, 4)`` voxel -> world mm.
        ijk: ``(N, 3)`` or ``(3,)`` voxel indices (may be fractional).

    Returns:
        ``(N, 3)`` float64 world coordinates in mm.
    """
    a = _affine(affine)
    return _points(ijk, "ijk") @ a[:3, :3].T + a[:3, 3]


def world_to_vox(affine: ArrayLike, xyz_mm: ArrayLike) -> np.ndarray:
    """World millimetres -> (fractional) voxel indices, the inverse of :func:`vox_to_world`.

    Args:
        affine: ``(4, 4)`` voxel -> world mm.
        xyz_mm: ``(N, 3)`` or ``(3,)`` world coordinates in mm.

    Returns:
        ``(N, 3)`` float64 voxel indices (not rounded).
    """
    a = _affine(affine)
    # Solve rather than invert: better conditioned for strongly anisotropic grids.
    return np.linalg.solve(a[:3, :3], (_points(xyz_mm, "xyz_mm") - a[:3, 3]).T).T


def spacing_from_affine(affine: ArrayLike) -> np.ndarray:
    """Voxel size along each array axis in mm, shape ``(3,)``: the norms of the affine's first three columns."""
    return np.linalg.norm(_affine(affine)[:3, :3], axis=0)


def crop_affine(affine: ArrayLike, start_vox: ArrayLike) -> np.ndarray:
    """Affine of the sub-grid whose voxel 0 is voxel ``start_vox`` of the original grid.

    Cropping keeps direction and spacing; only the origin moves, to the world
    position of ``start_vox``. Returns a new ``(4, 4)`` float64 array.
    """
    a = _affine(affine).copy()
    a[:3, 3] = vox_to_world(a, np.asarray(start_vox, dtype=np.float64).reshape(3))[0]
    return a


def _boxes(boxes: ArrayLike, name: str) -> np.ndarray:
    b = np.asarray(boxes)
    if b.shape[-1:] != (6,):
        raise ValueError(f"{name} must have shape (..., 6) as [x0, y0, z0, x1, y1, z1), got {b.shape}")
    if np.any(b[..., 3:] < b[..., :3]):
        raise ValueError(f"{name} has boxes with x1 < x0 (or y/z); boxes are half-open [x0, y0, z0, x1, y1, z1)")
    return b


def box_centres_vox(boxes_vox: ArrayLike) -> np.ndarray:
    """Centre voxel index of half-open boxes: ``(x0 + x1 - 1) / 2`` per axis.

    Args:
        boxes_vox: ``(..., 6)`` as ``[x0, y0, z0, x1, y1, z1)``.

    Returns:
        ``(..., 3)`` float64 (half-integers for even box sizes).
    """
    b = _boxes(boxes_vox, "boxes_vox").astype(np.float64)
    return (b[..., :3] + b[..., 3:] - 1.0) / 2.0


def box_start_for_centre(centres_vox: ArrayLike, size_vox: ArrayLike) -> np.ndarray:
    """Start voxel of the box of ``size_vox`` whose centre voxel is ``centres_vox``: ``c - S // 2``.

    ``centres_vox``: ``(..., 3)`` integer voxel indices; ``size_vox``: 3 ints (broadcast).
    Returns int64 of the same shape.
    """
    c = np.asarray(centres_vox, dtype=np.int64)
    return c - np.asarray(size_vox, dtype=np.int64) // 2


def centre_voxel_of_box(start_vox: ArrayLike, size_vox: ArrayLike) -> np.ndarray:
    """Inverse of :func:`box_start_for_centre`: the centre voxel ``start + S // 2`` (int64)."""
    return np.asarray(start_vox, dtype=np.int64) + np.asarray(size_vox, dtype=np.int64) // 2


def boxes_for_centres(centres_vox: ArrayLike, size_vox: ArrayLike) -> np.ndarray:
    """Half-open boxes ``(N, 6)`` of ``size_vox`` around centre voxels ``(N, 3)`` (the centre-voxel rule)."""
    start = box_start_for_centre(centres_vox, size_vox).reshape(-1, 3)
    return np.concatenate([start, start + np.asarray(size_vox, dtype=np.int64)], axis=1)


def centre_window(shape_vox: ArrayLike, size_vox: ArrayLike) -> tuple[slice, slice, slice]:
    """Slices of the voxel grid whose voxels can be centres of a box that fits entirely inside.

    Along an axis of ``n`` voxels a box of size ``S`` fits for centres ``S // 2 .. n - S + S // 2``;
    an empty slice when ``S > n``. ``mask[centre_window(shape, size)]`` is the mask of valid centres.
    """
    shape = np.asarray(shape_vox, dtype=np.int64)
    size = np.asarray(size_vox, dtype=np.int64)
    lo = size // 2
    hi = shape - size + size // 2 + 1  # exclusive
    return tuple(slice(int(a), int(max(a, b))) for a, b in zip(lo, hi))  # type: ignore[return-value]


def box_centres_mm(affine: ArrayLike, boxes_vox: ArrayLike) -> np.ndarray:
    """World mm of the centres of half-open voxel boxes ``(N, 6)`` -> ``(N, 3)`` float64."""
    centres = box_centres_vox(boxes_vox)
    return vox_to_world(affine, centres.reshape(-1, 3)).reshape(centres.shape)


def box_iou_3d(boxes_a: ArrayLike, boxes_b: ArrayLike) -> np.ndarray:
    """Elementwise intersection-over-union of axis-aligned half-open voxel boxes.

    Args:
        boxes_a: ``(..., 6)`` boxes ``[x0, y0, z0, x1, y1, z1)``.
        boxes_b: ``(..., 6)``, broadcastable against ``boxes_a`` (use
            ``a[:, None]`` and ``b[None]`` for the pairwise ``(N, M)`` matrix).

    Returns:
        ``(...)`` float64 IoU in ``[0, 1]``; 0 where both boxes are empty.
    """
    a = _boxes(boxes_a, "boxes_a").astype(np.float64)
    b = _boxes(boxes_b, "boxes_b").astype(np.float64)
    overlap = np.clip(np.minimum(a[..., 3:], b[..., 3:]) - np.maximum(a[..., :3], b[..., :3]), 0.0, None)
    inter = np.prod(overlap, axis=-1)
    union = np.prod(a[..., 3:] - a[..., :3], axis=-1) + np.prod(b[..., 3:] - b[..., :3], axis=-1) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def plane_axes(normal_axis: int) -> tuple[tuple[int, int], int]:
    """The two in-plane array axes (in increasing order) for a plane normal to ``normal_axis``.

    For the 2.5D context patches of Blendowski et al. (2019): normal 0 -> plane
    axes ``(1, 2)``; normal 1 -> ``(0, 2)``; normal 2 -> ``(0, 1)``. Axes index
    the spatial array axes ``(X, Y, Z)``.

    Returns:
        ``((in_plane_axis_a, in_plane_axis_b), normal_axis)``.
    """
    if isinstance(normal_axis, bool) or int(normal_axis) != normal_axis or normal_axis not in (0, 1, 2):
        raise ValueError(f"normal_axis must be 0, 1 or 2, got {normal_axis!r}")
    n = int(normal_axis)
    a, b = (ax for ax in (0, 1, 2) if ax != n)
    return (a, b), n


def check_affine(affine: ArrayLike) -> None:
    """Raise ``ValueError`` saying what is wrong if ``affine`` is not a usable voxel -> world map.

    Checks: shape (4, 4); all entries finite; last row ``[0, 0, 0, 1]``; every
    voxel size (column norm) > 0; columns linearly independent (non-singular).
    A negative diagonal is fine (a flipped axis).
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine must have shape (4, 4), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"affine has non-finite (NaN/Inf) entries:\n{a}")
    if not np.allclose(a[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"affine's last row must be [0, 0, 0, 1], got {a[3].tolist()}")
    spacing = spacing_from_affine(a)
    if np.any(spacing < _MIN_SPACING_MM):
        axes = [int(i) for i in np.flatnonzero(spacing < _MIN_SPACING_MM)]
        raise ValueError(f"zero voxel spacing along array axis {axes} (spacing {spacing.tolist()} mm)")
    normalised_det = np.linalg.det(a[:3, :3] / spacing)
    if abs(normalised_det) < _MIN_NORMALISED_DET:
        raise ValueError(
            "affine is singular (its voxel axes are parallel, "
            f"det of the direction matrix = {normalised_det:.3g}):\n{a}"
        )


def moment_alignment(points_a_mm: ArrayLike, points_b_mm: ArrayLike) -> np.ndarray:
    """A ``(4, 4)`` world-mm map that aligns point cloud A with point cloud B by their moments.

    Translation plus a scaling along each world axis: ``x_b = mu_b + (sigma_b / sigma_a) * (x_a - mu_a)``,
    with ``mu``/``sigma`` the mean and standard deviation of each cloud along x, y, z (e.g. the
    voxels of two body masks). No rotation: scans in medssl are RAS-oriented, and a rotation
    from second moments is ambiguous (axis signs and order) for near-symmetric bodies. This is
    the "aligned identity" shortcut of the evaluations: what plain body size and position
    explain, without any image content.
    """
    a, b = _points(points_a_mm, "points_a_mm"), _points(points_b_mm, "points_b_mm")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("moment_alignment needs at least 2 points in each cloud")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    sd_a, sd_b = a.std(axis=0), b.std(axis=0)
    scale = np.divide(sd_b, sd_a, out=np.ones(3), where=sd_a > 0)
    out = np.eye(4)
    out[:3, :3] = np.diag(scale)
    out[:3, 3] = mu_b - scale * mu_a
    return out


def apply_affine_mm(transform: ArrayLike, points_mm: ArrayLike) -> np.ndarray:
    """``(N, 3)`` points mapped by a ``(4, 4)`` mm -> mm transform."""
    t = _affine(transform)
    return _points(points_mm, "points_mm") @ t[:3, :3].T + t[:3, 3]


def as_size(size_vox: int | Sequence[int], name: str = "patch_size_vox", dims: int = 3) -> tuple[int, ...]:
    """A patch (crop, box) size as ``dims`` positive ints: one int means a cube (a square for ``dims=2``).

    The one place a size is normalised; ``name`` is the setting named in the error.
    """
    if np.isscalar(size_vox):
        size = (int(size_vox),) * dims  # type: ignore[arg-type]
    else:
        size = tuple(int(s) for s in size_vox)  # type: ignore[union-attr]
    if len(size) != dims or min(size) < 1:
        raise ValueError(f"{name} must be a positive int or {dims} positive ints, got {size_vox!r}")
    return size
