"""Plain folders of images with optional labels paired by name.

Pairing rules (documented here once; :func:`folder_manifest` follows them):

1. **Two folders.** If ``<root>/images/`` exists, every image in it is a case.
   Labels live in the first of ``labels/``, ``masks/``, ``segmentations/`` that
   exists next to it.
2. **One folder.** Otherwise every image directly in ``<root>`` is a case, except
   files whose name ends in a *label suffix*: those are labels.
3. **Names.** Strip the extension (``.nii.gz``, ``.nii``, ``.nrrd``, ``.nhdr``,
   ``.mha``, ``.mhd``) to get a stem. A label's stem minus its label suffix
   (``_seg``, ``_segmentation``, ``_label``, ``_labels``, ``_mask``, ``_gt``;
   separator ``_``, ``-`` or ``.``; case-insensitive) is its case key; in the two-folder
   layout a label may also carry no suffix. An image's stem minus an optional
   image suffix (``_img``, ``_image``, ``_vol``, ``_volume``) is its case key and
   case id. So ``liver3_img.nii.gz`` pairs with ``liver3_seg.nii.gz`` (case
   ``liver3``), and ``images/a.nii.gz`` with ``labels/a.nii.gz``.
4. **DICOM series.** A sub-folder holding DICOM files (``*.dcm`` or files with the
   ``DICM`` magic) is one image; its folder name is the stem. So a folder of DICOM
   series folders is a plain folder of images, and a folder that is itself one DICOM
   series is a dataset of one case.
5. **Problems.** Two images (or labels) with the same case key are an error. A
   label with no image is reported (``unpaired_labels="raise"``, the default, raises
   :class:`LayoutError` listing all of them; ``"warn"`` warns and drops them).
   Images without a label are fine (label empty). Hidden files are ignored.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Literal

import pandas as pd

from medssl.data.datasets import validate_manifest
from medssl.data.errors import MedsslDataError

PathLike = str | os.PathLike

IMAGE_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LABEL_SUFFIXES: tuple[str, ...] = ("seg", "segmentation", "label", "labels", "mask", "gt")
IMAGE_SUFFIXES: tuple[str, ...] = ("img", "image", "vol", "volume")
LABEL_DIRS: tuple[str, ...] = ("labels", "masks", "segmentations")

__all__ = ["folder_manifest", "LayoutError", "IMAGE_EXTENSIONS", "LABEL_SUFFIXES", "IMAGE_SUFFIXES"]


class LayoutError(MedsslDataError):
    """A dataset folder does not follow its layout (unknown layout, missing or unpaired files)."""


# ---------------------------------------------------------------------- shared helpers (all adapters)


def split_name(name: str) -> tuple[str, str] | None:
    """``"a_seg.nii.gz" -> ("a_seg", ".nii.gz")``; None if not a supported image file."""
    low = name.lower()
    for ext in IMAGE_EXTENSIONS:
        if low.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext) :]
    return None


def strip_suffix(stem: str, suffixes: Iterable[str]) -> str | None:
    """``stem`` minus a trailing ``[_-.]<suffix>`` (case-insensitive); None if none matches."""
    for suf in sorted(suffixes, key=len, reverse=True):
        m = re.fullmatch(rf"(.+?)[_.\-]{re.escape(suf)}", stem, flags=re.IGNORECASE)
        if m:
            return m.group(1)
    return None


def is_dicom_dir(path: Path) -> bool:
    """True if ``path`` directly holds DICOM files (``*.dcm``, or the ``DICM`` magic at byte 128)."""
    try:
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError:
        return False
    if any(p.suffix.lower() == ".dcm" for p in files):
        return True
    for p in files[:3]:
        try:
            with open(p, "rb") as f:
                f.seek(128)
                if f.read(4) == b"DICM":
                    return True
        except OSError:
            continue
    return False


def image_entries(folder: Path) -> list[tuple[str, Path]]:
    """``(stem, path)`` of the image files and DICOM series folders directly in ``folder``, sorted.

    A name with an image extension that is not a regular file (a dangling symbolic link, a FIFO,
    a socket) is listed too, so that the scan names it as a bad file instead of skipping it
    without a word.
    """
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            if is_dicom_dir(p):
                out.append((p.name, p))
            continue
        parts = split_name(p.name)
        if parts:
            out.append((parts[0], p))
    return out


def raise_problems(root: PathLike, what: str, items: list[str], hint: str = "") -> None:
    """Raise one :class:`LayoutError` listing every item (no-op when empty)."""
    if items:
        lines = "\n  - ".join(items)
        raise LayoutError(root, f"{what} ({len(items)}):\n  - {lines}" + (f"\n{hint}" if hint else ""))


def finalise(rows: list[dict], root: Path, dataset: str | None = None) -> pd.DataFrame:
    """Manifest DataFrame from adapter rows (absolute paths, ``dataset`` column), validated."""
    if not rows:
        raise LayoutError(root, "no cases found")
    df = pd.DataFrame(rows)
    for col in ("label", "group", "split"):
        if col not in df.columns:
            df[col] = ""
    df["dataset"] = dataset if dataset is not None else root.name
    if "label_names" in df.columns:
        df["label_names"] = [json.dumps({str(k): v for k, v in n.items()}) if n else "" for n in df["label_names"]]
    df = df.sort_values("case_id", kind="stable").reset_index(drop=True)
    return validate_manifest(df)


# ---------------------------------------------------------------------- the folder adapter


def folder_manifest(
    root: PathLike,
    *,
    label_suffixes: Iterable[str] = LABEL_SUFFIXES,
    image_suffixes: Iterable[str] = IMAGE_SUFFIXES,
    unpaired_labels: Literal["raise", "warn"] = "raise",
    group_fn: Callable[[str], str] | None = None,
    dataset: str | None = None,
) -> pd.DataFrame:
    """Manifest of a plain folder of images with optional labels (rules in the module docstring).

    Args:
        root: the folder.
        label_suffixes / image_suffixes: name suffixes that mark labels / images.
        unpaired_labels: ``"raise"`` or ``"warn"`` for labels without an image.
        group_fn: maps a case id to its group (patient); default: the case id.
        dataset: value of the ``dataset`` column (default: the folder name).
    """
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(root, "not a folder")
    label_suffixes, image_suffixes = tuple(label_suffixes), tuple(image_suffixes)
    if (root / "images").is_dir():
        images_raw = image_entries(root / "images")
        label_dir = next((root / d for d in LABEL_DIRS if (root / d).is_dir()), None)
        labels_raw = image_entries(label_dir) if label_dir else []
        label_key = lambda stem: strip_suffix(stem, label_suffixes) or stem  # noqa: E731
    elif is_dicom_dir(root) and not image_entries(root):
        return finalise([{"case_id": root.name, "image": str(root), "label": "", "group": ""}], root, dataset)
    else:
        entries = image_entries(root)
        labels_raw = [(s, p) for s, p in entries if strip_suffix(s, label_suffixes) and not p.is_dir()]
        images_raw = [(s, p) for s, p in entries if (s, p) not in labels_raw]
        label_key = lambda stem: strip_suffix(stem, label_suffixes)  # noqa: E731
    images = _by_key(root, [(strip_suffix(s, image_suffixes) or s, p) for s, p in images_raw], "images")
    labels = _by_key(root, [(label_key(s), p) for s, p in labels_raw], "labels")
    unpaired = sorted(str(p) for k, p in labels.items() if k not in images)
    if unpaired and unpaired_labels == "raise":
        raise_problems(root, "label file(s) with no matching image", unpaired,
                       "Rename them to match an image (see medssl.data.adapters.folder), "
                       "or pass unpaired_labels='warn'.")
    if unpaired:
        warnings.warn(f"{root}: ignoring {len(unpaired)} label file(s) with no matching image: {unpaired}",
                      stacklevel=2)
    rows = [
        {"case_id": k, "image": str(p), "label": str(labels[k]) if k in labels else "",
         "group": group_fn(k) if group_fn else k}
        for k, p in images.items()
    ]
    return finalise(rows, root, dataset)


def _by_key(root: Path, keyed: list[tuple[str, Path]], what: str) -> dict[str, Path]:
    groups: dict[str, list[Path]] = defaultdict(list)
    for k, p in keyed:
        groups[k].append(p)
    clashes = [f"{k}: {[str(p) for p in ps]}" for k, ps in sorted(groups.items()) if len(ps) > 1]
    raise_problems(root, f"{what} sharing one case name", clashes, "Remove or rename the duplicates.")
    return {k: ps[0] for k, ps in sorted(groups.items())}


def looks_like_folder(root: Path) -> bool:
    """``images/`` sub-folder, an image file or DICOM series folder directly in ``root``, or ``root`` is a series."""
    if (root / "images").is_dir():
        return True
    return bool(image_entries(root)) or is_dicom_dir(root)
