"""Medical Segmentation Decathlon (MSD) and nnU-Net raw-data folders.

Layout::

    <root>/dataset.json        # optional here; gives label names and (MSD) the training list
    <root>/imagesTr/<case>.nii.gz          (MSD)   or <case>_0000.nii.gz (nnU-Net, one file per channel)
    <root>/labelsTr/<case>.nii.gz
    <root>/imagesTs/...                    unlabelled test images (optional)

Label names come from ``dataset.json["labels"]``, in either convention: MSD's
``{"0": "background", "1": "tumour"}`` or nnU-Net v2's ``{"background": 0,
"tumour": 1}`` (region entries whose value is a list are skipped: they are not
single label ids). nnU-Net stores channels in separate files; ``read_volume``
takes one image file, so one channel (``channel=0`` by default) is used.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

import pandas as pd

from medssl.data.adapters.folder import LayoutError, finalise, image_entries, raise_problems

PathLike = str | os.PathLike

__all__ = ["msd_manifest"]

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def msd_manifest(
    root: PathLike,
    *,
    channel: int = 0,
    include_test: bool = True,
    test_split: str = "external",
    require_labels: bool = True,
    group_fn: Callable[[str], str] | None = None,
    dataset: str | None = None,
) -> pd.DataFrame:
    """Manifest of an MSD / nnU-Net folder.

    Args:
        root: the task folder (``Task09_Spleen``, ``Dataset001_X``, ...).
        channel: which nnU-Net channel file (``_0000``, ``_0001``, ...) is the image.
        include_test: add ``imagesTs`` cases, unlabelled, with split ``test_split``.
        test_split: split of the ``imagesTs`` cases (``"external"`` keeps them out of
            :func:`~medssl.data.datasets.assign_splits`; ``""`` lets it assign them).
        require_labels: a training image without a label is an error (else label empty).
        group_fn: case id -> group (patient); default: the case id.
        dataset: value of the ``dataset`` column (default: the folder name).

    Raises:
        LayoutError: no ``imagesTr``, bad ``dataset.json``, missing labels or
            channels, or labels without images (every offending file listed).
    """
    root = Path(root)
    if not (root / "imagesTr").is_dir():
        raise LayoutError(root, "not an MSD/nnU-Net folder: no imagesTr/ sub-folder")
    spec = _read_dataset_json(root)
    label_names = _label_names(root, spec.get("labels"))
    images = _listed_training_images(root, spec, channel) or _case_files(root / "imagesTr", channel)
    labels = _case_files(root / "labelsTr", None) if (root / "labelsTr").is_dir() else {}
    missing = [f"{p} (expected {root / 'labelsTr' / (c + _ext(p))})" for c, p in images.items() if c not in labels]
    if require_labels:
        raise_problems(root, "training image(s) without a label in labelsTr/", missing,
                       "Add the labels, or pass require_labels=False to use them unlabelled.")
    unpaired = [str(p) for c, p in labels.items() if c not in images]
    raise_problems(root, "label(s) in labelsTr/ without an image in imagesTr/", unpaired)
    rows = [_row(c, p, labels.get(c), "", label_names, group_fn) for c, p in images.items()]
    if include_test and (root / "imagesTs").is_dir():
        test_labels = _case_files(root / "labelsTs", None) if (root / "labelsTs").is_dir() else {}
        for c, p in _case_files(root / "imagesTs", channel).items():
            if c in images:
                raise LayoutError(p, f"case id {c!r} is in both imagesTr/ and imagesTs/")
            rows.append(_row(c, p, test_labels.get(c), test_split, label_names, group_fn))
    return finalise(rows, root, dataset)


def _row(case_id, image, label, split, label_names, group_fn) -> dict:
    return {
        "case_id": case_id,
        "image": str(image),
        "label": str(label) if label else "",
        "group": group_fn(case_id) if group_fn else case_id,
        "split": split,
        "label_names": label_names if label else None,
    }


def _ext(p: Path) -> str:
    return ".nii.gz" if p.name.lower().endswith(".nii.gz") else p.suffix


def _read_dataset_json(root: Path) -> dict:
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LayoutError(path, f"cannot read dataset.json ({e})") from e
    if not isinstance(spec, dict):
        raise LayoutError(path, "dataset.json must hold a JSON object")
    return spec


def _label_names(root: Path, labels: object) -> dict[int, str] | None:
    """``{id: name}`` from dataset.json ``labels`` in MSD or nnU-Net v2 form."""
    if not labels:
        return None
    if not isinstance(labels, dict):
        raise LayoutError(root / "dataset.json", f"'labels' must be an object, got {type(labels).__name__}")
    try:
        if all(str(k).strip().lstrip("-").isdigit() for k in labels):  # MSD: {"1": "tumour"}
            return {int(k): str(v) for k, v in labels.items()}
        # nnU-Net v2: {"tumour": 1}; list values are regions, not single ids
        return {int(v): str(k) for k, v in labels.items() if not isinstance(v, (list, tuple))}
    except (TypeError, ValueError) as e:
        raise LayoutError(root / "dataset.json", f"cannot read label ids from 'labels' ({e})") from e


def _case_files(folder: Path, channel: int | None) -> dict[str, Path]:
    """``{case id: file}``; with ``channel``, nnU-Net ``<case>_<cccc>`` names select that channel.

    The nnU-Net convention applies only when *every* file in the folder carries a
    4-digit channel suffix: MSD case names such as ``spleen_2`` or ``la_003`` have
    1-3 digits, nnU-Net always writes 4.
    """
    entries = image_entries(folder)
    matches = [_CHANNEL.match(stem) for stem, _ in entries]
    if channel is None or not entries or not all(matches):
        return _unique(folder, [(stem, p) for stem, p in entries])
    by_case: dict[str, dict[int, Path]] = {}
    for m, (_, p) in zip(matches, entries):
        by_case.setdefault(m["case"], {})[int(m["channel"])] = p
    missing = [f"{c}: has channels {sorted(ch)}, no _{channel:04d}" for c, ch in by_case.items() if channel not in ch]
    raise_problems(folder, f"case(s) without channel {channel}", missing)
    return {c: ch[channel] for c, ch in sorted(by_case.items())}


def _unique(folder: Path, keyed: list[tuple[str, Path]]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    dups = []
    for k, p in keyed:
        if k in out:
            dups.append(f"{k}: {out[k].name} and {p.name}")
        out[k] = p
    raise_problems(folder, "files sharing one case name", dups)
    return out


def _listed_training_images(root: Path, spec: dict, channel: int) -> dict[str, Path]:
    """MSD's ``training`` list (``[{"image": "./imagesTr/x.nii.gz", "label": ...}]``), if present.

    nnU-Net v1 lists ``./imagesTr/x.nii.gz`` while the files are ``x_0000.nii.gz``;
    the channel file is used then.
    """
    listed = spec.get("training")
    if not isinstance(listed, list) or not listed or not all(isinstance(e, dict) and "image" in e for e in listed):
        return {}
    out, missing = {}, []
    for entry in listed:
        p = Path(os.path.normpath(root / str(entry["image"])))
        ext = _ext(p)
        case = p.name[: -len(ext)]
        alt = p.with_name(f"{case}_{channel:04d}{ext}")
        if p.is_file():
            out[case] = p
        elif alt.is_file():
            out[case] = alt
        else:
            missing.append(f"{p} (listed in dataset.json 'training')")
    raise_problems(root, "image(s) listed in dataset.json but not on disk", missing)
    return dict(sorted(out.items()))


def looks_like_msd(root: Path) -> bool:
    return (root / "imagesTr").is_dir()
