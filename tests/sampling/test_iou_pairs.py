"""IoUPairSampler: the interval holds for every non-fallback pair, fallbacks are counted and bounded, geometry."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medssl.data.volume import Volume
from medssl.geometry import box_iou_3d, centre_voxel_of_box, vox_to_world, world_to_vox
from medssl.sampling.iou_pairs import (
    IOU_HIST_EDGES,
    IoUPairSampler,
    interval_offsets,
    iou_histogram_logs,
    max_pair_iou,
    pair_rows,
)
from tests.helpers import oblique_affine


def _volume(shape, seed=0, affine=None, case_id="v") -> Volume:
    data = np.random.default_rng(seed).normal(size=(1, *shape)).astype(np.float32)
    return Volume(data=data, affine=np.eye(4) if affine is None else affine, case_id=case_id)


def _voxel_iou_by_counting(box_a, box_b, shape) -> float:
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    a[box_a[0]:box_a[3], box_a[1]:box_a[4], box_a[2]:box_a[5]] = True
    b[box_b[0]:box_b[3], box_b[1]:box_b[4], box_b[2]:box_b[5]] = True
    return np.count_nonzero(a & b) / np.count_nonzero(a | b)


def _pairs(batch):
    i1, i2 = pair_rows(len(batch) // 2)
    return batch.boxes_vox[i1].numpy(), batch.boxes_vox[i2].numpy()


# ---------------------------------------------------------------------------- the interval


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    shape=st.tuples(*[st.integers(10, 40)] * 3),
    crop1=st.integers(3, 10),
    crop2=st.integers(3, 10),
    iou_min=st.sampled_from([0.0, 0.0001, 0.1, 0.3, 0.45, 0.6, 0.9]),
    width=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    draw=st.sampled_from(["analytic", "rejection"]),
    dims=st.sampled_from([3, 2]),
    seed=st.integers(0, 2**16),
)
def test_every_non_fallback_pair_has_its_iou_inside_the_interval(shape, crop1, crop2, iou_min, width, draw, dims, seed):
    iou_max = min(1.0, iou_min + width)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unequal sizes make some intervals impossible: they fall back
        sampler = IoUPairSampler(crop1, iou_min, iou_max, crop2_size_vox=crop2, volumes_per_batch=2, pairs_per_volume=12,
                                 crop2_draw=draw, spatial_dims=dims, output_size_vox=6)
    vols = [_volume(shape, seed=1), _volume(shape[::-1], seed=2, case_id="w")]
    batch = sampler(vols, np.random.default_rng(seed))
    iou, fallback = batch.extras["pair_iou"].numpy(), batch.extras["pair_fallback"].numpy()
    b1, b2 = _pairs(batch)
    np.testing.assert_array_equal(iou, box_iou_3d(b1, b2))  # the recorded IoU is the pair's, from its corners
    assert np.all((iou[~fallback] >= iou_min) & (iou[~fallback] <= iou_max))
    by_id = {v.case_id: v for v in vols}
    shapes = np.array([by_id[batch.case_ids[int(v)]].shape_vox for v in batch.volume_index[0::2]])
    for b, c in ((b1, crop1), (b2, crop2)):  # every box inside its volume, with its crop's size
        assert np.all(b[:, :3] >= 0) and np.all(b[:, 3:] <= shapes)
        assert np.all(b[:, 3:5] - b[:, :2] == c) and np.all(b[:, 5] - b[:, 2] == (c if dims == 3 else 1))


def test_the_property_test_accepts_many_pairs_inside_typical_intervals():
    # the property above must not hold vacuously: most pairs of feasible intervals are accepted
    for lo, hi in ((0.0, 0.0), (0.0001, 0.3), (0.3, 0.6), (0.6, 1.0)):
        s = IoUPairSampler(8, lo, hi, volumes_per_batch=1, pairs_per_volume=200)
        assert s([_volume((30, 28, 26))], np.random.default_rng(0)).extras["pair_fallback"].float().mean() < 0.01


def test_the_corner_formula_agrees_with_counting_overlapping_voxels():
    rng = np.random.default_rng(0)
    shape = (20, 17, 15)
    for _ in range(200):
        boxes = []
        for _ in range(2):
            lo = rng.integers(0, np.array(shape) - 1)
            hi = lo + rng.integers(1, np.array(shape) - lo + 1)
            boxes.append(np.concatenate([lo, hi]))
        assert box_iou_3d(boxes[0], boxes[1]) == pytest.approx(_voxel_iou_by_counting(*boxes, shape), abs=1e-12)


def test_interval_offset_table_holds_exactly_the_offsets_whose_corner_iou_is_in_the_interval():
    s1, s2 = (6, 5, 4), (4, 5, 3)
    table = {tuple(d) for d in interval_offsets(s1, s2, 0.2, 0.5)}
    box1 = np.array([0, 0, 0, *s1])
    for d in np.ndindex(20, 20, 20):
        d = np.array(d) - 10
        iou = float(box_iou_3d(box1, np.concatenate([d, d + s2])))
        assert (tuple(d) in table) == (0.2 <= iou <= 0.5)


def test_voxel_iou_equals_the_iou_of_the_boxes_in_world_mm_on_an_anisotropic_oblique_grid():
    # Monte Carlo in world mm: points uniform in a world box, mapped back to voxel coordinates.
    affine = oblique_affine((0.7, 1.9, 3.6), (25.0, -30.0, 40.0), (10.0, -20.0, 5.0))
    b1, b2 = np.array([2, 3, 1, 14, 9, 7]), np.array([6, 5, 3, 17, 15, 8])
    corners = np.array([[x, y, z] for x in (0, 20) for y in (0, 20) for z in (0, 10)], dtype=float) - 0.5
    world = vox_to_world(affine, corners)
    pts = np.random.default_rng(0).uniform(world.min(0), world.max(0), size=(400_000, 3))
    ijk = world_to_vox(affine, pts) + 0.5  # voxel v spans [v - 0.5, v + 0.5): shift so box [x0, x1) is [x0, x1)
    in1 = np.all((ijk >= b1[:3]) & (ijk < b1[3:]), axis=1)
    in2 = np.all((ijk >= b2[:3]) & (ijk < b2[3:]), axis=1)
    iou_mm = np.count_nonzero(in1 & in2) / np.count_nonzero(in1 | in2)
    assert float(box_iou_3d(b1, b2)) == pytest.approx(iou_mm, abs=0.01)


def test_interval_zero_zero_gives_disjoint_crops():
    sampler = IoUPairSampler(8, 0.0, 0.0, volumes_per_batch=1, pairs_per_volume=200)
    batch = sampler([_volume((30, 26, 24))], np.random.default_rng(1))
    b1, b2 = _pairs(batch)
    assert not batch.extras["pair_fallback"].any()
    overlap = np.minimum(b1[:, 3:], b2[:, 3:]) - np.maximum(b1[:, :3], b2[:, :3])
    assert np.all(np.any(overlap <= 0, axis=1))  # separated along at least one axis
    for a, b in list(zip(b1, b2))[:20]:
        assert _voxel_iou_by_counting(a, b, (30, 26, 24)) == 0.0


@pytest.mark.parametrize("draw", ["analytic", "rejection"])
def test_an_impossible_interval_falls_back_is_counted_and_terminates(draw):
    # crops of 8^3 and 16^3 reach IoU 512 / 4096 = 0.125 at most: [0.95, 1] cannot happen
    assert max_pair_iou((8, 8, 8), (16, 16, 16)) == pytest.approx(0.125)
    with pytest.warns(UserWarning, match="every pair will fall back"):
        sampler = IoUPairSampler(8, 0.95, 1.0, crop2_size_vox=16, volumes_per_batch=2, pairs_per_volume=25,
                                 crop2_draw=draw)
    vols = [_volume((30, 28, 26)), _volume((26, 30, 28), case_id="w")]
    batch = sampler(vols, np.random.default_rng(0))
    assert batch.extras["pair_fallback"].all() and len(batch) == 100
    iou = batch.extras["pair_iou"].numpy()
    assert np.all(iou <= 0.125 + 1e-12)
    from medssl.methods.simsiam import pair_logs

    assert pair_logs(batch)["fallback_rate"] == 1.0
    b1, b2 = _pairs(batch)
    shapes = np.array([{v.case_id: v for v in vols}[batch.case_ids[int(i)]].shape_vox for i in batch.volume_index[1::2]])
    assert np.all(b2[:, :3] >= 0) and np.all(b2[:, 3:] <= shapes)  # fallback pairs are still valid crops


def test_fallbacks_are_exactly_the_pairs_that_found_no_candidate_in_r2_rounds_of_r1():
    # [0.6, 1] in a large volume: each candidate succeeds with small probability p, so a pair falls
    # back with probability (1 - p)^(r1 r2); with r1 = r2 = 1 nearly all fall back, with the thesis's 30 x 4 fewer
    vol = _volume((40, 36, 32))
    rates = {}
    for r1, r2 in ((1, 1), (30, 4)):
        s = IoUPairSampler(16, 0.6, 1.0, volumes_per_batch=1, pairs_per_volume=400, crop2_draw="rejection",
                           max_crop2_draws=r1, max_crop1_draws=r2)
        rates[(r1, r2)] = float(s([vol], np.random.default_rng(0)).extras["pair_fallback"].float().mean())
    assert rates[(1, 1)] > 0.95
    assert rates[(30, 4)] < rates[(1, 1)] - 0.2


# ---------------------------------------------------------------------------- analytic vs rejection


def test_analytic_draw_gives_the_same_iou_distribution_as_rejection_with_far_fewer_fallbacks():
    from scipy.stats import ks_2samp

    vol = _volume((60, 56, 52))
    out = {}
    for draw in ("analytic", "rejection"):
        s = IoUPairSampler(16, 0.3, 0.6, volumes_per_batch=1, pairs_per_volume=3000, crop2_draw=draw)
        assert s.draws_analytically == (draw == "analytic")
        batch = s([vol], np.random.default_rng(5))
        ok = ~batch.extras["pair_fallback"].numpy()
        out[draw] = batch.extras["pair_iou"].numpy()[ok]
    assert ks_2samp(out["analytic"], out["rejection"]).pvalue > 1e-3
    assert abs(out["analytic"].mean() - out["rejection"].mean()) < 0.01
    # the high interval in 3D: rejection falls back on many pairs, the analytic draw on (almost) none
    fallback = {}
    for draw in ("analytic", "rejection"):
        s = IoUPairSampler(16, 0.6, 1.0, volumes_per_batch=1, pairs_per_volume=500, crop2_draw=draw)
        fallback[draw] = float(s([vol], np.random.default_rng(6)).extras["pair_fallback"].float().mean())
    assert fallback["analytic"] < 0.01 < 0.2 < fallback["rejection"]


# ---------------------------------------------------------------------------- options and geometry


def test_crop1_centre_lies_on_the_body_and_crop2_only_has_to_fit():
    shape = (40, 36, 30)
    vol = _volume(shape)
    body = np.zeros(shape, bool)
    body[25:35, 5:15, 10:20] = True
    vol.aux["body"] = body
    s = IoUPairSampler(8, 0.0, 0.0, volumes_per_batch=1, pairs_per_volume=100, crop1_on_body=True)
    b1, b2 = _pairs(s([vol], np.random.default_rng(0)))
    c1 = centre_voxel_of_box(b1[:, :3], 8)
    assert body[tuple(c1.T)].all()
    c2 = centre_voxel_of_box(b2[:, :3], 8)
    assert not body[tuple(c2.T)].all()  # [0, 0] pushes crop 2 away from crop 1: off the small body often


def test_unequal_crop_sizes_keep_their_boxes_and_are_resized_to_one_output_size():
    vol = _volume((40, 40, 40))
    s = IoUPairSampler(12, 0.1, 0.5, crop2_size_vox=20, output_size_vox=10, volumes_per_batch=1, pairs_per_volume=30)
    batch = s([vol], np.random.default_rng(2))
    b1, b2 = _pairs(batch)
    assert np.all(b1[:, 3:] - b1[:, :3] == 12) and np.all(b2[:, 3:] - b2[:, :3] == 20)
    assert batch.patches.shape == (60, 1, 10, 10, 10)
    # resized crop 1 is the trilinear resampling of its voxels
    x0, y0, z0, x1, y1, z1 = b1[0]
    crop = torch.from_numpy(vol.data[None, :, x0:x1, y0:y1, z0:z1])
    expected = torch.nn.functional.interpolate(crop, size=(10, 10, 10), mode="trilinear", align_corners=False)[0]
    torch.testing.assert_close(batch.patches[0], expected)


def test_equal_size_crops_are_the_exact_voxels_of_their_boxes_with_world_centres():
    affine = oblique_affine((0.8, 1.5, 3.5), (20.0, 10.0, -15.0), (3.0, 4.0, 5.0))
    vol = _volume((30, 28, 24), affine=affine)
    batch = IoUPairSampler(9, volumes_per_batch=1, pairs_per_volume=10)([vol], np.random.default_rng(0))
    for k, (x0, y0, z0, x1, y1, z1) in enumerate(batch.boxes_vox.numpy()):
        np.testing.assert_array_equal(batch.patches[k].numpy(), vol.data[:, x0:x1, y0:y1, z0:z1])
        centre = vox_to_world(affine, (np.array([x0, y0, z0]) + np.array([x1, y1, z1]) - 1) / 2)[0]
        np.testing.assert_allclose(batch.centres_mm[k].numpy(), centre, atol=1e-3)


def test_2d_pairs_lie_on_one_axial_slice_and_give_2d_patches():
    vol = _volume((40, 36, 12))
    s = IoUPairSampler(16, 0.3, 0.6, spatial_dims=2, volumes_per_batch=1, pairs_per_volume=50)
    batch = s([vol], np.random.default_rng(3))
    b1, b2 = _pairs(batch)
    assert batch.patches.shape == (100, 1, 16, 16)
    assert np.all(b1[:, 5] - b1[:, 2] == 1) and np.all(b1[:, 2] == b2[:, 2])  # one slice, the same one
    x0, y0, z0 = b1[0, :3]
    np.testing.assert_array_equal(batch.patches[0].numpy(), vol.data[:, x0:x0 + 16, y0:y0 + 16, z0])
    iou = batch.extras["pair_iou"].numpy()
    assert np.all((iou >= 0.3) & (iou <= 0.6) | batch.extras["pair_fallback"].numpy())


def test_same_rng_state_gives_the_same_pairs():
    vols = [_volume((30, 30, 30)), _volume((28, 32, 30), case_id="w")]
    s = IoUPairSampler(10, 0.3, 0.6, volumes_per_batch=2, pairs_per_volume=8)
    a, b = s(vols, np.random.default_rng(9)), s(vols, np.random.default_rng(9))
    assert torch.equal(a.boxes_vox, b.boxes_vox) and torch.equal(a.patches, b.patches)
    assert torch.equal(a.extras["pair_iou"], b.extras["pair_iou"])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="iou_min <= iou_max"):
        IoUPairSampler(8, 0.6, 0.3, volumes_per_batch=1, pairs_per_volume=1)
    with pytest.raises(ValueError, match="crop2_draw"):
        IoUPairSampler(8, crop2_draw="magic", volumes_per_batch=1, pairs_per_volume=1)
    with pytest.raises(ValueError, match="pairs_per_volume"):
        IoUPairSampler(8, volumes_per_batch=1, pairs_per_volume=0)


def test_iou_histogram_has_fixed_bins_that_sum_to_one():
    logs = iou_histogram_logs(np.array([0.0, 0.0, 0.05, 0.1, 0.35, 0.6, 1.0, 0.95]))
    assert len(logs) == len(IOU_HIST_EDGES)  # "exactly 0" plus 10 bins
    assert sum(logs.values()) == pytest.approx(1.0)
    assert logs["iou_hist_0"] == 0.25 and logs["iou_hist_0.0_0.1"] == 0.25  # 0.05 and 0.1 (right-closed)
    assert logs["iou_hist_0.3_0.4"] == logs["iou_hist_0.5_0.6"] == 0.125 and logs["iou_hist_0.9_1.0"] == 0.25
