"""Every kind of bad input raises a MedsslDataError subclass whose message names the file and the problem."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medssl.data.errors import (
    DimensionalityError,
    EmptyForegroundError,
    GeometryError,
    LabelGridMismatchError,
    MedsslDataError,
    NonFiniteVoxelsError,
    TooSmallError,
    UnreadableFileError,
)
from medssl.data.io import read_volume
from medssl.data.preprocess import PreprocessConfig, preprocess
from medssl.data.validate import validate_volume
from tests.helpers import oblique_affine, write_dicom_series, write_nifti_file, write_sitk_file

AFFINE = oblique_affine((0.8, 1.5, 3.5), (25.0, 20.0, 0.0), (5.0, -7.0, 11.0), flip_axes=(0, 1))
SHAPE = (10, 9, 8)


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 10.0, size=SHAPE).astype(np.float32)


def _raises(exc_type, path, *fragments, call=None):
    """Assert ``call()`` (default ``read_volume(path)``) raises ``exc_type`` naming ``path`` and each fragment."""
    with pytest.raises(exc_type) as info:
        (call or (lambda: read_volume(path)))()
    message = str(info.value)
    assert isinstance(info.value, MedsslDataError)
    assert info.value.path == str(path)
    assert str(path) in message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), f"{fragment!r} not in {message!r}"
    return message


def _nifti_with_header(path: Path, data: np.ndarray, *, sform=None, pixdim=None) -> Path:
    """Write a ``.nii.gz`` whose header carries exactly the given (possibly broken) geometry.

    nibabel "fixes" bad pixdim values whenever it builds a header, so those are
    patched into the bytes on disk (NIfTI-1 keeps pixdim as 8 float32 at byte 76).
    """
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    if sform is not None:
        header.set_sform(np.asarray(sform), code=1)
        header.set_qform(None, code=0)
    else:
        header.set_qform(np.eye(4), code=1)
        header.set_sform(None, code=0)
    plain = path.with_name(path.name.replace(".nii.gz", ".tmp.nii"))
    nib.save(nib.Nifti1Image(data, None, header=header), str(plain))
    raw = bytearray(plain.read_bytes())
    plain.unlink()
    if pixdim is not None:
        raw[80:92] = np.asarray(pixdim, dtype="<f4").tobytes()  # pixdim[1:4]
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


def _text_header_file(path: Path, replace: dict[bytes, bytes]) -> Path:
    """A valid NRRD/MetaImage file written by SimpleITK, then with header text replaced."""
    write_sitk_file(path, _image(), np.diag([-1.0, -1.0, 1.0, 1.0]))  # identity in ITK's LPS
    raw = path.read_bytes()
    for old, new in replace.items():
        assert old in raw, (old, raw[:400])
        raw = raw.replace(old, new)
    path.write_bytes(raw)
    return path


# --------------------------------------------------------------------------- unreadable files


def test_missing_file_names_the_file(tmp_path):
    _raises(UnreadableFileError, tmp_path / "nope.nii.gz", "does not exist")


@pytest.mark.parametrize(("name", "says"), [
    ("garbage.nii.gz", "not a readable gzip file"),
    ("garbage.nii", "not a NIfTI header: its first field (sizeof_hdr) is"),
    ("garbage.nrrd", "not a NRRD file: it starts with b'this is '"),
    ("garbage.mha", "the MetaImage header has no ElementDataFile line"),
])  # fmt: skip
def test_garbage_bytes_with_an_image_name_are_unreadable_and_the_message_says_why(tmp_path, name, says):
    path = tmp_path / name
    path.write_bytes(b"this is not an image \x00\x01\x02" * 50)
    _raises(UnreadableFileError, path, says)


def test_truncated_gzip_nifti_is_unreadable_and_says_why(tmp_path):
    path = write_nifti_file(tmp_path / "trunc.nii.gz", _image(), AFFINE)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = _raises(UnreadableFileError, path, "cannot read")
    assert "Error" in message or "ended" in message  # the underlying reason is kept


def test_truncated_uncompressed_nifti_is_unreadable(tmp_path):
    path = write_nifti_file(tmp_path / "trunc.nii", _image(), AFFINE)
    path.write_bytes(path.read_bytes()[:-100])
    _raises(UnreadableFileError, path, "cannot read")


def test_gzip_nifti_cut_after_the_last_voxel_is_still_detected(tmp_path):
    # A constant image compresses to a few bytes: cutting the 8-byte gzip trailer leaves every voxel readable.
    path = write_nifti_file(tmp_path / "cut.nii.gz", np.ones(SHAPE, np.float32), AFFINE)
    path.write_bytes(path.read_bytes()[:-8])
    _raises(UnreadableFileError, path, "cannot read", "ended before")


def test_gzip_of_garbage_named_nifti_is_unreadable(tmp_path):
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(gzip.compress(b"\x00" * 100))
    _raises(UnreadableFileError, path, "too short for a NIfTI header: 100 bytes")


def test_unknown_format_lists_the_supported_ones(tmp_path):
    path = tmp_path / "scan.xyz"
    path.write_bytes(b"\x00" * 64)
    _raises(UnreadableFileError, path, "unsupported", ".nii.gz", "DICOM")


def test_folder_without_dicom_series_is_unreadable(tmp_path):
    folder = tmp_path / "empty_series"
    folder.mkdir()
    (folder / "notes.txt").write_text("no dicom here")
    _raises(UnreadableFileError, folder, "no readable DICOM series")


def test_folder_with_two_dicom_series_asks_for_one_per_folder(tmp_path):
    folder = tmp_path / "mixed"
    image = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    write_dicom_series(folder / "a", image, AFFINE, series_uid="1.2.3.4.1")
    write_dicom_series(folder / "b", image, AFFINE, series_uid="1.2.3.4.2")
    for f in list((folder / "a").iterdir()) + list((folder / "b").iterdir()):
        f.rename(folder / f"{f.parent.name}_{f.name}")
    _raises(UnreadableFileError, folder, "2 DICOM series", "1.2.3.4.1", "one series per folder")


def test_dicom_series_with_a_missing_slice_is_a_geometry_error(tmp_path):
    folder = write_dicom_series(tmp_path / "gap", np.zeros(SHAPE, np.int16), AFFINE)
    (folder / "slice_003.dcm").unlink()
    _raises(GeometryError, folder, "missing slice", "slice_002.dcm", "slice_004.dcm")


def test_non_integer_label_map_is_rejected(tmp_path):
    image = write_nifti_file(tmp_path / "img.nii.gz", _image(), AFFINE)
    label = write_nifti_file(tmp_path / "prob.nii.gz", np.full(SHAPE, 0.5, np.float32), AFFINE)
    _raises(UnreadableFileError, label, "non-integer", call=lambda: read_volume(image, label))


# --------------------------------------------------------------------------- dimensionality


@pytest.mark.parametrize("shape", [(10, 9), (10, 9, 1)])
def test_two_d_image_is_rejected(tmp_path, shape):
    path = write_nifti_file(tmp_path / "slice.nii.gz", np.ones(shape, np.float32), np.eye(4))
    _raises(DimensionalityError, path, "2D", str(shape))


def test_two_d_metaimage_is_rejected(tmp_path):
    import SimpleITK as sitk

    path = tmp_path / "slice.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((9, 10), np.float32)), str(path))
    _raises(DimensionalityError, path, "2D")


@pytest.mark.parametrize("shape", [(*SHAPE, 6), (*SHAPE, 2, 3)])
def test_four_d_time_series_and_five_d_images_are_rejected(tmp_path, shape):
    path = write_nifti_file(tmp_path / "series.nii.gz", np.ones(shape, np.float32), AFFINE)
    _raises(DimensionalityError, path, f"{len(shape)}D", str(shape))


def test_four_d_metaimage_time_series_is_rejected(tmp_path):
    import SimpleITK as sitk

    path = tmp_path / "series.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((6, 8, 9, 10), np.float32), isVector=False), str(path))  # t,z,y,x
    _raises(DimensionalityError, path, "4D", "(10, 9, 8, 6)")


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    "kind, fragment",
    [("zero", "zero voxel spacing"), ("nan", "non-finite"), ("singular", "singular")],
)
def test_broken_nifti_sform_is_a_geometry_error(tmp_path, kind, fragment):
    sform = AFFINE.copy()
    if kind == "zero":
        sform[:3, 1] = 0.0
    elif kind == "nan":
        sform[0, 0] = np.nan
    else:
        sform[:3, 2] = sform[:3, 0] * 3.0
    path = _nifti_with_header(tmp_path / f"{kind}.nii.gz", _image(), sform=sform)
    _raises(GeometryError, path, "broken geometry", fragment)


@pytest.mark.parametrize("pixdim", [(0.0, 1.0, 1.0), (-1.0, 1.0, 1.0), (1.0, np.nan, 1.0)])
def test_zero_negative_or_nan_nifti_pixdim_is_a_geometry_error_not_silently_fixed(tmp_path, pixdim):
    path = _nifti_with_header(tmp_path / "pixdim.nii.gz", _image(), pixdim=pixdim)
    _raises(GeometryError, path, "spacing", "pixdim")


@pytest.mark.parametrize("value", [b"0 1 1", b"-1 1 1", b"nan 1 1"])
def test_zero_negative_or_nan_metaimage_spacing_is_a_geometry_error(tmp_path, value):
    path = _text_header_file(tmp_path / "bad.mha", {b"ElementSpacing = 1 1 1": b"ElementSpacing = " + value})
    _raises(GeometryError, path, "spacing", value.decode().split()[0])


def test_singular_metaimage_direction_is_a_geometry_error(tmp_path):
    path = _text_header_file(
        tmp_path / "sing.mha", {b"TransformMatrix = 1 0 0 0 1 0 0 0 1": b"TransformMatrix = 1 0 0 1 0 0 0 0 1"}
    )
    _raises(GeometryError, path, "broken geometry", "singular")


@pytest.mark.parametrize(
    "header, fragment",
    [
        (b"space directions: (0,0,0) (0,1,0) (0,0,1)", "zero voxel spacing"),
        (b"space directions: (nan,0,0) (0,1,0) (0,0,1)", "not a finite"),
        (b"spacings: -1 1 1", "positive"),
    ],
)
def test_broken_nrrd_spacing_is_a_geometry_error(tmp_path, header, fragment):
    path = _text_header_file(
        tmp_path / "bad.nrrd", {b"space directions: (1,0,0) (0,1,0) (0,0,1)": header}
    )
    _raises(GeometryError, path, "broken geometry", fragment)


def test_negative_diagonal_is_a_legitimate_flip_not_an_error(tmp_path):
    path = write_nifti_file(tmp_path / "flipped.nii.gz", _image(), np.diag([-1.0, -2.0, 3.0, 1.0]))
    np.testing.assert_allclose(read_volume(path).spacing_mm, [1.0, 2.0, 3.0])


# --------------------------------------------------------------------------- voxel values


def test_nan_and_inf_voxels_are_counted_in_the_error(tmp_path):
    image = _image()
    image[0, 0, 0] = np.nan
    image[1, 2, 3] = np.nan
    image[4, 4, 4] = np.inf
    path = write_nifti_file(tmp_path / "nan.nii.gz", image, AFFINE)
    _raises(NonFiniteVoxelsError, path, "3 non-finite", "2 NaN", "1 Inf")


# --------------------------------------------------------------------------- label grids


def test_label_with_another_shape_names_the_label_file_and_both_shapes(tmp_path):
    image = write_nifti_file(tmp_path / "img.nii.gz", _image(), AFFINE)
    label = write_nifti_file(tmp_path / "seg.nii.gz", np.zeros((10, 9, 7), np.int16), AFFINE)
    message = _raises(LabelGridMismatchError, label, "(10, 9, 7)", str(SHAPE), call=lambda: read_volume(image, label))
    assert str(image) in message


def test_label_with_a_shifted_affine_names_the_label_file_and_both_affines(tmp_path):
    image = write_nifti_file(tmp_path / "img.nii.gz", _image(), AFFINE)
    shifted = AFFINE.copy()
    shifted[:3, 3] += [2.0, 0.0, 0.0]
    label = write_nifti_file(tmp_path / "seg.nii.gz", np.zeros(SHAPE, np.int16), shifted)
    message = _raises(LabelGridMismatchError, label, "affine differs", "2 mm", call=lambda: read_volume(image, label))
    assert "label affine" in message and "image affine" in message and str(image) in message
    assert "flipped" not in message  # a real misalignment, not a reordered grid


def test_label_stored_with_a_flipped_axis_gets_a_reorientation_hint(tmp_path):
    image = write_nifti_file(tmp_path / "img.nii.gz", _image(), AFFINE)
    flip_y = np.eye(4)
    flip_y[1, 1], flip_y[1, 3] = -1.0, SHAPE[1] - 1  # label index j holds image index (ny - 1 - j)
    label = write_nifti_file(tmp_path / "seg.nii.gz", np.zeros(SHAPE, np.int16), AFFINE @ flip_y)
    _raises(LabelGridMismatchError, label, "affine differs", "flipped/permuted", call=lambda: read_volume(image, label))


def test_label_affine_within_tolerance_is_accepted(tmp_path):
    image = write_nifti_file(tmp_path / "img.nii.gz", _image(), AFFINE)
    nudged = AFFINE.copy()
    nudged[:3, 3] += 2e-4
    label = write_nifti_file(tmp_path / "seg.nii.gz", np.ones(SHAPE, np.int16), nudged)
    assert read_volume(image, label).label.sum() == np.prod(SHAPE)


def test_misaligned_aux_map_names_the_aux_file(tmp_path):
    image = write_nifti_file(tmp_path / "img.nii.gz", _image(), AFFINE)
    lesion = write_nifti_file(tmp_path / "lesion.nii.gz", np.zeros((9, 9, 8), np.int16), AFFINE)
    read = lambda: read_volume(image, aux_paths={"lesion": lesion})  # noqa: E731
    _raises(LabelGridMismatchError, lesion, "aux map 'lesion'", call=read)


# --------------------------------------------------------------------------- after preprocessing


def test_volume_too_small_after_preprocessing_names_file_shape_and_required_size(tmp_path):
    path = write_nifti_file(tmp_path / "small.nii.gz", _image(), AFFINE)
    volume = read_volume(path)
    config = PreprocessConfig(target_spacing_mm=(3.0, 3.0, 3.0), crop_foreground=False, min_shape_vox=(32, 32, 32))
    message = _raises(
        TooSmallError, path, "smaller than the required (32, 32, 32)", call=lambda: preprocess(volume, config)
    )
    shape = tuple(preprocess(volume, PreprocessConfig(crop_foreground=False)).shape_vox)
    assert str(shape) in message


def test_constant_image_has_empty_foreground(tmp_path):
    path = write_nifti_file(tmp_path / "flat.nii.gz", np.full(SHAPE, -1000.0, np.float32), AFFINE)
    volume = read_volume(path)
    _raises(EmptyForegroundError, path, "no body voxels", call=lambda: preprocess(volume, PreprocessConfig()))


def test_image_below_an_explicit_threshold_has_empty_foreground(tmp_path):
    path = write_nifti_file(tmp_path / "dark.nii.gz", _image() - 2000.0, AFFINE)
    volume = read_volume(path)
    config = PreprocessConfig(foreground_threshold=-500.0)
    _raises(EmptyForegroundError, path, "above -500", call=lambda: preprocess(volume, config))


# --------------------------------------------------------------------------- in-memory volumes


def test_validate_volume_checks_in_memory_volumes(tmp_path):
    path = write_nifti_file(tmp_path / "ok.nii.gz", _image(), AFFINE)
    volume = read_volume(path)
    validate_volume(volume, min_shape_vox=SHAPE)
    _raises(TooSmallError, path, "smaller", call=lambda: validate_volume(volume, min_shape_vox=(11, 1, 1)))
    broken = volume.affine.copy()
    broken[:3, 0] = 0.0
    _raises(GeometryError, path, "zero voxel spacing", call=lambda: validate_volume(volume.with_(affine=broken)))
    nan_data = volume.data.copy()
    nan_data[0, 1, 1, 1] = np.nan
    _raises(NonFiniteVoxelsError, path, "1 non-finite", call=lambda: validate_volume(volume.with_(data=nan_data)))
    _raises(
        LabelGridMismatchError, path, "label shape",
        call=lambda: validate_volume(volume.with_(label=np.zeros((2, 2, 2), np.int16))),
    )
    _raises(DimensionalityError, path, "(C, X, Y, Z)", call=lambda: validate_volume(volume.with_(data=volume.data[0])))
