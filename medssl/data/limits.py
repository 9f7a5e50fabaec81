"""Bounds checked before anything is allocated, so a hostile or broken header gets a named error.

A 4 KB NIfTI header may claim 2048^3 voxels, a voxel size of 1e6 mm or an origin at
1e30 mm. Readers and the resampler ask these functions first and raise
:class:`~medssl.data.errors.GeometryError` or :class:`~medssl.data.errors.TooLargeError`
naming the file; a dataset scan then goes on with the other files.

- Voxel size at most :data:`MAX_SPACING_MM` (no medical image has 10 cm voxels).
- Every grid corner within :data:`MAX_WORLD_MM` of the scanner origin (100 m: real
  scanners report table positions of a few metres; 1e30 mm leaves float64 no precision
  for a millimetre).
- The memory one volume may need: ``MEDSSL_MAX_VOLUME_BYTES`` (bytes) if set, else half the
  machine's RAM, at most 16 GiB.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from medssl.data.errors import GeometryError, SettingError, TooLargeError

__all__ = ["MAX_SPACING_MM", "MAX_WORLD_MM", "max_volume_bytes", "check_world_bounds", "check_memory"]

MAX_SPACING_MM = 100.0
MAX_WORLD_MM = 1e5
_DEFAULT_CAP_BYTES = 16 * 2**30


def max_volume_bytes() -> int:
    """The memory bound for one volume (``MEDSSL_MAX_VOLUME_BYTES``, else min(RAM / 2, 16 GiB)).

    Raises:
        SettingError: ``MEDSSL_MAX_VOLUME_BYTES`` is not a positive, finite number of bytes.
    """
    env = os.environ.get("MEDSSL_MAX_VOLUME_BYTES", "").strip()
    if env:
        try:
            value = float(env)
        except ValueError:
            value = float("nan")
        if not (np.isfinite(value) and value >= 1):
            raise SettingError(
                f"MEDSSL_MAX_VOLUME_BYTES must be a positive number of bytes (e.g. 8e9 for 8 GB), got {env!r}; "
                "unset it for the default (half the RAM, at most 16 GiB)"
            )
        return int(value)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # not POSIX
        return _DEFAULT_CAP_BYTES
    return int(min(ram // 2, _DEFAULT_CAP_BYTES))


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.3g} GiB"


def check_memory(path: object, n_bytes: float, what: str) -> None:
    """Raise :class:`TooLargeError` if ``what`` would need more than :func:`max_volume_bytes`."""
    limit = max_volume_bytes()
    if not np.isfinite(n_bytes) or n_bytes > limit:
        raise TooLargeError(
            path,
            f"{what} would need {_gib(n_bytes)} of memory, more than the bound of {_gib(limit)} per volume; "
            "if the file really is this large, raise MEDSSL_MAX_VOLUME_BYTES (bytes)",
        )


def check_world_bounds(path: object, affine: np.ndarray, shape_vox: Sequence[int]) -> None:
    """Raise :class:`GeometryError` for voxel sizes above :data:`MAX_SPACING_MM` or corners beyond :data:`MAX_WORLD_MM`.

    ``affine`` must already be finite and non-singular (``validate.check_geometry``).
    """
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.max(spacing) > MAX_SPACING_MM:
        raise GeometryError(
            path,
            f"broken geometry: voxel size {np.round(spacing, 6).tolist()} mm; voxels larger than "
            f"{MAX_SPACING_MM:g} mm are not a medical image (a wrong unit or a corrupt header?)",
        )
    hi = np.maximum(np.asarray(shape_vox[:3], dtype=np.float64) - 1.0, 0.0)
    corners = np.array([[x, y, z] for x in (0.0, hi[0]) for y in (0.0, hi[1]) for z in (0.0, hi[2])])
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    far = float(np.max(np.abs(world)))
    if not far <= MAX_WORLD_MM:
        raise GeometryError(
            path,
            f"broken geometry: the grid reaches {far:.4g} mm from the scanner origin (origin "
            f"{np.round(affine[:3, 3], 3).tolist()} mm); more than {MAX_WORLD_MM:g} mm is not a real scanner position",
        )
