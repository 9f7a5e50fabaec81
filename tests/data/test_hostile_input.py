"""Hostile headers and odd voxel types: a named error naming the file, before anything large is allocated."""

from __future__ import annotations

import os
import tracemalloc

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medssl.data import datasets
from medssl.data.cache import VolumeCache
from medssl.data.errors import GeometryError, MedsslDataError, TooLargeError, UnreadableFileError
from medssl.data.io import read_volume
from medssl.data.preprocess import PreprocessConfig, resample_to_spacing
from medssl.data.volume import Volume
from tests.helpers import make_volume_file, oblique_affine, write_raw_nifti

AFFINE = oblique_affine((0.8, 1.5, 3.5), (25.0, 20.0, 0.0), (5.0, -7.0, 11.0))
DATA = np.random.default_rng(0).integers(0, 1000, (6, 5, 4)).astype(np.int16)
SMALL_BYTES = 8 * 2**20  # any of these checks must stay far below this


def _read_small(path, call=None):
    """Run ``call`` (default: read ``path``); return its error and the peak bytes numpy allocated."""
    tracemalloc.start()
    try:
        with pytest.raises(MedsslDataError) as info:
            (call or (lambda: read_volume(path)))()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.path == str(path) and str(path) in str(info.value)
    return info.value, peak


def test_a_voxel_size_of_a_kilometre_is_a_geometry_error_before_reading(tmp_path):
    affine = AFFINE.copy()
    affine[:3, 0] *= 1e6 / 0.8  # 1e6 mm voxels along the first axis
    path = write_raw_nifti(tmp_path / "km.nii.gz", DATA, affine)
    err, peak = _read_small(path)
    assert isinstance(err, GeometryError) and "voxel size" in err.problem and "1000000" in err.problem
    assert peak < SMALL_BYTES


@pytest.mark.parametrize("origin", [1e30, -3e6])
def test_an_origin_beyond_100_m_is_a_geometry_error(tmp_path, origin):
    affine = AFFINE.copy()
    affine[2, 3] = origin
    path = write_raw_nifti(tmp_path / "far.nii", DATA, affine)
    err, _ = _read_small(path)
    assert isinstance(err, GeometryError) and "from the scanner origin" in err.problem


HUGE_DIM = [3, 2048, 2048, 2048, 1, 1, 1, 1]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_a_4_kb_header_claiming_2048_cubed_voxels_is_truncated_and_nothing_is_allocated(tmp_path, suffix):
    path = write_raw_nifti(tmp_path / f"huge{suffix}", DATA, AFFINE, dim=HUGE_DIM)
    assert path.stat().st_size < 4096
    err, peak = _read_small(path)
    assert isinstance(err, UnreadableFileError) and "truncated" in err.problem, err
    assert peak < SMALL_BYTES


def test_a_file_really_holding_2048_cubed_voxels_is_too_large_before_allocating(tmp_path):
    path = write_raw_nifti(tmp_path / "huge.nii", DATA, AFFINE, dim=HUGE_DIM)
    os.truncate(path, 352 + 2 * 2048**3)  # a sparse file: 16 GiB of int16 voxels, no disk used
    err, peak = _read_small(path)
    assert isinstance(err, TooLargeError) and "2048 x 2048 x 2048" in err.problem and "GiB" in err.problem
    assert peak < SMALL_BYTES


def test_the_memory_bound_comes_from_the_environment_and_the_message_names_it(tmp_path, monkeypatch):
    path = write_raw_nifti(tmp_path / "ct.nii.gz", np.zeros((40, 40, 40), np.int16), AFFINE)
    assert read_volume(path).shape_vox == (40, 40, 40)
    monkeypatch.setenv("MEDSSL_MAX_VOLUME_BYTES", str(100_000))  # < 64000 voxels x 6 bytes
    err, _ = _read_small(path)
    assert isinstance(err, TooLargeError) and "MEDSSL_MAX_VOLUME_BYTES" in err.problem


def test_resampling_to_an_absurd_grid_is_refused_before_allocating():
    vol = Volume(np.zeros((1, 4, 4, 4), np.float32), oblique_affine((50.0, 50.0, 50.0), (10.0, 0.0, 0.0)), "c",
                 label=np.zeros((4, 4, 4), np.int16), source="/data/c.nii.gz")  # fmt: skip
    err, peak = _read_small("/data/c.nii.gz", call=lambda: resample_to_spacing(vol, (0.01, 0.01, 0.01)))
    assert isinstance(err, TooLargeError) and "resampling to [20000, 20000, 20000]" in err.problem
    assert peak < SMALL_BYTES


def test_rgb_nifti_is_refused_as_colour_naming_the_file(tmp_path):
    rgb = np.zeros((6, 5, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    img = nib.Nifti1Image(rgb, AFFINE)
    nib.save(img, str(tmp_path / "colour.nii.gz"))
    err, _ = _read_small(tmp_path / "colour.nii.gz")
    assert isinstance(err, UnreadableFileError) and "RGB colour" in err.problem


def test_a_complex_nifti_is_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((6, 5, 4), np.complex64), AFFINE), str(tmp_path / "k.nii"))
    err, _ = _read_small(tmp_path / "k.nii")
    assert isinstance(err, UnreadableFileError) and "complex" in err.problem


def test_a_scan_names_each_hostile_file_and_still_caches_the_good_case(tmp_path):
    good = make_volume_file(tmp_path / "raw", name="good")
    km = AFFINE.copy()
    km[:3, 1] *= 1e6
    rows = [
        {"case_id": "good", "image": str(good.image_path)},
        {"case_id": "km", "image": str(write_raw_nifti(tmp_path / "raw" / "km.nii.gz", DATA, km))},
        {"case_id": "huge", "image": str(write_raw_nifti(tmp_path / "raw" / "huge.nii", DATA, AFFINE, dim=HUGE_DIM))},
    ]  # fmt: skip
    df = pd.DataFrame([{**r, "label": "", "group": "", "split": ""} for r in rows])
    report = VolumeCache(tmp_path / "cache", PreprocessConfig()).build(df, on_error="skip", progress=False)
    assert report.ok_case_ids == ["good"]
    problems = dict(zip(report.problem_case_ids, map(type, report.problems)))
    assert problems == {"km": GeometryError, "huge": UnreadableFileError}


def test_running_out_of_memory_on_one_case_is_reported_for_that_file(tmp_path, monkeypatch):
    cases = [make_volume_file(tmp_path / "raw", name=f"c{i}", seed=i) for i in range(2)]
    df = pd.DataFrame([{"case_id": f"c{i}", "image": str(v.image_path), "label": "", "group": "", "split": ""}
                       for i, v in enumerate(cases)])  # fmt: skip
    real = datasets.load_case

    def flaky(row, *args, **kwargs):
        if row["case_id"] == "c0":
            raise MemoryError("Unable to allocate 32.0 GiB")
        return real(row, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_case", flaky)
    report = datasets.scan_dataset(df, PreprocessConfig(), on_error="skip", progress=False)
    assert report.ok_case_ids == ["c1"]
    (err,) = report.problems
    assert isinstance(err, TooLargeError) and err.path == str(cases[0].image_path) and "32.0 GiB" in err.problem


# ------------------------------------------------------------ repairs and assumptions are named in the scan report

LEFT_HANDED = oblique_affine((2.0, 2.0, 2.0), (10.0, 0.0, 0.0), (-5.0, 3.0, 7.0), flip_axes=(0,))  # qfac -1
REPAIRED_HEADERS = {
    "sform7": ({"sform_code": 7}, "sform_code 7 is not a NIfTI code (0, 1, 2, 3, 4): that transform was ignored; "
                                  "the orientation was taken from the qform (code 1)"),
    "qform-2": ({"qform_code": -2}, "qform_code -2 is not a NIfTI code (0, 1, 2, 3, 4): that transform was ignored; "
                                    "the orientation was taken from the sform"),
    "both0": ({"sform_code": 0, "qform_code": 0}, "no orientation in the header (sform_code and qform_code 0): the "
                                                  "affine was taken from the voxel sizes alone"),
    "qfacnan": ({"sform_code": 0, "pixdim": [float("nan"), 2, 2, 2, 1, 1, 1, 1]},
                "qfac (pixdim[0]) is nan, must be 1 or -1: 1 was assumed (a right-handed grid); the qform defines "
                "this file's orientation, so its third axis may be flipped"),
    "qfac0.3": ({"pixdim": [0.3, 2, 2, 2, 1, 1, 1, 1]}, "qfac (pixdim[0]) is 0.3, must be 1 or -1: 1 was assumed (a "
                                                        "right-handed grid); the qform does not define this file's "
                                                        "orientation, so nothing changed"),
}  # fmt: skip


def test_headers_nibabel_repairs_are_accepted_with_a_warning_naming_the_file_and_the_rule(tmp_path, monkeypatch,
                                                                                          capfd):
    """Issue 23 item 11 and issue 20 ("found by a hostile run"): invalid sform/qform codes and a NaN or odd qfac
    were accepted with nibabel's silent repair, warned only on stderr (if at all)."""
    from medssl.data.source import open_data

    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path / "cache"))
    raw = tmp_path / "raw"
    raw.mkdir()
    data = np.random.default_rng(1).integers(0, 500, (12, 10, 9)).astype(np.int16)
    data[3:9, 3:8, 2:7] += 800  # a body to crop to
    paths = {name: write_raw_nifti(raw / f"{name}.nii", data, LEFT_HANDED, **fields)
             for name, (fields, _) in REPAIRED_HEADERS.items()}  # fmt: skip
    write_raw_nifti(raw / "clean.nii", data, LEFT_HANDED)
    with pytest.warns(UserWarning, match="5 file\\(s\\) were read with a repair or an assumption"):
        data_source = open_data(raw, progress=False)
    assert "sform_code 7 not valid" not in capfd.readouterr().err  # nibabel's own log line is not printed
    report = data_source.scan_report
    assert sorted(report.ok_case_ids) == sorted([*REPAIRED_HEADERS, "clean"]) and not report.problems
    got = {w.case_id: (w.path, w.problem) for w in report.warnings}
    assert set(got) == set(REPAIRED_HEADERS)  # none for the clean file
    for name, (_, rule) in REPAIRED_HEADERS.items():
        assert got[name][0] == str(paths[name]) and got[name][1].startswith(rule), (name, got[name])
    frame = report.to_frame()
    assert (frame["status"] == "warning").sum() == 5 and "sform_code 7" in report.summary()
    # a second open reuses the cache and still reports them
    with pytest.warns(UserWarning, match="5 file\\(s\\)"):
        again = open_data(raw, progress=False).scan_report
    assert again.built_case_ids == [] and {w.case_id for w in again.warnings} == set(REPAIRED_HEADERS)


def test_a_repaired_label_header_is_named_with_the_label_file(tmp_path):
    image = write_raw_nifti(tmp_path / "img.nii", DATA, AFFINE)
    label = write_raw_nifti(tmp_path / "lab.nii", np.zeros(DATA.shape, np.int16), AFFINE, sform_code=9)
    vol = read_volume(image, label)
    assert vol.meta["read_warnings"] == [{"path": str(label), "problem": "label: sform_code 9 is not a NIfTI code "
                                          "(0, 1, 2, 3, 4): that transform was ignored; the orientation was taken "
                                          "from the qform (code 1)"}]  # fmt: skip


def test_reader_warnings_are_not_printed_before_the_one_line_error(tmp_path, capfd):
    """Issue 23 item 10: ITK's "Non uniform sampling or missing slices" and nibabel's log lines were printed to
    stderr before medssl's own error."""
    from tests.helpers import write_dicom_series

    folder = write_dicom_series(tmp_path / "ct", np.zeros((8, 8, 10)), oblique_affine((1.0, 1.0, 2.0)))
    (folder / "slice_004.dcm").unlink()
    capfd.readouterr()
    with pytest.raises(GeometryError, match="missing slice"):
        read_volume(folder)
    bad_sform = write_raw_nifti(tmp_path / "s.nii", DATA, AFFINE, sform_code=7)
    read_volume(bad_sform)
    err = capfd.readouterr().err
    assert err == "", err


@pytest.mark.parametrize("value", ["abc", "-5", "0", "nan", "inf", "1e-3"])
def test_a_bad_memory_bound_setting_is_one_error_about_the_setting_not_one_per_file(tmp_path, monkeypatch, value):
    """Issue 23 item 11: `MEDSSL_MAX_VOLUME_BYTES=abc` was blamed on every data file; `-5` was accepted as the bound."""
    from medssl.data.errors import SettingError
    from medssl.data.source import open_data

    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path / "cache"))
    for i in range(3):
        make_volume_file(tmp_path / "raw", name=f"c{i}", seed=i, label=False)
    monkeypatch.setenv("MEDSSL_MAX_VOLUME_BYTES", value)
    with pytest.raises(SettingError) as err:
        open_data(tmp_path / "raw", progress=False)
    assert not isinstance(err.value, MedsslDataError)  # not about a file
    assert str(err.value).startswith(f"MEDSSL_MAX_VOLUME_BYTES must be a positive number of bytes (e.g. 8e9 for 8 GB), "
                                     f"got {value!r}")  # fmt: skip
    with pytest.raises(SettingError):
        read_volume(tmp_path / "raw" / "c0.nii.gz")
    monkeypatch.setenv("MEDSSL_MAX_VOLUME_BYTES", "1e9")
    assert len(open_data(tmp_path / "raw", progress=False).scan_report.ok_case_ids) == 3


def test_a_dangling_symlink_and_a_fifo_are_named_as_bad_files_not_skipped_without_a_word(tmp_path, monkeypatch):
    """Issue 23 item 11: a dangling `*.nii.gz` symlink or a FIFO in a scanned folder was skipped silently
    (and a FIFO that reached a reader would block it for ever)."""
    import signal

    from medssl.data.source import open_data

    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path / "cache"))
    raw = tmp_path / "raw"
    for i in range(2):
        make_volume_file(raw, name=f"c{i}", seed=i, label=False)
    os.symlink(tmp_path / "moved_away.nii.gz", raw / "dangling.nii.gz")
    os.mkfifo(raw / "pipe.nii.gz")
    previous = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("the scan blocked on the FIFO"))
    signal.alarm(60)
    try:
        data = open_data(raw, on_error="skip", progress=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    report = data.scan_report
    assert sorted(report.ok_case_ids) == ["c0", "c1"]
    problems = {c: e for c, e in zip(report.problem_case_ids, report.problems)}
    assert set(problems) == {"dangling", "pipe"}
    assert isinstance(problems["dangling"], UnreadableFileError) and problems["dangling"].path == str(
        raw / "dangling.nii.gz") and "dangling link" in problems["dangling"].problem  # fmt: skip
    assert str(tmp_path / "moved_away.nii.gz") in problems["dangling"].problem
    assert problems["pipe"].path == str(raw / "pipe.nii.gz") and "FIFO" in problems["pipe"].problem


def test_micrometre_voxels_are_named_as_a_tiny_extent_not_as_no_body_voxels(tmp_path):
    """Issue 23 item 11: 0.001 mm voxels gave "no body voxels" (the image fell into one 3 mm voxel)."""
    micro = make_volume_file(tmp_path, name="micro", shape=(40, 40, 40), label=False,
                             affine=oblique_affine((0.001, 0.002, 0.001), (10.0, 0.0, 0.0)))  # fmt: skip
    df = pd.DataFrame([{"case_id": "micro", "image": str(micro.image_path), "label": "", "group": "", "split": ""}])
    report = datasets.scan_dataset(df, PreprocessConfig(target_spacing_mm=(3.0, 2.0, 3.0)), on_error="skip",
                                   progress=False)  # fmt: skip
    (err,) = report.problems
    assert isinstance(err, GeometryError) and err.path == str(micro.image_path)
    assert err.problem.startswith("the image spans only 0.04 x 0.08 x 0.04 mm (voxel size 0.001 x 0.002 x 0.001 mm)")
    assert "less than two 3 x 2 x 3 mm voxels along axis [0, 1, 2]" in err.problem and "micrometres" in err.problem


_CRASH_PROBE = """
import sys
from medssl.data.errors import MedsslDataError
from medssl.data.io import read_volume
try:
    read_volume(sys.argv[1])
except MedsslDataError as e:
    print(type(e).__name__ + ": " + e.problem)
"""


@pytest.mark.parametrize(("field", "value", "error", "says"), [
    ("NDims", "-1", "UnreadableFileError", "NDims is '-1', not a number of dimensions"),  # SimpleITK: SIGSEGV
    ("NDims", "100", "DimensionalityError", "the header says NDims = 100"),  # SimpleITK: SIGABRT
    ("NDims", "2147483647", "DimensionalityError", "NDims = 2147483647"),  # SimpleITK: SIGSEGV
    ("NDims", "2.5", "UnreadableFileError", "NDims is '2.5'"),
    ("DimSize", "7 6", "UnreadableFileError", "DimSize is '7 6': the header needs 3 positive whole numbers"),
    ("ElementType", "MET_BOGUS", "UnreadableFileError", "ElementType is 'MET_BOGUS', not a MetaImage voxel type"),
])  # fmt: skip
def test_metaimage_headers_that_crash_simpleitk_are_refused_before_it_reads_them(tmp_path, field, value, error, says):
    """Found while fuzzing MetaImage headers for issue 20 item 7: `NDims = -1` killed the process (SIGSEGV)."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.data.test_fuzz_itk_headers import _base, _build, _write

    lines, data, sep = _base(tmp_path, ".mha")
    path = tmp_path / "hostile.mha"
    _write(path, _build(lines, sep, {field: value}, set(), False), data, False, None)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", _CRASH_PROBE, str(path)], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, f"the reader died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    assert proc.stdout.startswith(f"{error}: ") and says in proc.stdout, proc.stdout


def test_metaio_output_is_kept_for_the_message_not_printed(tmp_path, capfd):
    """Issue 23 item 10: MetaIO prints straight to the C++ stderr ("MetaImage: M_ReadElementsData: ...")."""
    from tests.data.test_fuzz_itk_headers import _base, _build, _write

    lines, data, sep = _base(tmp_path, ".mha")
    path = tmp_path / "binary-maybe.mha"
    _write(path, _build(lines, sep, {"BinaryData": "maybe"}, set(), False), data, False, None)
    capfd.readouterr()
    err, _ = _read_small(path)
    assert err.problem.startswith("ITK cannot read it: the file is damaged or uses a feature ITK does not read")
    assert "it also printed: MetaImage: M_ReadElementsData" in err.problem
    assert capfd.readouterr().err == ""
