"""Where patches may go: the one "does a patch fit" check and the one foreground rule.

Every sampler (training batches, evaluation sets, dense grids) asks these two questions
here and nowhere else:

- :func:`check_fits`: is the volume at least as large as the patch? (a named error if not)
- :func:`foreground_mask`: which voxels count as foreground? The **body**
  (:func:`medssl.data.body.body_mask`, from intensity), unless the caller names a map
  explicitly (``region="label"`` or an aux key such as ``"lesion"``). A label map is a
  target, not the body: on lesion datasets it covers well under 1 % of the voxels.
- :func:`valid_centres`: the centre voxels (centre-voxel rule of :mod:`medssl.geometry`)
  whose box fits inside the volume and, optionally, lies on a mask.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from medssl.data.body import BODY_KEY, body_mask
from medssl.data.errors import EmptyForegroundError, LabelGridMismatchError, TooSmallError
from medssl.data.volume import Volume
from medssl.geometry import centre_window

__all__ = ["check_fits", "foreground_mask", "valid_centres", "BODY"]

BODY = BODY_KEY


def check_fits(volume: Volume, size_vox: Sequence[int]) -> None:
    """Raise :class:`TooSmallError` naming the volume when a ``size_vox`` box does not fit inside it."""
    if any(s < p for s, p in zip(volume.shape_vox, size_vox)):
        raise TooSmallError(
            volume.source or volume.case_id,
            f"volume shape {volume.shape_vox} is smaller than the patch size {tuple(size_vox)}; "
            "choose a smaller patch or a finer target spacing",
        )


def foreground_mask(volume: Volume, region: str = BODY) -> np.ndarray:
    """``(X, Y, Z)`` bool: where a patch centre may go.

    Args:
        volume: the volume.
        region: ``"body"`` (default: the body mask, cached as ``aux["body"]`` or computed
            from intensity), ``"label"`` (``volume.label > 0``, only when a task asks for
            it), or the key of an aux map (its voxels > 0).
    """
    name = volume.source or volume.case_id
    if region == BODY:
        mask = body_mask(volume)
    elif region == "label":
        if volume.label is None:
            raise EmptyForegroundError(name, "region='label' but the volume has no label map")
        mask = np.asarray(volume.label) > 0
    elif region in volume.aux:
        mask = np.asarray(volume.aux[region]) > 0
    else:
        raise EmptyForegroundError(name, f"region {region!r} is neither 'body', 'label' nor one of its maps "
                                         f"{sorted(volume.aux)}")
    if mask.shape != volume.shape_vox:
        raise LabelGridMismatchError(name, f"{region} map shape {mask.shape} differs from image shape {volume.shape_vox}")
    return mask


def valid_centres(volume: Volume, size_vox: Sequence[int], mask: np.ndarray | None = None) -> np.ndarray:
    """``(X, Y, Z)`` bool: centre voxels whose ``size_vox`` box lies inside the volume (and on ``mask``).

    Raises:
        TooSmallError: the box fits nowhere.
        EmptyForegroundError: it fits, but no allowed centre lies on ``mask``.
    """
    check_fits(volume, size_vox)
    out = np.zeros(volume.shape_vox, dtype=bool)
    window = centre_window(volume.shape_vox, size_vox)
    out[window] = True if mask is None else np.asarray(mask, dtype=bool)[window]
    if mask is not None and not out.any():
        raise EmptyForegroundError(
            volume.source or volume.case_id,
            f"no foreground voxel can be a patch centre with patch size {tuple(size_vox)} "
            f"(volume shape {volume.shape_vox}, foreground voxels in the whole volume: {int(np.count_nonzero(mask))})",
        )
    return out
