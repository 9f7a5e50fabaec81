"""medssl.data.preprocess: world coordinates survive reorientation, resampling and cropping."""

from __future__ import annotations

import hashlib
from dataclasses import asdict

import numpy as np
import pytest
from monai.transforms import ScaleIntensityRangePercentiles
from scipy import ndimage

from medssl.data import preprocess as preprocess_module
from medssl.data.io import read_volume
from medssl.data.preprocess import (
    PreprocessConfig,
    crop_to_box,
    foreground_box,
    preprocess,
    reorient,
    resample_to_spacing,
)
from medssl.data.volume import Volume
from medssl.geometry import vox_to_world
from tests.helpers import grid_centre_mm, oblique_affine, world_grid_mm

SPACING_MM = (0.8, 1.5, 3.5)
TARGET_MM = 3.0
AFFINES = {
    "anisotropic": oblique_affine(SPACING_MM, (0.0, 0.0, 0.0), (-10.0, 20.0, -30.0)),
    "oblique": oblique_affine(SPACING_MM, (25.0, 20.0, 0.0), (-12.0, 30.0, -40.0)),
    "oblique_lps": oblique_affine(SPACING_MM, (25.0, 0.0, 20.0), (31.0, -22.0, 15.0), flip_axes=(0, 1)),
    "oblique_left_handed": oblique_affine(SPACING_MM, (0.0, 28.0, 22.0), (4.0, 5.0, -6.0), flip_axes=(2,)),
}
LANDMARK_SHAPE = (40, 24, 12)  # 32 x 36 x 42 mm
BLOB_SIGMA_MM = 4.0
RAW_BLOB_THRESHOLD = 300.0  # body ~100, blob peak +400: keeps the blob's core (g > 0.5)


def _volume(data: np.ndarray, affine: np.ndarray, **kwargs) -> Volume:
    data = np.asarray(data, dtype=np.float32)
    return Volume(data=data if data.ndim == 4 else data[None], affine=affine, case_id="c", **kwargs)


def _weighted_centroid_mm(weights: np.ndarray, affine: np.ndarray) -> np.ndarray:
    idx = np.argwhere(weights > 0)
    w = weights[weights > 0]
    return vox_to_world(affine, (idx * w[:, None]).sum(axis=0) / w.sum())[0]


def _assert_ras(affine: np.ndarray) -> None:
    rotation = affine[:3, :3]
    for axis in range(3):
        assert np.argmax(np.abs(rotation[:, axis])) == axis
        assert rotation[axis, axis] > 0


# --------------------------------------------------------------------------- landmarks through the whole pipeline


@pytest.mark.parametrize("name", AFFINES)
def test_blob_and_label_centroids_keep_their_world_position_through_reorient_resample_and_crop(make_volume_file, name):
    affine = AFFINES[name]
    landmark = grid_centre_mm(LANDMARK_SHAPE, affine) + np.array([2.5, -2.0, 3.0])
    case = make_volume_file(shape=LANDMARK_SHAPE, affine=affine, landmark_mm=landmark, blob_sigma_mm=BLOB_SIGMA_MM)
    raw = read_volume(case.image_path, case.label_path)
    # Sanity: the landmark really is where we think in the raw file (blob and label).
    blob_raw = _weighted_centroid_mm(np.clip(raw.data[0] - RAW_BLOB_THRESHOLD, 0, None), raw.affine)
    assert np.linalg.norm(blob_raw - landmark) < 0.5

    config = PreprocessConfig(target_spacing_mm=(TARGET_MM,) * 3, intensity="none", crop_margin_vox=0)
    out = preprocess(raw, config)

    _assert_ras(out.affine)
    np.testing.assert_allclose(out.spacing_mm, TARGET_MM, atol=1e-9)
    assert out.shape_vox != tuple(out.meta["resampled_shape_vox"])  # the crop really moved the origin
    blob_mm = _weighted_centroid_mm(np.clip(out.data[0] - RAW_BLOB_THRESHOLD, 0, None), out.affine)
    label_mm = _weighted_centroid_mm((out.label == 1).astype(float), out.affine)
    assert np.linalg.norm(blob_mm - landmark) < TARGET_MM / 2
    assert np.linalg.norm(label_mm - landmark) < TARGET_MM / 2


def test_landmark_survives_the_default_config_with_percentile_scaling(make_volume_file):
    affine = AFFINES["oblique_lps"]
    landmark = grid_centre_mm(LANDMARK_SHAPE, affine) + np.array([-2.0, 1.5, -2.5])
    case = make_volume_file(shape=LANDMARK_SHAPE, affine=affine, landmark_mm=landmark, blob_sigma_mm=BLOB_SIGMA_MM)
    out = preprocess(read_volume(case.image_path, case.label_path), PreprocessConfig())
    lo, hi = out.meta["intensity_range"][0]
    threshold = (RAW_BLOB_THRESHOLD - lo) / (hi - lo) * 2.0 - 1.0  # the raw threshold in output units
    blob_mm = _weighted_centroid_mm(np.clip(out.data[0] - threshold, 0, None), out.affine)
    assert np.linalg.norm(blob_mm - landmark) < TARGET_MM / 2


# --------------------------------------------------------------------------- each spatial step, exactly


@pytest.mark.parametrize("name", AFFINES)
def test_reorient_to_ras_keeps_every_voxel_at_its_world_position(name):
    affine = AFFINES[name]
    shape = (5, 6, 7)
    index = np.arange(np.prod(shape)).reshape(shape)  # value = flat index in the original grid
    volume = _volume(index, affine, label=index.astype(np.int32), aux={"lesion": index.astype(np.int32)})
    out = reorient(volume, "RAS")
    _assert_ras(out.affine)
    original_world = world_grid_mm(shape, affine).reshape(-1, 3)
    new_world = world_grid_mm(out.shape_vox, out.affine)
    values = out.data[0].astype(int)
    np.testing.assert_allclose(new_world, original_world[values], atol=1e-9)
    np.testing.assert_array_equal(out.label, values)
    np.testing.assert_array_equal(out.aux["lesion"], values)
    np.testing.assert_allclose(sorted(out.spacing_mm), sorted(SPACING_MM))


def test_reorient_moves_channels_with_the_image():
    affine = AFFINES["oblique_lps"]
    base = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    out = reorient(_volume(np.stack([base, 2 * base]), affine), "RAS")
    np.testing.assert_allclose(out.data[1], 2 * out.data[0])
    assert not np.allclose(out.data[0], base)  # the LPS grid really was flipped


@pytest.mark.parametrize("name", AFFINES)
def test_resampling_reproduces_a_linear_world_intensity_field_exactly(name):
    """Linear interpolation is exact for a field linear in world mm, so any affine error shows up."""
    volume = reorient(_volume(np.zeros((30, 16, 8)), AFFINES[name]), "RAS")
    gradient = np.array([0.7, -1.3, 0.4])  # intensity per mm
    field = world_grid_mm(volume.shape_vox, volume.affine) @ gradient + 50.0
    out = resample_to_spacing(volume.with_(data=field[None].astype(np.float32)), (TARGET_MM,) * 3)

    np.testing.assert_allclose(out.spacing_mm, TARGET_MM, atol=1e-9)
    new_world = world_grid_mm(out.shape_vox, out.affine)
    # Compare only where the new voxel lies inside the old grid (outside, edge values are repeated).
    old_index = np.linalg.solve(volume.affine[:3, :3], (new_world - volume.affine[:3, 3]).reshape(-1, 3).T).T
    inside = np.all((old_index >= 0) & (old_index <= np.array(volume.shape_vox) - 1), axis=1)
    assert inside.sum() > 0.5 * inside.size
    expected = new_world.reshape(-1, 3) @ gradient + 50.0
    np.testing.assert_allclose(out.data[0].reshape(-1)[inside], expected[inside], atol=1e-3)


@pytest.mark.parametrize("name", AFFINES)
def test_resampling_keeps_direction_and_physical_extent(name):
    volume = reorient(_volume(np.zeros((30, 16, 8)), AFFINES[name]), "RAS")
    out = resample_to_spacing(volume, (TARGET_MM, 2.0, 1.0))
    old_dir = volume.affine[:3, :3] / volume.spacing_mm
    new_dir = out.affine[:3, :3] / out.spacing_mm
    np.testing.assert_allclose(new_dir, old_dir, atol=1e-12)
    extent_old = np.array(volume.shape_vox) * volume.spacing_mm
    extent_new = np.array(out.shape_vox) * out.spacing_mm
    assert np.all(np.abs(extent_new - extent_old) <= out.spacing_mm / 2 + 1e-9)
    centre_before = grid_centre_mm(volume.shape_vox, volume.affine)
    np.testing.assert_allclose(grid_centre_mm(out.shape_vox, out.affine), centre_before)


def test_resampling_labels_keeps_ids_and_dtype():
    label = np.random.default_rng(1).choice(np.array([0, 3, 7], dtype=np.int16), size=(30, 16, 8))
    lesion = (label == 7).astype(np.int16)
    volume = _volume(np.zeros((30, 16, 8)), AFFINES["oblique"], label=label, aux={"lesion": lesion})
    out = resample_to_spacing(volume, (TARGET_MM,) * 3)
    assert out.label.dtype == np.int16 and out.label.shape == out.shape_vox
    assert set(np.unique(out.label)) <= {0, 3, 7}
    assert set(np.unique(out.aux["lesion"])) <= {0, 1}


def _ellipsoid_labels(shape, affine, n: int, seed: int) -> np.ndarray:
    """Label map with ``n`` non-overlapping-ish ellipsoids (ids 1..n) of 6-12 mm radii, in world mm."""
    rng = np.random.default_rng(seed)
    world = world_grid_mm(shape, affine)
    label = np.zeros(shape, dtype=np.int16)
    lo, hi = world.reshape(-1, 3).min(0) + 14.0, world.reshape(-1, 3).max(0) - 14.0
    for k in range(1, n + 1):
        centre, radii = rng.uniform(lo, hi), rng.uniform(6.0, 12.0, 3)
        label[np.sum(((world - centre) / radii) ** 2, axis=-1) <= 1.0] = k
    return label


def _centroids_mm(label: np.ndarray, affine: np.ndarray, ids) -> np.ndarray:
    return np.stack([vox_to_world(affine, np.argwhere(label == k).mean(axis=0))[0] for k in ids])


def test_label_resampling_does_not_shift_structures_where_nearest_neighbour_ties_would():
    # 1.0 x 0.8 x 1.5 mm, oblique; to 3 mm the new voxel centres fall exactly halfway between old
    # ones along x (61 = 3 * 20 + 1 voxels) and z (an even count at a factor of 2): every nearest-
    # neighbour pick is a tie there, and rounding all ties one way shifts every structure.
    shape, affine = (61, 50, 40), oblique_affine((1.0, 0.8, 1.5), (20.0, 10.0, 5.0), (-30.0, -20.0, -30.0))
    label = _ellipsoid_labels(shape, affine, n=12, seed=4)
    ids = [k for k in range(1, 13) if (label == k).sum() > 200]
    out = resample_to_spacing(_volume(np.zeros(shape), affine, label=label), (3.0, 3.0, 3.0))

    truth = _centroids_mm(label, affine, ids)
    shift_mm = _centroids_mm(out.label, out.affine, ids) - truth  # (n, 3)
    # the same grid with plain nearest neighbour (scipy order 0): the bias this test is about
    scale = np.array([3.0, 3.75, 2.0])
    offset = (np.array(shape) - 1) / 2 - scale * (np.array(out.shape_vox) - 1) / 2
    assert np.allclose(offset % 1, [0.5, 0.0, 0.5])  # ties along x and z
    nearest = ndimage.affine_transform(label, scale, offset=offset, output_shape=out.shape_vox, order=0, mode="nearest")
    nearest_shift_mm = _centroids_mm(nearest, out.affine, ids) - truth
    assert np.linalg.norm(nearest_shift_mm.mean(axis=0)) > 0.6  # half an old voxel along x and z

    assert np.linalg.norm(shift_mm.mean(axis=0)) < 0.25  # no systematic shift
    assert np.abs(shift_mm).max() < 1.5  # each structure within half a new voxel
    volume_ratio = np.array([(out.label == k).sum() * 27.0 / ((label == k).sum() * 1.2) for k in ids])
    assert abs(volume_ratio.mean() - 1.0) < 0.05 and np.allclose(volume_ratio, 1.0, atol=0.2)  # no growth/shrinkage


def test_label_resampling_upsamples_to_the_linear_interpolation_argmax():
    # 3 mm -> 1 mm: each new voxel takes the label with the largest trilinear weight among its 8 old neighbours
    label = np.zeros((4, 4, 4), np.int16)
    label[2:, :, :] = 5
    affine = oblique_affine((3.0, 3.0, 3.0), (15.0, 0.0, 30.0))
    out = resample_to_spacing(_volume(np.zeros((4, 4, 4)), affine, label=label), (1.0, 1.0, 1.0))
    x_old = vox_to_world(np.linalg.inv(affine) @ out.affine, np.argwhere(np.ones(out.shape_vox)))[:, 0]
    expected = np.where(x_old > 1.5 + 1e-9, 5, np.where(x_old < 1.5 - 1e-9, 0, -1)).reshape(out.shape_vox)
    decided = expected >= 0
    np.testing.assert_array_equal(out.label[decided], expected[decided])
    assert set(np.unique(out.label[~decided])) <= {0, 5}


def test_no_resampling_when_spacing_already_matches():
    affine = oblique_affine((3.0, 3.0, 3.0005), (25.0, 20.0, 0.0))
    volume = _volume(np.random.default_rng(2).normal(size=(6, 7, 8)), affine)
    assert resample_to_spacing(volume, (3.0, 3.0, 3.0)) is volume
    out = preprocess(volume, PreprocessConfig(intensity="none", crop_foreground=False))
    np.testing.assert_array_equal(out.data, volume.data)
    np.testing.assert_array_equal(out.affine, affine)


@pytest.mark.parametrize("name", AFFINES)
def test_crop_moves_the_origin_by_the_crop_offset(name):
    affine = AFFINES[name]
    data = np.random.default_rng(3).normal(size=(12, 10, 8)).astype(np.float32)
    label = (data > 0).astype(np.int16)
    box = (3, 1, 2, 9, 7, 5)
    out = crop_to_box(_volume(data, affine, label=label, aux={"a": label}), box)
    np.testing.assert_array_equal(out.data[0], data[3:9, 1:7, 2:5])
    np.testing.assert_array_equal(out.label, label[3:9, 1:7, 2:5])
    np.testing.assert_array_equal(out.aux["a"], label[3:9, 1:7, 2:5])
    expected_mm = world_grid_mm(data.shape, affine)[3:9, 1:7, 2:5]
    np.testing.assert_allclose(world_grid_mm(out.shape_vox, out.affine), expected_mm)


# --------------------------------------------------------------------------- foreground


def test_foreground_box_is_the_bounding_box_of_the_mask_plus_a_clipped_margin():
    mask = np.zeros((12, 10, 8), bool)
    mask[5:9, 3:6, 2:4] = True
    np.testing.assert_array_equal(foreground_box(mask, 2), [3, 1, 0, 11, 8, 6])
    np.testing.assert_array_equal(foreground_box(mask, 0), [5, 3, 2, 9, 6, 4])
    assert foreground_box(np.zeros_like(mask), 0) is None


def test_foreground_threshold_is_in_raw_units_even_with_intensity_scaling():
    data = np.full((12, 10, 8), -1000.0, np.float32)  # air
    data[2:10, 2:8, 1:7] = -800.0  # below the threshold: also dropped
    data[4:7, 3:6, 2:5] = 40.0  # tissue
    config = PreprocessConfig(target_spacing_mm=None, foreground_threshold=-500.0, crop_margin_vox=1)
    out = preprocess(_volume(data, AFFINES["oblique"]), config)
    assert out.meta["crop_box_vox"] == [3, 2, 1, 8, 7, 6]
    assert out.shape_vox == (5, 5, 5)


def test_default_preprocess_crops_the_padding_around_the_body(volume_file):
    volume = read_volume(volume_file.image_path, volume_file.label_path)
    spacing = (1.5, 1.5, 1.5)
    uncropped = preprocess(volume, PreprocessConfig(target_spacing_mm=spacing, crop_foreground=False, intensity="none"))
    out = preprocess(volume, PreprocessConfig(target_spacing_mm=spacing, crop_margin_vox=1, intensity="none"))
    assert np.all(np.array(out.shape_vox) <= uncropped.shape_vox) and out.shape_vox != uncropped.shape_vox
    x0, y0, z0, x1, y1, z1 = out.meta["crop_box_vox"]
    np.testing.assert_array_equal(out.label, uncropped.label[x0:x1, y0:y1, z0:z1])
    np.testing.assert_allclose(out.data, uncropped.data[:, x0:x1, y0:y1, z0:z1])
    np.testing.assert_array_equal(out.aux["body"], uncropped.aux["body"][x0:x1, y0:y1, z0:z1])
    body_box = np.argwhere(uncropped.aux["body"])
    np.testing.assert_array_equal([x0, y0, z0], np.maximum(body_box.min(0) - 1, 0))  # the crop is the body's box


def test_percentiles_are_taken_after_the_crop_as_isimed_does():
    rng = np.random.default_rng(7)
    data = np.full((1, 30, 28, 26), -1000.0, np.float32)
    data[0, 6:24, 5:22, 4:20] = rng.normal(40.0, 60.0, size=(18, 17, 16))  # the body, HU
    out = preprocess(_volume(data[0], np.eye(4)), PreprocessConfig(target_spacing_mm=None, crop_margin_vox=0))
    x0, y0, z0, x1, y1, z1 = out.meta["crop_box_vox"]
    cropped = data[:, x0:x1, y0:y1, z0:z1]
    reference = ScaleIntensityRangePercentiles(lower=5, upper=95, b_min=-1.0, b_max=1.0, clip=False)(cropped)
    np.testing.assert_allclose(out.data, np.asarray(reference), rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- intensity


def test_percentile_scaling_matches_monai_scale_intensity_range_percentiles_without_clipping():
    data = np.random.default_rng(4).gamma(2.0, 50.0, size=(1, 9, 8, 7)).astype(np.float32)
    config = PreprocessConfig(target_spacing_mm=None, crop_foreground=False)
    out = preprocess(_volume(data, np.eye(4)), config)
    reference = ScaleIntensityRangePercentiles(lower=5, upper=95, b_min=-1.0, b_max=1.0, clip=False)(data)
    np.testing.assert_allclose(out.data, np.asarray(reference), rtol=1e-5, atol=1e-5)
    assert out.data.min() < -1.0 and out.data.max() > 1.0  # not clipped
    p5, p95 = np.percentile(data, [5, 95])
    assert np.mean(out.data <= -1.0) == pytest.approx(np.mean(data <= p5))
    assert out.meta["intensity_range"] == [[pytest.approx(p5), pytest.approx(p95)]]


def test_percentile_scaling_is_per_channel():
    rng = np.random.default_rng(5)
    data = np.stack([rng.normal(0, 1, (9, 8, 7)), rng.normal(500, 100, (9, 8, 7))]).astype(np.float32)
    out = preprocess(_volume(data, np.eye(4)), PreprocessConfig(target_spacing_mm=None, crop_foreground=False))
    for c in range(2):
        lo, hi = np.percentile(data[c], [5, 95])
        np.testing.assert_allclose(out.data[c], (data[c] - lo) / (hi - lo) * 2 - 1, rtol=1e-5, atol=1e-5)


def test_ct_window_clips_and_maps_the_window_to_minus_one_one():
    values = np.array([-1000.0, -200.0, 50.0, 300.0, 3000.0], np.float32)
    data = np.broadcast_to(values[:, None, None], (5, 2, 2)).copy()
    config = PreprocessConfig(target_spacing_mm=None, intensity="ct_window", crop_foreground=False)
    out = preprocess(_volume(data, np.eye(4)), config)
    np.testing.assert_allclose(out.data[0, :, 0, 0], [-1.0, -1.0, 0.0, 1.0, 1.0], atol=1e-6)


# --------------------------------------------------------------------------- config, provenance, no side effects


def test_config_digest_is_stable_and_changes_with_any_field_or_the_version(monkeypatch):
    base = PreprocessConfig()
    assert base.digest() == PreprocessConfig(target_spacing_mm=[3, 3, 3], percentiles=[5, 95]).digest()
    assert len(base.digest()) == 64
    for change in [
        dict(target_spacing_mm=(2.0, 2.0, 2.0)),
        dict(target_spacing_mm=None),
        dict(intensity="ct_window"),
        dict(percentiles=(1.0, 99.0)),
        dict(crop_margin_vox=3),
        dict(foreground_threshold=-500.0),
        dict(min_shape_vox=(32, 32, 32)),
    ]:
        assert PreprocessConfig(**change).digest() != base.digest(), change
    digest_v1 = base.digest()
    monkeypatch.setattr(preprocess_module, "PREPROCESS_VERSION", "999")
    assert PreprocessConfig().digest() != digest_v1


@pytest.mark.parametrize(
    "bad",
    [
        dict(intensity="zscore"),
        dict(target_spacing_mm=(3.0, -1.0, 3.0)),
        dict(target_spacing_mm=(3.0, 3.0)),
        dict(percentiles=(95.0, 5.0)),
        dict(percentiles=(5.0, 101.0)),
        dict(orientation="RRS"),
        dict(crop_margin_vox=-1),
        dict(min_shape_vox=(0, 4, 4)),
    ],
)
def test_invalid_config_values_are_rejected(bad):
    with pytest.raises(ValueError):
        PreprocessConfig(**bad)


def test_meta_records_the_original_geometry_crop_box_and_digest(volume_file):
    volume = read_volume(volume_file.image_path, volume_file.label_path)
    config = PreprocessConfig()
    out = preprocess(volume, config)
    assert out.meta["original_shape_vox"] == list(volume.shape_vox)
    np.testing.assert_allclose(out.meta["original_spacing_mm"], SPACING_MM, atol=1e-5)
    np.testing.assert_allclose(out.meta["original_affine"], volume.affine)
    assert len(out.meta["crop_box_vox"]) == 6
    assert out.meta["preprocess_digest"] == config.digest()
    assert out.meta["preprocess_config"] == asdict(config)
    assert out.meta["format"] == "nifti"  # reader's meta is kept
    assert out.data.dtype == np.float32 and out.data.flags["C_CONTIGUOUS"]


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_raw_files_and_the_input_volume_are_never_modified(make_volume_file):
    case = make_volume_file(affine=AFFINES["oblique_lps"])
    lesion = make_volume_file(affine=AFFINES["oblique_lps"], name="lesion", label=False).image_path
    paths = [case.image_path, case.label_path, lesion]
    before = {p: _sha256(p) for p in paths}
    mtimes = {p: p.stat().st_mtime_ns for p in paths}
    volume = read_volume(case.image_path, case.label_path, aux_paths={"lesion": case.label_path})
    snapshot = (volume.data.copy(), volume.affine.copy(), volume.label.copy(), dict(volume.meta))
    out = preprocess(volume, PreprocessConfig())
    preprocess(volume, PreprocessConfig(intensity="ct_window", target_spacing_mm=(1.0, 1.0, 1.0)))
    assert {p: _sha256(p) for p in paths} == before
    assert {p: p.stat().st_mtime_ns for p in paths} == mtimes
    np.testing.assert_array_equal(volume.data, snapshot[0])
    np.testing.assert_array_equal(volume.affine, snapshot[1])
    np.testing.assert_array_equal(volume.label, snapshot[2])
    assert volume.meta == snapshot[3]
    assert not np.shares_memory(out.data, volume.data)


# --------------------------------------------------------------------------- body mask


def _ct_phantom(shape=(40, 36, 30)):
    """Air, a body ellipse column with air-filled 'lungs' inside, and a separate thin table below it."""
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    hu = np.full(shape, -1000.0, np.float32)
    body = ((x - 20) / 14.0) ** 2 + ((y - 17) / 11.0) ** 2 <= 1.0
    hu[body] = 30.0
    lungs = (((x - 14) / 4.0) ** 2 + ((y - 17) / 4.0) ** 2 <= 1.0) | (((x - 26) / 4.0) ** 2 + ((y - 17) / 4.0) ** 2 <= 1.0)
    hu[lungs & (z > 12)] = -850.0  # open at the top slice: only slice-wise filling closes it
    hu[4:36, 31:33, :] = 200.0  # the table, 2 voxels thick, not touching the body
    return hu, body


def test_ct_body_mask_keeps_the_body_fills_the_lungs_and_drops_the_table():
    from medssl.data.body import body_mask_from_intensity, detect_modality

    hu, body = _ct_phantom()
    assert detect_modality(hu) == "ct"
    mask = body_mask_from_intensity(hu[None], "auto")
    assert not mask[4:36, 31:33, :].any()  # the table is gone
    inner = ndimage_erode(body, 2)
    assert mask[inner].all()  # lungs included
    assert np.mean(mask == body) > 0.98


def ndimage_erode(mask, n):
    from scipy import ndimage

    return ndimage.binary_erosion(mask, iterations=n)


def test_mr_body_mask_uses_otsu_and_ignores_the_label_map():
    from medssl.data.body import body_mask_from_intensity, detect_modality, otsu_threshold

    rng = np.random.default_rng(1)
    img = np.abs(rng.normal(0.0, 5.0, size=(30, 30, 20))).astype(np.float32)  # Rician-like background
    img[5:25, 6:24, 3:17] = rng.normal(300.0, 40.0, size=(20, 18, 14))
    assert detect_modality(img) == "other"
    t = otsu_threshold(img)
    assert 20.0 < t < 250.0
    mask = body_mask_from_intensity(img[None], "mr")
    assert mask[5:25, 6:24, 3:17].mean() > 0.99 and mask.mean() < (20 * 18 * 14) / img.size + 0.01


def test_preprocess_keeps_the_body_mask_as_an_aux_map_that_follows_the_crop():
    hu, body = _ct_phantom()
    lesion = np.zeros(hu.shape, np.uint8)
    lesion[20, 17, 5] = 1  # the label is a lesion: it must not define the foreground
    vol = Volume(data=hu[None], affine=AFFINES["oblique"], case_id="ct", label=lesion)
    out = preprocess(vol, PreprocessConfig(target_spacing_mm=None, crop_margin_vox=0))
    assert out.aux["body"].dtype == np.uint8 and out.aux["body"].shape == out.shape_vox
    assert out.aux["body"].sum() > 1000 * out.label.sum()
    assert 0.2 < out.meta["body_fraction"] < 0.8
