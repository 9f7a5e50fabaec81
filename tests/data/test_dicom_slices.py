"""DICOM slice positions: scanner rounding is accepted (with its residual), missing/duplicated slices are named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medssl.data.errors import GeometryError
from medssl.data.io import DICOM_SLICE_TOLERANCE, read_volume
from tests.helpers import oblique_affine, write_dicom_series

# An oblique GE-like series: 20 slices 6.999 mm apart, 0.9 x 0.8 mm in-plane, tilted 12 and 7 degrees.
N_SLICES = 20
SPACING_MM = (0.9, 0.8, 6.999)
AFFINE = oblique_affine(SPACING_MM, (12.0, 7.0, 0.0), (110.0, 95.0, -60.0), flip_axes=(0, 1))
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _image(n_slices: int = N_SLICES) -> np.ndarray:
    return np.random.default_rng(0).integers(-1000, 1000, (6, 5, n_slices)).astype(np.int16)


def _rounding_offsets() -> np.ndarray:
    """Deviations from the uniform grid of at most 0.05 mm, with one gap 0.099 mm short."""
    offsets = np.tile([0.02, -0.01, 0.03, -0.03], N_SLICES // 4).astype(np.float64)
    offsets[9], offsets[10] = 0.049, -0.05
    return offsets


def _positions_ras(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        out[f.name] = _LPS_TO_RAS @ np.asarray([float(v) for v in ds.ImagePositionPatient])
    return out


def test_scanner_rounded_oblique_series_is_accepted_with_its_fit_residual(tmp_path):
    offsets = _rounding_offsets()
    gaps = np.diff(offsets)
    # the situation of the report: positions within 0.05 mm of the grid, one gap 0.099 mm off the median
    assert np.max(np.abs(offsets)) <= 0.05 and np.max(np.abs(gaps - np.median(gaps))) > 0.09
    folder = write_dicom_series(tmp_path / "ge", _image(), AFFINE, slice_offsets_mm=offsets)

    vol = read_volume(folder)

    residual = vol.meta["dicom_slice_fit_residual_mm"]
    assert 0.03 < residual <= 0.06
    assert vol.meta["dicom_slice_spacing_mm"] == pytest.approx(SPACING_MM[2], abs=0.01)
    np.testing.assert_allclose(vol.spacing_mm, SPACING_MM, atol=0.01)
    # every slice's first voxel lands within the residual of the position its file states
    stated = _positions_ras(folder)
    for k in range(N_SLICES):
        world = vol.affine @ np.array([0.0, 0.0, k, 1.0])
        assert np.linalg.norm(world[:3] - stated[f"slice_{k:03d}.dcm"]) <= residual + 1e-3


def test_a_missing_slice_is_named_with_its_neighbours(tmp_path):
    folder = write_dicom_series(tmp_path / "gap", _image(), AFFINE, slice_offsets_mm=_rounding_offsets())
    (folder / "slice_007.dcm").unlink()
    with pytest.raises(GeometryError) as info:
        read_volume(folder)
    msg = str(info.value)
    assert str(folder) in msg and "missing slice" in msg
    assert "1 between slice_006.dcm (instance 7" in msg and "slice_008.dcm (instance 9" in msg


def test_two_missing_slices_in_a_row_are_counted(tmp_path):
    folder = write_dicom_series(tmp_path / "gap2", _image(), AFFINE)
    for k in (11, 12):
        (folder / f"slice_{k:03d}.dcm").unlink()
    with pytest.raises(GeometryError, match=r"missing slice.*2 between slice_010\.dcm"):
        read_volume(folder)


def test_a_duplicated_slice_is_named_as_such(tmp_path):
    folder = write_dicom_series(tmp_path / "dup", _image(), AFFINE)
    ds = pydicom.dcmread(folder / "slice_005.dcm")
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".99"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = 99
    ds.save_as(folder / "slice_005b.dcm")
    with pytest.raises(GeometryError) as info:
        read_volume(folder)
    msg = str(info.value)
    assert "duplicated slice" in msg and "slice_005.dcm" in msg and "slice_005b.dcm" in msg
    assert "instance 99" in msg


def test_unevenly_spaced_slices_beyond_the_tolerance_are_refused_with_the_residual(tmp_path):
    offsets = np.zeros(N_SLICES)
    offsets[10:] = 0.3 * SPACING_MM[2]  # one gap 30 % too long: neither a missing slice nor rounding
    folder = write_dicom_series(tmp_path / "uneven", _image(), AFFINE, slice_offsets_mm=offsets)
    with pytest.raises(GeometryError, match=r"unevenly spaced.*deviate up to .* mm from a uniform") as info:
        read_volume(folder)
    assert f"{DICOM_SLICE_TOLERANCE:.0%}" in str(info.value)


def test_slices_drifting_in_plane_are_refused(tmp_path):
    drift = [[0.0, 0.4 * k, 0.0] for k in range(N_SLICES)]  # 0.4 mm per slice along LPS y: a gantry tilt
    folder = write_dicom_series(tmp_path / "tilt", _image(), AFFINE, position_shift_lps_mm=drift)
    with pytest.raises(GeometryError, match="in-plane"):
        read_volume(folder)
