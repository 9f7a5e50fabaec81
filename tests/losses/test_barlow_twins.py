"""BarlowTwinsLoss against the paper's formula, computed with numpy loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medssl.losses.barlow_twins import BarlowTwinsLoss


def _reference(za: np.ndarray, zb: np.ndarray, lam: float, eps: float = 1e-5) -> float:
    n, d = za.shape
    a = (za - za.mean(0)) / np.sqrt(za.var(0) + eps)  # numpy var is the biased (BatchNorm) one
    b = (zb - zb.mean(0)) / np.sqrt(zb.var(0) + eps)
    total = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[k, i] * b[k, j] for k in range(n)) / n
            total += (1.0 - c_ij) ** 2 if i == j else lam * c_ij**2
    return total


@pytest.mark.parametrize("n, d, lam, seed", [(8, 5, 5e-3, 0), (16, 3, 0.1, 1), (5, 7, 0.0, 2)])
def test_barlow_twins_matches_the_cross_correlation_formula(n, d, lam, seed):
    rng = np.random.default_rng(seed)
    za = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d) + rng.normal(size=d)
    zb = 0.5 * za + rng.normal(size=(n, d))
    za_t, zb_t = torch.tensor(za, dtype=torch.float32), torch.tensor(zb, dtype=torch.float32)
    got = BarlowTwinsLoss(lambda_offdiag=lam)(za_t, zb_t)
    assert got.item() == pytest.approx(_reference(za, zb, lam), rel=1e-4)


def test_barlow_twins_is_near_zero_for_identical_decorrelated_views():
    # two identical views with orthogonal, standardised columns give C = I exactly
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(64, 8)))
    z = q - q.mean(0)
    z = torch.tensor(z / z.std(0), dtype=torch.float32)
    assert BarlowTwinsLoss()(z, z).item() < 1e-3
    assert BarlowTwinsLoss()(z, torch.flip(z, dims=[0])).item() > 1.0


def test_barlow_twins_gradients_are_finite_and_reach_both_views():
    za = torch.randn(6, 4, requires_grad=True)
    zb = torch.randn(6, 4, requires_grad=True)
    BarlowTwinsLoss()(za, zb).backward()
    assert torch.isfinite(za.grad).all() and za.grad.abs().sum() > 0 and zb.grad.abs().sum() > 0


def test_barlow_twins_rejects_mismatched_views():
    with pytest.raises(ValueError, match="z_a and z_b must both be"):
        BarlowTwinsLoss()(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least 2"):
        BarlowTwinsLoss()(torch.zeros(1, 3), torch.zeros(1, 3))
