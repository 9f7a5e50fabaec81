"""medssl.data.io: every format gives the same RAS Volume; labels, channels, atomic NIfTI writes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medssl.data import io as medssl_io
from medssl.data.io import read_volume, write_nifti
from medssl.geometry import vox_to_world
from tests.helpers import oblique_affine, write_dicom_series, write_nifti_file, write_sitk_file

# Oblique (rotated about two axes), anisotropic and LPS-stored: the hard case for LPS <-> RAS handling.
AFFINE = oblique_affine((0.8, 1.5, 3.5), (25.0, 20.0, 0.0), (-12.3, 30.7, -40.1), flip_axes=(0, 1))
SHAPE = (12, 10, 8)


@pytest.fixture
def int_image():
    """A unique-valued int16 image, so any axis mix-up changes the array."""
    rng = np.random.default_rng(0)
    return rng.permutation(np.prod(SHAPE)).reshape(SHAPE).astype(np.int16) - 300


def _write(kind: str, folder: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    if kind == "dicom":
        return write_dicom_series(folder / "dicom_series", array, affine)
    if kind in (".nii.gz", ".nii"):
        return write_nifti_file(folder / f"img{kind}", array, affine)
    return write_sitk_file(folder / f"img{kind}", array, affine)


@pytest.mark.parametrize("kind", [".nii", ".nrrd", ".nhdr", ".mha", ".mhd", "dicom"])
def test_every_format_gives_the_same_ras_affine_and_voxels_as_nifti(tmp_path, int_image, kind):
    reference = read_volume(_write(".nii.gz", tmp_path, int_image, AFFINE))
    other = read_volume(_write(kind, tmp_path, int_image, AFFINE))
    # NIfTI stores the affine in float32, DICOM in 6-decimal strings.
    np.testing.assert_allclose(reference.affine, AFFINE, atol=1e-4)
    np.testing.assert_allclose(other.affine, reference.affine, atol=1e-4)
    np.testing.assert_array_equal(other.data, reference.data)
    np.testing.assert_array_equal(other.data[0], int_image.astype(np.float32))
    assert other.data.shape == (1, *SHAPE) and other.data.dtype == np.float32


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_files_voxel_world_position_matches_simpleitk_physical_point_converted_to_ras(tmp_path, int_image, suffix):
    path = write_sitk_file(tmp_path / f"img{suffix}", int_image, AFFINE)
    volume = read_volume(path)
    image = sitk.ReadImage(str(path))
    for ijk in [(0, 0, 0), (11, 0, 0), (3, 7, 5), (11, 9, 7)]:
        lps = np.asarray(image.TransformIndexToPhysicalPoint(ijk))  # SimpleITK index is (x, y, z)
        ras = lps * [-1.0, -1.0, 1.0]
        np.testing.assert_allclose(vox_to_world(volume.affine, ijk)[0], ras, atol=1e-6)
        assert volume.data[(0, *ijk)] == image[ijk]


def test_dicom_series_slices_are_ordered_by_position_not_file_name(tmp_path, int_image):
    folder = write_dicom_series(tmp_path / "series", int_image, AFFINE)
    files = sorted(folder.iterdir())
    for i, f in enumerate(files):  # reverse the file names: the reader must sort by Image Position
        f.rename(folder / f"renamed_{len(files) - i:03d}.dcm")
    volume = read_volume(folder)
    np.testing.assert_array_equal(volume.data[0], int_image.astype(np.float32))
    np.testing.assert_allclose(volume.affine, AFFINE, atol=1e-4)


def test_three_d_image_gets_one_channel_and_default_ids(tmp_path, int_image):
    volume = read_volume(write_nifti_file(tmp_path / "ct.nii.gz", int_image, AFFINE))
    assert volume.data.shape == (1, *SHAPE)
    assert volume.case_id == "ct" and volume.group == "ct"
    assert volume.source == str(tmp_path / "ct.nii.gz")
    assert volume.meta["format"] == "nifti"
    named = read_volume(tmp_path / "ct.nii.gz", case_id="s1", group="patient7", label_names={1: "liver"})
    assert (named.case_id, named.group, named.label_names) == ("s1", "patient7", {1: "liver"})


def test_four_d_image_with_a_short_last_axis_becomes_channels_first(tmp_path):
    channels = np.random.default_rng(1).normal(size=(*SHAPE, 3)).astype(np.float32)
    volume = read_volume(write_nifti_file(tmp_path / "mr.nii.gz", channels, AFFINE))
    assert volume.data.shape == (3, *SHAPE)
    for c in range(3):
        np.testing.assert_array_equal(volume.data[c], channels[..., c])


def test_nifti_vector_image_with_singleton_time_axis_is_read_as_channels(tmp_path):
    vector = np.random.default_rng(2).normal(size=(*SHAPE, 1, 2)).astype(np.float32)
    volume = read_volume(write_nifti_file(tmp_path / "vec.nii.gz", vector, AFFINE))
    assert volume.data.shape == (2, *SHAPE)
    np.testing.assert_array_equal(volume.data[1], vector[..., 0, 1])


def test_metaimage_vector_pixels_and_short_fourth_axis_become_channels(tmp_path):
    channels_zyx = np.random.default_rng(4).normal(size=(2, SHAPE[2], SHAPE[1], SHAPE[0])).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(np.moveaxis(channels_zyx, 0, -1), isVector=True), str(tmp_path / "vec.mha"))
    four_d = sitk.GetImageFromArray(channels_zyx, isVector=False)  # a 4D image (t, z, y, x)
    sitk.WriteImage(four_d, str(tmp_path / "four_d.mha"))
    for name in ("vec.mha", "four_d.mha"):
        volume = read_volume(tmp_path / name)
        assert volume.data.shape == (2, *SHAPE), name
        np.testing.assert_array_equal(volume.data[1], channels_zyx[1].transpose(2, 1, 0))


def test_labels_and_aux_maps_are_read_as_integers_on_the_image_grid(tmp_path, int_image):
    label = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 5).astype(np.uint8)
    image = write_nifti_file(tmp_path / "img.nii.gz", int_image, AFFINE)
    label_path = write_nifti_file(tmp_path / "seg.nii.gz", label, AFFINE)
    # A lesion mask stored as float (common) with integer values, in another format.
    lesion_path = write_sitk_file(tmp_path / "lesion.nrrd", (label == 3).astype(np.float32), AFFINE)
    volume = read_volume(image, label_path, aux_paths={"lesion": lesion_path})
    assert volume.label.dtype == np.int16 and volume.aux["lesion"].dtype == np.int16
    np.testing.assert_array_equal(volume.label, label)
    np.testing.assert_array_equal(volume.aux["lesion"], (label == 3).astype(np.int16))
    assert volume.meta["label_source"] == str(label_path)
    assert volume.meta["aux_sources"] == {"lesion": str(lesion_path)}


def test_label_ids_beyond_int16_are_kept_as_int32(tmp_path, int_image):
    label = np.zeros(SHAPE, dtype=np.int32)
    label[1, 2, 3] = 70000
    volume = read_volume(
        write_nifti_file(tmp_path / "img.nii.gz", int_image, AFFINE),
        write_nifti_file(tmp_path / "seg.nii.gz", label, AFFINE),
    )
    assert volume.label.dtype == np.int32 and volume.label[1, 2, 3] == 70000


def test_real_nibabel_anatomical_t1_is_read_with_its_own_affine():
    path = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    if not path.exists():
        pytest.skip("nibabel test data not installed")
    volume = read_volume(path)
    img = nib.load(str(path))
    assert volume.data.shape == (1, *img.shape[:3])
    np.testing.assert_allclose(volume.affine, img.affine)
    np.testing.assert_allclose(volume.data[0], img.get_fdata(), rtol=1e-6)


def test_write_nifti_round_trips_array_and_oblique_affine(tmp_path):
    array = np.random.default_rng(3).normal(size=SHAPE).astype(np.float32)
    path = write_nifti(tmp_path / "sub" / "out.nii.gz", array, AFFINE)
    img = nib.load(str(path))
    np.testing.assert_array_equal(np.asarray(img.dataobj), array)
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-5)
    # qform and sform agree, so ITK-based readers see the same geometry.
    np.testing.assert_allclose(img.header.get_qform(), img.header.get_sform(), atol=1e-4)
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.nii.gz"]  # no temp files left


def test_write_nifti_failure_leaves_the_existing_file_intact_and_no_temp_files(tmp_path, monkeypatch):
    path = write_nifti(tmp_path / "keep.nii.gz", np.ones(SHAPE, np.float32), AFFINE)
    before = path.read_bytes()

    def crash_mid_write(img, filename):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(medssl_io.nib, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        write_nifti(path, np.zeros(SHAPE, np.float32), AFFINE)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.nii.gz"]


def test_write_nifti_refuses_non_nifti_names(tmp_path):
    with pytest.raises(ValueError, match="nii"):
        write_nifti(tmp_path / "out.nrrd", np.ones(SHAPE, np.float32), AFFINE)
