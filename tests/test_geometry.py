"""medssl.geometry: voxel <-> world maps, boxes, 3D IoU, plane axes, affine checks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medssl.geometry import (
    box_centres_mm,
    box_centres_vox,
    box_iou_3d,
    check_affine,
    crop_affine,
    plane_axes,
    spacing_from_affine,
    vox_to_world,
    world_to_vox,
)
from tests.helpers import oblique_affine

SPACING_MM = (0.8, 1.5, 3.5)
AFFINES = {
    "anisotropic": oblique_affine(SPACING_MM, (0, 0, 0), (10.0, -20.0, 30.0)),
    "oblique": oblique_affine(SPACING_MM, (25.0, 20.0, 0.0), (-12.0, 30.0, -40.0)),
    "oblique_lps": oblique_affine(SPACING_MM, (20.0, 0.0, 30.0), (31.0, -22.0, 15.0), flip_axes=(0, 1)),
    "oblique_left_handed": oblique_affine(SPACING_MM, (0.0, 28.0, 22.0), (1.0, 2.0, 3.0), flip_axes=(2,)),
}


@pytest.mark.parametrize("name", AFFINES)
def test_vox_to_world_equals_affine_times_homogeneous_index(name):
    affine = AFFINES[name]
    ijk = np.random.default_rng(0).uniform(-5, 40, size=(17, 3))
    expected = np.array([(affine @ np.append(p, 1.0))[:3] for p in ijk])
    np.testing.assert_allclose(vox_to_world(affine, ijk), expected, atol=1e-10)


@pytest.mark.parametrize("name", AFFINES)
def test_world_to_vox_inverts_vox_to_world(name):
    affine = AFFINES[name]
    ijk = np.random.default_rng(1).uniform(-5, 40, size=(23, 3))
    np.testing.assert_allclose(world_to_vox(affine, vox_to_world(affine, ijk)), ijk, atol=1e-9)


def test_voxel_steps_move_by_the_spacing_along_each_axis_in_mm():
    affine = AFFINES["oblique_lps"]
    origin = vox_to_world(affine, [3, 4, 5])[0]
    for axis, spacing in enumerate(SPACING_MM):
        step = np.zeros(3)
        step[axis] = 1
        moved = vox_to_world(affine, np.array([3, 4, 5]) + step)[0]
        assert np.linalg.norm(moved - origin) == pytest.approx(spacing)


def test_single_point_gives_one_row_and_bad_shapes_raise():
    assert vox_to_world(np.eye(4), [1, 2, 3]).shape == (1, 3)
    assert world_to_vox(np.eye(4), [1, 2, 3]).shape == (1, 3)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        vox_to_world(np.eye(4), np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        vox_to_world(np.eye(3), [1, 2, 3])


@pytest.mark.parametrize("name", AFFINES)
def test_spacing_from_affine_recovers_anisotropic_spacing_of_rotated_and_flipped_grids(name):
    np.testing.assert_allclose(spacing_from_affine(AFFINES[name]), SPACING_MM, atol=1e-12)


def test_crop_affine_maps_cropped_index_to_world_of_original_index():
    affine = AFFINES["oblique_lps"]
    start = np.array([4, 7, 2])
    cropped = crop_affine(affine, start)
    ijk = np.random.default_rng(2).integers(0, 10, size=(9, 3))
    np.testing.assert_allclose(vox_to_world(cropped, ijk), vox_to_world(affine, ijk + start), atol=1e-10)
    np.testing.assert_allclose(cropped[:3, :3], affine[:3, :3])


@pytest.mark.parametrize(
    "box, centre",
    [
        ([0, 0, 0, 4, 4, 4], [1.5, 1.5, 1.5]),
        ([2, 3, 4, 3, 4, 5], [2.0, 3.0, 4.0]),  # a single voxel: its own index
        ([0, 10, 5, 5, 13, 6], [2.0, 11.0, 5.0]),
    ],
)
def test_box_centres_vox_is_mean_of_first_and_last_voxel_index(box, centre):
    np.testing.assert_allclose(box_centres_vox(np.array([box])), [centre])


def test_box_centres_mm_is_mean_world_position_of_the_boxes_voxels():
    affine = AFFINES["oblique_lps"]
    boxes = np.array([[1, 2, 3, 5, 8, 6], [0, 0, 0, 2, 3, 4]])
    expected = []
    for b in boxes:
        voxels = np.array(list(itertools.product(*[range(b[a], b[a + 3]) for a in range(3)])))
        expected.append(vox_to_world(affine, voxels).mean(axis=0))
    np.testing.assert_allclose(box_centres_mm(affine, boxes), expected, atol=1e-9)


@pytest.mark.parametrize(
    "a, b, iou",
    [
        ([0, 0, 0, 4, 4, 4], [0, 0, 0, 4, 4, 4], 1.0),
        ([0, 0, 0, 4, 4, 4], [2, 0, 0, 6, 4, 4], 32 / 96),
        ([0, 0, 0, 4, 4, 4], [4, 0, 0, 8, 4, 4], 0.0),  # half-open: touching boxes share no voxel
        ([0, 0, 0, 4, 4, 4], [10, 10, 10, 12, 12, 12], 0.0),
        ([0, 0, 0, 4, 4, 4], [1, 1, 1, 3, 3, 3], 8 / 64),  # nested
        ([0, 0, 0, 0, 4, 4], [0, 0, 0, 0, 4, 4], 0.0),  # empty boxes
    ],
)
def test_box_iou_3d_table(a, b, iou):
    assert box_iou_3d(np.array([a]), np.array([b]))[0] == pytest.approx(iou)


def _voxel_set(box):
    return set(itertools.product(*[range(box[a], box[a + 3]) for a in range(3)]))


def test_box_iou_3d_equals_iou_of_voxel_sets_on_random_boxes():
    rng = np.random.default_rng(3)
    lo = rng.integers(0, 6, size=(40, 2, 3))
    size = rng.integers(1, 6, size=(40, 2, 3))
    a = np.concatenate([lo[:, 0], lo[:, 0] + size[:, 0]], axis=1)
    b = np.concatenate([lo[:, 1], lo[:, 1] + size[:, 1]], axis=1)
    expected = [len(_voxel_set(x) & _voxel_set(y)) / len(_voxel_set(x) | _voxel_set(y)) for x, y in zip(a, b)]
    np.testing.assert_allclose(box_iou_3d(a, b), expected)
    np.testing.assert_allclose(box_iou_3d(a, b), box_iou_3d(b, a))


def test_box_iou_3d_broadcasts_to_a_pairwise_matrix():
    a = np.array([[0, 0, 0, 4, 4, 4], [2, 0, 0, 6, 4, 4]])
    b = np.array([[0, 0, 0, 4, 4, 4], [4, 0, 0, 8, 4, 4], [2, 0, 0, 6, 4, 4]])
    iou = box_iou_3d(a[:, None], b[None])
    assert iou.shape == (2, 3)
    np.testing.assert_allclose(iou, [[1.0, 0.0, 1 / 3], [1 / 3, 1 / 3, 1.0]])


def test_box_with_end_before_start_raises():
    with pytest.raises(ValueError, match="half-open"):
        box_iou_3d(np.array([[4, 0, 0, 2, 4, 4]]), np.array([[0, 0, 0, 4, 4, 4]]))


@pytest.mark.parametrize("normal, expected", [(0, ((1, 2), 0)), (1, ((0, 2), 1)), (2, ((0, 1), 2))])
def test_plane_axes_returns_the_other_two_axes_in_order(normal, expected):
    assert plane_axes(normal) == expected


@pytest.mark.parametrize("normal", [0, 1, 2])
def test_shift_along_a_plane_axis_lands_on_that_axis_of_the_extracted_slice(normal):
    (ax_a, ax_b), n = plane_axes(normal)
    vol = np.zeros((7, 8, 9))
    point = np.array([2, 3, 4])
    for shift_axis, slice_axis in ((ax_a, 0), (ax_b, 1)):
        moved = point.copy()
        moved[shift_axis] += 2
        vol[...] = 0
        vol[tuple(moved)] = 1
        plane = np.take(vol, point[n], axis=n)  # the 2D slice through the point, normal to n
        found = np.argwhere(plane == 1)[0]
        expected = np.array([point[ax_a], point[ax_b]])
        expected[slice_axis] += 2
        np.testing.assert_array_equal(found, expected)


@pytest.mark.parametrize("bad", [3, -1, 1.5, True, None])
def test_plane_axes_rejects_non_axes(bad):
    with pytest.raises((ValueError, TypeError)):
        plane_axes(bad)


@pytest.mark.parametrize("name", AFFINES)
def test_check_affine_accepts_oblique_flipped_anisotropic_affines(name):
    check_affine(AFFINES[name])


def _broken(kind):
    a = AFFINES["oblique"].copy()
    if kind == "nan":
        a[1, 1] = np.nan
    elif kind == "inf":
        a[0, 3] = np.inf
    elif kind == "zero_spacing":
        a[:3, 2] = 0.0
    elif kind == "singular":
        a[:3, 1] = 2.0 * a[:3, 0]
    elif kind == "last_row":
        a[3] = [0, 0, 1, 1]
    return a


@pytest.mark.parametrize(
    "kind, message",
    [
        ("nan", "non-finite"),
        ("inf", "non-finite"),
        ("zero_spacing", "zero voxel spacing along array axis \\[2\\]"),
        ("singular", "singular"),
        ("last_row", "last row"),
    ],
)
def test_check_affine_rejects_broken_geometry_with_the_reason(kind, message):
    with pytest.raises(ValueError, match=message):
        check_affine(_broken(kind))
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        check_affine(np.eye(3))


def test_as_size_is_the_one_patch_size_normaliser_and_names_the_setting():
    from medssl.geometry import as_size

    assert as_size(16) == (16, 16, 16) and as_size([8, 12, 4]) == (8, 12, 4) and as_size(np.int64(5)) == (5, 5, 5)
    assert as_size(6, "crop_size_vox", dims=2) == (6, 6)
    for bad in (0, (8, 8), (8, 8, 0), (4, 4, 4, 4)):
        with pytest.raises(ValueError, match=r"crop_size_vox must be a positive int or 3 positive ints"):
            as_size(bad, "crop_size_vox")
