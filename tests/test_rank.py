"""Effective rank (RankMe) and the fraction of dimensions with non-negligible variance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medssl.capacity import dim_variance_fraction, effective_rank


def _reference_rankme(z: np.ndarray, eps: float = 1e-7) -> float:
    # Written from the RankMe paper's definition, independently of the implementation.
    s = np.linalg.svd(z, compute_uv=False)
    p = s / np.abs(s).sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def test_effective_rank_matches_the_rankme_formula_on_random_embeddings():
    z = np.random.default_rng(0).normal(size=(200, 16)) @ np.diag(np.linspace(0.1, 3.0, 16))
    assert effective_rank(z) == pytest.approx(_reference_rankme(z), rel=1e-9)


def test_effective_rank_is_the_dimension_when_singular_values_are_equal():
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(50, 8)))  # orthonormal columns
    assert effective_rank(q * 4.0) == pytest.approx(8.0, rel=1e-4)


def test_effective_rank_is_one_when_embeddings_lie_on_one_line_through_the_origin():
    z = np.outer(np.random.default_rng(2).normal(size=100), np.arange(1.0, 33.0))
    assert effective_rank(z) == pytest.approx(1.0, abs=1e-3)


def test_effective_rank_counts_an_offset_unless_centred():
    rng = np.random.default_rng(3)
    z = np.outer(rng.normal(size=300), [1.0, 0, 0, 0]) + np.array([0, 0, 0, 5.0])  # one spread axis + constant offset
    assert effective_rank(z) > 1.5
    assert effective_rank(z, centre=True) == pytest.approx(1.0, abs=1e-3)


def test_effective_rank_accepts_torch_tensors_and_rejects_bad_shapes():
    z = torch.randn(64, 10)
    assert effective_rank(z) == pytest.approx(_reference_rankme(z.double().numpy()), rel=1e-9)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        effective_rank(torch.randn(10))


def test_dim_variance_fraction_counts_only_dimensions_above_the_relative_threshold():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(500, 10))
    z[:, :3] *= 1e-3  # variance 1e-6 relative: negligible
    z[:, 3] = 7.0  # constant
    assert dim_variance_fraction(z, rel_threshold=1e-3) == pytest.approx(0.6)
    assert dim_variance_fraction(z, rel_threshold=1e-8) == pytest.approx(0.9)
    assert dim_variance_fraction(z * 1e6) == dim_variance_fraction(z)  # scale-free
    assert dim_variance_fraction(np.ones((5, 4))) == 0.0


def test_collapse_coefficient_is_one_for_identical_outputs_and_near_zero_for_isotropic_gaussians():
    from medssl.capacity import collapse_coefficient

    rng = np.random.default_rng(4)
    identical = np.tile(rng.normal(size=(1, 64)), (500, 1))
    assert collapse_coefficient(identical) == pytest.approx(1.0)
    assert collapse_coefficient(torch.tensor(identical, dtype=torch.float32)) == pytest.approx(1.0, abs=1e-6)
    gaussian = rng.normal(size=(4000, 64))  # directions uniform on the sphere: per-channel std 1/sqrt(d)
    assert collapse_coefficient(gaussian) < 0.02
    assert collapse_coefficient(torch.tensor(gaussian)) == pytest.approx(collapse_coefficient(gaussian))
    # the formula: 1 - sqrt(d) * mean per-channel std of the l2-normalised rows, floored at 0
    z = rng.normal(size=(50, 8)) + np.array([3.0] + [0.0] * 7)
    u = z / np.linalg.norm(z, axis=1, keepdims=True)
    assert collapse_coefficient(z) == pytest.approx(max(0.0, 1 - np.sqrt(8) * u.std(axis=0).mean()))
