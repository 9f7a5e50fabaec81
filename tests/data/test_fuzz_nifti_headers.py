"""Fuzzed NIfTI headers: each file either loads (and preprocesses) with sane geometry or raises a named
medssl error naming it. Never another exception type, a hang or an unbounded allocation.

Hypothesis mutates the header of a small valid oblique volume: whole fields set to
hostile values (dims, pixdim, datatype, offsets, scaling, q/sform codes, quaternions,
srows, magic ...) and raw bytes overwritten anywhere in the 348-byte header. The
examples are derandomised, so every run checks the same few hundred files.

A reader that refused every file would pass "loads or names the file", so each test
counts loaded against rejected files and requires a fair share of both; a refused file's
message must explain the problem in words, not carry only the reader's raw text.
"""

from __future__ import annotations

import gzip
import re
import signal
import tracemalloc
from collections import Counter
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medssl.data.errors import MedsslDataError
from medssl.data.io import read_volume
from medssl.data.limits import MAX_SPACING_MM, MAX_WORLD_MM
from medssl.data.preprocess import PreprocessConfig, preprocess
from medssl.data.validate import MAX_CHANNELS
from tests.helpers import nifti_bytes, oblique_affine

BASE_DATA = np.random.default_rng(0).integers(-200, 800, (7, 6, 5)).astype(np.int16)
BASE_AFFINE = oblique_affine((0.9, 1.4, 2.5), (20.0, -10.0, 5.0), (-40.0, 25.0, 60.0))
MEMORY_BOUND = 64 * 2**20  # MEDSSL_MAX_VOLUME_BYTES for this test
HANG_S = 60  # a hang guard, far above the milliseconds a case takes

_floats = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 3.0, 1e-30, 1e-6, 99.0, 101.0, 1e6, 1e30, -1e30,
                           float("nan"), float("inf"), float("-inf")]) | st.floats(-1e4, 1e4)  # fmt: skip
_ints16 = st.sampled_from([-32768, -1, 0, 1, 2, 3, 4, 5, 7, 8, 99, 2048, 32767]) | st.integers(-32768, 32767)
_dim = st.tuples(st.integers(-1, 8), *[st.sampled_from([0, 1, 2, 3, 5, 6, 7, 64, 2048, 32767, -1])] * 7)
_datatype = st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 3,
                             9999])  # fmt: skip

FIELDS = {
    "dim": _dim.map(list),
    "pixdim": st.lists(_floats, min_size=8, max_size=8),
    "datatype": _datatype,
    "bitpix": st.sampled_from([0, 1, 8, 16, 24, 32, 64, 128, 7]),
    "vox_offset": st.sampled_from([0.0, 352.0, 351.0, 360.0, 1e9, -1.0, float("nan")]),
    "scl_slope": _floats,
    "scl_inter": _floats,
    "qform_code": _ints16,
    "sform_code": _ints16,
    "quatern_b": _floats,
    "quatern_c": _floats,
    "quatern_d": _floats,
    "qoffset_x": _floats,
    "qoffset_z": _floats,
    "srow_x": st.lists(_floats, min_size=4, max_size=4),
    "srow_y": st.lists(_floats, min_size=4, max_size=4),
    "srow_z": st.lists(_floats, min_size=4, max_size=4),
    "sizeof_hdr": st.sampled_from([348, 0, 540, -1, 1 << 24]),
    "magic": st.sampled_from([b"n+1", b"ni1", b"n+2", b"xyz", b""]),
    "dim_info": st.integers(0, 255),
    "intent_code": _ints16,
    "xyzt_units": st.integers(0, 255),
    "cal_max": _floats,
}

field_mutations = st.dictionaries(st.sampled_from(sorted(FIELDS)), st.none(), min_size=1, max_size=5).flatmap(
    lambda keys: st.fixed_dictionaries({k: FIELDS[k] for k in keys})
)
byte_mutations = st.lists(st.tuples(st.integers(0, 347), st.integers(0, 255)), min_size=1, max_size=8)


class _Hang(Exception):
    pass


@contextmanager
def _guard():
    """Fail on a hang (SIGALRM) and measure the peak of numpy/Python allocations."""

    def on_alarm(signum, frame):
        raise _Hang(f"no answer within {HANG_S} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(HANG_S)
    tracemalloc.start()
    peak = [0]
    try:
        yield peak
    finally:
        peak[0] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _assert_sane(vol, where: str) -> None:
    affine = np.asarray(vol.affine)
    assert np.all(np.isfinite(affine)) and abs(np.linalg.det(affine[:3, :3])) > 0, where
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    assert np.all(spacing > 0) and np.all(spacing <= MAX_SPACING_MM), (where, spacing)
    assert np.all(np.abs(affine[:3, 3]) <= MAX_WORLD_MM), (where, affine)
    data = np.asarray(vol.data)
    assert data.ndim == 4 and 1 <= data.shape[0] <= MAX_CHANNELS and data.dtype == np.float32, (where, data.shape)
    assert np.all(np.isfinite(data)), where


def _check(path, raw: bytes) -> str:
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return read_outcome(path)


def read_outcome(path) -> str:
    """``"loaded"`` (sane geometry, read and preprocessed) or ``"rejected"`` (a named, explained error);
    anything else (another exception, NaN geometry, an allocation over the bound) fails the test."""
    outcome = "loaded"
    with _guard() as peak:
        try:
            vol = read_volume(path)
            _assert_sane(vol, "read")
            _assert_sane(preprocess(vol, PreprocessConfig(target_spacing_mm=(3.0, 3.0, 3.0))), "preprocessed")
        except MedsslDataError as e:
            assert e.path == str(path) and str(path) in str(e) and e.problem, repr(e)
            assert_explained(e)
            outcome = "rejected"
    assert peak[0] < 2 * MEMORY_BOUND, f"allocated {peak[0]} bytes"
    return outcome


def assert_explained(e: MedsslDataError) -> None:
    """The message says what is wrong in words; the reader's own text, if kept, only follows as detail."""
    problem = e.problem
    assert not problem.startswith("cannot read file:"), problem  # the bare "cannot read file: <Type>: <text>"
    words = problem.split(" (nibabel:")[0].split(" (ITK:")[0]
    assert len(words.split()) >= 4 and not re.match(r"^[A-Z]\w*(Error|Exception)\b", words), problem


def assert_fair_share(counts: Counter, n_min_loaded: float, n_min_rejected: float) -> None:
    """Both outcomes must be common: a reader that rejects (or accepts) everything fails here."""
    total = counts["loaded"] + counts["rejected"]
    assert total >= 100, counts
    assert counts["loaded"] >= n_min_loaded * total, f"only {counts['loaded']} of {total} mutated files loaded"
    assert counts["rejected"] >= n_min_rejected * total, f"only {counts['rejected']} of {total} rejected"


_settings = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip


@pytest.fixture
def bounded(monkeypatch):
    monkeypatch.setenv("MEDSSL_MAX_VOLUME_BYTES", str(MEMORY_BOUND))


def test_hostile_header_fields_give_sane_geometry_or_a_named_error(tmp_path, bounded):
    counts: Counter = Counter()

    @_settings
    @given(fields=field_mutations, gz=st.booleans())
    def one(fields, gz):
        try:
            raw = nifti_bytes(BASE_DATA, BASE_AFFINE, **fields)
        except (ValueError, OverflowError, TypeError):  # the value does not fit the field's type: not a file
            return
        counts[_check(tmp_path / ("f.nii.gz" if gz else "f.nii"), raw)] += 1

    one()
    assert_fair_share(counts, 0.3, 0.2)  # measured: about 45 % load


def test_random_header_bytes_give_sane_geometry_or_a_named_error(tmp_path, bounded):
    counts: Counter = Counter()

    @_settings
    @given(edits=byte_mutations, gz=st.booleans())
    def one(edits, gz):
        raw = bytearray(nifti_bytes(BASE_DATA, BASE_AFFINE))
        for offset, value in edits:
            raw[offset] = value
        counts[_check(tmp_path / ("b.nii.gz" if gz else "b.nii"), bytes(raw))] += 1

    one()
    assert_fair_share(counts, 0.3, 0.2)  # measured: about 65 % load


def test_the_fair_share_check_fails_for_a_reader_that_rejects_everything(tmp_path, bounded, monkeypatch):
    """The mutation check of issue 20: with a reader that refuses every file, the fuzz tests fail."""
    import medssl.data.io as io

    def refuse(path):
        raise io.UnreadableFileError(path, "refused by a broken reader for this check")

    monkeypatch.setattr(io, "_read_raw", refuse)
    with pytest.raises(AssertionError, match="mutated files loaded"):
        test_random_header_bytes_give_sane_geometry_or_a_named_error(tmp_path, None)
