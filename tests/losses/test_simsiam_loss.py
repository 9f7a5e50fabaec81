"""SimSiamLoss against the formula, and the stop-gradient on the targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medssl.losses.simsiam import SimSiamLoss


def _neg_cos(p: np.ndarray, z: np.ndarray) -> float:
    return -float(np.mean([pi @ zi / (np.linalg.norm(pi) * np.linalg.norm(zi)) for pi, zi in zip(p, z)]))


@pytest.mark.parametrize("n, d, seed", [(4, 3, 0), (16, 8, 1), (2, 32, 2)])
def test_simsiam_loss_is_half_the_sum_of_the_two_negative_cosines(n, d, seed):
    rng = np.random.default_rng(seed)
    p1, p2, z1, z2 = (rng.normal(size=(n, d)) * rng.uniform(0.1, 10) for _ in range(4))
    got = SimSiamLoss()(*(torch.tensor(a, dtype=torch.float32) for a in (p1, p2, z1, z2)))
    assert got.item() == pytest.approx(0.5 * _neg_cos(p1, z2) + 0.5 * _neg_cos(p2, z1), rel=1e-5)


def test_simsiam_loss_is_minus_one_for_perfect_predictions_and_plus_one_for_opposite_ones():
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    assert SimSiamLoss()(3 * z2, 0.5 * z1, z1, z2).item() == pytest.approx(-1.0)
    assert SimSiamLoss()(-z2, -z1, z1, z2).item() == pytest.approx(1.0)


def test_no_gradient_flows_into_the_target_branch():
    p1, p2 = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    z1, z2 = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    SimSiamLoss()(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None  # stop-gradient: the targets are constants
    assert p1.grad is not None and p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0


def test_gradient_reaches_the_projection_only_through_the_predictor():
    # p = h(z) with h a scaling: the gradient on z1 is that of -0.5 cos(h(z1), sg(z2)) alone,
    # nothing from z1's use as the target of p2
    z1, z2 = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    scale = torch.full((1,), 2.0, requires_grad=True)
    SimSiamLoss()(scale * z1, scale * z2, z1, z2).backward()
    z1_alone = z1.detach().clone().requires_grad_(True)
    (-0.5 * torch.nn.functional.cosine_similarity(2.0 * z1_alone, z2.detach(), dim=1).mean()).backward()
    torch.testing.assert_close(z1.grad, z1_alone.grad)


def test_simsiam_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        SimSiamLoss()(torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3), torch.randn(5, 3))
