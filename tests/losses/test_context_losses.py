"""Context-prediction losses against the paper's formulas (Blendowski et al. 2019, sec. 2.1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medssl.losses.context import (
    HeatmapMSELoss,
    NeighbourCrossEntropy,
    OffsetL1Loss,
    heatmap_offsets,
    heatmap_target,
)


@pytest.mark.parametrize(("offsets", "peak"), [
    ((0.0, 0.0), (9, 9)),
    ((2.5 * 3 / 9, -2.5 * 6 / 9), (12, 3)),  # grid points: i/9 = Delta / 2.5
    ((-2.5, 2.5), (0, 18)),  # the grid's border: +-2.5 half-widths = the paper's i/9 = +-1
    ((1.75, -1.75), (15, 3)),  # the curriculum's widest offset: 9 +- 9 x 0.7 = 15.3 / 2.7, the nearest pixels
    ((0.7, 0.25), (12, 10)),  # off the grid: 9 + 2.52, 9 + 0.9
])
def test_heatmap_target_peaks_at_the_pixel_of_known_offsets(offsets, peak):
    target = heatmap_target(torch.tensor([offsets]))
    assert target.shape == (1, 19, 19)
    flat = int(target[0].argmax())
    assert (flat // 19, flat % 19) == peak  # row i carries Delta1, column j Delta2


def test_heatmap_target_is_the_papers_formula_in_its_image_units_at_every_pixel():
    """The paper's 10 exp(-15 ((i/9 - D1)^2 + (j/9 - D2)^2)) with D in image units = half-widths / 2.5."""
    offsets = torch.tensor([[0.123, -0.456], [-1.75, 0.05], [2.2, 1.1]])  # half-widths
    target = heatmap_target(offsets)
    for b, (h1, h2) in enumerate(offsets.tolist()):
        d1, d2 = h1 * 0.4, h2 * 0.4  # image units: the paper's patch half-width is 0.4
        for i in range(-9, 10):
            for j in range(-9, 10):
                expected = 10 * math.exp(-15 * ((i / 9 - d1) ** 2 + (j / 9 - d2) ** 2))
                assert float(target[b, i + 9, j + 9]) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_heatmap_offsets_read_back_offsets_between_grid_points():
    offsets = torch.tensor([[0.123, -0.456], [0.0, 0.0], [-1.61, 0.33], [1.75, -1.75], [2.3, 0.7]])
    decoded = heatmap_offsets(heatmap_target(offsets))
    assert torch.allclose(decoded, offsets, atol=2e-4)  # the argmax alone is off by up to 2.5/18
    border = heatmap_offsets(heatmap_target(torch.tensor([[2.45, -2.45]])))
    assert border.tolist() == [[2.5, -2.5]]  # a peak on the border of the map is kept as it is
    flat = torch.zeros(1, 19, 19)
    flat[0, 4, 7] = -1.0  # no positive value: the plain argmax (here the first zero, row 0 column 0)
    assert heatmap_offsets(flat).tolist() == [[-2.5, -2.5]]


def test_the_target_of_every_sampled_pair_peaks_at_the_offset_the_sampler_applied():
    from medssl.sampling.context import ContextPairSampler
    from tests.helpers import coordinate_volume, oblique_affine

    vol = coordinate_volume("c", (60, 56, 50), oblique_affine((1.0, 1.5, 2.0), (10.0, 0.0, -5.0), (0.0, 0.0, 0.0)))
    sampler = ContextPairSampler(42, 3, volumes_per_batch=1, patches_per_volume=100)
    batch = sampler([vol], np.random.default_rng(0), progress=1.0)
    offsets = batch.extras["offsets"].reshape(-1, 2)
    assert float(offsets.abs().max()) >= 1.7  # the paper's range: up to 1.75 half-widths
    target = heatmap_target(offsets)
    flat = target.flatten(1).argmax(1)
    expected = torch.round(9 + 9 * offsets / 2.5).long()  # the pixel nearest to the applied offset
    assert torch.equal(torch.stack([flat // 19, flat % 19], 1), expected)
    assert torch.allclose(heatmap_offsets(target), offsets, atol=2e-4)


def test_heatmap_mse_is_zero_for_the_target_and_the_mean_squared_difference_otherwise():
    offsets = torch.tensor([[0.2, -0.3], [0.5, 0.1]])
    loss = HeatmapMSELoss()
    assert float(loss(heatmap_target(offsets), offsets)) == pytest.approx(0.0, abs=1e-10)
    pred = torch.zeros(2, 19, 19)
    assert float(loss(pred, offsets)) == pytest.approx(float((heatmap_target(offsets) ** 2).mean()), rel=1e-6)
    with pytest.raises(ValueError, match="heatmaps"):
        loss(torch.zeros(2, 19, 17), offsets)


def test_offset_l1_is_the_mean_absolute_difference():
    pred = torch.tensor([[0.1, 0.2], [-0.3, 0.4]])
    target = torch.tensor([[0.0, 0.5], [0.3, 0.4]])
    assert float(OffsetL1Loss()(pred, target)) == pytest.approx((0.1 + 0.3 + 0.6 + 0.0) / 4)
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        OffsetL1Loss()(torch.zeros(3), torch.zeros(3))


def test_neighbour_cross_entropy_is_minus_log_softmax_of_the_true_neighbour():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 3])
    expected = (-math.log(math.e ** 2 / (math.e ** 2 + 5)) - math.log(1 / (5 + math.e))) / 2
    assert float(NeighbourCrossEntropy()(logits, labels)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="logits"):
        NeighbourCrossEntropy()(torch.zeros(2, 5), labels)
