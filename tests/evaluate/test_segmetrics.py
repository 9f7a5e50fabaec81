"""Segmentation scores: MONAI's Dice and surface Dice, foreground only, per volume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medssl.evaluate.segmetrics import DEFAULT_ORGANS, organ_set, segmentation_scores

ORGANS = ("a", "b", "c")


def random_codes(shape=(20, 18, 16), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = np.zeros(shape, np.uint8)
    for code in (1, 2, 3):
        x, y, z = (rng.integers(0, s - 6) for s in shape)
        codes[x : x + rng.integers(3, 7), y : y + rng.integers(3, 7), z : z + rng.integers(3, 7)] = code
    return codes


def test_dice_agrees_with_monai_on_one_hot_maps_without_the_background_channel():
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    truth, pred = random_codes(seed=1), random_codes(seed=2)
    ours = segmentation_scores(pred, truth, ORGANS)
    oh = [one_hot(torch.as_tensor(c, dtype=torch.long)[None, None], 4, dim=1) for c in (pred, truth)]
    monai = DiceMetric(include_background=False, reduction="none")(oh[0], oh[1])[0].numpy()
    np.testing.assert_allclose(ours["dice"].to_numpy(), monai, rtol=1e-6)
    assert list(ours["organ"]) == list(ORGANS)  # no background row
    # and with the plain formula 2|P & T| / (|P| + |T|) per organ
    for i in range(1, len(ORGANS) + 1):
        p, t = pred == i, truth == i
        assert ours.loc[i - 1, "dice"] == pytest.approx(2 * (p & t).sum() / (p.sum() + t.sum()))


def test_dice_ignores_background_agreement():
    truth = np.zeros((12, 12, 12), np.uint8)
    truth[2:6, 2:6, 2:6] = 1
    wrong = np.zeros_like(truth)
    wrong[7:11, 7:11, 7:11] = 1  # every background voxel but 128 right, the organ entirely wrong
    s = segmentation_scores(wrong, truth, ("a",))
    assert s["dice"].iloc[0] == 0.0  # background counted as a class would have given about (0.93 + 0) / 2
    bigger = np.zeros((40, 40, 40), np.uint8)  # more correct background changes nothing
    bigger[:12, :12, :12] = wrong
    t_big = np.zeros_like(bigger)
    t_big[:12, :12, :12] = truth
    assert segmentation_scores(bigger, t_big, ("a",))["dice"].iloc[0] == 0.0


def test_a_perfect_prediction_scores_one_and_an_absent_organ_is_not_scored():
    truth = random_codes(seed=3)
    truth[truth == 3] = 0  # organ c absent
    s = segmentation_scores(truth, truth, ORGANS, spacing_mm=(1.0, 1.5, 2.0), surface_tolerance_mm=1.0)
    assert s["dice"].iloc[:2].tolist() == [1.0, 1.0] and s["nsd"].iloc[:2].tolist() == [1.0, 1.0]
    assert np.isnan(s["dice"].iloc[2]) and np.isnan(s["nsd"].iloc[2])


def test_a_shifted_cube_scores_what_the_hand_computation_says():
    truth = np.zeros((24, 20, 20), np.uint8)
    truth[4:14, 5:15, 5:15] = 1  # a 10^3 cube
    shifted = np.roll(truth, 2, axis=0)  # 2 voxels along x: overlap 8 x 10 x 10
    s = segmentation_scores(shifted, truth, ("a",), spacing_mm=(1.0, 1.0, 1.0), surface_tolerance_mm=2.5)
    assert s["dice"].iloc[0] == pytest.approx(2 * 800 / (1000 + 1000))
    assert s["nsd"].iloc[0] == pytest.approx(1.0)  # every surface point within 2 mm < 2.5 mm of the other surface
    tight = segmentation_scores(shifted, truth, ("a",), spacing_mm=(1.0, 1.0, 1.0), surface_tolerance_mm=0.5)
    assert 0.0 < tight["nsd"].iloc[0] < 1.0  # the two faces across the shift are 2 mm apart


def test_an_organ_never_predicted_scores_zero():
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[2:5, 2:5, 2:5] = 2
    s = segmentation_scores(np.zeros_like(truth), truth, ("a", "b"), spacing_mm=(1, 1, 1), surface_tolerance_mm=1.0)
    assert s.loc[1, "dice"] == 0.0 and s.loc[1, "nsd"] == 0.0
    assert np.isnan(s.loc[0, "dice"])


def test_bad_maps_are_refused_with_the_problem_named():
    with pytest.raises(ValueError, match="codes must lie in"):
        segmentation_scores(np.full((4, 4, 4), 5), np.zeros((4, 4, 4)), ORGANS)
    with pytest.raises(ValueError, match="different grids"):
        segmentation_scores(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), ORGANS)
    with pytest.raises(ValueError, match="spacing_mm"):
        segmentation_scores(np.ones((4, 4, 4)), np.ones((4, 4, 4)), ORGANS, surface_tolerance_mm=1.0)


def test_organ_set_maps_the_demo_names_to_codes_and_names_missing_organs():
    names = {5: "liver", 1: "spleen", 3: "kidney_left", 2: "kidney_right", 88: "iliopsoas_left",
             89: "iliopsoas_right", 7: "pancreas"}
    org = organ_set(names)
    assert org.names == DEFAULT_ORGANS and org.label_ids == (5, 1, 3, 2, 88, 89)
    lab = np.array([[[5, 7, 0, 89, 1]]])
    np.testing.assert_array_equal(org.encode(lab), [[[1, 0, 0, 6, 2]]])
    with pytest.raises(ValueError, match="not among the dataset's labels"):
        organ_set(names, ["liver", "heart"])


def test_an_organ_predicted_where_the_truth_has_none_scores_zero_and_its_volume_is_a_false_positive():
    truth = np.zeros((12, 12, 12), np.uint8)
    truth[2:6, 2:6, 2:6] = 1  # organ a present; b and c absent
    pred = truth.copy()
    pred[8:10, 8:10, 8:10] = 2  # b predicted in 8 voxels where the truth has none
    s = segmentation_scores(pred, truth, ORGANS, spacing_mm=(1.0, 2.0, 2.5), surface_tolerance_mm=1.0).set_index("organ")
    assert s.loc["b", "dice"] == 0.0 and s.loc["b", "nsd"] == 0.0  # not NaN: the false positive counts
    assert np.isnan(s.loc["c", "dice"]) and np.isnan(s.loc["c", "nsd"])  # absent from both: not scored
    assert s.loc["a", "dice"] == 1.0
    voxel_ml = 1.0 * 2.0 * 2.5 / 1000.0
    assert s.loc["b", "fp_ml"] == pytest.approx(8 * voxel_ml) and s.loc["a", "fp_ml"] == 0.0
    # the mean over organs now counts it: (1 + 0) / 2 instead of 1
    assert s["dice"].mean() == pytest.approx(0.5)


def test_false_positive_volume_counts_predicted_voxels_outside_the_true_organ():
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[2:5, 2:5, 2:5] = 1
    pred = np.zeros_like(truth)
    pred[3:6, 2:5, 2:5] = 1  # shifted by one voxel: 9 voxels outside the truth
    s = segmentation_scores(pred, truth, ("a",), spacing_mm=(2.0, 2.0, 2.0))
    assert s.loc[0, "fp_ml"] == pytest.approx(9 * 8 / 1000.0)
    assert np.isnan(segmentation_scores(pred, truth, ("a",))["fp_ml"].iloc[0])  # no spacing: no volume
