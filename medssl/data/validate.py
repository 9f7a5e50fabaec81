"""Checks that turn bad volumes into clear :mod:`medssl.data.errors`.

``io`` and ``preprocess`` call the helpers at their boundaries; a dataset scan
calls :func:`validate_volume` (or just ``read_volume`` + ``preprocess``) and
collects the :class:`~medssl.data.errors.MedsslDataError` of every bad file.
Every error names the file (``path``) and says what is wrong with it.
"""

from __future__ import annotations

from typing import Sequence

import nibabel as nib
import numpy as np

from medssl.data.errors import (
    DimensionalityError,
    GeometryError,
    LabelGridMismatchError,
    NonFiniteVoxelsError,
    TooSmallError,
)
from medssl.data.limits import check_world_bounds
from medssl.data.volume import Volume
from medssl.geometry import check_affine, vox_to_world

__all__ = [
    "MAX_CHANNELS",
    "GRID_TOLERANCE_MM",
    "channels_first",
    "check_geometry",
    "check_finite",
    "check_same_grid",
    "check_min_shape",
    "validate_volume",
]

# A 4th axis this short is read as channels (e.g. multi-contrast MR); longer ones are time series.
MAX_CHANNELS = 4
# Two grids are "the same" if every grid corner lands within this distance in world mm.
GRID_TOLERANCE_MM = 1e-3


def _fmt_affine(affine: np.ndarray) -> str:
    return np.array2string(np.asarray(affine, dtype=np.float64), precision=4, suppress_small=True)


def channels_first(path: object, array: np.ndarray) -> np.ndarray:
    """``(X, Y, Z)`` or ``(X, Y, Z, C)`` -> ``(C, X, Y, Z)`` (a view when possible).

    Trailing singleton axes beyond the third are dropped first (NIfTI stores a
    vector image as ``(X, Y, Z, 1, C)``). Raises :class:`DimensionalityError` for
    2D images (fewer than 3 axes, or a spatial axis of length 1: a single slice)
    and for 4D+ images whose extra axis holds more than ``MAX_CHANNELS`` entries
    or that have more than one extra axis.
    """
    shape = tuple(int(s) for s in array.shape)
    squeezed = array.reshape(shape[:3] + tuple(s for s in shape[3:] if s != 1)) if len(shape) > 3 else array
    if squeezed.ndim < 3 or min(squeezed.shape[:3]) <= 1:
        raise DimensionalityError(
            path, f"image is 2D (shape {shape}); medssl needs 3D volumes with at least 2 voxels along each axis"
        )
    if squeezed.ndim == 3:
        return squeezed[None]
    if squeezed.ndim == 4 and squeezed.shape[3] <= MAX_CHANNELS:
        return np.moveaxis(squeezed, 3, 0)
    raise DimensionalityError(
        path,
        f"image is {squeezed.ndim}D (shape {shape}); medssl reads 3D volumes, or 4D with at most "
        f"{MAX_CHANNELS} channels on the last axis (time series and higher dimensions are not supported; "
        "split them into 3D files)",
    )


def check_geometry(path: object, affine: np.ndarray, shape_vox: Sequence[int] | None = None) -> np.ndarray:
    """Return ``affine`` as float64 ``(4, 4)``; raise :class:`GeometryError` if it is not usable.

    Zero or NaN spacing, non-finite entries and singular matrices are rejected; with
    ``shape_vox``, so are voxels and grid corners beyond :mod:`medssl.data.limits`.
    """
    try:
        check_affine(affine)
    except ValueError as exc:
        raise GeometryError(path, f"broken geometry: {exc}") from None
    if shape_vox is not None:
        check_world_bounds(path, affine, shape_vox)
    return np.asarray(affine, dtype=np.float64)


def check_finite(path: object, array: np.ndarray, what: str = "image") -> None:
    """Raise :class:`NonFiniteVoxelsError` saying how many voxels of ``array`` are NaN or Inf."""
    if not np.issubdtype(array.dtype, np.floating):
        return  # integer arrays cannot hold NaN/Inf
    bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if bad:
        n_nan = int(np.count_nonzero(np.isnan(array)))
        raise NonFiniteVoxelsError(
            path,
            f"{what} has {bad} non-finite voxel(s) of {array.size} ({n_nan} NaN, {bad - n_nan} Inf); "
            "fix or mask them before using the file",
        )


def _corners_vox(shape_vox: Sequence[int]) -> np.ndarray:
    """``(8, 3)`` voxel indices of the grid's corner voxel centres."""
    hi = np.asarray(shape_vox, dtype=np.float64) - 1.0
    return np.array([[x, y, z] for x in (0.0, hi[0]) for y in (0.0, hi[1]) for z in (0.0, hi[2])])


def _grid_gap_mm(affine_a: np.ndarray, affine_b: np.ndarray, shape_vox: Sequence[int]) -> float:
    """Largest world distance (mm) between the two affines' images of the grid's corner voxels."""
    corners = _corners_vox(shape_vox)
    return float(np.max(np.linalg.norm(vox_to_world(affine_a, corners) - vox_to_world(affine_b, corners), axis=1)))


def _same_voxels_reordered(label_affine: np.ndarray, image_affine: np.ndarray, shape_vox, atol_mm: float) -> bool:
    """True if the label grid is the image grid with axes flipped/permuted (same voxel centres)."""
    try:
        ornt = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(label_affine), nib.orientations.io_orientation(image_affine)
        )
        permuted_shape = [int(shape_vox[int(i)]) for i in np.argsort(ornt[:, 0])]
        reordered = np.asarray(label_affine) @ nib.orientations.inv_ornt_aff(ornt, shape_vox)
        return permuted_shape == list(shape_vox) and _grid_gap_mm(reordered, image_affine, shape_vox) <= atol_mm
    except Exception:  # only a hint: never mask the real error
        return False


def check_same_grid(
    label_path: object,
    label_shape: Sequence[int],
    label_affine: np.ndarray,
    image_path: object,
    image_shape: Sequence[int],
    image_affine: np.ndarray,
    *,
    what: str = "label",
    atol_mm: float = GRID_TOLERANCE_MM,
) -> None:
    """Raise :class:`LabelGridMismatchError` (naming ``label_path``) unless the label lies on the image's grid.

    Same grid means equal spatial shape and every grid corner at the same world
    position within ``atol_mm`` (a physical tolerance, so it does not grow
    with the number of voxels the way an elementwise affine tolerance would).
    """
    label_shape = tuple(int(s) for s in label_shape)
    image_shape = tuple(int(s) for s in image_shape)
    if label_shape != image_shape:
        raise LabelGridMismatchError(
            label_path,
            f"{what} shape {label_shape} differs from image shape {image_shape} (image: {image_path}); "
            "labels must be on the image's voxel grid",
        )
    gap_mm = _grid_gap_mm(label_affine, image_affine, image_shape)
    if not gap_mm <= atol_mm:  # also catches NaN
        hint = ""
        if _same_voxels_reordered(label_affine, image_affine, image_shape, atol_mm):
            hint = (
                f"\nThe {what} covers the same voxels with its axes flipped/permuted (as some DICOM -> NIfTI "
                "converters write them): reorient it to the image's axis order and save it again."
            )
        raise LabelGridMismatchError(
            label_path,
            f"{what} affine differs from the image's (image: {image_path}) by up to {gap_mm:.4g} mm "
            f"(tolerance {atol_mm} mm) although both have shape {image_shape};\n"
            f"{what} affine:\n{_fmt_affine(label_affine)}\nimage affine:\n{_fmt_affine(image_affine)}{hint}",
        )


def check_min_shape(path: object, shape_vox: Sequence[int], min_shape_vox: Sequence[int] | None) -> None:
    """Raise :class:`TooSmallError` if ``shape_vox`` is smaller than ``min_shape_vox`` along any axis."""
    if min_shape_vox is None:
        return
    shape = tuple(int(s) for s in shape_vox)
    required = tuple(int(s) for s in min_shape_vox)
    if len(required) != 3:
        raise ValueError(f"min_shape_vox must have 3 entries, got {min_shape_vox!r}")
    if any(s < r for s, r in zip(shape, required)):
        axes = [ax for ax, (s, r) in enumerate(zip(shape, required)) if s < r]
        raise TooSmallError(
            path,
            f"volume shape {shape} voxels is smaller than the required {required} along axis {axes}; "
            "use a finer target spacing, a smaller patch size or a larger crop margin",
        )


def validate_volume(volume: Volume, *, min_shape_vox: Sequence[int] | None = None) -> None:
    """Run every check on an in-memory :class:`Volume`; raise the first problem found.

    Checks: data is ``(C, X, Y, Z)`` with C <= ``MAX_CHANNELS`` and no spatial
    axis of length 1; the affine is a usable geometry; no NaN/Inf voxels; the
    label and aux maps have the image's spatial shape; the spatial shape is at
    least ``min_shape_vox``.
    """
    path = volume.source or volume.case_id
    data = np.asarray(volume.data)
    if data.ndim != 4 or data.shape[0] > MAX_CHANNELS or data.shape[0] < 1 or min(data.shape[1:]) <= 1:
        raise DimensionalityError(
            path,
            f"volume data must be (C, X, Y, Z) with 1 <= C <= {MAX_CHANNELS} and 3D spatial axes, got {data.shape}",
        )
    check_geometry(path, volume.affine, volume.shape_vox)
    check_finite(path, data)
    maps = ([("label", volume.label)] if volume.label is not None else []) + [
        (f"aux map '{name}'", arr) for name, arr in volume.aux.items()
    ]
    for what, arr in maps:
        if tuple(arr.shape) != volume.shape_vox:
            raise LabelGridMismatchError(
                path, f"{what} shape {tuple(arr.shape)} differs from image shape {volume.shape_vox}"
            )
    check_min_shape(path, volume.shape_vox, min_shape_vox)
