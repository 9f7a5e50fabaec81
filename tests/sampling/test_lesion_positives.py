"""Lesion positives centred on a lesion, the minimum target share, and each patch's recorded share.

Small oblique, anisotropic volumes with ball lesions of very different sizes; the shares are
recounted here by slicing the lesion map with each stored box.
"""

from __future__ import annotations

import numpy as np
import pytest

from medssl.data.volume import Volume
from medssl.evaluate.patchsets import PatchSet, concat_patch_sets, draw_labelled_patch_set
from medssl.sampling.sets import draw_labelled_centres
from tests.helpers import ball_mask, oblique_affine

SHAPE = (40, 36, 30)
SPACING = (1.5, 2.0, 2.5)


def _volume(k: int) -> Volume:
    """A body block with a liver label, one large and one small lesion (ids 1, 2), and a lesion at the border."""
    rng = np.random.default_rng(k)
    affine = oblique_affine(SPACING, (20.0, -15.0, 8.0 * k), (-30.0, 10.0 * k, 5.0))
    label = np.zeros(SHAPE, np.int16)
    label[2:-2, 2:-2, 2:-2] = 2
    label[5:30, 5:30, 4:26] = 1
    ijk_world = lambda ijk: affine[:3, :3] @ np.asarray(ijk, float) + affine[:3, 3]  # noqa: E731
    lesion = np.zeros(SHAPE, np.uint8)
    lesion[ball_mask(SHAPE, affine, ijk_world((14 + k, 14, 12)), 7.0)] = 1  # large: about 340 voxels
    lesion[ball_mask(SHAPE, affine, ijk_world((24, 24, 20)), 1.6)] = 2  # small: a few voxels
    lesion[ball_mask(SHAPE, affine, ijk_world((2, 32, 27)), 2.6)] = 3  # at the border: no box centred on it fits
    data = (0.2 * rng.standard_normal((1, *SHAPE)) + (label[None] > 0) - 0.5 * (lesion[None] > 0)).astype(np.float32)
    return Volume(data=data, affine=affine, case_id=f"case{k}", group=f"pat{k}", label=label, aux={"lesion": lesion},
                  label_names={1: "liver", 2: "body"})


@pytest.fixture(scope="module")
def volumes() -> list[Volume]:
    return [_volume(k) for k in range(3)]


def _box_count(mask: np.ndarray, box: np.ndarray) -> int:
    x0, y0, z0, x1, y1, z1 = box
    return int(np.count_nonzero(mask[x0:x1, y0:y1, z0:z1]))


def test_centred_positives_sit_on_a_lesion_and_small_lesions_are_drawn_as_often_as_large_ones(volumes):
    size = (12, 12, 10)
    ps = draw_labelled_patch_set(volumes, "lesion", n_per_class=600, patch_size_vox=size, seed=1)
    assert ps.meta["positives"] == "centred" and "centred on a 'lesion' voxel" in ps.description
    by_case = {v.case_id: v for v in volumes}
    counts = {1: 0, 2: 0, 3: 0}
    for c, box, case, y in zip(ps.centres_vox, ps.boxes_vox, ps.case_ids, ps.labels):
        lesion = by_case[case].aux["lesion"]
        assert np.all(box[:3] >= 0) and np.all(box[3:] <= SHAPE)  # every box lies inside its volume
        if y == 1:
            # the box holds a lesion, and either its centre is a lesion voxel or it was moved inwards at the border
            assert _box_count(lesion, box) > 0
            lid = int(lesion[tuple(c)])
            if lid:
                counts[lid] += 1
            else:
                near = np.unique(lesion[box[0] : box[3], box[1] : box[4], box[2] : box[5]])
                assert 3 in near, (case, c, box)  # only the border lesion needs moving
                counts[3] += 1
        else:
            assert _box_count(lesion, box) == 0
    sizes = {i: int(np.count_nonzero(volumes[0].aux["lesion"] == i)) for i in (1, 2, 3)}
    assert sizes[1] > 30 * sizes[2]
    # lesions chosen uniformly: the few-voxel lesion as often as the large one (600 draws, p = 1/3: s.d. 11.5)
    assert all(150 < n < 250 for n in counts.values()), counts


def test_border_lesions_move_the_box_inwards_by_the_least_amount(volumes):
    size = (12, 12, 10)
    rng = np.random.default_rng(0)
    drawn = draw_labelled_centres(volumes[:1], "lesion", 300, size, rng, negatives="same_structure")
    pos = drawn.centres_vox[drawn.labels == 1]
    lesion = volumes[0].aux["lesion"]
    lo, hi = np.asarray(size) // 2, np.asarray(SHAPE) - np.asarray(size) + np.asarray(size) // 2
    on_edge = np.any((pos == lo) | (pos == hi), axis=1)
    assert on_edge.any()  # the border lesion's boxes sit on the edge of the allowed centres ...
    moved = pos[lesion[tuple(pos.T)] == 0]
    assert len(moved) and np.all(np.any((moved == lo) | (moved == hi), axis=1))  # ... and only those moved
    assert np.all((pos >= lo) & (pos <= hi))


def test_target_share_is_recorded_per_patch_and_min_share_is_respected(volumes):
    size = (10, 10, 8)
    ps = draw_labelled_patch_set(volumes, "lesion", n_per_class=90, patch_size_vox=size, seed=4, min_share=0.02)
    by_case = {v.case_id: v for v in volumes}
    n_box = float(np.prod(size))
    recount = np.array([_box_count(by_case[c].aux["lesion"], b) for c, b in zip(ps.case_ids, ps.boxes_vox)]) / n_box
    np.testing.assert_allclose(ps.target_share, recount)
    assert np.all(ps.target_share[ps.labels == 1] >= 0.02) and np.all(ps.target_share[ps.labels == 0] == 0)
    assert ps.meta["min_target_voxels"] == int(np.ceil(0.02 * n_box))
    # the small lesion (a few voxels) can never give 2 % of 800 voxels: its subjects' positives come from the others
    assert "with >= 16 of them" in ps.description


def test_any_rule_keeps_the_old_positives_and_organs_default_to_it(volumes):
    size = (10, 10, 8)
    a = draw_labelled_patch_set(volumes, "lesion", n_per_class=40, patch_size_vox=size, seed=2, positives="any")
    assert a.meta["positives"] == "any"
    assert np.any(a.target_share[a.labels == 1] > 0)
    organ = draw_labelled_patch_set(volumes, "liver", n_per_class=20, patch_size_vox=size, seed=2)
    assert organ.meta["positives"] == "any" and organ.target_share is not None
    with pytest.raises(ValueError, match="positives must be one of"):
        draw_labelled_patch_set(volumes, "lesion", n_per_class=4, patch_size_vox=size, seed=0, positives="middle")
    with pytest.raises(ValueError, match="min_share"):
        draw_labelled_patch_set(volumes, "lesion", n_per_class=4, patch_size_vox=size, seed=0, min_share=1.0)
    with pytest.raises(ValueError, match="at least 800 voxels"):
        draw_labelled_patch_set(volumes, "lesion", n_per_class=4, patch_size_vox=size, seed=0, min_share=0.999)


def test_target_share_survives_save_load_concat_subset_and_another_size(volumes, tmp_path):
    size = (10, 10, 8)
    a = draw_labelled_patch_set(volumes[:2], "lesion", n_per_class=10, patch_size_vox=size, seed=0)
    b = draw_labelled_patch_set(volumes[2:], "lesion", n_per_class=6, patch_size_vox=size, seed=1)
    both = concat_patch_sets({"val": a, "test": b}, seed=0)
    np.testing.assert_array_equal(both.target_share, np.r_[a.target_share, b.target_share])
    back = PatchSet.load(both.save(tmp_path / "set"))
    np.testing.assert_array_equal(back.target_share, both.target_share)
    np.testing.assert_array_equal(back.split("test").target_share, b.target_share)
    other = back.for_size(6, volumes)  # the share describes the labelled box, like the labels
    np.testing.assert_array_equal(other.target_share, back.target_share)
