"""BraTS brain-tumour folders: one folder per case, one file per MR contrast.

Layouts::

    BraTS 2021/2022:  <root>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz     (labels 1, 2, 4)
    BraTS 2023+:      <root>/<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz      (labels 1, 2, 3)

The contrast is chosen with ``modality`` (2021 names; the 2023 names are
accepted too and translated). Group: BraTS 2023 ids end in a time-point
(``BraTS-GLI-00000-000``), so the group is the id without it; 2021 ids are one
per patient, so the group is the case id.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from medssl.data.adapters.folder import LayoutError, finalise, raise_problems

PathLike = str | os.PathLike

__all__ = ["brats_manifest"]

_MODALITIES_2021 = ("t1", "t1ce", "t2", "flair")
_2021_TO_2023 = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
_TIMEPOINT = re.compile(r"^(?P<patient>.+-\d{5})-(?P<timepoint>\d{3})$")

# Label conventions of the challenge (Baid et al. 2021; BraTS 2023 renumbered ET to 3).
LABEL_NAMES_2021 = {1: "necrotic tumour core (NCR)", 2: "peritumoral oedema (ED)", 4: "enhancing tumour (ET)"}
LABEL_NAMES_2023 = {1: "necrotic tumour core (NCR)", 2: "peritumoral oedema (ED)", 3: "enhancing tumour (ET)"}


def brats_manifest(
    root: PathLike,
    *,
    modality: str = "t1",
    require_labels: bool = True,
    dataset: str | None = None,
) -> pd.DataFrame:
    """Manifest of a BraTS training (or validation) folder.

    Args:
        root: folder holding the case folders.
        modality: ``"t1"``, ``"t1ce"``, ``"t2"`` or ``"flair"`` (or the 2023 names
            ``"t1n"``, ``"t1c"``, ``"t2w"``, ``"t2f"``).
        require_labels: a case without ``seg`` is an error (validation sets have
            none: pass False).
        dataset: value of the ``dataset`` column (default: the folder name).

    Raises:
        LayoutError: no cases, or cases missing the contrast or the label (all listed).
    """
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(root, "not a folder")
    valid = _MODALITIES_2021 + tuple(_2021_TO_2023.values())
    if modality not in valid:
        raise ValueError(f"modality must be one of {valid}, got {modality!r}")
    rows, missing_image, missing_label = [], [], []
    for case_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        style = _style(case_dir)
        if style is None:
            continue
        case = case_dir.name
        mod = _2021_TO_2023.get(modality, modality) if style == 2023 else _to_2021(modality)
        sep = "-" if style == 2023 else "_"
        img, seg = _nifti(case_dir, f"{case}{sep}{mod}"), _nifti(case_dir, f"{case}{sep}seg")
        if img is None:
            missing_image.append(f"{case_dir} (no {case}{sep}{mod}.nii.gz)")
            continue
        if seg is None and require_labels:
            missing_label.append(f"{case_dir} (no {case}{sep}seg.nii.gz)")
        m = _TIMEPOINT.match(case)
        rows.append({
            "case_id": case,
            "image": str(img),
            "label": str(seg) if seg else "",
            "group": m["patient"] if (m and style == 2023) else case,
            "label_names": (LABEL_NAMES_2023 if style == 2023 else LABEL_NAMES_2021) if seg else None,
        })
    raise_problems(root, f"BraTS cases without the {modality} image", missing_image)
    raise_problems(root, "BraTS cases without a segmentation", missing_label,
                   "Pass require_labels=False for validation data without labels.")
    if not rows:
        raise LayoutError(root, "no BraTS cases found (expected <case>/<case>_t1.nii.gz or <case>/<case>-t1n.nii.gz)")
    return finalise(rows, root, dataset)


def _to_2021(modality: str) -> str:
    inverse = {v: k for k, v in _2021_TO_2023.items()}
    return inverse.get(modality, modality)


def _nifti(folder: Path, stem: str) -> Path | None:
    for ext in (".nii.gz", ".nii"):
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def _style(case_dir: Path) -> int | None:
    """2021 (``_t1``), 2023 (``-t1n``) or None if this is not a BraTS case folder."""
    case = case_dir.name
    if any(_nifti(case_dir, f"{case}_{m}") for m in _MODALITIES_2021 + ("seg",)):
        return 2021
    if any(_nifti(case_dir, f"{case}-{m}") for m in tuple(_2021_TO_2023.values()) + ("seg",)):
        return 2023
    return None


def looks_like_brats(root: Path, max_dirs: int = 20) -> bool:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))[:max_dirs]
    return any(_style(d) for d in dirs)
