"""Header checks that say in words what is wrong with a file, before (or instead of) a reader's raw message.

Readers fail on hostile headers with their own terse text ("HeaderDataError: data code 9999 not
supported", "MetaImage: Read: Cannot parse file") or, for a few MetaImage headers, crash the
process: SimpleITK segfaults on ``NDims = -1`` and aborts on ``NDims = 100``. So the text headers
of NRRD and MetaImage files are checked here before SimpleITK sees them, and when nibabel refuses
a NIfTI file its raw header is inspected to name the field at fault.

Each check returns ``(error class, problem)`` or None; the reader raises it naming the file, and
keeps the library's text only as detail in parentheses.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import stat
import zlib
from pathlib import Path

import numpy as np

from medssl.data.errors import DimensionalityError, GeometryError, MedsslDataError, UnreadableFileError

__all__ = ["itk_header_problem", "nifti_header_problem", "MAX_DIMS"]

# medssl reads 3D volumes and 4D ones with a short channel axis; a header claiming more is refused
# before a reader allocates anything for it (and before SimpleITK can crash on it).
MAX_DIMS = 4
_NUM = r"[-+]?(?:nan|inf|\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"

Problem = tuple[type[MedsslDataError], str]

# --------------------------------------------------------------------------- text headers (NRRD, MetaImage)

_MET_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}  # fmt: skip
_NRRD_BYTES = {
    **dict.fromkeys(["signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"], 1),
    **dict.fromkeys(["short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"], 2),  # fmt: skip
    **dict.fromkeys(["int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"], 4),
    **dict.fromkeys(["longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                     "double"], 8),  # fmt: skip
}
_NRRD_ENCODINGS = ("raw", "txt", "text", "ascii", "hex", "gz", "gzip", "bz2", "bzip2")


def _fields(lines: list[str], sep: str) -> dict[str, str]:
    out = {}
    for line in lines:
        if sep not in line or line.lstrip().startswith("#"):
            continue
        key, value = line.split(sep, 1)
        out.setdefault(key.strip().lower(), value.strip())
    return out


def _numbers(value: str) -> list[float] | None:
    """Every whitespace-separated token as a float, or None if one is not a number."""
    tokens = value.split()
    try:
        return [float(t) for t in tokens]
    except ValueError:
        return None


def _whole(value: str) -> int | None:
    try:
        f = float(value)
    except ValueError:
        return None
    return int(f) if math.isfinite(f) and f == int(f) else None


def _check_sizes(what: str, value: str | None, n_dims: int) -> Problem | None:
    if value is None:
        return UnreadableFileError, f"the header has no {what} line: the image size is not given"
    nums = _numbers(value)
    if nums is None or len(nums) != n_dims or not all(math.isfinite(v) and v == int(v) and v >= 1 for v in nums):
        return UnreadableFileError, (f"{what} is {value!r}: the header needs {n_dims} positive whole numbers "
                                     f"(one size per dimension)")  # fmt: skip
    return None


def _check_data_file(header: Path, name: str, field: str) -> Problem | None:
    """A detached data file must exist and be a regular file (a FIFO or device would block the reader)."""
    if not name or name.split()[0].upper() in ("LOCAL", "LIST") or "%" in name:
        return None
    target = Path(name) if os.path.isabs(name) else header.parent / name
    try:
        st = os.stat(target)
    except OSError:
        return UnreadableFileError, f"its {field} {name!r} does not exist (looked for {target})"
    if not stat.S_ISREG(st.st_mode):
        return UnreadableFileError, f"its {field} {name!r} is not a regular file (a folder, FIFO or device)"
    return None


def _data_bytes_available(path: Path, header_bytes: int) -> int:
    return os.path.getsize(path) - header_bytes


def _metaimage_problem(path: Path, raw: bytes) -> Problem | None:
    end = raw.find(b"ElementDataFile")
    if end < 0:
        return UnreadableFileError, ("the MetaImage header has no ElementDataFile line: it does not say where the "
                                     "voxels are (a truncated or damaged header?)")  # fmt: skip
    line_end = raw.find(b"\n", end)
    header_bytes = len(raw) if line_end < 0 else line_end + 1
    lines = raw[:header_bytes].decode("latin-1").splitlines()
    f = _fields(lines, "=")
    n_dims = _whole(f.get("ndims", ""))
    problem = _check_dims("NDims", "NDims = ", f.get("ndims"), n_dims) or _check_sizes("DimSize", f.get("dimsize"), n_dims)
    if problem:
        return problem
    for key, count in (("elementspacing", n_dims), ("elementsize", n_dims), ("offset", n_dims),
                       ("position", n_dims), ("origin", n_dims), ("transformmatrix", n_dims**2),
                       ("rotation", n_dims**2), ("orientation", n_dims**2)):  # fmt: skip
        if key in f:
            nums = _numbers(f[key])
            if nums is None or len(nums) != count:
                return GeometryError, (f"broken geometry: {key} is {f[key][:80]!r}, the header needs {count} "
                                       f"numbers for NDims = {n_dims}")  # fmt: skip
            if not all(math.isfinite(v) for v in nums):
                return GeometryError, f"broken geometry: {key} ({f[key][:80]}) holds non-finite numbers"
    element = f.get("elementtype", "").upper().removesuffix("_ARRAY")  # MET_UCHAR_ARRAY: vector voxels of uchar
    if element not in _MET_BYTES:
        known = ", ".join(_MET_BYTES)
        return UnreadableFileError, f"ElementType is {f.get('elementtype')!r}, not a MetaImage voxel type ({known})"
    channels = _whole(f.get("elementnumberofchannels", "1"))
    if channels is None or channels < 1:
        return UnreadableFileError, f"ElementNumberOfChannels is {f.get('elementnumberofchannels')!r}, not a count"
    header_size = _whole(f.get("headersize", "0"))
    if header_size is None or header_size < -1:
        return UnreadableFileError, f"HeaderSize is {f.get('headersize')!r}: it must be -1 (auto) or a byte count"
    data_file = f.get("elementdatafile", "")
    problem = _check_data_file(path, data_file, "ElementDataFile")
    if problem:
        return problem
    compressed = f.get("compresseddata", "false").lower() == "true"
    if data_file.upper() == "LOCAL" and not compressed and header_size == 0:
        sizes = [int(float(v)) for v in f["dimsize"].split()]
        need = math.prod(sizes) * channels * _MET_BYTES[element]
        have = _data_bytes_available(path, header_bytes)
        if have < need:
            return UnreadableFileError, (f"truncated: the header promises {need} bytes of voxels "
                                         f"({' x '.join(map(str, sizes))} {element}), the file holds {have}")  # fmt: skip
    return None


def _check_dims(field: str, says: str, text: str | None, n_dims: int | None) -> Problem | None:
    """The header's number of dimensions: a positive whole number, at most :data:`MAX_DIMS`."""
    if n_dims is None or n_dims < 1:
        return UnreadableFileError, f"{field} is {text!r}, not a number of dimensions (1, 2, 3 ...)"
    if n_dims > MAX_DIMS:
        return DimensionalityError, (f"the header says {says}{n_dims}; medssl reads 3D volumes, or 4D with a "
                                     "short channel axis")  # fmt: skip
    return None


def _nrrd_problem(path: Path, raw: bytes) -> Problem | None:
    if not re.match(rb"NRRD000[1-9]", raw):
        return UnreadableFileError, f"not a NRRD file: it starts with {raw[:8]!r}, not 'NRRD000x'"
    detached = _suffix(path) == ".nhdr"
    end = raw.find(b"\n\n")
    if end < 0 and not detached:
        return UnreadableFileError, ("the NRRD header does not end (no blank line before the voxels): a truncated "
                                     "or damaged file")  # fmt: skip
    header_bytes = len(raw) if end < 0 else end + 2
    lines = raw[:header_bytes].decode("latin-1").splitlines()[1:]
    f = _fields(lines, ": ")  # "field: description"; "key:=value" pairs are not fields
    n_dims = _whole(f.get("dimension", ""))
    problem = _check_dims("dimension", "dimension: ", f.get("dimension"), n_dims) or \
        _check_sizes("sizes", f.get("sizes"), n_dims)
    if problem:
        return problem
    kind = f.get("type", "").lower()
    if kind not in _NRRD_BYTES:
        return UnreadableFileError, f"type is {f.get('type')!r}, not a NRRD voxel type medssl reads (short, float, ...)"
    encoding = f.get("encoding", "").lower()
    if encoding not in _NRRD_ENCODINGS:
        return UnreadableFileError, f"encoding is {f.get('encoding')!r}, not a NRRD encoding ({', '.join(_NRRD_ENCODINGS)})"
    if _NRRD_BYTES[kind] > 1 and encoding in ("raw", "gz", "gzip", "bz2", "bzip2") and \
            f.get("endian", "").lower() not in ("little", "big"):  # fmt: skip
        return UnreadableFileError, f"endian is {f.get('endian')!r}: multi-byte voxels need 'little' or 'big'"
    if "space origin" in f:
        vec = re.findall(r"\(([^)]*)\)", f["space origin"])
        vals = [float(v) for v in re.findall(_NUM, vec[0], flags=re.I)] if len(vec) == 1 else []
        if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
            return GeometryError, f"broken geometry: space origin {f['space origin'][:80]!r} is not a finite 3-vector"
    if "space directions" in f:
        entries = re.findall(r"\([^)]*\)|none", f["space directions"])
        if len(entries) != n_dims:
            return GeometryError, (f"broken geometry: space directions lists {len(entries)} entries for dimension "
                                   f"{n_dims} ({f['space directions'][:80]!r})")  # fmt: skip
    data_file = f.get("data file", f.get("datafile", ""))
    problem = _check_data_file(path, data_file, "data file")
    if problem:
        return problem
    if not detached and not data_file and encoding == "raw" and "byte skip" not in f and "line skip" not in f:
        sizes = [int(float(v)) for v in f["sizes"].split()]
        need = math.prod(sizes) * _NRRD_BYTES[kind]
        have = _data_bytes_available(path, header_bytes)
        if have < need:
            return UnreadableFileError, (f"truncated: the header promises {need} bytes of voxels "
                                         f"({' x '.join(map(str, sizes))} {kind}), the file holds {have}")  # fmt: skip
    return None


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def itk_header_problem(path: Path, max_bytes: int = 1 << 16) -> Problem | None:
    """What is wrong with a NRRD (``.nrrd``/``.nhdr``) or MetaImage (``.mha``/``.mhd``) text header, if anything.

    Only the header is read. Checks the fields SimpleITK needs (dimensions, sizes, voxel type, encoding,
    byte order, geometry counts, the data file) and, for attached raw voxels, that the file holds them.
    """
    with open(path, "rb") as f:
        raw = f.read(max_bytes)
    if _suffix(path) in (".nrrd", ".nhdr"):
        return _nrrd_problem(path, raw)
    return _metaimage_problem(path, raw)


# --------------------------------------------------------------------------- NIfTI (when nibabel refused it)

_NIFTI_TYPES = {2: "uint8", 4: "int16", 8: "int32", 16: "float32", 32: "complex64", 64: "float64", 128: "RGB",
                256: "int8", 512: "uint16", 768: "uint32", 1024: "int64", 1280: "uint64", 1536: "float128",
                1792: "complex128", 2048: "complex256", 2304: "RGBA", 1: "binary"}  # fmt: skip


def _nifti_head(path: Path) -> bytes:
    if path.name.lower().endswith(".gz"):
        try:
            with gzip.open(path, "rb") as g:
                return g.read(544)
        except (OSError, EOFError, zlib.error) as e:
            raise _Explained(UnreadableFileError, f"not a readable gzip file ({e}); a .nii.gz must be gzip-compressed") \
                from None
    with open(path, "rb") as f:
        return f.read(544)


class _Explained(Exception):
    def __init__(self, cls: type[MedsslDataError], problem: str) -> None:
        self.cls, self.problem = cls, problem


def nifti_header_problem(path: Path) -> Problem | None:
    """The NIfTI header field that makes it unreadable, in words (None if none is found).

    Called after nibabel refused the file: reads the raw header bytes (no fixes) and checks, in order,
    its size and magic, voxel type, dimensions, voxel offset, intensity scaling and qform quaternion.
    """
    try:
        head = _nifti_head(path)
    except _Explained as e:
        return e.cls, e.problem
    if len(head) < 348:
        return UnreadableFileError, f"too short for a NIfTI header: {len(head)} bytes (a NIfTI-1 header has 348)"
    for order in ("<", ">"):
        sizeof_hdr = int(np.frombuffer(head[:4], dtype=f"{order}i4")[0])
        if sizeof_hdr in (348, 540):
            break
    else:
        return UnreadableFileError, (f"not a NIfTI header: its first field (sizeof_hdr) is "
                                     f"{int(np.frombuffer(head[:4], '<i4')[0])}, NIfTI-1 has 348 and NIfTI-2 540")  # fmt: skip
    if sizeof_hdr == 540:
        return None  # NIfTI-2: nibabel's own message stands (rare enough not to parse here)
    import nibabel as nib

    hdr = nib.Nifti1Header(head[:348], endianness=order, check=False)
    magic = bytes(hdr["magic"]).rstrip(b"\0")
    if magic not in (b"n+1", b"ni1"):
        return UnreadableFileError, (f"not a NIfTI-1 header: its magic string is {magic!r}, not 'n+1' (one file) "
                                     "or 'ni1' (with a .img)")  # fmt: skip
    code = int(hdr["datatype"])
    if code not in _NIFTI_TYPES:
        return UnreadableFileError, (f"the voxel type code (datatype) is {code}, not a NIfTI type "
                                     "(e.g. 4: int16, 16: float32)")  # fmt: skip
    dim = [int(d) for d in hdr["dim"]]
    if not 1 <= dim[0] <= 7:
        return UnreadableFileError, f"the number of dimensions (dim[0]) is {dim[0]}; NIfTI allows 1 to 7"
    if any(d < 1 for d in dim[1 : dim[0] + 1]):
        return UnreadableFileError, f"the image size (dim[1:{dim[0] + 1}]) is {dim[1:dim[0] + 1]}: every size must be >= 1"
    offset = float(hdr["vox_offset"])
    if not math.isfinite(offset):
        return UnreadableFileError, f"the voxel offset (vox_offset) is {offset}: it must say where the voxels start"
    if magic == b"n+1" and offset < 352:
        return UnreadableFileError, (f"the voxels would start at byte {offset:g} (vox_offset), inside the header; a "
                                     "single-file NIfTI-1 stores them from byte 352")  # fmt: skip
    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    if math.isfinite(slope) and slope != 0 and not math.isfinite(inter):
        return UnreadableFileError, (f"the intensity scaling is broken: scl_slope {slope:g} with scl_inter {inter} "
                                     "(both must be finite)")  # fmt: skip
    if int(hdr["qform_code"]) > 0:
        b, c, d = (float(hdr[k]) for k in ("quatern_b", "quatern_c", "quatern_d"))
        norm = b * b + c * c + d * d
        if not math.isfinite(norm) or norm > 1.0 + 1e-6:
            return GeometryError, (f"broken geometry: the qform rotation is not a unit quaternion (quatern_b, c, d = "
                                   f"{b:g}, {c:g}, {d:g}; b^2 + c^2 + d^2 = {norm:g} > 1)")  # fmt: skip
    return None
