"""Fetching the real TotalSegmentator example volumes from PyPI and naming their label ids.

:func:`fetch_totalseg_examples` downloads the TotalSegmentator 2.18.0 source
distribution with ``pip download`` (the only registry we may use), checks its
pinned sha256 and extracts the few real volumes under ``tests/reference_files/``
(Apache-2.0). It also works out which organ each label id names (by overlap with
the per-structure masks that ship alongside).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.util import find_spec
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from medssl import paths
from medssl._files import file_sha256, make_temp_dir, remove_stale_temps, temp_path
from medssl.data.errors import MedsslDataError

# --------------------------------------------------------------------------- the pinned source

TOTALSEG_VERSION = "2.18.0"
TOTALSEG_SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
TOTALSEG_LICENSE = "Apache-2.0"
_SDIST_NAME = f"totalsegmentator-{TOTALSEG_VERSION}.tar.gz"
_SDIST_TOP = f"totalsegmentator-{TOTALSEG_VERSION}"
_REF_PREFIX = f"{_SDIST_TOP}/tests/reference_files/"
_REF_FILES = (
    "example_ct.nii.gz",
    "example_seg_fast_force_split.nii.gz",
    "example_ct_sm.nii.gz",
    "example_seg_fast.nii.gz",
    "example_mr_sm.nii.gz",
    "example_seg_mr.nii.gz",
    "example_seg_dicom.nii.gz",
)
# folders taken whole (one level deep), with the file-name ending they must have
_REF_DIRS = {"example_seg_fast/": ".nii.gz", "example_ct_dicom/": ""}
_LICENSE_MEMBER = f"{_SDIST_TOP}/LICENSE"
_CLASS_MAP_MEMBER = f"{_SDIST_TOP}/totalsegmentator/map_to_binary.py"
# example_ct_sm is z-slices 82..111 of example_ct (checked voxel-for-voxel at fetch time;
# note its header keeps the full volume's origin, so the two do not align in world mm).
_CROP_Z0 = 82
_DICOM_LABEL_ON_GRID = "example_seg_dicom_on_image_grid.nii.gz"
CT_LABEL_FILE = "example_seg_fast_force_split.nii.gz"  # the template CT's 61-class label map
_FETCH_FORMAT = 1

# Ids named by overlap must match their mask this well (they are the same model output).
_MIN_NAMING_DICE = 0.99


class ChecksumMismatchError(MedsslDataError):
    """A downloaded archive's sha256 differs from the pinned one."""


class DemoFetchError(RuntimeError):
    """``pip download`` of the demo data failed (network, missing build tools, ...)."""


# --------------------------------------------------------------------------- fetch


def _default_examples_dir() -> Path:
    return paths.data_dir() / "demo" / f"totalseg-{TOTALSEG_VERSION}"


def fetch_totalseg_examples(
    dest: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    *,
    sdist: str | os.PathLike | None = None,
    expected_sha256: str = TOTALSEG_SDIST_SHA256,
) -> Path:
    """Download and unpack the real TotalSegmentator 2.18.0 example volumes; return their folder.

    Runs ``python -m pip download --no-deps --no-build-isolation --no-binary
    totalsegmentator totalsegmentator==2.18.0`` (pip runs the package's
    metadata step, so numpy, setuptools and wheel must be importable), checks the
    archive's sha256 against the pinned value, and extracts only the needed
    members of ``tests/reference_files/`` plus the license. Then it derives the
    label names (``label_names.json``) and writes ``SOURCE.json`` last. Everything is
    staged in a temporary folder next to ``dest`` and moved into place at the end,
    so a failure leaves nothing behind. A complete ``dest`` is returned untouched.

    Args:
        dest: target folder (default ``paths.data_dir()/demo/totalseg-2.18.0``).
        force: re-download and replace an existing copy.
        progress: show pip's output.
        sdist: use this local archive instead of downloading (it is still checked).
        expected_sha256: the archive's expected sha256 (the pinned value by default).

    Raises:
        ChecksumMismatchError: the archive is not the pinned one.
        DemoFetchError: pip failed or the build tools are missing.
    """
    dest = Path(dest).expanduser() if dest is not None else _default_examples_dir()
    if not force and _examples_complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest.parent, f".{dest.name}.")  # fetches that were killed (their writer is gone)
    with _temp_dir(dest.parent, f".{dest.name}") as tmp:
        archive = Path(sdist) if sdist is not None else _pip_download(tmp / "download", progress)
        digest = file_sha256(archive)
        if digest != expected_sha256:
            raise ChecksumMismatchError(
                archive,
                f"sha256 is {digest}, expected {expected_sha256} (pinned for {_SDIST_NAME}); the download is "
                "corrupt or not the pinned release, so nothing was extracted",
            )
        stage = tmp / "stage"
        stage.mkdir()
        files, class_map_src = _extract_members(archive, stage)
        class_maps = _parse_class_maps(class_map_src)
        _check_crop_matches_full(stage)
        names = _derive_label_names(stage, class_maps)
        (stage / "label_names.json").write_text(json.dumps(names, indent=1), encoding="utf-8")
        dicom_note = _write_dicom_label_on_image_grid(stage)
        source = {
            "format_version": _FETCH_FORMAT,
            "package": "TotalSegmentator",
            "version": TOTALSEG_VERSION,
            "archive": _SDIST_NAME,
            "archive_sha256": digest,
            "fetched_with": "pip download --no-deps --no-build-isolation --no-binary totalsegmentator "
            f"totalsegmentator=={TOTALSEG_VERSION}",
            "url": f"https://pypi.org/project/TotalSegmentator/{TOTALSEG_VERSION}/",
            "license": TOTALSEG_LICENSE,
            "license_file": "LICENSE",
            "members_prefix": _REF_PREFIX,
            "files": files,
            "notes": [
                "Labels are TotalSegmentator model outputs, not manual masks.",
                f"example_ct_sm.nii.gz equals example_ct.nii.gz[:, :, {_CROP_Z0}:{_CROP_Z0 + 30}] voxel for voxel, "
                "but its header keeps the full volume's origin (it is not shifted in world mm).",
                dicom_note,
            ],
            "fetched": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        # SOURCE.json last: a folder without it is never taken for a complete copy.
        (stage / "SOURCE.json").write_text(json.dumps(source, indent=1), encoding="utf-8")
        _install_dir(stage, dest, replace=force)
    return dest


@contextmanager
def _temp_dir(parent: Path, prefix: str):
    tmp = make_temp_dir(parent, prefix)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _examples_complete(dest: Path) -> bool:
    try:
        source = json.loads((dest / "SOURCE.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if source.get("archive_sha256") != TOTALSEG_SDIST_SHA256 or source.get("format_version") != _FETCH_FORMAT:
        return False
    required = list(source.get("files", {})) + ["label_names.json", "LICENSE"]
    return all((dest / f).is_file() for f in required)


def _install_dir(stage: Path, dest: Path, replace: bool) -> None:
    """Move a finished ``stage`` folder to ``dest`` atomically (a concurrent identical install wins ties)."""
    old = None
    if dest.exists() or dest.is_symlink():
        if not replace and _examples_complete(dest):
            return  # another process finished first
        old = temp_path(dest.parent, f".{dest.name}.old")
        os.replace(dest, old)
    try:
        os.replace(stage, dest)
    except OSError:
        if old is not None:
            os.replace(old, dest)
            old = None
        if not _examples_complete(dest):
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()


def _check_build_tools() -> None:
    # TotalSegmentator's setup.py imports numpy; setuptools >= 70.1 builds metadata without `wheel`.
    missing = [m for m in ("numpy", "setuptools") if find_spec(m) is None]
    if missing:
        raise DemoFetchError(
            f"fetching the demo data runs `pip download`, which builds TotalSegmentator's metadata and needs "
            f"{', '.join(missing)} in this environment ({sys.executable}); install them with "
            f"`{sys.executable} -m pip install numpy setuptools wheel`"
        )


def _pip_download(folder: Path, progress: bool) -> Path:
    _check_build_tools()
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
        "--no-binary", "totalsegmentator", "--disable-pip-version-check",
        "-d", str(folder), f"totalsegmentator=={TOTALSEG_VERSION}",
    ]  # fmt: skip
    if progress:
        print("fetching demo data:", " ".join(cmd[2:]), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archive = folder / _SDIST_NAME
    if proc.returncode != 0 or not archive.is_file():
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise DemoFetchError(
            f"`pip download` of {_SDIST_NAME} failed (exit code {proc.returncode}); it needs access to PyPI "
            f"and numpy, setuptools (and, for setuptools < 70.1, wheel) installed. pip said:\n{tail}"
        )
    return archive


def _wanted_name(member: str) -> str | None:
    """Where an archive member goes inside the examples folder, or None if we do not need it."""
    if member == _LICENSE_MEMBER:
        return "LICENSE"
    if not member.startswith(_REF_PREFIX):
        return None
    rel = member[len(_REF_PREFIX) :]
    if rel in _REF_FILES:
        return rel
    for folder, ending in _REF_DIRS.items():
        rest = rel[len(folder) :]
        if rel.startswith(folder) and rest and "/" not in rest and rest.endswith(ending):
            return rel
    return None


def _extract_members(archive: Path, stage: Path) -> tuple[dict[str, str], str | None]:
    """Copy the wanted regular-file members into ``stage``; return ``{name: sha256}`` and map_to_binary.py's text.

    Members are read with ``extractfile`` and written by us: only regular files,
    only names we asked for, and every target checked to lie inside ``stage``
    (a hostile archive cannot write elsewhere through ``..``, absolute names or links).
    """
    files: dict[str, str] = {}
    class_map_src = None
    root = stage.resolve()
    try:
        tar = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError) as e:
        raise ChecksumMismatchError(archive, f"not a readable tar archive ({e})") from e
    with tar:
        for member in tar:
            name = member.name
            parts = PurePosixPath(name).parts
            if name.startswith("/") or ".." in parts:
                raise MedsslDataError(archive, f"unsafe member name {name!r} (absolute or '..'); refusing to extract")
            if name == _CLASS_MAP_MEMBER and member.isfile():
                class_map_src = tar.extractfile(member).read().decode("utf-8", errors="replace")
                continue
            rel = _wanted_name(name)
            if rel is None:
                continue
            if not member.isfile():  # symlinks, hard links, devices: never followed
                raise MedsslDataError(archive, f"member {name!r} is not a regular file; refusing to extract")
            target = (stage / rel).resolve()
            if root not in target.parents:
                raise MedsslDataError(archive, f"member {name!r} would be written outside the target folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            with tar.extractfile(member) as src, open(target, "wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    h.update(block)
                    dst.write(block)
            files[rel] = h.hexdigest()
    missing = [f for f in _REF_FILES if f not in files] + (["LICENSE"] if "LICENSE" not in files else [])
    if missing:
        raise MedsslDataError(archive, f"archive lacks the expected member(s) {missing} under {_REF_PREFIX}")
    return dict(sorted(files.items())), class_map_src


def _parse_class_maps(src: str | None) -> dict[str, dict[int, str]] | None:
    """``class_map`` from TotalSegmentator's map_to_binary.py, read as data with ``ast`` (never imported)."""
    if not src:
        return None
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "class_map" for t in node.targets):
            try:
                raw = ast.literal_eval(node.value)
            except ValueError:
                return None
            return {task: {int(k): str(v) for k, v in m.items()} for task, m in raw.items() if isinstance(m, dict)}
    return None


def _load_int(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj).astype(np.int32)


def _check_crop_matches_full(ref: Path) -> None:
    full = np.asanyarray(nib.load(str(ref / "example_ct.nii.gz")).dataobj)
    crop = np.asanyarray(nib.load(str(ref / "example_ct_sm.nii.gz")).dataobj)
    nz = crop.shape[2]
    if full.shape[:2] != crop.shape[:2] or not np.array_equal(full[:, :, _CROP_Z0 : _CROP_Z0 + nz], crop):
        raise MedsslDataError(
            ref / "example_ct_sm.nii.gz",
            f"is not z-slices {_CROP_Z0}..{_CROP_Z0 + nz - 1} of example_ct.nii.gz; cannot name label ids by overlap",
        )


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.count_nonzero(a & b)) / s if s else 0.0


def _derive_label_names(ref: Path, class_maps: dict[str, dict[int, str]] | None) -> dict[str, Any]:
    """``{label file: {id: name}}`` plus the evidence for every name.

    CT ids are named by overlap: ``example_seg_fast/<structure>.nii.gz`` are the
    binary masks of the label map ``example_seg_fast.nii.gz`` (both on the
    30-slice crop), so each id takes the name of the mask it matches. The full
    volume's map uses the same ids; we check that on the shared slices every id
    overlaps its own id best. Ids that only occur outside the crop (bladder,
    femurs, ...) and the MR/DICOM maps are named from TotalSegmentator's
    ``class_map`` (task ``total`` / ``total_mr``), used only if it agrees with
    every overlap-derived name.
    """
    crop_seg = _load_int(ref / "example_seg_fast.nii.gz")
    full_seg = _load_int(ref / "example_seg_fast_force_split.nii.gz")
    masks = {p.name[: -len(".nii.gz")]: np.asarray(nib.load(str(p)).dataobj) > 0
             for p in sorted((ref / "example_seg_fast").glob("*.nii.gz"))}  # fmt: skip
    masks = {k: m for k, m in masks.items() if m.any() and m.shape == crop_seg.shape}
    crop_ids = [int(i) for i in np.unique(crop_seg) if i != 0]
    shared = full_seg[:, :, _CROP_Z0 : _CROP_Z0 + crop_seg.shape[2]]
    names: dict[int, str] = {}
    evidence: dict[str, dict] = {}
    for i in crop_ids:
        m = crop_seg == i
        scores = {name: _dice(m, mask) for name, mask in masks.items()}
        best = max(scores, key=scores.get)
        if scores[best] < _MIN_NAMING_DICE:
            raise MedsslDataError(ref / "example_seg_fast.nii.gz", f"label id {i} matches no structure mask "
                                  f"(best: {best}, Dice {scores[best]:.3f})")  # fmt: skip
        # consistency: the full map's id i, on the shared slices, overlaps crop id i more than any other id
        overlap = np.bincount(crop_seg[shared == i], minlength=max(crop_ids) + 1)
        overlap[0] = 0
        if shared[shared == i].size and int(np.argmax(overlap)) != i:
            raise MedsslDataError(
                ref / "example_seg_fast_force_split.nii.gz",
                f"label id {i} on slices {_CROP_Z0}.. overlaps crop id {int(np.argmax(overlap))} best, not {i}: "
                "the two maps do not share their ids",
            )
        names[i] = best
        evidence[str(i)] = {"name": best, "method": f"overlap with example_seg_fast/{best}.nii.gz",
                            "dice_crop": round(scores[best], 4),
                            "dice_full_vs_crop": round(_dice(shared == i, m), 4)}  # fmt: skip
    total = (class_maps or {}).get("total")
    total_mr = (class_maps or {}).get("total_mr")
    if total is not None and any(total.get(i) != n for i, n in names.items()):
        total = None  # the class map disagrees with the data: do not trust it
    full_names = {}
    for i in (int(i) for i in np.unique(full_seg) if i != 0):
        if i in names:
            full_names[i] = names[i]
        elif total is not None and i in total:
            full_names[i] = total[i]
            evidence[str(i)] = {"name": total[i], "method": "class_map['total'] of totalsegmentator/map_to_binary.py"}

    def _present(path: Path, cmap: dict[int, str] | None) -> dict[str, str] | None:
        if cmap is None:
            return None
        ids = [int(i) for i in np.unique(_load_int(path)) if i != 0]
        return {str(i): cmap[i] for i in ids if i in cmap} if all(i in cmap for i in ids) else None

    return {
        "example_seg_fast_force_split.nii.gz": {str(i): n for i, n in sorted(full_names.items())},
        "example_seg_fast.nii.gz": {str(i): n for i, n in sorted(names.items())},
        # made with `TotalSegmentator -ta total_mr --ml` and `--fast --ml` (tests/update_test_files.sh)
        "example_seg_mr.nii.gz": _present(ref / "example_seg_mr.nii.gz", total_mr),
        "example_seg_dicom.nii.gz": _present(ref / "example_seg_dicom.nii.gz", total),
        "evidence": evidence,
        "class_map_source": None if class_maps is None else
        f"{_CLASS_MAP_MEMBER} (class_map['total'], class_map['total_mr']), parsed with ast, not imported",
    }  # fmt: skip


def load_example_label_names(examples_dir: str | os.PathLike, label_file: str) -> dict[int, str] | None:
    """``{id: name}`` for one of the example label maps (None if its names are unknown)."""
    data = json.loads((Path(examples_dir) / "label_names.json").read_text(encoding="utf-8"))
    key = "example_seg_dicom.nii.gz" if label_file == _DICOM_LABEL_ON_GRID else label_file
    names = data.get(key)
    return {int(k): v for k, v in names.items()} if names else None


def _write_dicom_label_on_image_grid(ref: Path) -> str:
    """Re-index the DICOM example's label map onto the DICOM image's voxel grid, if the grids coincide.

    TotalSegmentator wrote ``example_seg_dicom.nii.gz`` with its y axis reversed
    relative to the DICOM series as read by ITK (same voxel centres in world mm,
    other voxel order), so it fails the same-grid check. When every label voxel
    centre lands exactly on an image voxel centre, the label is a pure axis
    permutation/flip away, which we apply (no interpolation) and save next to it.
    """
    from medssl.data.io import read_volume, write_nifti

    image = read_volume(ref / "example_ct_dicom")
    lab_img = nib.load(str(ref / "example_seg_dicom.nii.gz"))
    label = np.asarray(lab_img.dataobj)
    reindexed = _reindex_onto_grid(label, lab_img.affine, image.shape_vox, image.affine)
    if reindexed is None:
        return ("example_seg_dicom.nii.gz does NOT lie on the DICOM image's voxel grid and cannot be re-indexed "
                "exactly; the DICOM case is registered without a label.")  # fmt: skip
    write_nifti(ref / _DICOM_LABEL_ON_GRID, reindexed.astype(np.uint8), image.affine)
    return (f"example_seg_dicom.nii.gz stores the DICOM grid with the y axis reversed (same voxel centres in world "
            f"mm); {_DICOM_LABEL_ON_GRID} is the same label re-indexed (flip, no interpolation) onto the DICOM "
            "image grid as read by ITK.")  # fmt: skip


def _reindex_onto_grid(
    label: np.ndarray, label_affine: np.ndarray, shape_vox: Sequence[int], image_affine: np.ndarray, tol: float = 1e-3
) -> np.ndarray | None:
    """``out[i] = label[M i + t]`` when ``M`` (image voxel -> label voxel) is a signed permutation; else None."""
    m = np.linalg.inv(np.asarray(label_affine, float)) @ np.asarray(image_affine, float)
    rot = np.rint(m[:3, :3])
    is_signed_permutation = np.all(np.abs(rot).sum(0) == 1) and np.all(np.abs(rot).sum(1) == 1)
    if np.abs(m[:3, :3] - rot).max() > tol or not is_signed_permutation:
        return None
    order = [int(np.flatnonzero(rot[:, b])[0]) for b in range(3)]  # label axis feeding image axis b
    out = np.transpose(label, order)
    if out.shape != tuple(shape_vox):
        return None
    for b, a in enumerate(order):
        sign, t = rot[a, b], m[a, 3]
        if sign > 0 and abs(t) < tol:
            continue
        if sign < 0 and abs(t - (label.shape[a] - 1)) < tol:
            out = np.flip(out, axis=b)
            continue
        return None
    return np.ascontiguousarray(out)
