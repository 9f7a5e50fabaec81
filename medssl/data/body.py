"""Body masks from image intensity: where the patient is, whatever a label map marks.

A label map is a *target* (a lesion, a tumour, a set of organs), not the body: on
autoPET, BraTS or MSD the label covers well under 1 % of the voxels. Every rule in
medssl that needs "somewhere on the patient" (training patch centres with
``foreground_only``, uniform evaluation sets, dense maps, the foreground crop) uses the
body mask defined here, and label maps are read only for the target a task names.

The rule, per modality (``modality="auto"`` decides from the intensities):

- **CT** (Hounsfield units): voxels above -500 HU (between air at -1000 and fat at
  about -100), the usual body/air threshold.
- **MR, PET and anything else** (arbitrary units): voxels above Otsu's threshold of the
  intensity histogram (the threshold that best separates the dark background from the
  brighter body).

Then, for both: one binary opening (3x3x3) to detach thin things such as the CT table
or MR ghosting, the largest connected component (6-connectivity), and holes filled in
3D and in every axial slice (lungs and bowel gas are inside the body even where they
open to the edge of the field of view). The mask is computed on the *raw* intensities
during preprocessing (before any scaling) and cached with the volume as
``Volume.aux["body"]``; :func:`body_mask` returns it, or recomputes it for a volume
that was not preprocessed by medssl.
"""

from __future__ import annotations

import numpy as np

from medssl.data.errors import EmptyForegroundError
from medssl.data.volume import Volume

__all__ = ["BODY_KEY", "CT_BODY_THRESHOLD_HU", "MODALITIES", "body_mask", "body_mask_from_intensity", "detect_modality",
           "otsu_threshold"]

BODY_KEY = "body"
CT_BODY_THRESHOLD_HU = -500.0
MODALITIES = ("auto", "ct", "mr", "pet", "other")
# "auto" calls an image CT when its 1st percentile is below this (air in HU is about -1000;
# MR/PET intensities are >= 0 up to noise).
_CT_DETECT_P1_HU = -500.0


def detect_modality(image: np.ndarray) -> str:
    """``"ct"`` if the intensities look like Hounsfield units (1st percentile < -500), else ``"other"``.

    ``image``: ``(C, X, Y, Z)`` or ``(X, Y, Z)`` raw intensities; the first channel decides.
    """
    x = np.asarray(image)
    first = x[0] if x.ndim == 4 else x
    return "ct" if float(np.percentile(first, 1.0)) < _CT_DETECT_P1_HU else "other"


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximal between-class variance) of ``values`` over a ``bins``-bin histogram.

    Written here (a few lines of numpy) because scikit-image, which has it, is not a
    dependency of medssl. Returns the upper edge of the best lower class.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("otsu_threshold needs at least one finite value")
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    p = counts / counts.sum()
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(p)  # weight of the lower class when split after bin k
    m0 = np.cumsum(p * centres)  # its unnormalised mean
    mt = m0[-1]
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return float(edges[int(np.argmax(between)) + 1])


def body_mask_from_intensity(
    image: np.ndarray,
    modality: str = "auto",
    threshold: float | None = None,
    source: object = "image",
) -> np.ndarray:
    """``(X, Y, Z)`` bool body mask of raw intensities ``image`` ``(C, X, Y, Z)`` (module docstring rule).

    Args:
        image: raw intensities (HU for CT); the first channel is used.
        modality: ``"auto"``, ``"ct"``, ``"mr"``, ``"pet"`` or ``"other"``.
        threshold: overrides the modality's threshold (same units as ``image``).
        source: names the file in errors.

    Raises:
        EmptyForegroundError: nothing is above the threshold.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    x = np.asarray(image)
    first = np.asarray(x[0] if x.ndim == 4 else x, dtype=np.float32)
    if threshold is None:
        kind = detect_modality(first) if modality == "auto" else modality
        threshold = CT_BODY_THRESHOLD_HU if kind == "ct" else otsu_threshold(first)
    mask = first > threshold
    if not mask.any():
        raise EmptyForegroundError(
            source, f"no body voxels: nothing in the image is above {threshold:g} (modality {modality!r}); "
            "the image may be empty or constant"
        )
    from scipy import ndimage  # here, not at import: samplers (and so the method registry) import this module

    opened = ndimage.binary_opening(mask, structure=np.ones((3, 3, 3), bool))
    if opened.any():  # a tiny object survives no opening: keep the unopened mask then
        mask = opened
    mask = _largest_component(mask)
    mask = ndimage.binary_fill_holes(mask)
    for z in range(mask.shape[2]):  # axial slices: holes open to the top/bottom of the field of view
        mask[:, :, z] = ndimage.binary_fill_holes(mask[:, :, z])
    return mask


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def body_mask(volume: Volume) -> np.ndarray:
    """``(X, Y, Z)`` bool: the volume's body mask.

    The cached mask (``volume.aux["body"]``, computed on raw intensities while
    preprocessing) when present; otherwise computed now from ``volume.data`` with the
    modality detected from its intensities (for data already scaled to [-1, 1] that is
    Otsu's threshold).
    """
    if BODY_KEY in volume.aux:
        mask = np.asarray(volume.aux[BODY_KEY]) > 0
        if mask.shape != volume.shape_vox:
            raise EmptyForegroundError(
                volume.source or volume.case_id,
                f"body mask shape {mask.shape} differs from the image shape {volume.shape_vox}",
            )
        return mask
    return body_mask_from_intensity(volume.data, "auto", source=volume.source or volume.case_id)
