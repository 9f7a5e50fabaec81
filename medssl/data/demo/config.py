"""Settings of the synthetic demo cohort."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

# --------------------------------------------------------------------------- cohort configuration


@dataclass(frozen=True)
class CohortConfig:
    """Settings of the synthetic demo cohort (all recorded in ``cohort.json``).

    The deformation ranges are uniform: rotation about each axis in
    ``+-rotation_deg``, per-axis scaling in ``1 +- scaling``, translation in
    ``+-translation_mm``; elastic control displacements are Gaussian with
    s.d. ``elastic_mm / 2``, clipped to ``+-elastic_mm``.

    Lesions (``lesions_per_subject`` per subject, organ drawn with ``lesion_organ_weights``):
    smooth-edged ellipsoids whose three diameters all lie in ``lesion_diameter_mm``
    (a size uniform in that range, each axis within ``1 +- lesion_axis_ratio`` of it),
    placed wholly inside their organ. Their contrast follows the template, a
    non-contrast CT (liver about 46 HU, spleen 35, kidneys 15-20):

    - liver: hypodense, ``lesion_hypo_delta_hu`` relative to the parenchyma (metastasis-like),
      or, with probability ``liver_hyperdense_share``, hyperdense by ``lesion_hyper_delta_hu``;
    - spleen: hypodense, ``lesion_hypo_delta_hu``;
    - kidneys: simple cysts near water, ``cyst_hu`` (absolute, in the subject's intensity
      calibration), replacing the parenchyma.
    """

    n_subjects: int = 48
    split_counts: tuple[int, int, int] = (32, 8, 8)
    seed: int = 0
    spacing_mm: float = 3.0
    lesions_per_subject: tuple[int, int] = (2, 4)
    rotation_deg: float = 10.0
    scaling: float = 0.10
    translation_mm: float = 10.0
    elastic_control_points: int = 6
    elastic_mm: float = 9.0
    intensity_scale: float = 0.05
    intensity_shift_hu: float = 20.0
    noise_hu: tuple[float, float] = (10.0, 20.0)
    lesion_diameter_mm: tuple[float, float] = (10.0, 30.0)
    lesion_axis_ratio: float = 0.2
    lesion_organs: tuple[str, ...] = ("liver", "spleen", "kidney_left", "kidney_right")
    lesion_organ_weights: tuple[float, ...] = (0.7, 0.2, 0.05, 0.05)
    lesion_hypo_delta_hu: tuple[float, float] = (-60.0, -20.0)
    lesion_hyper_delta_hu: tuple[float, float] = (20.0, 40.0)
    liver_hyperdense_share: float = 0.2
    cyst_hu: tuple[float, float] = (0.0, 15.0)
    lesion_edge: float = 0.15
    background_hu: float = -1024.0
    variability: dict | None = None  # inter-subject variability settings (medssl.data.demo.variability), None: plain

    def __post_init__(self) -> None:
        if self.n_subjects < 3:
            raise ValueError(f"n_subjects must be >= 3 (one per split), got {self.n_subjects}")
        if len(self.split_counts) != 3 or min(self.split_counts) < 0:
            raise ValueError(f"split_counts must be 3 non-negative counts, got {self.split_counts}")
        if not self.spacing_mm > 0:
            raise ValueError(f"spacing_mm must be positive, got {self.spacing_mm}")
        lo, hi = self.lesions_per_subject
        if not 0 <= lo <= hi:
            raise ValueError(f"lesions_per_subject must be (lo, hi) with 0 <= lo <= hi, got {self.lesions_per_subject}")
        d_lo, d_hi = self.lesion_diameter_mm
        if not 0 < d_lo <= d_hi:
            raise ValueError(f"lesion_diameter_mm must be (lo, hi) with 0 < lo <= hi, got {self.lesion_diameter_mm}")
        if len(self.lesion_organ_weights) != len(self.lesion_organs) or min(self.lesion_organ_weights, default=0) < 0:
            raise ValueError(f"lesion_organ_weights must give one non-negative weight per organ of lesion_organs "
                             f"{self.lesion_organs}, got {self.lesion_organ_weights}")
        for name in ("lesion_hypo_delta_hu", "lesion_hyper_delta_hu", "cyst_hu"):
            a, b = getattr(self, name)
            if a > b:
                raise ValueError(f"{name} must be (lo, hi) with lo <= hi, got {(a, b)}")

    def subject_splits(self) -> list[str]:
        """Split of each subject in order. Counts not summing to ``n_subjects`` are scaled (val/test >= 1)."""
        train, val, test = self.split_counts
        total = train + val + test
        if total != self.n_subjects:
            val = max(1, round(self.n_subjects * val / max(total, 1)))
            test = max(1, round(self.n_subjects * test / max(total, 1)))
            train = self.n_subjects - val - test
        return ["train"] * train + ["val"] * val + ["test"] * test

    def to_json(self) -> dict:
        data = json.loads(json.dumps(asdict(self)))
        if data.get("variability") is None:  # a plain cohort's record stays what it was before the field existed
            data.pop("variability", None)
        return data


def _config_from_json(data: dict) -> CohortConfig:
    return CohortConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
