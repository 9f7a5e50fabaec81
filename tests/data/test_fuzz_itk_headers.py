"""Fuzzed NRRD and MetaImage headers: each file loads with sane geometry or raises a named, explained medssl error.

The NIfTI fuzz (``test_fuzz_nifti_headers.py``) covers nibabel; these files go through SimpleITK and
medssl's own text-header checks. Hypothesis mutates the text header of a small valid oblique volume:
fields set to hostile values (sizes, spacings, directions, origins, voxel types, encodings, byte
order, data file), lines dropped, and raw bytes overwritten in the header. Examples are
derandomised. Each test counts loaded against rejected files and requires a fair share of both.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from medssl.data.io import read_volume
from tests.data.test_fuzz_nifti_headers import (
    BASE_AFFINE,
    BASE_DATA,
    MEMORY_BOUND,
    _settings,
    assert_fair_share,
    read_outcome,
)
from tests.helpers import write_sitk_file

# Hostile values mixed with ordinary ones, so that a fair share of the mutated files is still valid.
_num = st.sampled_from(["0", "-0", "1", "-1", "0.5", "2.5", "1e-30", "99", "101", "1e6", "1e30", "-1e30", "nan",
                        "inf", "-inf", "abc", ""]) | st.floats(-50, 50).map(lambda v: f"{v:.4g}")  # fmt: skip
_size = st.sampled_from(["0", "1", "2", "5", "6", "7", "64", "2048", "-1", "nan", "x"])


_byte = st.integers(0, 255) | st.sampled_from(list(b"0123456789 .-+eE(),"))  # text-like edits as well


def _nums(n: int, of=_num) -> st.SearchStrategy[str]:
    return st.lists(of, min_size=max(0, n - 1), max_size=n + 1).map(" ".join)


def _vec(n: int = 3) -> st.SearchStrategy[str]:
    return st.lists(_num, min_size=n, max_size=n).map(lambda v: "(" + ",".join(v) + ")")


NRRD_FIELDS = {
    "type": st.sampled_from(["short", "int16", "uchar", "float", "double", "int64", "block", "complex", "bogus"]),
    "dimension": st.sampled_from(["3", "2", "4", "1", "0", "-3", "nan"]),
    "space": st.sampled_from(["left-posterior-superior", "right-anterior-superior", "3D-right-handed", "bogus"]),
    "sizes": _nums(3, _size) | st.just("7 6 5"),
    "space directions": st.lists(_vec() | st.just("none"), min_size=2, max_size=4).map(" ".join)
    | st.just("(0.9,0,0) (0,1.4,0) (0,0,2.5)"),
    "kinds": st.sampled_from(["domain domain domain", "domain domain", "RGB-color domain domain", "list x y"]),
    "endian": st.sampled_from(["little", "big", "middle"]),
    "encoding": st.sampled_from(["raw", "gzip", "ascii", "hex", "bzip2", "bogus"]),
    "space origin": _vec() | _vec(2),
    "data file": st.sampled_from(["missing.raw", "LIST", "../../etc/passwd"]),
}
MHA_FIELDS = {
    "NDims": st.sampled_from(["3", "2", "4", "0", "-1", "nan"]),
    "DimSize": _nums(3, _size) | st.just("7 6 5"),
    "ElementSpacing": _nums(3),
    "TransformMatrix": _nums(9) | st.just("1 0 0 0 1 0 0 0 1") | st.just("0 1 0 -1 0 0 0 0 1"),
    "Offset": _nums(3),
    "ElementType": st.sampled_from(["MET_SHORT", "MET_UCHAR", "MET_FLOAT", "MET_DOUBLE", "MET_LONG_LONG",
                                    "MET_FLOAT_ARRAY", "MET_BOGUS"]),  # fmt: skip
    "ElementNumberOfChannels": st.sampled_from(["1", "3", "0", "-2"]),
    "BinaryDataByteOrderMSB": st.sampled_from(["True", "False", "maybe"]),
    "CompressedData": st.sampled_from(["True", "False"]),
    "ElementDataFile": st.sampled_from(["missing.raw", "LIST", "LOCAL"]),
    "HeaderSize": st.sampled_from(["-1", "0", "100000"]),
}


def _base(tmp_path, suffix: str) -> tuple[list[str], bytes, str]:
    """(header lines, data bytes, key/value separator) of a valid file written by SimpleITK."""
    path = write_sitk_file(tmp_path / f"base{suffix}", BASE_DATA, BASE_AFFINE)
    raw = path.read_bytes()
    if suffix == ".nrrd":
        head, data = raw.split(b"\n\n", 1)
        return head.decode("latin-1").split("\n"), data, ": "
    marker = b"ElementDataFile = LOCAL\n"
    head, data = raw.split(marker, 1)
    return head.decode("latin-1").rstrip("\n").split("\n") + ["ElementDataFile = LOCAL"], data, " = "


def _build(lines: list[str], sep: str, fields: dict, dropped: set[int], nrrd: bool) -> list[str]:
    out, seen = [], set()
    for i, line in enumerate(lines):
        key = line.split(sep, 1)[0] if sep in line else None
        if i in dropped and i > 0:  # the magic line stays: without it, it is just not this format
            continue
        if key in fields:
            line, seen = f"{key}{sep}{fields[key]}", seen | {key}
        out.append(line)
    extra = [f"{k}{sep}{v}" for k, v in fields.items() if k not in seen]
    if nrrd:
        return out + extra
    return out[:-1] + extra + out[-1:]  # MetaImage: ElementDataFile must stay last


def _write(path, lines: list[str], data: bytes, nrrd: bool, truncate: float | None) -> None:
    body = data if truncate is None else data[: int(len(data) * truncate)]
    path.write_bytes("\n".join(lines).encode("latin-1") + (b"\n\n" if nrrd else b"\n") + body)


def _check(path) -> str:
    return read_outcome(path)


@pytest.fixture
def bounded(monkeypatch):
    monkeypatch.setenv("MEDSSL_MAX_VOLUME_BYTES", str(MEMORY_BOUND))


def _mutations(table: dict) -> st.SearchStrategy[dict]:
    return st.dictionaries(st.sampled_from(sorted(table)), st.none(), min_size=1, max_size=2).flatmap(
        lambda keys: st.fixed_dictionaries({k: table[k] for k in keys})
    )


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_hostile_header_fields_give_sane_geometry_or_a_named_error(tmp_path, bounded, suffix):
    nrrd = suffix == ".nrrd"
    lines, data, sep = _base(tmp_path, suffix)
    counts: Counter = Counter()

    @_settings
    @given(fields=_mutations(NRRD_FIELDS if nrrd else MHA_FIELDS),
           dropped=st.sets(st.integers(0, len(lines) - 1), max_size=1),
           truncate=st.none() | st.none() | st.sampled_from([0.0, 0.5, 0.99]))  # fmt: skip
    def one(fields, dropped, truncate):
        path = tmp_path / f"f{suffix}"
        _write(path, _build(lines, sep, fields, dropped, nrrd), data, nrrd, truncate)
        counts[_check(path)] += 1

    one()
    assert_fair_share(counts, 0.1, 0.3)  # measured: 14-22 % (NRRD; 14 % on the CI machine) and 26 % (MetaImage) load


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_random_header_bytes_give_sane_geometry_or_a_named_error(tmp_path, bounded, suffix):
    nrrd = suffix == ".nrrd"
    lines, data, sep = _base(tmp_path, suffix)
    head = "\n".join(lines).encode("latin-1")
    counts: Counter = Counter()

    digits = [i for i, b in enumerate(head) if chr(b).isdigit()]
    any_edit = st.tuples(st.integers(0, len(head) - 1), _byte)
    digit_edit = st.tuples(st.sampled_from(digits), st.sampled_from(list(b"0123456789")))  # other numbers

    @_settings
    @given(edits=st.lists(any_edit | digit_edit, min_size=1, max_size=4))
    def one(edits):
        raw = bytearray(head)
        for offset, value in edits:
            raw[offset] = value
        path = tmp_path / f"b{suffix}"
        path.write_bytes(bytes(raw) + (b"\n\n" if nrrd else b"\n") + data)
        counts[_check(path)] += 1

    one()
    assert_fair_share(counts, 0.25, 0.25)  # measured: 43 % (NRRD) and 55 % (MetaImage) load


def test_the_base_files_load_with_the_base_geometry(tmp_path):
    for suffix in (".nrrd", ".mha"):
        lines, data, sep = _base(tmp_path, suffix)
        path = tmp_path / f"same{suffix}"
        _write(path, _build(lines, sep, {}, set(), suffix == ".nrrd"), data, suffix == ".nrrd", None)
        vol = read_volume(path)
        np.testing.assert_allclose(vol.affine, BASE_AFFINE, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(vol.data)[0], BASE_DATA)
