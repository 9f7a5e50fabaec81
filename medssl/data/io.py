"""Reading volumes (NIfTI, NRRD, MetaImage, DICOM series) into a :class:`Volume`, and writing NIfTI.

Every reader returns the array in ``(X, Y, Z[, C])`` index order plus a RAS
voxel -> world affine, so NIfTI and ITK-read files of the same scan give the
same :class:`Volume`. NIfTI goes through nibabel (already RAS). NRRD,
MetaImage and DICOM go through SimpleITK, whose geometry is LPS:
``world_lps = origin + direction @ diag(spacing) @ ijk`` with ``ijk`` in
(x, y, z) order while its arrays are indexed (z, y, x). We transpose the
array and flip the first two world axes (``diag(-1, -1, 1)``) to get RAS.

Bad files raise :mod:`medssl.data.errors` naming the file and the problem.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medssl._files import atomic_path
from medssl.data.errors import (
    DimensionalityError,
    GeometryError,
    MedsslDataError,
    UnreadableFileError,
)
from medssl.data.validate import channels_first, check_finite, check_geometry, check_same_grid
from medssl.data.volume import Volume

__all__ = ["read_volume", "write_nifti", "NIFTI_SUFFIXES", "ITK_SUFFIXES"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class _Raw:
    """What a format reader hands back: array in (X, Y, Z[, C]) order and a RAS affine."""

    array: np.ndarray
    affine: np.ndarray
    fmt: str


# --------------------------------------------------------------------------- format dispatch


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _read_raw(path: Path) -> _Raw:
    """Dispatch on the file type; turn every unexpected reader failure into UnreadableFileError."""
    if not path.exists():
        raise UnreadableFileError(path, "file or folder does not exist")
    try:
        if path.is_dir():
            return _read_dicom_series(path)
        suffix = _suffix(path)
        if suffix in NIFTI_SUFFIXES:
            return _read_nifti(path)
        if suffix in ITK_SUFFIXES:
            return _read_itk_file(path)
        try:  # unknown suffix: SimpleITK recognises many formats by content
            return _read_itk_file(path)
        except UnreadableFileError as exc:
            raise UnreadableFileError(
                path,
                f"unsupported or unreadable format '{suffix}' ({exc.problem}); medssl reads "
                f"{', '.join(NIFTI_SUFFIXES + ITK_SUFFIXES)} files and DICOM series folders",
            ) from None
    except MedsslDataError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # boundary: any reader failure means the file cannot be used
        raise UnreadableFileError(path, f"cannot read file: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- NIfTI (nibabel)


def _check_nifti_pixdim(path: Path, img: nib.Nifti1Image) -> None:
    """Reject zero/negative/NaN pixdim when it defines the geometry.

    nibabel silently "fixes" such headers on load (zero -> 1, negative -> abs),
    which would hand us a wrong but valid-looking affine; so we re-read the raw
    header without fixes. With a valid sform (code > 0) pixdim is not used.
    """
    header = img.header
    if int(header["sform_code"]) > 0:
        return
    with nib.openers.ImageOpener(path) as fobj:
        raw = type(header).from_fileobj(fobj, check=False)
    pixdim = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise GeometryError(
            path,
            f"broken geometry: voxel spacing (NIfTI pixdim[1:4]) is {pixdim.tolist()} mm; "
            "spacing must be positive and finite",
        )


def _check_gzip_complete(path: Path, expected_size: int) -> None:
    """Detect a truncated .gz whose cut fell after the last voxel (the reader never notices).

    The gzip trailer's last 4 bytes hold the uncompressed size mod 2**32: a cheap
    check. On a mismatch (truncation, or a legitimate multi-member gzip) we
    decompress to the end, which raises the real error if the file is damaged.
    """
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        if int.from_bytes(f.read(4), "little") == expected_size % 2**32:
            return
    with gzip.open(path, "rb") as g:
        while g.read(1 << 24):
            pass


def _read_nifti(path: Path) -> _Raw:
    img = nib.load(str(path))
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise UnreadableFileError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
    _check_nifti_pixdim(path, img)
    # asanyarray keeps integer label maps integer (scaling, if any, makes it float).
    array = np.asanyarray(img.dataobj)
    if _suffix(path) == ".nii.gz":
        _check_gzip_complete(path, img.header.get_data_offset() + array.size * img.header.get_data_dtype().itemsize)
    return _Raw(array=array, affine=np.asarray(img.affine, dtype=np.float64), fmt="nifti")


# --------------------------------------------------------------------------- NRRD / MetaImage / DICOM (SimpleITK)

_NUM = r"[-+]?(?:nan|inf|\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"


def _text_header(path: Path, max_bytes: int = 65536) -> list[str]:
    """The plain-text header lines of a NRRD or MetaImage file (data may follow)."""
    with open(path, "rb") as f:
        head = f.read(max_bytes)
    text = head.split(b"\n\n", 1)[0] if _suffix(path) in (".nrrd", ".nhdr") else head
    lines = text.decode("latin-1").splitlines()
    out = []
    for line in lines:
        out.append(line)
        if line.strip().startswith("ElementDataFile"):
            break
    return out


def _header_spacing_problem(path: Path) -> str | None:
    """Spacing problems ITK would hide or mangle, read straight from the text header.

    ITK turns a negative MetaImage ``ElementSpacing`` into a silent axis flip and
    rejects zero/NaN spacing with a generic exception, so we check the header
    ourselves to name the real problem.
    """
    try:
        lines = _text_header(path)
    except OSError:
        return None  # let SimpleITK report the read failure
    for line in lines:
        key, sep, value = line.partition("=") if "=" in line else line.partition(":")
        key = key.strip().lower()
        if not sep:
            continue
        if key in ("elementspacing", "spacings"):
            vals = [float(v) for v in re.findall(_NUM, value, flags=re.I)]
            if vals and (not np.all(np.isfinite(vals)) or min(vals) <= 0):
                return f"voxel spacing in the header ({line.strip()}) must be positive and finite"
        if key == "space directions":
            for vec in re.findall(r"\(([^)]*)\)", value):
                vals = [float(v) for v in re.findall(_NUM, vec, flags=re.I)]
                if len(vals) != 3 or not np.all(np.isfinite(vals)):
                    return f"space direction ({vec}) in the header is not a finite 3-vector"
                if np.linalg.norm(vals) == 0:
                    return f"zero voxel spacing in the header ({line.strip()})"
    return None


def _itk_error_message(exc: Exception) -> str:
    """The informative line(s) of an ITK exception, without the C++ source locations."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    keep = [
        ln for ln in lines if not ln.startswith("Exception thrown in SimpleITK") and not re.match(r"^/\S+:\d+:?$", ln)
    ]
    msg = " ".join(keep) if keep else str(exc)
    return re.sub(r"(ITK ERROR|sitk::ERROR):\s*(\w+\(0x[0-9a-f]+\):\s*)?", "", msg).strip()


def _sitk_to_raw(path: Path, image: sitk.Image, fmt: str) -> _Raw:
    """SimpleITK image (LPS, (z, y, x) arrays) -> (X, Y, Z[, C]) array + RAS affine."""
    dim = image.GetDimension()
    if dim == 2:
        raise DimensionalityError(path, f"image is 2D (size {image.GetSize()}); medssl needs 3D volumes")
    if dim > 4:
        raise DimensionalityError(path, f"image is {dim}D (size {image.GetSize()}); medssl reads 3D volumes")
    arr = sitk.GetArrayViewFromImage(image)  # (z, y, x[, comp]) or (t, z, y, x[, comp]) for 4D
    if dim == 4:
        arr = arr.transpose(3, 2, 1, 0, *range(4, arr.ndim))  # -> (x, y, z, t[, comp])
    else:
        arr = arr.transpose(2, 1, 0, *range(3, arr.ndim))  # -> (x, y, z[, comp])
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)[:3]
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)[:3]
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = _LPS_TO_RAS @ origin
    return _Raw(array=np.array(arr), affine=affine, fmt=fmt)  # copy: the view dies with `image`


def _execute_itk(path: Path, run) -> sitk.Image:
    try:
        return run()
    except RuntimeError as exc:
        msg = _itk_error_message(exc)
        if re.search(r"spacing|direction|determinant|space vector", msg, flags=re.I):
            raise GeometryError(path, f"broken geometry: {msg}") from None
        raise UnreadableFileError(path, f"cannot read file: {msg}") from None


def _read_itk_file(path: Path) -> _Raw:
    if _suffix(path) in ITK_SUFFIXES:
        problem = _header_spacing_problem(path)
        if problem:
            raise GeometryError(path, f"broken geometry: {problem}")
    image = _execute_itk(path, lambda: sitk.ReadImage(str(path)))
    fmt = {".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "metaimage", ".mhd": "metaimage"}.get(_suffix(path), "itk")
    return _sitk_to_raw(path, image, fmt)


def _read_dicom_series(folder: Path) -> _Raw:
    """One DICOM series per folder, read with SimpleITK/GDCM (which sorts slices by position)."""
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(series_ids) == 0:
        raise UnreadableFileError(
            folder,
            "folder holds no readable DICOM series (files must sit directly in the folder, one series per folder)",
        )
    if len(series_ids) > 1:
        raise UnreadableFileError(
            folder,
            f"folder holds {len(series_ids)} DICOM series ({', '.join(series_ids)}); medssl reads one series per "
            "folder: move each series into its own folder",
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # per-slice tags, for the slice-gap check
    image = _execute_itk(folder, reader.Execute)
    if image.GetDimension() == 3 and len(files) > 2:
        _check_dicom_slice_gaps(folder, reader, image)
    return _sitk_to_raw(folder, image, "dicom")


def _check_dicom_slice_gaps(folder: Path, reader: sitk.ImageSeriesReader, image: sitk.Image) -> None:
    """Reject series whose slices are unevenly spaced (missing or duplicate slices).

    ITK only warns and then uses the *average* gap as the slice spacing, which
    puts every slice after a missing one at the wrong world position.
    """
    key = "0020|0032"  # Image Position (Patient), LPS mm
    n_files = len(reader.GetFileNames())
    if not all(reader.HasMetaDataKey(i, key) for i in range(n_files)):
        return  # cannot check without positions; ITK has already sorted what it could
    positions = np.array([[float(v) for v in reader.GetMetaData(i, key).split("\\")] for i in range(n_files)])
    normal = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    gaps_mm = np.diff(positions @ normal)
    typical = float(np.median(gaps_mm))
    if typical <= 0 or np.max(np.abs(gaps_mm - typical)) > 0.01 + 0.01 * abs(typical):
        raise GeometryError(
            folder,
            f"DICOM slices are unevenly spaced along the slice normal (gaps {np.min(gaps_mm):.3g} to "
            f"{np.max(gaps_mm):.3g} mm over {n_files} slices): missing or duplicate slices; "
            "world coordinates cannot be trusted",
        )


# --------------------------------------------------------------------------- labels


def _as_label_map(path: Path, raw: _Raw) -> np.ndarray:
    """(X, Y, Z) integer label map: int16 when the ids fit, else int32."""
    arr = raw.array
    if arr.ndim > 3:
        arr = arr.reshape(arr.shape[:3] + tuple(s for s in arr.shape[3:] if s != 1))
    if arr.ndim != 3 or min(arr.shape) <= 1:
        raise DimensionalityError(path, f"label map must be a 3D volume, got shape {raw.array.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        check_finite(path, arr, what="label map")
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            frac = arr[rounded != arr].ravel()[:3].tolist()
            raise UnreadableFileError(
                path, f"label map holds non-integer values (e.g. {frac}); expected integer class ids"
            )
        arr = rounded
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    dtype = np.int16 if np.iinfo(np.int16).min <= lo and hi <= np.iinfo(np.int16).max else np.int32
    return np.ascontiguousarray(arr, dtype=dtype)


def _read_map_on_grid(path: Path, image_path: Path, image_shape, image_affine, what: str) -> np.ndarray:
    raw = _read_raw(path)
    label = _as_label_map(path, raw)
    affine = check_geometry(path, raw.affine)
    check_same_grid(path, label.shape, affine, image_path, image_shape, image_affine, what=what)
    return label


# --------------------------------------------------------------------------- public API


def _default_case_id(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES[::-1] + ITK_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.is_file() else name


def read_volume(
    image_path: str | os.PathLike,
    label_path: str | os.PathLike | None = None,
    *,
    case_id: str | None = None,
    group: str | None = None,
    aux_paths: Mapping[str, str | os.PathLike] | None = None,
    label_names: Mapping[int, str] | None = None,
) -> Volume:
    """Read an image (and optional label maps on the same grid) into a :class:`Volume`.

    Args:
        image_path: a NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr) or MetaImage
            (.mha/.mhd) file, or a folder holding one DICOM series.
        label_path: optional integer label map on the image's grid (any format above).
        case_id: defaults to the file name without its extension.
        group: patient id for grouped splits (defaults to ``case_id``).
        aux_paths: further label maps by name, e.g. ``{"lesion": "SEG.nii.gz"}``.
        label_names: optional ``{label id: structure name}``.

    Returns:
        A Volume with ``data`` ``(C, X, Y, Z)`` float32 (C = 1 for 3D images,
        C <= 4 for a 4D image's last axis), a RAS voxel -> world affine, and
        ``label`` / ``aux`` as ``(X, Y, Z)`` int16 (int32 if ids need it).

    Raises:
        UnreadableFileError: missing, corrupt or unsupported file.
        DimensionalityError: 2D image, or 4D+ that is not a short channel axis.
        GeometryError: zero/negative/NaN spacing, singular or non-finite affine.
        NonFiniteVoxelsError: NaN/Inf voxels (the message counts them).
        LabelGridMismatchError: a label's shape or affine differs from the image's.
    """
    image_path = Path(image_path)
    raw = _read_raw(image_path)
    data = channels_first(image_path, raw.array)
    affine = check_geometry(image_path, raw.affine)
    data = np.ascontiguousarray(data, dtype=np.float32)
    check_finite(image_path, data)
    shape_vox = data.shape[1:]

    label = None
    if label_path is not None:
        label = _read_map_on_grid(Path(label_path), image_path, shape_vox, affine, "label")
    aux = {
        name: _read_map_on_grid(Path(p), image_path, shape_vox, affine, f"aux map '{name}'")
        for name, p in (aux_paths or {}).items()
    }
    meta = {
        "format": raw.fmt,
        "label_source": str(label_path) if label_path is not None else None,
        "aux_sources": {name: str(p) for name, p in (aux_paths or {}).items()},
    }
    return Volume(
        data=data,
        affine=affine,
        case_id=case_id if case_id is not None else _default_case_id(image_path),
        group=group,
        label=label,
        aux=aux,
        label_names=dict(label_names) if label_names is not None else None,
        source=str(image_path),
        meta=meta,
    )


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``array`` ``(X, Y, Z[, C])`` with voxel -> world ``affine`` as NIfTI, atomically.

    The file is written to a temporary name in the same folder and moved into
    place with ``os.replace``, so a crash never leaves a half-written file under
    ``path``. Booleans are stored as uint8. Both qform and sform hold the affine
    (code 1, scanner), so nibabel and ITK readers agree. Returns ``path``.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in NIFTI_SUFFIXES:
        raise ValueError(f"{path}: write_nifti needs a .nii or .nii.gz name, got '{suffix}'")
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path, suffix) as tmp:  # nibabel picks the format from the suffix
        nib.save(img, tmp)
    return path
