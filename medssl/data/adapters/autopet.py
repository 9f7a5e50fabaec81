"""autoPET "FDG-PET-CT-Lesions" in NIfTI: one folder per patient, one sub-folder per study.

Layout::

    <root>/<patient>/<study>/CTres.nii.gz   # CT resampled to the PET grid (the default image)
                             SUV.nii.gz, PET.nii.gz, CT.nii.gz
                             SEG.nii.gz     # lesion mask on the PET/CTres grid

Case id: ``<patient>_<study date>`` when the study folder name starts with a date
(``08-12-2005-NA-PET-CT ...``), else ``<patient>_<study folder>`` with spaces and
unusual characters replaced; group: the patient, so a patient's studies never
straddle splits.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from medssl.data.adapters.folder import LayoutError, finalise, raise_problems

PathLike = str | os.PathLike

__all__ = ["autopet_manifest"]

_DATE = re.compile(r"^(\d{2}-\d{2}-\d{4})")
LESION_LABEL_NAMES = {1: "lesion"}


def autopet_manifest(
    root: PathLike,
    *,
    image: str = "CTres",
    label: str = "SEG",
    require_labels: bool = True,
    dataset: str | None = None,
) -> pd.DataFrame:
    """Manifest of an autoPET NIfTI tree.

    Args:
        root: folder holding the patient folders.
        image: which file of a study is the image (``"CTres"``, ``"SUV"``, ``"PET"``, ``"CT"``).
        label: the label file (``"SEG"``, the lesion mask).
        require_labels: a study without ``SEG`` is an error (else label empty).
        dataset: value of the ``dataset`` column (default: the folder name).

    Raises:
        LayoutError: no studies, or studies missing the image or label (all listed).
    """
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(root, "not a folder")
    rows, missing_image, missing_label = [], [], []
    for patient_dir in _subdirs(root):
        studies = [s for s in _subdirs(patient_dir) if any(s.glob("*.nii*"))]
        keys = _study_keys([s.name for s in studies])
        for study_dir, key in zip(studies, keys):
            img, seg = _nifti(study_dir, image), _nifti(study_dir, label)
            if img is None:
                missing_image.append(f"{study_dir} (no {image}.nii.gz)")
                continue
            if seg is None and require_labels:
                missing_label.append(f"{study_dir} (no {label}.nii.gz)")
            rows.append({
                "case_id": f"{patient_dir.name}_{key}",
                "image": str(img),
                "label": str(seg) if seg else "",
                "group": patient_dir.name,
                "label_names": LESION_LABEL_NAMES if seg else None,
            })
    raise_problems(root, f"autoPET studies without the image file {image}", missing_image)
    raise_problems(root, f"autoPET studies without the label file {label}", missing_label,
                   "Pass require_labels=False to use them unlabelled.")
    if not rows:
        raise LayoutError(root, f"no autoPET studies found (expected <patient>/<study>/{image}.nii.gz)")
    return finalise(rows, root, dataset)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _nifti(folder: Path, name: str) -> Path | None:
    for ext in (".nii.gz", ".nii"):
        p = folder / f"{name}{ext}"
        if p.is_file():
            return p
    return None


def _study_keys(names: list[str]) -> list[str]:
    """Short, unique, folder-safe keys: the leading date if it is unique within the patient."""
    dates = [m.group(1) if (m := _DATE.match(n)) else None for n in names]
    if all(dates) and len(set(dates)) == len(dates):
        return dates  # type: ignore[return-value]
    return [re.sub(r"[^A-Za-z0-9.\-]+", "-", n).strip("-.") or f"study{i}" for i, n in enumerate(names)]


def looks_like_autopet(root: Path, max_dirs: int = 20) -> bool:
    for patient in _subdirs(root)[:max_dirs]:
        for study in _subdirs(patient)[:max_dirs]:
            if _nifti(study, "CTres") or _nifti(study, "SEG"):
                return True
    return False
