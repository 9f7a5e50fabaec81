"""Context-prediction losses against the paper's formulas (Blendowski et al. 2019, sec. 2.1)."""

from __future__ import annotations

import math

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
    ((1 / 3, -2 / 3), (12, 3)),
    ((-1.0, 1.0), (0, 18)),
    ((0.7, 0.25), (15, 11)),  # off the grid: the nearest grid point (9 + 6.3, 9 + 2.25)
])
def test_heatmap_target_peaks_at_the_pixel_of_known_offsets(offsets, peak):
    target = heatmap_target(torch.tensor([offsets]))
    assert target.shape == (1, 19, 19)
    flat = int(target[0].argmax())
    assert (flat // 19, flat % 19) == peak  # row i carries Delta1, column j Delta2


def test_heatmap_target_is_the_papers_formula_at_every_pixel():
    offsets = torch.tensor([[0.123, -0.456], [-0.7, 0.05]])
    target = heatmap_target(offsets)
    for b, (d1, d2) in enumerate(offsets.tolist()):
        for i in range(-9, 10):
            for j in range(-9, 10):
                expected = 10 * math.exp(-15 * ((i / 9 - d1) ** 2 + (j / 9 - d2) ** 2))
                assert float(target[b, i + 9, j + 9]) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_heatmap_offsets_read_back_offsets_between_grid_points():
    offsets = torch.tensor([[0.123, -0.456], [0.0, 0.0], [-0.61, 0.33], [0.7, -0.7]])
    decoded = heatmap_offsets(heatmap_target(offsets))
    assert torch.allclose(decoded, offsets, atol=1e-4)  # the argmax alone is off by up to 1/18
    border = heatmap_offsets(heatmap_target(torch.tensor([[0.95, -0.95]])))
    assert border.tolist() == [[1.0, -1.0]]  # a peak on the border of the map is kept as it is
    flat = torch.zeros(1, 19, 19)
    flat[0, 4, 7] = -1.0  # no positive value: the plain argmax (here the first zero, row 0 column 0)
    assert heatmap_offsets(flat).tolist() == [[-1.0, -1.0]]


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
