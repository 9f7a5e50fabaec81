"""Context-prediction samplers: the orientation axes, the curriculum, Doersch labels, reach over a cohort.

Geometry is checked on oblique, anisotropic grids through patch *content*: the volumes' channels hold
each voxel's world coordinate in mm, so a patch's pixels say exactly where they were cut.
"""

from __future__ import annotations

import numpy as np
import pytest

from medssl.data.errors import TooSmallError
from medssl.data.volume import Volume
from medssl.geometry import plane_axes, vox_to_world
from medssl.sampling.context import (
    ContextPairSampler,
    NeighbourPairSampler,
    PointInputSampler,
    curriculum_range,
    neighbour_direction,
    planar_patches,
    point_values,
    triplanar_patches,
)
from tests.helpers import coordinate_volume, oblique_affine

SPACING = (0.8, 1.5, 3.5)
AFFINE = oblique_affine(SPACING, (25.0, 10.0, -15.0), (10.0, -5.0, 3.0))
S, NS = 12, 3  # small planar patches: 12 x 12 in-plane, 3 slices


def _unit_axes(affine: np.ndarray) -> np.ndarray:
    """``(3, 3)``: column k is the world unit vector of array axis k."""
    return affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)


def _xyz_at(patch: np.ndarray, k: int, i: int, j: int) -> np.ndarray:
    """World mm stored in a planar patch of a coordinate volume (channels x, y, z; layout c * NS + slice)."""
    return np.array([patch[c * NS + k, i, j] for c in range(3)])


@pytest.fixture(scope="module")
def coords() -> Volume:
    return coordinate_volume("coords", (40, 36, 30), AFFINE)


# ---------------------------------------------------------------------------- cutting


def test_planar_patches_equal_a_padded_plain_loop_with_the_documented_layout():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 15, 13, 11)).astype(np.float32)
    centres = np.array([[7, 6, 5], [0, 0, 0], [14, 12, 10], [3, 11, 1]])  # the last three reach outside
    fill = data.reshape(2, -1).min(1)
    padded = np.stack([np.pad(data[c], S, constant_values=fill[c]) for c in range(2)])  # index + S = padded index
    for normal in range(3):
        (a, b), n = plane_axes(normal)
        out = planar_patches(data, centres, normal, S, NS)
        assert out.shape == (len(centres), 2 * NS, S, S) and out.dtype == np.float32
        expected = np.empty_like(out)
        for row, c in enumerate(centres):
            for ch in range(2):
                for k in range(NS):
                    for i in range(S):
                        for j in range(S):
                            idx = np.array(c) + S
                            idx[n] += k - NS // 2
                            idx[a] += i - S // 2
                            idx[b] += j - S // 2
                            expected[row, ch * NS + k, i, j] = padded[ch][tuple(idx)]
        np.testing.assert_array_equal(out, expected)


def test_triplanar_patches_stack_the_three_orientations_and_point_values_read_single_voxels(coords):
    centres = np.array([[20, 18, 15], [2, 30, 28]])
    tri = triplanar_patches(coords.data, centres, S, NS)
    assert tri.shape == (2, 3, 3 * NS, S, S)
    for o in range(3):
        np.testing.assert_array_equal(tri[:, o], planar_patches(coords.data, centres, o, S, NS))
    offsets = np.array([[0, 0, 0], [1, -2, 1], [0, 0, 5]])  # the last is outside for the second centre
    values = point_values(coords.data, centres, offsets)  # (N, C, K)
    for n in range(2):
        for k in range(2):
            np.testing.assert_allclose(values[n, :, k], vox_to_world(AFFINE, centres[n] + offsets[k])[0], rtol=1e-5)
    np.testing.assert_array_equal(values[1, :, 2], coords.data.reshape(3, -1).min(1))


# ---------------------------------------------------------------------------- the 2.5D pairs


@pytest.mark.parametrize("progress", [0.0, 1.0])
def test_a_partners_world_mm_shift_appears_as_the_intended_offsets_for_all_three_orientations(coords, progress):
    """The acceptance test of issue 10: world mm -> (Delta1, Delta2) on an oblique, anisotropic grid."""
    inner = np.zeros(coords.shape_vox, np.uint8)  # anchors far enough from the border that partners stay inside
    m = S // 2 + 6
    inner[m:-m, m:-m, m:-m] = 1
    vol = coords.with_(aux={"body": inner})
    sampler = ContextPairSampler(S, NS, volumes_per_batch=1, patches_per_volume=25, normal_gap_mm=(8.0, 20.0))
    batch = sampler([vol], np.random.default_rng(1), progress=progress)
    anchors, partners = batch.patches.numpy(), batch.extras["partners"].numpy()
    offsets, hw_mm = batch.extras["offsets"].numpy(), batch.extras["half_width_mm"].numpy()
    normal_mm = batch.extras["normal_shift_mm"].numpy()
    u = _unit_axes(AFFINE)
    c = S // 2  # the centre pixel (centre-voxel rule)
    for o in range(3):
        (a, b), n = plane_axes(o)
        np.testing.assert_allclose(hw_mm[:, o], np.broadcast_to(S / 2 * np.asarray(SPACING)[[a, b]], (25, 2)), rtol=1e-6)
        for row in range(len(batch)):
            anchor_mm = _xyz_at(anchors[row, o], NS // 2, c, c)
            partner_mm = _xyz_at(partners[row, o], NS // 2, c, c)
            shift = partner_mm - anchor_mm  # what the pixels say, in world mm
            assert shift @ u[:, a] == pytest.approx(offsets[row, o, 0] * hw_mm[row, o, 0], abs=1e-3)
            assert shift @ u[:, b] == pytest.approx(offsets[row, o, 1] * hw_mm[row, o, 1], abs=1e-3)
            assert shift @ u[:, n] == pytest.approx(normal_mm[row, o], abs=1e-3)
            # and the geometry that travels with the batch agrees with the pixels
            geometric = batch.extras["partner_centres_mm"][row, o].numpy() - batch.centres_mm[row].numpy()
            np.testing.assert_allclose(geometric, shift, atol=1e-3)
            # tensor axis -2 runs along the first in-plane axis, -1 along the second, channels along the normal
            p = partners[row, o]
            np.testing.assert_allclose(_xyz_at(p, 1, c + 1, c) - _xyz_at(p, 1, c, c), AFFINE[:3, a], atol=1e-3)
            np.testing.assert_allclose(_xyz_at(p, 1, c, c + 1) - _xyz_at(p, 1, c, c), AFFINE[:3, b], atol=1e-3)
            np.testing.assert_allclose(_xyz_at(p, 2, c, c) - _xyz_at(p, 1, c, c), AFFINE[:3, n], atol=1e-3)


def test_partner_slabs_never_overlap_the_anchors_and_stay_inside_along_the_normal():
    vol = coordinate_volume("thin", (20, 18, 10), AFFINE)  # 10 voxels of 3.5 mm along z: little room
    sampler = ContextPairSampler(S, NS, volumes_per_batch=1, patches_per_volume=200, normal_gap_mm=(20.0, 40.0))
    batch = sampler([vol], np.random.default_rng(2))
    centres = (batch.boxes_vox[:, :3] + S // 2).numpy()
    shift_vox = batch.extras["normal_shift_mm"].numpy() / np.asarray(SPACING)
    for o in range(3):
        moved = np.rint(shift_vox[:, o]).astype(int)
        assert np.all(np.abs(moved) >= NS)  # slabs of NS slices are disjoint
        partner_n = centres[:, o] + moved
        assert np.all(partner_n - NS // 2 >= 0) and np.all(partner_n + NS // 2 < vol.shape_vox[o])
    assert (shift_vox[:, 2] > 0).any() and (shift_vox[:, 2] < 0).any()  # both directions occur


def test_a_volume_too_thin_for_two_disjoint_slabs_is_refused_by_name():
    vol = Volume(np.zeros((1, 30, 30, 8), np.float32), np.eye(4), "flat", source="flat.nii.gz")
    with pytest.raises(TooSmallError, match="flat.nii.gz"):
        ContextPairSampler(S, NS)([vol], np.random.default_rng(0))


def test_the_curriculum_widens_from_the_papers_start_range_to_its_end_range():
    assert curriculum_range(0.0) == pytest.approx((0.25, 0.3))
    assert curriculum_range(0.5) == pytest.approx((0.125, 0.5))
    assert curriculum_range(1.0) == pytest.approx((0.0, 0.7))
    assert curriculum_range(7.0) == curriculum_range(1.0) and curriculum_range(-1.0) == curriculum_range(0.0)


@pytest.mark.parametrize(("progress", "lo", "hi"), [(0.0, 0.25, 0.3), (0.5, 0.125, 0.5), (1.0, 0.0, 0.7)])
def test_drawn_offsets_fill_the_curriculum_range_at_start_middle_and_end(coords, progress, lo, hi):
    size = 20  # half-width 10 voxels: offsets are multiples of 1/10
    sampler = ContextPairSampler(size, 1, volumes_per_batch=1, patches_per_volume=200, normal_gap_mm=(8.0, 20.0))
    mag = np.abs(sampler([coords], np.random.default_rng(3), progress=progress).extras["offsets"].numpy())
    rounding = 0.5 / (size / 2)
    assert mag.min() >= lo - rounding - 1e-6 and mag.max() <= hi + rounding + 1e-6
    assert mag.min() <= lo + 0.1 * (hi - lo) + rounding and mag.max() >= hi - 0.1 * (hi - lo) - rounding  # the range is used
    signs = np.sign(sampler([coords], np.random.default_rng(4), progress=1.0).extras["offsets"].numpy())
    assert (signs > 0).mean() == pytest.approx(0.5, abs=0.1) and (signs < 0).mean() == pytest.approx(0.5, abs=0.1)


def test_anchor_centres_lie_on_the_body():
    shape = (30, 28, 26)
    body = np.zeros(shape, np.uint8)
    body[10:20, 5:25, 8:12] = 1
    vol = Volume(np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32), AFFINE, "b", aux={"body": body})
    batch = ContextPairSampler(S, NS, volumes_per_batch=1, patches_per_volume=300)([vol], np.random.default_rng(5))
    centres = (batch.boxes_vox[:, :3] + S // 2).numpy()
    assert body[tuple(centres.T)].all()


def test_sampling_reaches_every_volume_of_a_40_volume_cohort_within_a_few_batches():
    """The authors' sampler only ever reached the first 8 of 63 volumes; here every batch draws from the whole pool."""
    vols = [coordinate_volume(f"s{k:02d}", (10, 10, 10), AFFINE) for k in range(40)]
    for sampler in (ContextPairSampler(4, 1, volumes_per_batch=8, patches_per_volume=1, normal_gap_mm=(2.0, 4.0)),
                    NeighbourPairSampler(6, volumes_per_batch=8, patches_per_volume=1, gap_mm=1.0, jitter_mm=1.0)):
        rng = np.random.default_rng(6)
        seen: list[str] = []
        batches = 0
        while len(set(seen)) < 40 and batches < 100:
            seen += sampler(vols, rng).case_ids
            batches += 1
        assert len(set(seen)) == 40 and batches <= 20, (type(sampler).__name__, batches)  # 5 at best; 15 and 18 here
    counts = {}
    rng = np.random.default_rng(7)
    sampler = ContextPairSampler(4, 1, volumes_per_batch=8, patches_per_volume=1, normal_gap_mm=(2.0, 4.0))
    for _ in range(120):
        for case in sampler(vols, rng).case_ids:
            counts[case] = counts.get(case, 0) + 1
    assert min(counts.values()) >= 10 and max(counts.values()) <= 38  # uniform: 120 * 8 / 40 = 24 each (sd 4.4)


def test_the_same_rng_state_gives_the_same_pairs(coords):
    sampler = ContextPairSampler(S, NS, volumes_per_batch=1, patches_per_volume=4, normal_gap_mm=(8.0, 20.0))
    a = sampler([coords], np.random.default_rng(9), progress=0.3)
    b = sampler([coords], np.random.default_rng(9), progress=0.3)
    assert all(np.array_equal(a.extras[k], b.extras[k]) for k in a.extras)
    assert np.array_equal(a.patches, b.patches)


# ---------------------------------------------------------------------------- 3D Doersch


def test_doersch_labels_match_the_direction_the_partner_moved_in_world_mm(coords):
    size = 6
    sampler = NeighbourPairSampler(size, volumes_per_batch=1, patches_per_volume=300, gap_mm=2.0, jitter_mm=2.0)
    batch = sampler([coords], np.random.default_rng(10))
    labels = batch.extras["labels"].numpy()
    # the partner's move read from its pixels (world mm of its centre voxel) ...
    c = size // 2
    anchor_mm = batch.patches.numpy()[:, :, c, c, c]
    partner_mm = batch.extras["partners"].numpy()[:, :, c, c, c]
    moved_vox = (partner_mm - anchor_mm) @ _unit_axes(AFFINE) / np.asarray(SPACING)  # along each array axis
    axis, sign = neighbour_direction(labels)
    rows = np.arange(len(labels))
    # ... is largest along the label's axis, in the label's direction, by at least a cube (no overlap)
    assert np.array_equal(np.abs(moved_vox).argmax(1), axis)
    assert np.array_equal(np.sign(moved_vox[rows, axis]), sign)
    assert np.all(np.abs(moved_vox[rows, axis]) >= size - 1e-3)
    np.testing.assert_allclose(batch.extras["partner_centres_mm"].numpy() - batch.centres_mm.numpy(),
                               partner_mm - anchor_mm, atol=1e-3)
    assert np.bincount(labels, minlength=6).min() > 300 / 6 * 0.6  # every class occurs, about equally


def test_doersch_anchors_keep_all_six_neighbours_inside_when_the_volume_allows_it(coords):
    size = 6
    sampler = NeighbourPairSampler(size, volumes_per_batch=1, patches_per_volume=200, gap_mm=2.0, jitter_mm=2.0)
    batch = sampler([coords], np.random.default_rng(11))
    partner_box = np.round(np.linalg.solve(AFFINE[:3, :3], (batch.extras["partner_centres_mm"].numpy() - AFFINE[:3, 3]).T).T
                           - (size - 1) / 2).astype(int)
    assert np.all(partner_box >= 0) and np.all(partner_box + size <= np.asarray(coords.shape_vox))


def test_point_input_sampler_cuts_the_methods_input_at_body_centres(coords):
    cut = lambda data, centres: point_values(data, centres, np.zeros((1, 3), int))  # noqa: E731
    batch = PointInputSampler(cut, (5, 5, 5), volumes_per_batch=1, patches_per_volume=6)([coords], np.random.default_rng(0))
    centres = batch.boxes_vox[:, :3].numpy() + 2
    np.testing.assert_allclose(batch.patches.numpy()[:, :, 0], vox_to_world(AFFINE, centres), rtol=1e-5)
    np.testing.assert_allclose(batch.centres_mm.numpy(), vox_to_world(AFFINE, centres), rtol=1e-5, atol=1e-3)
