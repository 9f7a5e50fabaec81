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
    """

    n_subjects: int = 48
    split_counts: tuple[int, int, int] = (32, 8, 8)
    seed: int = 0
    spacing_mm: float = 3.0
    lesions_per_subject: tuple[int, int] = (1, 3)
    rotation_deg: float = 10.0
    scaling: float = 0.10
    translation_mm: float = 10.0
    elastic_control_points: int = 6
    elastic_mm: float = 9.0
    intensity_scale: float = 0.05
    intensity_shift_hu: float = 20.0
    noise_hu: tuple[float, float] = (10.0, 20.0)
    lesion_radius_mm: tuple[float, float] = (4.0, 12.0)
    lesion_delta_hu: tuple[float, float] = (-60.0, 50.0)
    lesion_min_abs_delta_hu: float = 20.0
    lesion_edge: float = 0.15
    lesion_organs: tuple[str, ...] = ("liver", "spleen", "kidney_left", "kidney_right")
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
