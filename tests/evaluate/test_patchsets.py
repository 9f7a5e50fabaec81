"""Seeded evaluation patch sets: balance, determinism, geometry, storage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medssl.data.body import body_mask
from medssl.data.volume import Volume
from medssl.evaluate.patchsets import (
    PatchSet,
    draw_labelled_patch_set,
    draw_pair_set,
    draw_uniform_patch_set,
    get_or_draw,
    target_mask,
)
from medssl.geometry import vox_to_world, world_to_vox
from tests.helpers import oblique_affine

LABEL_NAMES = {1: "liver", 2: "kidney_left", 3: "kidney_right", 4: "muscle"}


def make_volume(k: int, shape=(28, 24, 20), with_lesion: bool = True) -> Volume:
    """An oblique, anisotropic volume: body (label 4) with a liver block, two kidneys and small lesions."""
    rng = np.random.default_rng(100 + k)
    affine = oblique_affine((0.8, 1.5, 3.5), (25.0, 20.0, 10.0 * k), (-12.0 + k, 30.0, -40.0))
    label = np.zeros(shape, np.int16)
    label[2:-2, 2:-2, 2:-2] = 4
    label[3:12, 3:12, 3:10] = 1
    label[18:22, 4:8, 10:14] = 2
    label[18:22, 14:18, 10:14] = 3
    lesion = np.zeros(shape, np.uint8)
    if with_lesion:
        lesion[5:7, 5:7, 4:6] = 1
        lesion[20, 15, 11] = 1
    data = (0.3 * rng.standard_normal((1, *shape)) + 2.0 * (label[None] > 0) + label[None]).astype(np.float32)
    return Volume(data=data, affine=affine, case_id=f"case{k}", group=f"pat{k // 2}", label=label,
                  aux={"lesion": lesion}, label_names=LABEL_NAMES)


@pytest.fixture(scope="module")
def volumes() -> list[Volume]:
    return [make_volume(k) for k in range(4)]


def _box_sum(mask: np.ndarray, box: np.ndarray) -> int:
    x0, y0, z0, x1, y1, z1 = box
    return int(mask[x0:x1, y0:y1, z0:z1].sum())


def test_lesion_patch_set_is_balanced_and_positives_contain_lesion_voxels_and_negatives_none(volumes):
    ps = draw_labelled_patch_set(volumes, "lesion", n_per_class=30, patch_size_vox=8, seed=3)
    assert ps.labels is not None and len(ps) == 60
    assert ps.labels.sum() == 30
    by_case = {v.case_id: v for v in volumes}
    for label, box, case in zip(ps.labels, ps.boxes_vox, ps.case_ids):
        n_lesion = _box_sum(by_case[case].aux["lesion"], box)
        assert (n_lesion > 0) == bool(label), (case, box, label, n_lesion)
    # every subject gives as many positives as negatives
    for case in np.unique(ps.case_ids):
        lab = ps.labels[ps.case_ids == case]
        assert lab.sum() * 2 == len(lab)


def test_organ_patch_set_matches_sided_structures_by_name(volumes):
    ps = draw_labelled_patch_set(volumes, "kidney", n_per_class=12, patch_size_vox=6, seed=0)
    by_case = {v.case_id: v for v in volumes}
    for label, box, case in zip(ps.labels, ps.boxes_vox, ps.case_ids):
        kidney = np.isin(by_case[case].label, [2, 3])
        assert (_box_sum(kidney, box) > 0) == bool(label)
    assert ps.labels.mean() == 0.5
    assert target_mask(volumes[0], "liver").sum() == 9 * 9 * 7


def test_unknown_structure_name_raises_listing_known_names(volumes):
    with pytest.raises(ValueError, match="known names"):
        draw_labelled_patch_set(volumes, "pancreas", n_per_class=4, patch_size_vox=6, seed=0)


def test_volumes_without_target_are_skipped_and_recorded(volumes):
    vols = [*volumes[:2], make_volume(9, with_lesion=False)]
    ps = draw_labelled_patch_set(vols, "lesion", n_per_class=6, patch_size_vox=6, seed=1)
    assert "case9" not in set(ps.case_ids)
    assert ps.meta["skipped_cases"] == ["case9"]


def test_patch_sets_are_deterministic_from_the_seed(volumes):
    a = draw_labelled_patch_set(volumes, "lesion", n_per_class=10, patch_size_vox=8, seed=5)
    b = draw_labelled_patch_set(volumes, "lesion", n_per_class=10, patch_size_vox=8, seed=5)
    c = draw_labelled_patch_set(volumes, "lesion", n_per_class=10, patch_size_vox=8, seed=6)
    np.testing.assert_array_equal(a.boxes_vox, b.boxes_vox)
    np.testing.assert_array_equal(a.patches, b.patches)
    assert not np.array_equal(a.boxes_vox, c.boxes_vox)
    u1 = draw_uniform_patch_set(volumes, 7, 8, seed=2)
    u2 = draw_uniform_patch_set(volumes, 7, 8, seed=2)
    np.testing.assert_array_equal(u1.boxes_vox, u2.boxes_vox)


def test_patches_centres_and_groups_come_from_the_box_and_the_affine(volumes):
    ps = draw_uniform_patch_set(volumes, 5, (8, 6, 4), seed=0)
    assert ps.patches.shape == (20, 1, 8, 6, 4) and ps.patches.dtype == np.float32
    by_case = {v.case_id: v for v in volumes}
    for patch, box, centre, case, group in zip(ps.patches, ps.boxes_vox, ps.centres_mm, ps.case_ids, ps.groups):
        v = by_case[case]
        x0, y0, z0, x1, y1, z1 = box
        np.testing.assert_array_equal(patch, v.data[:, x0:x1, y0:y1, z0:z1])
        centre_vox = (box[:3] + box[3:] - 1) / 2.0
        expected = v.affine @ np.r_[centre_vox, 1.0]
        np.testing.assert_allclose(centre, expected[:3], atol=1e-9)
        assert group == v.group


def test_uniform_foreground_only_centres_lie_on_the_body_not_on_the_label(volumes):
    ps = draw_uniform_patch_set(volumes, 40, 6, seed=0, foreground_only=True)
    by_case = {v.case_id: v for v in volumes}
    for box, case, c in zip(ps.boxes_vox, ps.case_ids, ps.centres_vox):
        np.testing.assert_array_equal(c, box[:3] + 3)  # centre voxel (upper middle) of an even box
        assert body_mask(by_case[case])[tuple(c)]


def test_foreground_of_a_lesion_labelled_volume_is_the_body_and_negatives_exist():
    """autoPET/MSD style: the label map IS the lesion; foreground must still be the body."""
    vols = []
    for k in range(3):
        v = make_volume(k)
        vols.append(v.with_(label=v.aux["lesion"].astype(np.int16), aux={}, label_names={1: "lesion"}))
    ps = draw_uniform_patch_set(vols, 200, 6, seed=0, foreground_only=True)
    lesion_share = np.mean([vols[int(c[-1])].label[tuple(x)] > 0 for c, x in zip(ps.case_ids, ps.centres_vox)])
    assert lesion_share < 0.1  # centres spread over the body, not stuck on the lesion
    probe = draw_labelled_patch_set(vols, "lesion", n_per_class=12, patch_size_vox=6, seed=0)
    assert probe.labels.sum() == 12 and (probe.labels == 0).sum() == 12


def test_corresponding_negatives_sit_at_the_positives_corresponding_point_in_another_subject(volumes):
    shift = {v.case_id: np.array([0.7 * k, -1.1 * k, 2.0 * k]) for k, v in enumerate(volumes)}

    def correspondence(a, b, pts):  # a known synthetic correspondence: per-subject translations
        return np.asarray(pts) - shift[a] + shift[b]

    ps = draw_labelled_patch_set(volumes, "lesion", n_per_class=24, patch_size_vox=6, seed=1,
                                 correspondence=correspondence)
    assert ps.meta["negatives"] == "corresponding"
    by_case = {v.case_id: v for v in volumes}
    pos = np.flatnonzero(ps.labels == 1)
    neg = np.flatnonzero(ps.labels == 0)
    fallback = ps.meta["negatives_fallback_nearby"]
    matched = 0
    for n in neg:
        vb = by_case[ps.case_ids[n]]
        for p in pos:  # some positive of another subject maps onto this negative's centre voxel
            if ps.case_ids[p] == ps.case_ids[n]:
                continue
            q = correspondence(ps.case_ids[p], ps.case_ids[n], vox_to_world(by_case[ps.case_ids[p]].affine, ps.centres_vox[p]))
            if np.array_equal(np.rint(world_to_vox(vb.affine, q))[0].astype(int), ps.centres_vox[n]):
                matched += 1
                break
    assert matched >= len(neg) - fallback and matched > 0
    counts = {c: (int((ps.labels[ps.case_ids == c] == 1).sum()), int((ps.labels[ps.case_ids == c] == 0).sum()))
              for c in np.unique(ps.case_ids)}
    assert all(abs(p - n) <= 2 for p, n in counts.values()), counts  # balanced per subject


def test_organ_negatives_come_from_the_organs_neighbourhood(volumes):
    from scipy import ndimage

    ps = draw_labelled_patch_set(volumes, "liver", n_per_class=20, patch_size_vox=6, seed=0, shell_mm=4.0)
    assert ps.meta["negatives"] == "shell"
    by_case = {v.case_id: v for v in volumes}
    for case, c, lab in zip(ps.case_ids, ps.centres_vox, ps.labels):
        v = by_case[case]
        liver = v.label == 1
        dist = ndimage.distance_transform_edt(~liver, sampling=np.linalg.norm(v.affine[:3, :3], axis=0))
        if lab == 0:
            assert dist[tuple(c)] <= 6 * 3.5 + 4.0  # near the organ, not anywhere on the body


def test_pair_set_pairs_are_within_a_volume(volumes):
    ps = draw_pair_set(volumes, 6, 6, seed=0, n_pairs_per_volume=10)
    assert ps.pairs.shape == (40, 2)
    assert np.all(ps.case_ids[ps.pairs[:, 0]] == ps.case_ids[ps.pairs[:, 1]])
    assert np.all(ps.pairs[:, 0] != ps.pairs[:, 1])


def test_save_and_load_round_trip_without_pickle(volumes, tmp_path):
    ps = draw_labelled_patch_set(volumes, "lesion", n_per_class=8, patch_size_vox=6, seed=2)
    ps.save(tmp_path / "set")
    back = PatchSet.load(tmp_path / "set.npz")
    for name in ("patches", "centres_mm", "boxes_vox", "centres_vox", "case_ids", "groups", "labels"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ps, name))
    assert back.seed == 2 and back.description == ps.description and back.meta["target"] == "lesion"
    with np.load(tmp_path / "set.npz", allow_pickle=False) as z:  # loads with pickle disabled
        assert z["case_ids"].dtype.kind == "U"
    assert not list(tmp_path.glob("*.tmp"))


def test_load_refuses_an_npz_that_does_not_match_its_sidecar(volumes, tmp_path):
    ps = draw_uniform_patch_set(volumes, 3, 6, seed=0)
    ps.save(tmp_path / "a")
    draw_uniform_patch_set(volumes, 3, 6, seed=1).save(tmp_path / "b")
    (tmp_path / "b.npz").replace(tmp_path / "a.npz")
    with pytest.raises(ValueError, match="does not match"):
        PatchSet.load(tmp_path / "a")


def test_get_or_draw_draws_once_per_parameters_and_reuses_the_saved_set(volumes, tmp_path):
    calls = []

    def draw(seed, n):
        calls.append(1)
        return draw_uniform_patch_set(volumes, n, 6, seed=seed)

    first = get_or_draw(tmp_path, "uniform_test", 4, draw, n=3)
    second = get_or_draw(tmp_path, "uniform_test", 4, draw, n=3)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.patches, second.patches)
    (json_path,) = (tmp_path / "patchsets").glob("uniform_test_seed4_*.json")
    info = json.loads(json_path.read_text())
    assert info["seed"] == 4 and info["content_sha256"] == first.content_sha256
    other = get_or_draw(tmp_path, "uniform_test", 4, draw, n=2)  # a changed parameter draws a new set
    assert len(calls) == 2 and len(other) == 8
    get_or_draw(tmp_path, "uniform_test", 5, draw, n=3)  # so does another seed
    assert len(calls) == 3


def test_get_or_draw_keys_volumes_by_their_content(volumes, tmp_path):
    a = get_or_draw(tmp_path, "lesion", 0, draw_labelled_patch_set, volumes=volumes, target="lesion",
                    n_per_class=4, patch_size_vox=6)
    changed = [volumes[0].with_(data=volumes[0].data + 1.0), *volumes[1:]]
    b = get_or_draw(tmp_path, "lesion", 0, draw_labelled_patch_set, volumes=changed, target="lesion",
                    n_per_class=4, patch_size_vox=6)
    assert len(list((tmp_path / "patchsets").glob("lesion_seed0_*.npz"))) == 2
    assert a.meta["spec"]["volumes"][0]["case_id"] == "case0"
    assert not np.array_equal(a.patches, b.patches)


def test_patch_larger_than_volume_is_rejected_with_the_case_named(volumes):
    with pytest.raises(ValueError, match="case0.*smaller than the patch size"):
        draw_uniform_patch_set(volumes, 2, 32, seed=0)


def test_for_size_keeps_the_centre_voxels_and_pads_outside_the_image(volumes):
    ps = draw_uniform_patch_set(volumes, 6, 6, seed=3)
    big = ps.for_size(12, volumes)
    np.testing.assert_array_equal(big.centres_vox, ps.centres_vox)
    assert big.patches.shape[2:] == (12, 12, 12)
    np.testing.assert_array_equal(big.patches[:, :, 3:9, 3:9, 3:9], ps.patches)  # same centre voxel
    by_case = {v.case_id: v for v in volumes}
    for patch, box, case in zip(big.patches, big.boxes_vox, big.case_ids):
        data = by_case[case].data
        if np.any(box[:3] < 0):  # padded with the per-channel minimum
            assert patch.min() == pytest.approx(float(data.min()))
    assert ps.for_size(6, volumes) is ps


def test_sets_drawn_by_split_keep_their_splits_apart_and_split_reindexes_pairs(volumes):
    from medssl.evaluate.patchsets import draw_by_split

    ps = draw_by_split({"val": volumes[:2], "test": volumes[2:]}, draw_pair_set, seed=0, n_per_volume=4,
                       patch_size_vox=6)
    assert set(ps.splits) == {"val", "test"}
    assert set(ps.case_ids[ps.splits == "val"]) == {"case0", "case1"}
    test = ps.split("test")
    assert set(test.case_ids) == {"case2", "case3"} and len(test) == 8
    assert len(test.pairs) == 2 * 6 and np.all(test.case_ids[test.pairs[:, 0]] == test.case_ids[test.pairs[:, 1]])
    np.testing.assert_array_equal(test.patches, ps.patches[ps.splits == "test"])
    lab = draw_by_split({"val": volumes[:2], "test": volumes[2:]}, draw_labelled_patch_set, seed=0, target="lesion",
                        n_per_class=4, patch_size_vox=6)
    for split in ("val", "test"):  # each split is balanced on its own
        assert lab.labels[lab.splits == split].sum() == 4 and (lab.splits == split).sum() == 8
