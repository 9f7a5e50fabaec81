"""Segmentation scores: foreground-only, per-volume 3D Dice and surface Dice, both from MONAI.

Every downstream segmentation protocol (kNN label transfer, fine-tuning) scores label
maps here. Label maps are *organ codes*: ``0`` = background (everything that is not one
of the organs), ``i`` = the i-th organ of an :class:`OrganSet`.

- **Dice**: MONAI ``DiceMetric(include_background=False, reduction="none", ignore_empty=False)``
  on the one-hot maps of one volume: one score per organ and volume, computed over the whole
  3D volume. An organ **predicted where the truth has none scores 0** (a false positive is an
  error, not a missing value); an organ absent from both maps is not scored (NaN, skipped by
  the mean over organs; MONAI would give it 1, which flatters a method on every absent organ).
  Background is never scored.
- **False-positive volume**: ``fp_ml``, the organ's predicted voxels outside the true organ, in
  mL (needs ``spacing_mm``); an organ absent from the truth contributes its whole predicted
  volume, which the segmentation tables report as ``absent_fp_ml``.
- **Surface Dice** (normalised surface distance, NSD): MONAI ``SurfaceDiceMetric`` with a
  tolerance in mm and the volume's voxel spacing: the fraction of both surfaces lying within
  the tolerance of the other.

The seeds' code did otherwise: the thesis counted background as a
class and averaged Dice over 2D slices, which inflates the score (background is easy, and
slices without an organ count as perfect). medssl does neither.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

__all__ = ["DEFAULT_ORGANS", "OrganSet", "organ_set", "segmentation_scores"]

# Blendowski et al. (MICCAI 2019), Table 2: the six structures, as the demo cohort's labels name them.
DEFAULT_ORGANS = ("liver", "spleen", "kidney_left", "kidney_right", "iliopsoas_left", "iliopsoas_right")


@dataclass(frozen=True)
class OrganSet:
    """The organs a segmentation is scored on, and how a dataset's label ids map to organ codes.

    Attributes:
        names: organ names, code ``i + 1`` for ``names[i]`` (code 0 = background).
        label_ids: the dataset's label id of each organ (same order as ``names``).
    """

    names: tuple[str, ...]
    label_ids: tuple[int, ...]

    @property
    def n_classes(self) -> int:
        """Organs plus background."""
        return len(self.names) + 1

    def encode(self, label_map: np.ndarray) -> np.ndarray:
        """``(X, Y, Z)`` organ codes (uint8) of a dataset label map; every other label becomes 0."""
        lut_size = max(int(np.max(label_map, initial=0)), max(self.label_ids, default=0)) + 1
        lut = np.zeros(lut_size, dtype=np.uint8)
        for code, lid in enumerate(self.label_ids, start=1):
            lut[lid] = code
        lab = np.asarray(label_map)
        if lab.size and int(lab.min()) < 0:
            raise ValueError(f"label maps must hold non-negative ids, got minimum {int(lab.min())}")
        return lut[lab.astype(np.int64, copy=False)]


def organ_set(label_names: Mapping[int, str] | None, organs: Sequence[str] | None = None) -> OrganSet:
    """The :class:`OrganSet` of ``organs`` (default :data:`DEFAULT_ORGANS`) in a dataset's ``{id: name}``.

    ``organs=[]`` or ``None`` with a dataset lacking any default organ raises; to score every
    label of a dataset pass ``organs=list(label_names.values())``.
    """
    if not label_names:
        raise ValueError("the dataset has no label names: pass a label map with names (e.g. dataset.json labels)")
    wanted = list(organs) if organs else list(DEFAULT_ORGANS)
    by_name = {str(v).lower(): int(k) for k, v in label_names.items()}
    missing = [o for o in wanted if o.lower() not in by_name]
    if missing:
        raise ValueError(f"organs {missing} are not among the dataset's labels: {sorted(by_name)}")
    if len(set(o.lower() for o in wanted)) != len(wanted):
        raise ValueError(f"organs must be distinct, got {wanted}")
    return OrganSet(names=tuple(wanted), label_ids=tuple(by_name[o.lower()] for o in wanted))


def segmentation_scores(
    pred_codes: np.ndarray | torch.Tensor,
    true_codes: np.ndarray | torch.Tensor,
    organs: Sequence[str],
    spacing_mm: Sequence[float] | None = None,
    surface_tolerance_mm: float | None = None,
) -> pd.DataFrame:
    """Per-organ scores of one predicted label map against the truth (same grid).

    Both maps are first cropped to the bounding box of every voxel that is an organ in
    either map: Dice and surface Dice only count organ voxels and surfaces, so the crop
    changes no score and saves time on large volumes.

    Args:
        pred_codes, true_codes: ``(X, Y, Z)`` organ codes (0 = background, ``i + 1`` = ``organs[i]``).
        organs: organ names, in code order.
        spacing_mm: voxel size per array axis (needed for the surface Dice).
        surface_tolerance_mm: compute MONAI's surface Dice at this tolerance (None: skip it).

    Returns:
        One row per organ: ``organ, dice`` [``, nsd``], ``true_voxels``, ``pred_voxels``, ``fp_ml``.
        ``dice`` and ``nsd`` are 0 for an organ predicted but absent from the truth, or present
        in the truth but never predicted, and NaN for an organ absent from both. ``fp_ml``
        (predicted organ voxels outside the true organ, mL) is NaN without ``spacing_mm``.
    """
    n_classes = len(organs) + 1
    pred, true = _codes_tensor(pred_codes, n_classes), _codes_tensor(true_codes, n_classes)
    if pred.shape != true.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and truth {tuple(true.shape)} are on different grids")
    pred, true = _crop_to_organs(pred, true)
    true_voxels = torch.bincount(true.reshape(-1), minlength=n_classes)[1:].numpy()
    pred_voxels = torch.bincount(pred.reshape(-1), minlength=n_classes)[1:].numpy()
    hit_voxels = torch.bincount(pred[pred == true].reshape(-1), minlength=n_classes)[1:].numpy()
    # Dice from the three voxel counts above: MONAI's DiceMetric gives the same numbers (the test compares
    # them) but recomputed the counts per class and took a third of a kNN row's scoring time. An organ
    # absent from both maps is NaN (not scored); absent from one of them, 0.
    total = (true_voxels + pred_voxels).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(total > 0, 2.0 * hit_voxels / total, np.nan)
    voxel_ml = float(np.prod(np.asarray(spacing_mm, dtype=np.float64))) / 1000.0 if spacing_mm is not None else np.nan
    out = pd.DataFrame({"organ": list(organs), "dice": dice, "true_voxels": true_voxels, "pred_voxels": pred_voxels,
                        "fp_ml": (pred_voxels - hit_voxels) * voxel_ml})
    if surface_tolerance_mm is not None:
        if spacing_mm is None:
            raise ValueError("the surface Dice needs spacing_mm")
        out["nsd"] = [
            _surface_dice(pred == code, true == code, spacing_mm, surface_tolerance_mm, int(tv), int(pv))
            for code, tv, pv in zip(range(1, n_classes), true_voxels, pred_voxels)
        ]
    return out


def _codes_tensor(codes: np.ndarray | torch.Tensor, n_classes: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(codes) if not torch.is_tensor(codes) else codes).long()
    if t.ndim != 3:
        raise ValueError(f"label maps must be 3D (X, Y, Z), got shape {tuple(t.shape)}")
    if t.numel() and (int(t.max()) >= n_classes or int(t.min()) < 0):
        raise ValueError(f"organ codes must lie in [0, {n_classes - 1}], got [{int(t.min())}, {int(t.max())}]")
    return t


def _crop_to_organs(pred: torch.Tensor, true: torch.Tensor, margin: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps cropped to the bounding box (plus ``margin`` background voxels) of organ voxels in either."""
    any_organ = (pred > 0) | (true > 0)
    if not bool(any_organ.any()):
        return pred[:1, :1, :1], true[:1, :1, :1]
    sl = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = torch.nonzero(any_organ.any(dim=other[1]).any(dim=other[0]))[:, 0]
        sl.append(slice(max(int(idx[0]) - margin, 0), int(idx[-1]) + 1 + margin))
    return pred[tuple(sl)], true[tuple(sl)]


def _surface_dice(pred: torch.Tensor, true: torch.Tensor, spacing_mm: Sequence[float], tolerance_mm: float,
                  true_voxels: int, pred_voxels: int) -> float:
    """MONAI's surface Dice of one organ (binary maps); the empty cases are decided here.

    MONAI warns and computes distances to an empty surface (slowly) when a map is empty;
    those cases have plain answers, as for Dice: absent from both -> NaN (not scored), absent
    from one of them -> 0.
    """
    from monai.metrics import SurfaceDiceMetric

    if true_voxels == 0 and pred_voxels == 0:
        return float("nan")
    if true_voxels == 0 or pred_voxels == 0:
        return 0.0
    import warnings

    p, t = _crop_to_organs(pred.long(), true.long())
    one_hot = [torch.stack([1 - m, m])[None] for m in (p, t)]  # (1, 2, *S): background, organ
    nsd = SurfaceDiceMetric(class_thresholds=[float(tolerance_mm)], include_background=False, reduction="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # a deprecated argument inside MONAI's own call chain
        return float(nsd(one_hot[0], one_hot[1], spacing=[float(s) for s in spacing_mm])[0, 0])
