"""NTXentLoss against the SimCLR formula, computed with explicit loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medssl.losses.ntxent import NTXentLoss


def _reference(za: np.ndarray, zb: np.ndarray, tau: float) -> float:
    z = np.concatenate([za, zb])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    two_n = z.shape[0]
    n = two_n // 2
    total = 0.0
    for i in range(two_n):
        pos = i + n if i < n else i - n
        sims = {k: float(z[i] @ z[k]) / tau for k in range(two_n) if k != i}
        log_denominator = math.log(sum(math.exp(s) for s in sims.values()))
        total += -(sims[pos] - log_denominator)
    return total / two_n


@pytest.mark.parametrize("n, d, tau, seed", [(4, 3, 0.5, 0), (6, 8, 0.05, 1), (2, 5, 1.0, 2)])
def test_ntxent_matches_the_simclr_formula(n, d, tau, seed):
    rng = np.random.default_rng(seed)
    za = rng.normal(size=(n, d))
    zb = za + 0.3 * rng.normal(size=(n, d))
    got = NTXentLoss(temperature=tau)(torch.tensor(za, dtype=torch.float32), torch.tensor(zb, dtype=torch.float32))
    assert got.item() == pytest.approx(_reference(za, zb, tau), rel=1e-4)


def test_ntxent_default_temperature_is_the_isimed_papers():
    assert NTXentLoss().temperature == 0.05


def test_ntxent_prefers_matching_views_over_swapped_ones():
    z = torch.randn(8, 16)
    loss = NTXentLoss(temperature=0.1)
    assert loss(z, z + 0.01 * torch.randn_like(z)).item() < loss(z, torch.roll(z, 1, dims=0)).item()


def test_ntxent_rejects_mismatched_views():
    with pytest.raises(ValueError, match="z_a and z_b must both be"):
        NTXentLoss()(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="temperature must be positive"):
        NTXentLoss(temperature=0.0)
