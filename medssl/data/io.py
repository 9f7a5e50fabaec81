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
import math
import os
import re
import stat
import tempfile
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medssl._files import atomic_path
from medssl.data.errors import (
    DimensionalityError,
    GeometryError,
    MedsslDataError,
    SettingError,
    TooLargeError,
    UnreadableFileError,
)
from medssl.data.headers import itk_header_problem, nifti_header_problem
from medssl.data.limits import check_memory
from medssl.data.validate import channels_first, check_finite, check_geometry, check_same_grid
from medssl.data.volume import Volume

__all__ = ["read_volume", "write_nifti", "NIFTI_SUFFIXES", "ITK_SUFFIXES"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
# DICOM slice positions may deviate from a uniform grid by this fraction of the slice spacing
# (scanners round positions: 0.05 mm on a 7 mm grid is 0.7 %); beyond it the series is uneven.
DICOM_SLICE_TOLERANCE = 0.05


@dataclass
class _Raw:
    """What a format reader hands back: array in (X, Y, Z[, C]) order and a RAS affine."""

    array: np.ndarray
    affine: np.ndarray
    fmt: str
    notes: dict = field(default_factory=dict)  # goes into Volume.meta (e.g. the DICOM slice fit)


# --------------------------------------------------------------------------- format dispatch


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _check_is_file_or_folder(path: Path) -> None:
    """A regular file or a folder; a dangling link, a FIFO (which would block the reader for ever), a socket
    or a device is named as such."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if path.is_symlink():
            raise UnreadableFileError(path, f"a symbolic link to {os.readlink(path)!r}, which does not exist "
                                            "(a dangling link: the file was moved or deleted)") from None  # fmt: skip
        raise UnreadableFileError(path, "file or folder does not exist") from None
    except OSError as e:
        raise UnreadableFileError(path, f"cannot be opened ({e.strerror or e})") from None
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        return
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "a device file" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a special file")
    raise UnreadableFileError(path, f"is {kind}, not a regular file: medssl reads image files and DICOM folders")


def _read_raw(path: Path) -> _Raw:
    """Dispatch on the file type; turn every unexpected reader failure into UnreadableFileError."""
    _check_is_file_or_folder(path)
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
    except (MedsslDataError, SettingError):  # SettingError: not about this file (e.g. MEDSSL_MAX_VOLUME_BYTES)
        raise
    except MemoryError as exc:  # the bounds in medssl.data.limits were not enough on this machine
        raise TooLargeError(path, f"ran out of memory while reading it ({exc or 'MemoryError'})") from None
    except Exception as exc:  # boundary: any reader failure means the file cannot be used
        raw = f"{type(exc).__name__}: {str(exc).strip()}"
        if _suffix(path) in NIFTI_SUFFIXES:
            found = nifti_header_problem(path)
            if found is not None:
                raise found[0](path, f"{found[1]} (nibabel: {raw})") from exc
            raise UnreadableFileError(path, f"damaged or not a NIfTI file: nibabel cannot read it and no header "
                                            f"field explains why (nibabel: {raw})") from exc  # fmt: skip
        raise UnreadableFileError(path, f"the reader failed on it; the file may be damaged or in a format medssl "
                                        f"does not read (reader: {raw})") from exc  # fmt: skip


# --------------------------------------------------------------------------- NIfTI (nibabel)


def _raw_nifti_header(path: Path, img: nib.Nifti1Image):
    """The header as stored, without nibabel's fixes."""
    with nib.openers.ImageOpener(path) as fobj:
        return type(img.header).from_fileobj(fobj, check=False)


def _check_nifti_pixdim(path: Path, img: nib.Nifti1Image, raw) -> None:
    """Reject zero/negative/NaN pixdim when it defines the geometry.

    nibabel silently "fixes" such headers on load (zero -> 1, negative -> abs),
    which would hand us a wrong but valid-looking affine; so we re-read the raw
    header without fixes. With a valid sform (code > 0) pixdim is not used.
    """
    header = img.header
    if int(header["sform_code"]) > 0:
        return
    pixdim = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise GeometryError(
            path,
            f"broken geometry: voxel spacing (NIfTI pixdim[1:4]) is {pixdim.tolist()} mm; "
            "spacing must be positive and finite",
        )


def _check_gzip_complete(path: Path, expected_size: int) -> None:
    """Check, before reading voxels, that a .gz holds as many bytes as its header promises.

    The gzip trailer's last 4 bytes hold the uncompressed size mod 2**32: a cheap
    check. On a mismatch (truncation, a header claiming more voxels than stored, or a
    legitimate multi-member gzip) we decompress to the end in bounded chunks and
    count, so a lying header costs no memory.
    """
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        if int.from_bytes(f.read(4), "little") == expected_size % 2**32:
            return
    total = 0
    with gzip.open(path, "rb") as g:
        while chunk := g.read(1 << 20):
            total += len(chunk)
    if total < expected_size:
        raise UnreadableFileError(
            path, f"truncated: the header needs {expected_size} bytes (header + voxels), the file holds {total}"
        )


def _check_voxel_type(path: Path, dtype: np.dtype) -> None:
    """Only real numbers are intensities: RGB (structured), complex and other voxel types are refused."""
    if dtype.names:
        raise UnreadableFileError(
            path,
            f"holds RGB colour voxels ({', '.join(dtype.names)} fields); medssl reads scalar intensities: "
            "convert it to grayscale, or store multi-channel data as a 4D image",
        )
    if dtype.kind not in "biuf":
        what = "complex" if dtype.kind == "c" else f"'{dtype}'"
        raise UnreadableFileError(path, f"holds {what} voxels; medssl reads real-valued intensities")


def _check_before_reading(path: Path, affine: np.ndarray, shape: tuple[int, ...], bytes_per_voxel: float | None):
    """Geometry bounds and (unless ``bytes_per_voxel`` is None) the memory bound, from the header alone."""
    from medssl.data.validate import check_geometry

    if len(shape) >= 3:
        check_geometry(path, affine, shape[:3])
    if bytes_per_voxel is None:
        return
    n_voxels = math.prod(int(s) for s in shape)
    check_memory(path, n_voxels * bytes_per_voxel, f"reading this image ({' x '.join(map(str, shape))} voxels)")


# NIfTI xform codes: 0 unknown, 1 scanner, 2 aligned, 3 Talairach, 4 MNI (NIfTI-2 adds 5, template)
_XFORM_CODES = {nib.Nifti1Image: (0, 1, 2, 3, 4), nib.Nifti2Image: (0, 1, 2, 3, 4, 5)}


def _nifti_orientation_notes(img: nib.Nifti1Image, raw, repairs: list[str]) -> list[str]:
    """What nibabel repaired or assumed about the orientation, one sentence per rule applied.

    nibabel sets an invalid ``sform_code``/``qform_code`` to 0 (the transform is then ignored)
    and a ``qfac`` (``pixdim[0]``) other than 1 or -1 to 1, logging it at most; with neither
    transform the affine comes from the voxel sizes alone. The user must know which
    orientation was assumed, so each case is named here (and lands in the scan report).
    """
    valid = _XFORM_CODES.get(type(img), _XFORM_CODES[nib.Nifti1Image])
    header = img.header
    s_code, q_code = int(header["sform_code"]), int(header["qform_code"])  # after nibabel's fixes
    source = ("the sform" if s_code else f"the qform (code {q_code})" if q_code else
              "the voxel sizes alone (nibabel's fallback: axes along L, A, S, origin at voxel 0; left/right and "
              "world positions may be wrong)")  # fmt: skip
    notes = []
    for name, code in (("sform_code", raw["sform_code"]), ("qform_code", raw["qform_code"])):
        code = int(code)
        if code not in valid:
            notes.append(f"{name} {code} is not a NIfTI code ({', '.join(map(str, valid))}): that transform was "
                         f"ignored; the orientation was taken from {source}")  # fmt: skip
    if not notes and s_code == 0 and q_code == 0:
        notes.append(f"no orientation in the header (sform_code and qform_code 0): the affine was taken from {source}")
    qfac = float(raw["pixdim"][0])
    if qfac not in (-1.0, 0.0, 1.0):  # 0 is the NIfTI standard's "treat as 1"
        effect = ("the qform defines this file's orientation, so its third axis may be flipped" if s_code == 0
                  and q_code else "the qform does not define this file's orientation, so nothing changed")  # fmt: skip
        notes.append(f"qfac (pixdim[0]) is {qfac:g}, must be 1 or -1: 1 was assumed (a right-handed grid); {effect}")
    noted = ("sform_code", "qform_code", "qfac", "pixdim[0]")
    notes += [f"nibabel repaired the header: {r}" for r in repairs if not any(k in r for k in noted)]
    return notes


@contextmanager
def _nibabel_messages() -> Iterator[list[str]]:
    """Collect what nibabel logs while loading (header repairs) instead of printing it."""
    import logging

    logger = nib.imageglobals.logger
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    saved, logger.handlers = logger.handlers, [_Collect()]
    propagate, logger.propagate = logger.propagate, False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        logger.handlers, logger.propagate = saved, propagate


def _read_nifti(path: Path) -> _Raw:
    with _nibabel_messages() as repairs:
        img = nib.load(str(path))
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise UnreadableFileError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
    raw_header = _raw_nifti_header(path, img)
    _check_nifti_pixdim(path, img, raw_header)
    notes = _nifti_orientation_notes(img, raw_header, repairs)
    header = img.header
    dtype = header.get_data_dtype()
    _check_voxel_type(path, dtype)
    # a loaded image's header has its scaling reset (nibabel moves it to the array proxy): ask the proxy
    slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    scaled = slope != 1 or inter != 0
    # Order: the header's geometry, then whether the file holds the voxels its header promises
    # (a 4 KB file claiming 2048^3 voxels is truncated, not large), then the memory they need.
    _check_before_reading(path, img.affine, img.shape, None)
    expected = header.get_data_offset() + math.prod(img.shape) * dtype.itemsize
    if _suffix(path) == ".nii.gz":
        _check_gzip_complete(path, expected)
    elif (size := os.path.getsize(path)) < expected:
        raise UnreadableFileError(
            path, f"truncated: the header needs {expected} bytes (header + voxels), the file holds {size}"
        )
    # Alive at the peak (measured as the RSS peak of a fresh process): the raw voxels (for .nii.gz nibabel's
    # decompressed buffer and the array made from it, plus about one copy of heap fragmentation under medssl's
    # malloc settings, which never trim), nibabel's float64 when scaled, read_volume's float32 copy and
    # check_finite's mask.
    raw_copies = 3 if _suffix(path) == ".nii.gz" else 1
    _check_before_reading(path, img.affine, img.shape, raw_copies * dtype.itemsize + (8 if scaled else 0) + 4 + 1)
    # asanyarray keeps integer label maps integer (scaling, if any, makes it float).
    array = np.asanyarray(img.dataobj)
    out = _Raw(array=array, affine=np.asarray(img.affine, dtype=np.float64), fmt="nifti")
    if notes:
        out.notes["read_warnings"] = notes
    return out


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


def _itk_ras_affine(size, spacing, origin, direction) -> np.ndarray:
    """RAS voxel -> world affine of the first three axes of an ITK (LPS) geometry."""
    dim = len(size)
    direction = np.asarray(direction, dtype=np.float64).reshape(dim, dim)[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(np.asarray(spacing, dtype=np.float64)[:3])
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(origin, dtype=np.float64)[:3]
    return affine


def _itk_pixel_bytes(pixel_id: int) -> int:
    """Bytes per pixel component of a SimpleITK pixel type (8 if unknown)."""
    try:
        return int(sitk.GetArrayViewFromImage(sitk.Image([1, 1], pixel_id)).dtype.itemsize)
    except Exception:  # noqa: BLE001 - label or exotic pixel types: assume the widest
        return 8


def _check_itk_info(path: Path, reader: sitk.ImageFileReader) -> None:
    """Bounds from an ITK header (``ReadImageInformation``), before the voxels are read."""
    size = reader.GetSize()
    if len(size) < 3:
        return  # 2D: DimensionalityError once read
    affine = _itk_ras_affine(size, reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    components = max(1, int(reader.GetNumberOfComponents()))
    # ITK's buffer, our transposed copy, read_volume's float32 copy and check_finite's mask
    per_voxel = components * (2 * _itk_pixel_bytes(reader.GetPixelID()) + 4 + 1)
    _check_before_reading(path, affine, tuple(size), per_voxel)


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
    affine = _itk_ras_affine(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    return _Raw(array=np.array(arr), affine=affine, fmt=fmt)  # copy: the view dies with `image`


_STDERR_LOCK = threading.Lock()


@contextmanager
def _quiet_itk() -> Iterator[list[str]]:
    """No ITK/GDCM warnings on stderr while reading: medssl checks what they warn about (uneven DICOM slices,
    geometry) itself and names it in its own error or the scan report, instead of printing before it.

    ITK's warnings are switched off; MetaIO and teem (NRRD) write straight to the C++ stderr, so file
    descriptor 2 is sent to a temporary file for the duration of the call (held under a lock; a read takes
    milliseconds) and what they wrote is yielded, for the error message if the read fails.
    """
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    said: list[str] = []
    with _STDERR_LOCK, tempfile.TemporaryFile() as sink:
        try:
            saved = os.dup(2)
            os.dup2(sink.fileno(), 2)
        except OSError:  # no stderr to redirect: nothing to hide either
            saved = None
        try:
            yield said
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                said.append(" ".join(sink.read(4096).decode("utf-8", "replace").split()))
            sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _execute_itk(path: Path, run) -> sitk.Image:
    said: list[str] = []
    try:
        with _quiet_itk() as said:
            return run()
    except RuntimeError as exc:
        msg = _itk_error_message(exc)
        if said and said[0]:
            msg += f"; it also printed: {said[0][:300]}"
        if re.search(r"spacing|direction|determinant|space vector", msg, flags=re.I):
            raise GeometryError(path, f"broken geometry: ITK refuses its voxel axes (ITK: {msg})") from None
        raise UnreadableFileError(path, f"ITK cannot read it: the file is damaged or uses a feature ITK does not "
                                        f"read (ITK: {msg})") from None  # fmt: skip


def _read_itk_file(path: Path) -> _Raw:
    if _suffix(path) in ITK_SUFFIXES:
        found = itk_header_problem(path)  # before SimpleITK: some headers crash it (NDims = -1)
        if found is not None:
            raise found[0](path, found[1])
        problem = _header_spacing_problem(path)
        if problem:
            raise GeometryError(path, f"broken geometry: {problem}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    _execute_itk(path, reader.ReadImageInformation)
    _check_itk_info(path, reader)
    image = _execute_itk(path, reader.Execute)
    fmt = {".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "metaimage", ".mhd": "metaimage"}.get(_suffix(path), "itk")
    return _sitk_to_raw(path, image, fmt)


def _read_dicom_series(folder: Path) -> _Raw:
    """One DICOM series per folder, read with SimpleITK/GDCM (which sorts slices by position)."""
    with _quiet_itk():
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
    with _quiet_itk():
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    _execute_itk(folder, first.ReadImageInformation)
    rows_cols = math.prod(first.GetSize()[:2])
    components = max(1, int(first.GetNumberOfComponents()))
    per_voxel = components * (2 * _itk_pixel_bytes(first.GetPixelID()) + 4 + 1)
    check_memory(folder, rows_cols * len(files) * per_voxel, f"reading this series ({len(files)} slices)")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # per-slice tags, for the slice-position fit
    image = _execute_itk(folder, reader.Execute)
    order = _position_order(reader, image)
    if order is not None:  # GDCM fell back to another order (e.g. on duplicate positions): stack by position
        reader.SetFileNames([files[i] for i in order])
        image = _execute_itk(folder, reader.Execute)
    notes = {}
    if image.GetDimension() == 3 and len(files) > 2:
        notes = _fit_dicom_slices(folder, reader, image)
    raw = _sitk_to_raw(folder, image, "dicom")
    raw.notes.update(notes)
    return raw


def _slice_positions(reader: sitk.ImageSeriesReader) -> np.ndarray | None:
    """``(n, 3)`` Image Position (Patient) of every file read, LPS mm (None if any lacks it)."""
    key = "0020|0032"
    n = len(reader.GetFileNames())
    if not all(reader.HasMetaDataKey(i, key) for i in range(n)):
        return None
    return np.array([[float(v) for v in reader.GetMetaData(i, key).split("\\")] for i in range(n)])


def _position_order(reader: sitk.ImageSeriesReader, image: sitk.Image) -> list[int] | None:
    """File order sorted along the slice normal, or None if the files already are."""
    positions = _slice_positions(reader)
    if positions is None or image.GetDimension() != 3:
        return None
    along_mm = positions @ np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    if np.all(np.diff(along_mm) >= 0):
        return None
    return [int(i) for i in np.argsort(along_mm, kind="stable")]


def _fit_dicom_slices(folder: Path, reader: sitk.ImageSeriesReader, image: sitk.Image) -> dict:
    """Fit the slice positions to a uniform grid; set the image's slice spacing and origin from the fit.

    ITK only warns about uneven slices and then uses the *average* gap, which puts every
    slice after a missing one at the wrong world position. Scanners round positions, so
    the fit allows :data:`DICOM_SLICE_TOLERANCE` of the spacing; a missing or duplicated
    slice is named as such (with its files and instance numbers), and slices drifting
    in-plane (gantry tilt) are refused. Returns notes for ``Volume.meta``.
    """
    files = list(reader.GetFileNames())
    positions = _slice_positions(reader)
    if positions is None:
        return {}  # cannot check without positions; ITK has already sorted what it could
    instances = [reader.GetMetaData(i, "0020|0013").strip() if reader.HasMetaDataKey(i, "0020|0013") else "?"
                 for i in range(len(files))]  # fmt: skip
    normal = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    along_mm = positions @ normal
    fit = _uniform_grid_fit(along_mm)
    spacing, intercept, residual, index = fit
    tol = max(DICOM_SLICE_TOLERANCE * spacing, 0.01)  # 0.01 mm: below any DICOM position's precision

    def slice_name(i: int) -> str:
        return f"{Path(files[i]).name} (instance {instances[i]}, {along_mm[i]:.3f} mm)"

    if not spacing > 0:
        raise GeometryError(folder, f"duplicated slices: all {len(files)} slices share one position along the "
                                    "slice normal; world coordinates cannot be trusted")  # fmt: skip
    if residual > tol:
        gaps = np.diff(along_mm)
        raise GeometryError(
            folder,
            f"DICOM slices are unevenly spaced: positions along the slice normal deviate up to {residual:.3g} mm "
            f"from a uniform {spacing:.4g} mm grid (tolerance {tol:.3g} mm, {DICOM_SLICE_TOLERANCE:.0%} of the "
            f"spacing; gaps {gaps.min():.4g} to {gaps.max():.4g} mm over {len(files)} slices); "
            "world coordinates cannot be trusted",
        )
    steps = np.diff(index)
    duplicated = [f"{slice_name(i)} and {slice_name(i + 1)}" for i in np.flatnonzero(steps == 0)]
    if duplicated:
        raise GeometryError(folder, f"duplicated slice(s): {'; '.join(duplicated)} lie at the same position; "
                                    "remove the duplicates (world coordinates cannot be trusted)")  # fmt: skip
    after = np.flatnonzero(steps > 1)
    missing = [f"{int(steps[i]) - 1} between {slice_name(i)} and {slice_name(i + 1)}" for i in after]
    if missing:
        raise GeometryError(
            folder,
            f"missing slice(s) in a series with {spacing:.4g} mm slice spacing: {'; '.join(missing)}; "
            "world coordinates after the gap cannot be trusted",
        )
    in_plane = positions - np.outer(along_mm, normal)
    drift = float(np.max(np.linalg.norm(in_plane - in_plane[0], axis=1)))
    if drift > tol:
        raise GeometryError(
            folder,
            f"slice positions drift {drift:.3g} mm in-plane along the series (gantry tilt or a sheared grid); "
            "medssl needs slices stacked along their normal",
        )
    sx, sy = image.GetSpacing()[:2]
    image.SetSpacing((sx, sy, spacing))
    image.SetOrigin(tuple(positions[0] + (intercept - along_mm[0]) * normal))
    return {"dicom_slice_spacing_mm": spacing, "dicom_slice_fit_residual_mm": residual}


def _uniform_grid_fit(along_mm: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    """Least-squares fit ``along_mm[k] = intercept + spacing * index[k]``.

    ``index`` counts grid steps from the first slice (a missing slice skips one, a
    duplicate repeats one), found with the median gap. Returns ``(spacing, intercept,
    max |residual| mm, index)``; spacing is 0 when all positions coincide.
    """
    gaps = np.diff(along_mm)
    typical = float(np.median(gaps))
    if not typical > 0:
        positive = gaps[gaps > 0]
        typical = float(np.median(positive)) if positive.size else 0.0
    if typical <= 0:
        return 0.0, float(along_mm[0]), 0.0, np.zeros(len(along_mm), dtype=np.int64)
    index = np.rint((along_mm - along_mm[0]) / typical).astype(np.int64)
    design = np.stack([np.ones(len(index)), index.astype(np.float64)], axis=1)
    (intercept, spacing), *_ = np.linalg.lstsq(design, along_mm, rcond=None)
    residual = float(np.max(np.abs(along_mm - (intercept + spacing * index))))
    return float(spacing), float(intercept), residual, index


# --------------------------------------------------------------------------- labels


def _as_label_map(path: Path, raw: _Raw) -> np.ndarray:
    """(X, Y, Z) integer label map: int16 when the ids fit, else int32."""
    arr = raw.array
    _check_voxel_type(path, arr.dtype)
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


def _read_map_on_grid(path: Path, image_path: Path, image_shape, image_affine, what: str,
                      read_warnings: list[dict]) -> np.ndarray:  # fmt: skip
    raw = _read_raw(path)
    label = _as_label_map(path, raw)
    affine = check_geometry(path, raw.affine, label.shape)
    check_same_grid(path, label.shape, affine, image_path, image_shape, image_affine, what=what)
    read_warnings += [{"path": str(path), "problem": f"{what}: {n}"} for n in raw.notes.get("read_warnings", [])]
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

    What the readers repaired or assumed (an invalid NIfTI ``sform_code``/``qform_code``, an odd
    ``qfac``, no orientation at all) is listed in ``meta["read_warnings"]`` as
    ``{"path", "problem"}`` records; a dataset scan reports them as warnings.
    """
    image_path = Path(image_path)
    raw = _read_raw(image_path)
    _check_voxel_type(image_path, raw.array.dtype)
    data = channels_first(image_path, raw.array)
    affine = check_geometry(image_path, raw.affine, data.shape[1:])
    data = np.ascontiguousarray(data, dtype=np.float32)
    check_finite(image_path, data)
    shape_vox = data.shape[1:]

    read_warnings = [{"path": str(image_path), "problem": n} for n in raw.notes.pop("read_warnings", [])]
    label = None
    if label_path is not None:
        label = _read_map_on_grid(Path(label_path), image_path, shape_vox, affine, "label", read_warnings)
    aux = {
        name: _read_map_on_grid(Path(p), image_path, shape_vox, affine, f"aux map '{name}'", read_warnings)
        for name, p in (aux_paths or {}).items()
    }
    meta = {
        **raw.notes,
        **({"read_warnings": read_warnings} if read_warnings else {}),
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
