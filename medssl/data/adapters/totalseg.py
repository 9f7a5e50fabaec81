"""The TotalSegmentator dataset: one CT per subject with one binary mask per structure.

Layout (Wasserthal et al. 2023, Radiology: AI)::

    <root>/meta.csv                                   # optional; image_id;...;split
    <root>/<subject>/ct.nii.gz
    <root>/<subject>/segmentations/<structure>.nii.gz  # one binary mask per structure

medssl trains on one integer label map per case, so the masks are merged
(:func:`merge_totalseg_masks`) into ``<derived_dir>/<subject>_labels.nii.gz``
with a JSON sidecar of label names. The raw folder is never written to.
Label ids are 1..N in the order of ``structures`` (default: the structure names
sorted alphabetically, identical for every subject, so an id means the same
structure in every case).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from medssl import paths
from medssl._files import atomic_write_text
from medssl.data.adapters.folder import LayoutError, finalise, raise_problems
from medssl.data.errors import LabelGridMismatchError, UnreadableFileError

PathLike = str | os.PathLike

__all__ = ["totalseg_manifest", "merge_totalseg_masks", "totalseg_structures"]

# World positions of two grids' voxels may differ by float noise in the header.
_AFFINE_ATOL_MM = 1e-3
_SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "test"}


def totalseg_manifest(
    root: PathLike,
    *,
    merge_labels: bool = True,
    derived_dir: PathLike | None = None,
    structures: Sequence[str] | None = None,
    use_meta_splits: bool = True,
    progress: bool = True,
    dataset: str | None = None,
) -> pd.DataFrame:
    """Manifest of a TotalSegmentator dataset folder.

    Args:
        root: the dataset folder (subject folders ``s0000``, ...).
        merge_labels: merge each subject's masks into one label map (written to
            ``derived_dir``, reused while newer than its masks); False: no labels.
        derived_dir: where merged maps go (default:
            ``paths.data_dir()/derived/totalseg-<hash of root>``). Must be outside ``root``.
        structures: structures to merge, in label-id order (default: all, sorted;
            every subject must then have the same set).
        use_meta_splits: take ``split`` from ``meta.csv`` (``image_id``/``split``).
        progress: progress bar over subjects while merging.
        dataset: value of the ``dataset`` column (default: the folder name).
    """
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(root, "not a folder")
    subjects = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _ct(p))
    if not subjects:
        raise LayoutError(root, "no TotalSegmentator subjects found (expected <subject>/ct.nii.gz)")
    splits = _meta_splits(root) if use_meta_splits else {}
    rows = [{"case_id": s.name, "image": str(_ct(s)), "group": s.name, "split": splits.get(s.name, "")}
            for s in subjects]
    if merge_labels:
        out_dir = _derived_dir(root, derived_dir)
        names = list(structures) if structures is not None else _common_structures(root, subjects)
        for row, subject in zip(tqdm(rows, desc="merging TotalSegmentator masks", disable=not progress), subjects):
            out = out_dir / f"{subject.name}_labels.nii.gz"
            label_names = _fresh_merge(subject, out, names) or merge_totalseg_masks(subject, out, names)
            row.update(label=str(out), label_names=label_names)
    return finalise(rows, root, dataset)


def totalseg_structures(subject_dir: PathLike) -> list[str]:
    """Structure names of a subject (mask file names without ``.nii.gz``), sorted."""
    seg = Path(subject_dir) / "segmentations"
    if not seg.is_dir():
        raise LayoutError(subject_dir, "no segmentations/ folder")
    return sorted(p.name[: -len(".nii.gz")] for p in seg.glob("*.nii.gz") if not p.name.startswith("."))


def merge_totalseg_masks(
    subject_dir: PathLike, out_path: PathLike, structures: Sequence[str] | None = None
) -> dict[int, str]:
    """Merge a subject's binary masks into one integer label map, written atomically.

    Structure ``structures[i]`` gets label ``i + 1`` (default: all masks, sorted by
    name). Where masks overlap, the later structure wins. The map is stored as
    uint8 (uint16 beyond 255 structures) on the CT's grid, with a sidecar
    ``<out>.json`` holding the label names. ``out_path`` must be outside
    ``subject_dir`` (raw data is never written to).

    Returns:
        ``{label id: structure name}``.

    Raises:
        UnreadableFileError: a requested mask is missing or unreadable.
        LabelGridMismatchError: a mask's shape or affine differs from the CT's.
    """
    from medssl.data.io import write_nifti

    subject_dir, out_path = Path(subject_dir), Path(out_path)
    _refuse_inside(out_path, subject_dir)
    names = list(structures) if structures is not None else totalseg_structures(subject_dir)
    ct_path = _ct(subject_dir)
    if ct_path is None:
        raise UnreadableFileError(subject_dir / "ct.nii.gz", "missing CT of a TotalSegmentator subject")
    ct = _load_header(ct_path)
    merged = np.zeros(ct.shape[:3], dtype=np.uint8 if len(names) <= 255 else np.uint16)  # shape (X, Y, Z)
    for label_id, name in enumerate(names, start=1):
        mask_path = subject_dir / "segmentations" / f"{name}.nii.gz"
        mask = _load_header(mask_path)
        if mask.shape[:3] != ct.shape[:3] or not np.allclose(mask.affine, ct.affine, atol=_AFFINE_ATOL_MM):
            raise LabelGridMismatchError(
                mask_path, f"mask grid (shape {mask.shape}, affine\n{mask.affine}) differs from the CT's "
                f"(shape {ct.shape}, affine\n{ct.affine}) in {ct_path}",
            )
        merged[np.asanyarray(mask.dataobj).reshape(ct.shape[:3]) > 0] = label_id
    label_names = {i: n for i, n in enumerate(names, start=1)}
    write_nifti(out_path, merged, ct.affine)
    sidecar = {"label_names": {str(k): v for k, v in label_names.items()}, "structures": names,
               "subject_dir": str(subject_dir.resolve())}
    _atomic_write_json(_sidecar(out_path), sidecar)
    return label_names


# ---------------------------------------------------------------------- helpers


def _ct(subject: Path) -> Path | None:
    for name in ("ct.nii.gz", "ct.nii"):
        if (subject / name).is_file():
            return subject / name
    return None


def _load_header(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise UnreadableFileError(path, "file not found")
    try:
        return nib.load(path)
    except Exception as e:  # noqa: BLE001 - nibabel raises many types for bad files
        raise UnreadableFileError(path, f"cannot read NIfTI ({type(e).__name__}: {e})") from e


def _meta_splits(root: Path) -> dict[str, str]:
    path = root / "meta.csv"
    if not path.is_file():
        return {}
    try:
        meta = pd.read_csv(path, sep=None, engine="python", dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001 - pandas raises several parser errors
        raise LayoutError(path, f"cannot read meta.csv ({e})") from e
    if "image_id" not in meta.columns or "split" not in meta.columns:
        return {}
    return {i: _SPLITS.get(s.strip().lower(), "") for i, s in zip(meta["image_id"], meta["split"])}


def _common_structures(root: Path, subjects: list[Path]) -> list[str]:
    per_subject = {s.name: totalseg_structures(s) for s in subjects if (s / "segmentations").is_dir()}
    no_seg = [str(s / "segmentations") for s in subjects if s.name not in per_subject]
    raise_problems(root, "subjects without a segmentations/ folder", no_seg,
                   "Pass merge_labels=False to use the CTs unlabelled.")
    union = sorted(set().union(*per_subject.values()))
    differ = [f"{s}: missing {sorted(set(union) - set(n))}" for s, n in per_subject.items() if len(n) != len(union)]
    raise_problems(root, "subjects with a different set of masks (label ids would disagree)", differ,
                   "Pass structures=[...] to merge a common subset.")
    return union


def _derived_dir(root: Path, derived_dir: PathLike | None) -> Path:
    if derived_dir is None:
        tag = hashlib.sha1(str(root.resolve()).encode("utf-8")).hexdigest()[:10]
        derived_dir = paths.data_dir() / "derived" / f"totalseg-{tag}"
    out = Path(derived_dir)
    _refuse_inside(out, root)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _refuse_inside(path: Path, raw: Path) -> None:
    p, r = path.resolve(), raw.resolve()
    if p == r or r in p.parents:
        raise ValueError(f"{path}: derived data must be written outside the raw data folder {raw}")


def _sidecar(out_path: Path) -> Path:
    return out_path.with_name(out_path.name.replace(".nii.gz", "") + ".json")


def _fresh_merge(subject: Path, out: Path, names: list[str]) -> dict[int, str] | None:
    """Label names of an existing merged map if it is newer than its masks and has the same structures."""
    side = _sidecar(out)
    if not (out.is_file() and side.is_file()):
        return None
    try:
        info = json.loads(side.read_text(encoding="utf-8"))
        if info.get("structures") != names:
            return None
        newest = max(os.stat(subject / "segmentations" / f"{n}.nii.gz").st_mtime_ns for n in names)
        newest = max(newest, os.stat(_ct(subject)).st_mtime_ns)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    if out.stat().st_mtime_ns < newest:
        return None
    return {int(k): v for k, v in info["label_names"].items()}


def _atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def looks_like_totalseg(root: Path, max_dirs: int = 20) -> bool:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))[:max_dirs]
    return any(_ct(d) and (d / "segmentations").is_dir() for d in dirs)
