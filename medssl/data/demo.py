"""The demo data: real TotalSegmentator example volumes, and a synthetic cohort warped from one of them.

Two steps, both cached and both no-ops the second time:

1. :func:`fetch_totalseg_examples` downloads the TotalSegmentator 2.18.0 source
   distribution from PyPI with ``pip download`` (the only registry we may use),
   checks its pinned sha256 and extracts the few real volumes under
   ``tests/reference_files/`` (Apache-2.0). It also works out which organ each
   label id names (by overlap with the per-structure masks that ship alongside).
2. :func:`build_demo_cohort` warps the real abdomen CT and its 61-class label
   map jointly with a random affine + smooth elastic deformation per subject,
   jitters intensities, adds noise and inserts ellipsoid lesions into liver,
   spleen and kidneys. Each subject's deformation is stored, so cross-subject
   correspondences are known exactly (:meth:`DemoCohort.correspondence`).

Deformation convention: ``T_s`` maps a subject's world point ``x`` (mm) to the
template's world point::

    T_s(x) = c + A_s (x - c) + t_s + u_s(x)

with ``c`` the template's centre, ``A_s`` a rotation times a per-axis scaling,
``t_s`` a translation and ``u_s`` a displacement (mm) interpolated with cubic
splines from a coarse control grid (``G^3`` points spanning the subject's field
of view). Subject voxel ``x`` holds the template's CT (linear) and label
(nearest) at ``T_s(x)``. Inverting ``T_s`` (needed to go template -> subject) is
a fixed-point iteration, see :meth:`SubjectDeformation.inverse`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib.util import find_spec
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from medssl import paths
from medssl._files import file_sha256, replace_dir
from medssl.data.errors import MedsslDataError
from medssl.provenance import DEMO_PROVENANCE

if TYPE_CHECKING:  # pragma: no cover
    from medssl.data.preprocess import PreprocessConfig
    from medssl.data.volume import Volume

__all__ = [
    "TOTALSEG_VERSION",
    "TOTALSEG_SDIST_SHA256",
    "ChecksumMismatchError",
    "DemoFetchError",
    "fetch_totalseg_examples",
    "load_example_label_names",
    "CohortConfig",
    "SubjectDeformation",
    "DemoCohort",
    "build_demo_cohort",
    "default_cohort_dir",
]

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
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.tmp-") as tmp:
        tmp = Path(tmp)
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
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex}")
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


# --------------------------------------------------------------------------- deformations


@dataclass(frozen=True)
class SubjectDeformation:
    """``T(x) = c + A (x - c) + t + u(x)``: subject world mm -> template world mm.

    Attributes:
        centre_mm: ``c``, (3,).
        matrix: ``A`` (rotation @ diag(scales)), (3, 3).
        translation_mm: ``t``, (3,).
        grid_origin_mm: world position of control point (0, 0, 0), (3,).
        grid_spacing_mm: control point spacing along world x, y, z, (3,).
        displacement_mm: ``u`` at the control points, (3, G, G, G); interpolated
            with cubic splines (``scipy.ndimage.map_coordinates``, order 3, mode
            "nearest"), so ``u`` is smooth and defined everywhere.
    """

    centre_mm: np.ndarray
    matrix: np.ndarray
    translation_mm: np.ndarray
    grid_origin_mm: np.ndarray
    grid_spacing_mm: np.ndarray
    displacement_mm: np.ndarray

    @classmethod
    def identity(cls, centre_mm: Sequence[float] = (0.0, 0.0, 0.0)) -> "SubjectDeformation":
        return cls(np.asarray(centre_mm, float), np.eye(3), np.zeros(3), np.zeros(3), np.ones(3),
                   np.zeros((3, 2, 2, 2)))  # fmt: skip

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SubjectDeformation":
        with np.load(path, allow_pickle=False) as z:
            return cls(*(np.asarray(z[k], dtype=np.float64) for k in
                         ("centre_mm", "matrix", "translation_mm", "grid_origin_mm", "grid_spacing_mm",
                          "displacement_mm")))  # fmt: skip

    def save(self, path: str | os.PathLike, **extra: np.ndarray) -> None:
        np.savez(path, **{k: np.asarray(v) for k, v in asdict(self).items()}, **extra)

    def displacement(self, points_mm: np.ndarray) -> np.ndarray:
        """``u(x)`` in mm, (N, 3) -> (N, 3)."""
        g = ((points_mm - self.grid_origin_mm) / self.grid_spacing_mm).T  # (3, N) control-grid coordinates
        return np.stack(
            [ndi.map_coordinates(self.displacement_mm[c], g, order=3, mode="nearest") for c in range(3)], axis=1
        )

    def __call__(self, points_mm: np.ndarray) -> np.ndarray:
        """``T(x)``: subject world mm (N, 3) -> template world mm (N, 3)."""
        p = _as_points(points_mm)
        return self.centre_mm + (p - self.centre_mm) @ self.matrix.T + self.translation_mm + self.displacement(p)

    def inverse(self, points_mm: np.ndarray, tol_mm: float = 1e-4, max_iter: int = 200) -> np.ndarray:
        """``T^-1(y)``: template world mm (N, 3) -> subject world mm (N, 3).

        Fixed-point iteration ``x <- c + A^-1 (y - c - t - u(x))``, which converges
        because ``u`` varies slowly (its Lipschitz constant times ``|A^-1|`` is well
        below 1 for the cohort's settings: ~9 mm control displacements over ~60 mm
        spacing). It stops when the step falls below ``tol_mm``; the final residual
        ``|T(x) - y|`` is checked to be below ``10 * tol_mm`` (well under 1 mm; the
        tests measure the round trip).

        Raises:
            RuntimeError: the iteration did not converge (a folding deformation).
        """
        y = _as_points(points_mm)
        a_inv = np.linalg.inv(self.matrix)
        base = y - self.centre_mm - self.translation_mm
        x = self.centre_mm + base @ a_inv.T
        for _ in range(max_iter):
            x_new = self.centre_mm + (base - self.displacement(x)) @ a_inv.T
            step = np.abs(x_new - x).max() if len(x) else 0.0
            x = x_new
            if step < tol_mm:
                break
        residual = np.linalg.norm(self(x) - y, axis=1).max() if len(x) else 0.0
        if residual > 10 * tol_mm:
            raise RuntimeError(f"inverting the subject deformation did not converge (residual {residual:.3g} mm)")
        return x


def _as_points(points_mm: Any) -> np.ndarray:
    p = np.asarray(points_mm, dtype=np.float64)
    if p.ndim == 1 and p.shape[0] == 3:
        p = p[None]
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"points_mm must have shape (N, 3), got {np.shape(points_mm)}")
    return p


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3D rotation (QR of a Gaussian matrix, signs fixed so det = +1)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _euler_rotation(angles_rad: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles_rad)
    sx, sy, sz = np.sin(angles_rad)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


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
        return json.loads(json.dumps(asdict(self)))


def _config_from_json(data: dict) -> CohortConfig:
    return CohortConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# --------------------------------------------------------------------------- subject synthesis


_TEMPLATE: dict[str, Any] = {}


def _load_template(examples_dir: str) -> dict[str, Any]:
    ref = Path(examples_dir)
    ct_img = nib.load(str(ref / "example_ct.nii.gz"))
    names = load_example_label_names(ref, CT_LABEL_FILE) or {}
    return {
        "ct": np.asarray(ct_img.dataobj, dtype=np.float32),
        "label": np.asarray(nib.load(str(ref / CT_LABEL_FILE)).dataobj).astype(np.uint8),
        "affine": np.asarray(ct_img.affine, dtype=np.float64),
        "names": names,
    }


def _init_worker(examples_dir: str) -> None:
    _TEMPLATE.clear()
    _TEMPLATE.update(_load_template(examples_dir))


def _subject_grid(template_shape: Sequence[int], template_affine: np.ndarray, spacing_mm: float):
    """The template's field of view at ``spacing_mm`` (same origin voxel and axes). Returns (shape, affine)."""
    t_spacing = np.linalg.norm(template_affine[:3, :3], axis=0)
    factor = spacing_mm / t_spacing
    shape = tuple(int(np.floor((n - 1) / f + 1e-6)) + 1 for n, f in zip(template_shape, factor))
    affine = template_affine.copy()
    affine[:3, :3] = template_affine[:3, :3] * factor  # scale each column (voxel axis)
    return shape, affine


def _world_centres(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World mm of every voxel centre, C order, (N, 3)."""
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:4]).T


def _draw_deformation(rng: np.random.Generator, cfg: CohortConfig, shape, affine, centre_mm) -> SubjectDeformation:
    angles = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, 3))
    scales = rng.uniform(1 - cfg.scaling, 1 + cfg.scaling, 3)
    translation = rng.uniform(-cfg.translation_mm, cfg.translation_mm, 3)
    corners = _world_centres((2, 2, 2), affine @ np.diag([shape[0] - 1, shape[1] - 1, shape[2] - 1, 1]))
    lo, hi = corners.min(0), corners.max(0)
    g = cfg.elastic_control_points
    disp = np.clip(rng.normal(0.0, cfg.elastic_mm / 2, (3, g, g, g)), -cfg.elastic_mm, cfg.elastic_mm)
    return SubjectDeformation(
        centre_mm=np.asarray(centre_mm, float),
        matrix=_euler_rotation(angles) @ np.diag(scales),
        translation_mm=translation,
        grid_origin_mm=lo,
        grid_spacing_mm=(hi - lo) / (g - 1),
        displacement_mm=disp,
    )


def _sample_lesion_delta(rng: np.random.Generator, cfg: CohortConfig) -> float:
    lo, hi = cfg.lesion_delta_hu
    m = cfg.lesion_min_abs_delta_hu
    if hi <= m or (lo < -m and rng.random() < 0.5):
        return float(rng.uniform(lo, -m))
    return float(rng.uniform(m, hi))


def _insert_lesions(rng, image, label, affine, organ_ids: dict[str, int], cfg: CohortConfig):
    """Paint 1-3 ellipsoid lesions into organs of ``image`` (in place). Returns (lesion map, records).

    Each lesion's centre is drawn among organ voxels at least its largest radius
    away from the organ's border (and from earlier lesions), so the ellipsoid lies
    inside the organ; radii shrink to fit when an organ is too thin. Intensity
    changes by ``delta * w`` with ``w = (1 - tanh((r - 1) / edge)) / 2`` (``r``: the
    ellipsoid's normalised radius), restricted to the organ: a smooth edge.
    """
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    lesion_map = np.zeros(label.shape, dtype=np.uint8)
    records = []
    n = int(rng.integers(cfg.lesions_per_subject[0], cfg.lesions_per_subject[1] + 1))
    organs = [o for o in cfg.lesion_organs if o in organ_ids and np.any(label == organ_ids[o])]
    r_lo, r_hi = cfg.lesion_radius_mm
    for k in range(n):
        for _attempt in range(8):
            if not organs:
                break
            organ = organs[int(rng.integers(len(organs)))]
            oid = organ_ids[organ]
            radii = rng.uniform(r_lo, r_hi, 3)
            placed = _place_one_lesion(rng, image, label, lesion_map, affine, spacing, oid, radii, k + 1, cfg)
            if placed is not None:
                placed.update(organ=organ, organ_id=oid)
                records.append(placed)
                break
    return lesion_map, records


def _place_one_lesion(rng, image, label, lesion_map, affine, spacing, oid, radii, lesion_id, cfg):
    organ = label == oid
    idx = np.argwhere(organ)
    margin = int(np.ceil(cfg.lesion_radius_mm[1] * 2 / spacing.min())) + 2
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, label.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    free = organ[box] & (lesion_map[box] == 0)
    depth_mm = ndi.distance_transform_edt(free, sampling=spacing)  # distance to organ border or other lesion
    need = radii.max() + 0.5 * spacing.max()
    if depth_mm.max() < need:
        fit = depth_mm.max() - 0.5 * spacing.max()
        if fit < 0.75 * cfg.lesion_radius_mm[0]:
            return None
        radii = radii * (fit / radii.max())
        need = depth_mm.max() - 1e-6
    candidates = np.argwhere(depth_mm >= need)
    centre_vox = candidates[int(rng.integers(len(candidates)))] + lo
    centre_mm = affine[:3, :3] @ centre_vox + affine[:3, 3]
    rot = _random_rotation(rng)
    delta = _sample_lesion_delta(rng, cfg)
    # local box around the lesion, wide enough for the smooth edge
    half = np.ceil(radii.max() * (1 + 3 * cfg.lesion_edge) / spacing).astype(int) + 1
    a = np.maximum(centre_vox - half, 0)
    b = np.minimum(centre_vox + half + 1, label.shape)
    local = tuple(slice(p, q) for p, q in zip(a, b))
    sub_shape = tuple(int(q - p) for p, q in zip(a, b))
    sub_affine = affine.copy()
    sub_affine[:3, 3] = affine[:3, :3] @ a + affine[:3, 3]
    pts = _world_centres(sub_shape, sub_affine) - centre_mm
    r_norm = np.linalg.norm((pts @ rot) / radii, axis=1).reshape(sub_shape)  # rot columns = ellipsoid axes
    in_organ = label[local] == oid
    weight = 0.5 * (1.0 - np.tanh((r_norm - 1.0) / cfg.lesion_edge)) * in_organ
    image[local] += (delta * weight).astype(image.dtype)
    inside = (r_norm <= 1.0) & in_organ & (lesion_map[local] == 0)
    lesion_map[local][inside] = lesion_id
    return {
        "id": lesion_id,
        "centre_mm": [round(float(v), 3) for v in centre_mm],
        "radii_mm": [round(float(v), 3) for v in radii],
        "axes": np.round(rot, 6).tolist(),
        "delta_hu": round(delta, 3),
        "voxels": int(inside.sum()),
    }


def _synthesize_subject(job: dict) -> dict:
    """Make one subject from the template in ``_TEMPLATE``; write its files into ``job['dir']``."""
    from medssl.data.io import write_nifti

    cfg = _config_from_json(job["config"])
    rng = np.random.default_rng(np.random.SeedSequence(job["entropy"], spawn_key=tuple(job["spawn_key"])))
    t = _TEMPLATE
    shape, affine = _subject_grid(t["ct"].shape, t["affine"], cfg.spacing_mm)
    centre_mm = t["affine"][:3, :3] @ ((np.asarray(t["ct"].shape) - 1) / 2) + t["affine"][:3, 3]
    deformation = _draw_deformation(rng, cfg, shape, affine, centre_mm)

    template_mm = deformation(_world_centres(shape, affine))  # (N, 3)
    t_inv = np.linalg.inv(t["affine"])
    coords = (t_inv[:3, :3] @ template_mm.T + t_inv[:3, 3:4])  # (3, N) template voxel coordinates
    image = ndi.map_coordinates(t["ct"], coords, order=1, mode="constant", cval=cfg.background_hu).reshape(shape)
    label = ndi.map_coordinates(t["label"], coords, order=0, mode="constant", cval=0).reshape(shape)
    # sign: derivatives are along voxel axes, whose handedness is det(affine)'s sign
    min_jac = _min_jacobian_det(template_mm.reshape(shape + (3,)), np.linalg.norm(affine[:3, :3], axis=0))
    min_jac *= np.sign(np.linalg.det(affine[:3, :3]))
    del template_mm, coords

    scale = rng.uniform(1 - cfg.intensity_scale, 1 + cfg.intensity_scale)
    shift = rng.uniform(-cfg.intensity_shift_hu, cfg.intensity_shift_hu)
    image = image * np.float32(scale) + np.float32(shift)
    organ_ids = {name: i for i, name in t["names"].items()}
    lesion_map, lesions = _insert_lesions(rng, image, label, affine, organ_ids, cfg)
    noise_hu = rng.uniform(*cfg.noise_hu)
    image += rng.normal(0.0, noise_hu, shape).astype(np.float32)
    image = np.clip(np.rint(image), -32768, 32767).astype(np.int16)

    out = Path(job["dir"])
    out.mkdir(parents=True, exist_ok=True)
    write_nifti(out / "image.nii.gz", image, affine)
    write_nifti(out / "label.nii.gz", label.astype(np.uint8), affine)
    write_nifti(out / "lesion.nii.gz", lesion_map, affine)
    deformation.save(out / "deformation.npz", subject_affine=affine, subject_shape_vox=np.asarray(shape),
                     template_affine=t["affine"])  # fmt: skip
    return {
        "case_id": job["case_id"],
        "split": job["split"],
        "shape_vox": list(shape),
        "spacing_mm": [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)],
        "intensity_scale": round(float(scale), 5),
        "intensity_shift_hu": round(float(shift), 3),
        "noise_hu": round(float(noise_hu), 3),
        "min_jacobian_det": round(float(min_jac), 4),
        "n_labels": int(len(np.unique(label)) - 1),
        "lesions": lesions,
        "lesion_voxels": int(np.count_nonzero(lesion_map)),
    }


def _min_jacobian_det(field_mm: np.ndarray, spacing_mm: np.ndarray) -> float:
    """Smallest det(dT/dx) over the grid (central differences); > 0 means the warp does not fold."""
    sub = field_mm[::2, ::2, ::2]  # every 2nd voxel: the warp is smooth on that scale
    grads = [np.gradient(sub[..., c], *(2 * spacing_mm)) for c in range(3)]  # grads[c][d] = dT_c/dx_d
    j = np.stack([np.stack(g, -1) for g in grads], -2)  # (..., 3, 3), derivatives along voxel axes
    return float(np.linalg.det(j).min())


# --------------------------------------------------------------------------- the cohort


def default_cohort_dir(n_subjects: int = 48, seed: int = 0, spacing_mm: float = 3.0) -> Path:
    """``paths.data_dir()/demo/cohort-seed<seed>-n<n>`` (plus ``-<spacing>mm`` if not 3 mm)."""
    suffix = "" if float(spacing_mm) == 3.0 else f"-{float(spacing_mm):g}mm"
    return paths.data_dir() / "demo" / f"cohort-seed{seed}-n{n_subjects}{suffix}"


def build_demo_cohort(
    n_subjects: int = 48,
    split_counts: tuple[int, int, int] = (32, 8, 8),
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    spacing_mm: float = 3.0,
    lesions_per_subject: tuple[int, int] = (1, 3),
    *,
    examples_dir: str | os.PathLike | None = None,
    n_workers: int | None = None,
) -> "DemoCohort":
    """Build (or reuse) the synthetic demo cohort; see the module docstring for the model.

    Args:
        n_subjects: number of synthetic subjects.
        split_counts: subjects in (train, val, test); scaled if they do not sum to ``n_subjects``.
        seed: the cohort seed; subject ``i`` uses ``np.random.SeedSequence(seed).spawn(n)[i]``,
            so the result does not depend on ``n_workers``.
        out_dir: the cohort folder (default :func:`default_cohort_dir`).
        progress: show progress bars.
        spacing_mm: isotropic voxel size of the subjects' grids (the template's field of view).
        lesions_per_subject: (min, max) lesions per subject.
        examples_dir: the fetched TotalSegmentator examples (fetched if None).
        n_workers: processes for synthesis (default: up to 4 cores for >= 8 subjects, else 1).

    A complete cohort with the same settings and source is returned untouched.
    Otherwise it is built in a temporary folder next to ``out_dir`` and moved
    into place at the end (an older cohort there is replaced only then).
    """
    cfg = CohortConfig(
        n_subjects=int(n_subjects),
        split_counts=tuple(int(c) for c in split_counts),
        seed=int(seed),
        spacing_mm=float(spacing_mm),
        lesions_per_subject=tuple(int(v) for v in lesions_per_subject),
    )
    examples = Path(examples_dir) if examples_dir is not None else fetch_totalseg_examples(progress=progress)
    root = Path(out_dir).expanduser() if out_dir is not None else default_cohort_dir(n_subjects, seed, spacing_mm)
    if _cohort_complete(root, cfg):
        return DemoCohort(root)
    start = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root.parent, root.name)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    try:
        subjects = _synthesize_all(cfg, examples, tmp, n_workers, progress)
        _write_cohort_files(cfg, examples, tmp, root, subjects, time.perf_counter() - start)
        replace_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DemoCohort(root)


def _synthesize_all(cfg: CohortConfig, examples: Path, tmp: Path, n_workers: int | None, progress: bool) -> list[dict]:
    seeds = np.random.SeedSequence(cfg.seed).spawn(cfg.n_subjects)
    splits = cfg.subject_splits()
    jobs = [
        {"case_id": f"demo-s{i:03d}", "split": splits[i], "entropy": s.entropy, "spawn_key": list(s.spawn_key),
         "config": cfg.to_json(), "dir": str(tmp / "subjects" / f"demo-s{i:03d}")}
        for i, s in enumerate(seeds)
    ]  # fmt: skip
    if n_workers is None:
        n_workers = min(os.cpu_count() or 1, 4) if cfg.n_subjects >= 8 else 1
    bar = tqdm(total=len(jobs), desc="synthesising demo subjects", unit="subject", disable=not progress)
    try:
        if n_workers <= 1:
            _init_worker(str(examples))
            results = []
            for job in jobs:
                results.append(_synthesize_subject(job))
                bar.update()
            return results
        # spawn, not fork: the caller (a notebook kernel) may hold torch/OpenMP threads
        ctx = multiprocessing.get_context("spawn")
        init = {"initializer": _init_worker, "initargs": (str(examples),)}
        with ProcessPoolExecutor(n_workers, mp_context=ctx, **init) as pool:
            futures = [pool.submit(_synthesize_subject, job) for job in jobs]
            results = []
            for fut in futures:  # in subject order
                results.append(fut.result())
                bar.update()
            return results
    finally:
        bar.close()


def _external_rows(examples: Path, root: Path) -> tuple[list[dict], list[dict]]:
    """Manifest rows for the real example volumes (split ``external``) and notes about them."""
    from medssl.data.io import read_volume

    ref = examples.resolve()
    ct_names = load_example_label_names(ref, CT_LABEL_FILE)
    mr_names = load_example_label_names(ref, "example_seg_mr.nii.gz")
    rows = [
        {"case_id": "totalseg-ct", "image": ref / "example_ct.nii.gz", "label": ref / CT_LABEL_FILE, "names": ct_names,
         "note": "the real CT every demo subject is warped from (the template)"},
        {"case_id": "totalseg-mr", "image": ref / "example_mr_sm.nii.gz", "label": ref / "example_seg_mr.nii.gz",
         "names": mr_names, "note": "real abdominal MR (another subject), labels from TotalSegmentator total_mr"},
    ]  # fmt: skip
    dicom_label = ref / _DICOM_LABEL_ON_GRID
    dicom = {"case_id": "totalseg-dicom", "image": ref / "example_ct_dicom", "label": "", "names": None,
             "note": "real abdominal CT as a 20-file DICOM series (another subject); "}  # fmt: skip
    if dicom_label.is_file():
        try:
            read_volume(dicom["image"], dicom_label)
            dicom.update(label=dicom_label, names=load_example_label_names(ref, _DICOM_LABEL_ON_GRID))
            dicom["note"] += ("label example_seg_dicom.nii.gz re-indexed onto the DICOM grid (its y axis was "
                              "stored reversed; same voxel centres, no interpolation)")  # fmt: skip
        except MedsslDataError as e:
            dicom["note"] += f"registered WITHOUT label: {e.problem}"
    else:
        dicom["note"] += "registered WITHOUT label: example_seg_dicom.nii.gz does not lie on the DICOM image grid"
    rows.append(dicom)
    manifest_rows, notes = [], []
    for r in rows:
        manifest_rows.append({
            "case_id": r["case_id"], "image": str(r["image"]), "label": str(r["label"]), "group": r["case_id"],
            "split": "external", "aux_lesion": "", "dataset": f"totalsegmentator-{TOTALSEG_VERSION}-example",
            "label_names": json.dumps({str(k): v for k, v in r["names"].items()}) if r["names"] else "",
        })  # fmt: skip
        notes.append({"case_id": r["case_id"], "note": r["note"]})
    return manifest_rows, notes


def _write_cohort_files(cfg: CohortConfig, examples: Path, tmp: Path, root: Path, subjects: list[dict], seconds: float):
    from medssl.data.datasets import write_manifest

    names = load_example_label_names(examples, CT_LABEL_FILE) or {}
    names_json = json.dumps({str(k): v for k, v in names.items()})
    rows = []
    for s in subjects:
        rel = f"subjects/{s['case_id']}"
        rows.append({"case_id": s["case_id"], "image": f"{rel}/image.nii.gz", "label": f"{rel}/label.nii.gz",
                     "group": s["case_id"], "split": s["split"], "aux_lesion": f"{rel}/lesion.nii.gz",
                     "dataset": "medssl-demo-synthetic", "label_names": names_json})  # fmt: skip
    external, notes = _external_rows(examples, root)
    write_manifest(pd.DataFrame(rows + external), tmp / "manifest.csv")
    (tmp / "label_names.json").write_text(json.dumps({str(k): v for k, v in names.items()}, indent=1), "utf-8")
    source = json.loads((examples / "SOURCE.json").read_text(encoding="utf-8"))
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    info = {
        "format_version": 1,
        "config": cfg.to_json(),
        "seed": cfg.seed,
        "source": {"package": f"TotalSegmentator {TOTALSEG_VERSION}", "archive_sha256": source["archive_sha256"],
                   "license": TOTALSEG_LICENSE, "template_image": "example_ct.nii.gz",
                   "template_label": CT_LABEL_FILE, "examples_dir": str(examples.resolve())},
        "deformation": "T_s(x) = c + A_s (x - c) + t_s + u_s(x): subject world mm -> template world mm; "
                       "parameters in subjects/<case>/deformation.npz (see medssl.data.demo.SubjectDeformation)",
        "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(seconds, 2),
        "provenance": DEMO_PROVENANCE,
        "subjects": subjects,
        "external": notes,
        "files": files,
    }  # fmt: skip
    (tmp / "cohort.json").write_text(json.dumps(info, indent=1), encoding="utf-8")  # last: marks completeness


def _cohort_complete(root: Path, cfg: CohortConfig) -> bool:
    try:
        info = json.loads((root / "cohort.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if info.get("config") != cfg.to_json() or info.get("source", {}).get("archive_sha256") != TOTALSEG_SDIST_SHA256:
        return False
    for rel, size in info.get("files", {}).items():
        p = root / rel
        if not p.is_file() or p.stat().st_size != size:
            return False
    # the external cases point into the examples folder: a moved data folder means a rebuild
    return _examples_complete(Path(info.get("source", {}).get("examples_dir", "")))


def _remove_stale_builds(parent: Path, name: str, older_than_s: float = 24 * 3600) -> None:
    """Delete temporary folders of cohort builds that were killed long ago."""
    now = time.time()
    for p in parent.glob(f".{name}.tmp-*"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)
        except FileNotFoundError:
            pass





class DemoCohort:
    """A built demo cohort on disk: manifest, label names, deformations, provenance.

    Attributes:
        root: the cohort folder.
        manifest: the manifest (absolute paths), splits train/val/test/external.
        label_names: ``{id: name}`` of the subjects' (and the template's) organ labels.
        provenance: the statement every report must carry.
        info: the parsed ``cohort.json``.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        from medssl.data.datasets import read_manifest

        self.root = Path(root)
        self.info: dict = json.loads((self.root / "cohort.json").read_text(encoding="utf-8"))
        self.manifest: pd.DataFrame = read_manifest(self.root / "manifest.csv")
        raw = json.loads((self.root / "label_names.json").read_text(encoding="utf-8"))
        self.label_names: dict[int, str] = {int(k): v for k, v in raw.items()}
        self.provenance: str = self.info.get("provenance", DEMO_PROVENANCE)
        self.config = _config_from_json(self.info["config"])
        self._deformations: dict[str, SubjectDeformation] = {}

    def __repr__(self) -> str:
        return f"DemoCohort(root={str(self.root)!r}, n_subjects={self.config.n_subjects}, seed={self.config.seed})"

    def case_ids(self, split: str | None = None) -> list[str]:
        m = self.manifest
        return list(m["case_id"] if split is None else m.loc[m["split"] == split, "case_id"])

    def subject(self, case_id: str) -> dict:
        """The ``cohort.json`` record of a synthetic subject (lesions, intensity settings, ...)."""
        for s in self.info["subjects"]:
            if s["case_id"] == case_id:
                return s
        raise KeyError(f"{case_id!r} is not a synthetic subject of {self.root}")

    def deformation(self, case_id: str) -> SubjectDeformation:
        """The subject's ``T``; the template case ``totalseg-ct`` has the identity."""
        if case_id not in self._deformations:
            if case_id == "totalseg-ct":
                self._deformations[case_id] = SubjectDeformation.identity()
            else:
                path = self.root / "subjects" / case_id / "deformation.npz"
                if not path.is_file():
                    raise KeyError(f"{case_id!r} has no deformation in {self.root} (external cases other than "
                                   "'totalseg-ct' are other patients; their correspondence is unknown)")  # fmt: skip
                self._deformations[case_id] = SubjectDeformation.load(path)
        return self._deformations[case_id]

    def to_template_mm(self, case_id: str, points_mm: np.ndarray) -> np.ndarray:
        """Subject world mm (N, 3) -> template (``totalseg-ct``) world mm (N, 3). Exact (it is ``T``)."""
        return self.deformation(case_id)(points_mm)

    def from_template_mm(self, case_id: str, points_mm: np.ndarray) -> np.ndarray:
        """Template world mm (N, 3) -> subject world mm (N, 3), to 1e-4 mm (see ``SubjectDeformation.inverse``)."""
        return self.deformation(case_id).inverse(points_mm)

    def correspondence(self, case_a: str, case_b: str, points_mm_a: np.ndarray) -> np.ndarray:
        """The points of ``case_b`` (world mm, (N, 3)) that show the same anatomy as ``points_mm_a`` in ``case_a``.

        ``T_b^-1(T_a(p))``; the round trip a -> b -> a returns within 1e-3 mm.
        """
        return self.from_template_mm(case_b, self.to_template_mm(case_a, points_mm_a))

    def volumes(
        self, split: str | None = None, preprocess_config: "PreprocessConfig | None" = None, progress: bool = True
    ) -> list["Volume"]:
        """Cached, preprocessed Volumes of a split (all cases if None), through :class:`VolumeCache`.

        The default preprocessing (:meth:`default_preprocess_config`) keeps the
        cohort's spacing and crops to the body (medssl.data.body).
        """
        from medssl.data.cache import VolumeCache

        config = preprocess_config if preprocess_config is not None else self.default_preprocess_config()
        cache = VolumeCache(config=config)
        cache.build(self.manifest, progress=progress, workers=2 if len(self.manifest) > 8 else 1)
        return cache.load_all(self.manifest, split=split)

    def default_preprocess_config(self) -> "PreprocessConfig":
        from medssl.data.preprocess import PreprocessConfig

        s = float(self.config.spacing_mm)
        # The body mask's modality rule crops the air: -500 HU for the CT subjects, Otsu for the MR case.
        return PreprocessConfig(target_spacing_mm=(s, s, s))
