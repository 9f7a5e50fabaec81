"""Dataset layouts -> manifests.

Each adapter is a function ``<layout>_manifest(root, **opts) -> DataFrame`` that
returns validated manifest rows (``case_id, image, label, group, split, dataset``
and, where known, ``label_names``) without reading any voxels or writing into
``root``. :func:`detect_layout` guesses the layout; :func:`manifest_from_folder`
does both.

=========  ==========================================================================
layout     what it recognises
=========  ==========================================================================
msd        ``imagesTr/`` (+ ``labelsTr/``, ``imagesTs/``, ``dataset.json``): MSD, nnU-Net
totalseg   ``<subject>/ct.nii.gz`` + ``<subject>/segmentations/*.nii.gz``
autopet    ``<patient>/<study>/CTres.nii.gz`` + ``SEG.nii.gz``
brats      ``<case>/<case>_t1.nii.gz`` (2021/22) or ``<case>/<case>-t1n.nii.gz`` (2023)
folder     ``images/`` (+ ``labels/``) or image files directly in the folder
=========  ==========================================================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from medssl.data.adapters.autopet import autopet_manifest, looks_like_autopet
from medssl.data.adapters.brats import brats_manifest, looks_like_brats
from medssl.data.adapters.folder import LayoutError, folder_manifest, looks_like_folder
from medssl.data.adapters.msd import looks_like_msd, msd_manifest
from medssl.data.adapters.totalseg import looks_like_totalseg, merge_totalseg_masks, totalseg_manifest

__all__ = [
    "ADAPTERS",
    "LayoutError",
    "detect_layout",
    "manifest_from_folder",
    "folder_manifest",
    "msd_manifest",
    "autopet_manifest",
    "brats_manifest",
    "totalseg_manifest",
    "merge_totalseg_masks",
]

ADAPTERS: dict[str, Callable[..., pd.DataFrame]] = {
    "msd": msd_manifest,
    "totalseg": totalseg_manifest,
    "autopet": autopet_manifest,
    "brats": brats_manifest,
    "folder": folder_manifest,
}

# Most specific first: an MSD folder also holds image files, a BraTS case folder is
# also "a folder of images".
_DETECTORS: tuple[tuple[str, Callable[[Path], bool]], ...] = (
    ("msd", looks_like_msd),
    ("totalseg", looks_like_totalseg),
    ("autopet", looks_like_autopet),
    ("brats", looks_like_brats),
    ("folder", looks_like_folder),
)


def detect_layout(root: str | os.PathLike) -> str:
    """The layout name of ``root`` (a key of :data:`ADAPTERS`).

    Raises:
        LayoutError: ``root`` is not a folder or matches no known layout.
    """
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(root, "dataset root is not a folder")
    for name, looks_like in _DETECTORS:
        if looks_like(root):
            return name
    raise LayoutError(
        root,
        "unknown dataset layout: expected one of imagesTr/ (MSD/nnU-Net), <subject>/ct.nii.gz + segmentations/ "
        "(TotalSegmentator), <patient>/<study>/CTres.nii.gz (autoPET), <case>/<case>_t1.nii.gz (BraTS), or "
        "images/ or image files (.nii.gz, .nii, .nrrd, .mha, .mhd, DICOM folders) directly in the folder",
    )


def manifest_from_folder(root: str | os.PathLike, layout: str = "auto", **opts: Any) -> pd.DataFrame:
    """Manifest of a dataset folder; ``layout="auto"`` detects it, ``opts`` go to the adapter."""
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in ADAPTERS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(ADAPTERS)} or 'auto'")
    return ADAPTERS[layout](root, **opts)
