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
