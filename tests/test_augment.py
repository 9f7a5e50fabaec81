"""CoarseDropoutShuffleViews: shapes, seeding, and the same statistics as the MONAI reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medssl.augment import CoarseDropoutShuffleViews

V = 32**3
SENTINEL = -100.0


def _dropped_fraction_ours(aug: CoarseDropoutShuffleViews, n: int, seed: int, size: int = 32) -> np.ndarray:
    x = torch.rand(n, 1, size, size, size)
    views = aug(x, np.random.default_rng(seed))
    return (views[0] == SENTINEL).float().mean(dim=(1, 2, 3, 4)).numpy()


def _dropped_fraction_monai(aug: CoarseDropoutShuffleViews, n: int, seed: int) -> np.ndarray:
    t = aug.monai_transform()
    t.set_random_state(seed=seed)
    out = []
    for _ in range(n):
        y = np.asarray(t(torch.rand(1, 32, 32, 32)))
        out.append(float((y == SENTINEL).mean()))
    return np.array(out)


@pytest.mark.parametrize(
    "mode, lo, hi",
    [
        ("foreground", 27 / V, 6 * 10**3 / V),  # 6 holes of 3^3..10^3 voxels dropped
        ("background", 1 - 6 * 21**3 / V, 1 - 27 / V),  # 6 kept boxes of 3^3..21^3, the rest dropped
    ],
)
def test_dropped_fraction_is_in_the_documented_range_and_matches_monai(mode, lo, hi):
    aug = CoarseDropoutShuffleViews(mode=mode, shuffle_prob=0.0, fill_value=SENTINEL, n_views=1)
    ours = _dropped_fraction_ours(aug, 400, seed=0)
    ref = _dropped_fraction_monai(aug, 400, seed=0)
    for frac in (ours, ref):
        assert frac.min() >= lo - 1e-9 and frac.max() <= hi + 1e-9
    # same distribution: means within ~4 standard errors, similar spread
    se = np.sqrt(ours.var() / len(ours) + ref.var() / len(ref))
    assert abs(ours.mean() - ref.mean()) < 4 * se, (ours.mean(), ref.mean())
    assert 0.8 < ours.std() / ref.std() < 1.25


def test_independent_size_sampling_draws_each_side_uniformly_as_the_paper_states():
    # one hole: E[dropped voxels] = E[side]^3 with side ~ U{3..10}, E[side] = 6.5
    aug = CoarseDropoutShuffleViews(
        mode="foreground", holes=1, shuffle_prob=0.0, fill_value=SENTINEL, n_views=1, size_sampling="independent"
    )
    dropped = _dropped_fraction_ours(aug, 2000, seed=3, size=16) * 16**3
    assert abs(dropped.mean() - 6.5**3) < 0.06 * 6.5**3
    assert dropped.min() >= 27 and dropped.max() <= 1000
    # with 6 boxes, MONAI's ratcheting lower bound keeps larger boxes than independent sides
    kw = dict(mode="background", shuffle_prob=0.0, fill_value=SENTINEL, n_views=1)
    independent = _dropped_fraction_ours(CoarseDropoutShuffleViews(size_sampling="independent", **kw), 200, seed=4)
    monai_like = _dropped_fraction_ours(CoarseDropoutShuffleViews(size_sampling="monai", **kw), 200, seed=4)
    assert independent.mean() > monai_like.mean() + 0.1


def test_random_mode_picks_foreground_or_background_per_sample_half_the_time():
    aug = CoarseDropoutShuffleViews(mode="random", shuffle_prob=0.0, fill_value=SENTINEL, n_views=1)
    frac = _dropped_fraction_ours(aug, 400, seed=1)
    background_like = frac > 6 * 10**3 / V  # foreground mode can never drop more than this
    assert 0.4 < background_like.mean() < 0.6


def test_default_fill_is_uniform_noise_within_each_patchs_range():
    # binary patches (min 0, max 1): MONAI's default fill draws from [0, 1), so dropped voxels
    # are exactly the non-binary values
    x = (torch.rand(64, 1, 32, 32, 32) > 0.5).float() * 3.0 - 1.0  # values {-1, 2}
    views = CoarseDropoutShuffleViews(mode="background", shuffle_prob=0.0)(x, np.random.default_rng(0))
    filled = views[(views != -1.0) & (views != 2.0)]
    assert filled.numel() > 0.2 * views.numel()
    assert filled.min() >= -1.0 and filled.max() < 2.0
    assert abs(filled.mean().item() - 0.5) < 0.05  # uniform on [-1, 2)


def test_views_have_the_right_shape_leave_the_input_alone_and_differ_from_each_other():
    x = torch.randn(6, 2, 20, 18, 16)
    before = x.clone()
    views = CoarseDropoutShuffleViews()(x, np.random.default_rng(0))
    assert views.shape == (2, 6, 2, 20, 18, 16) and views.dtype == x.dtype
    assert torch.equal(x, before)
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[0], x)
    # 2D patches too
    assert CoarseDropoutShuffleViews()(torch.randn(3, 1, 24, 24), np.random.default_rng(0)).shape == (2, 3, 1, 24, 24)


def test_views_are_reproducible_from_the_numpy_generator():
    aug = CoarseDropoutShuffleViews()
    x = torch.randn(8, 1, 16, 16, 16)
    a = aug(x, np.random.default_rng(5))
    b = aug(x, np.random.default_rng(5))
    c = aug(x, np.random.default_rng(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_coarse_shuffle_permutes_voxels_inside_at_most_two_6cube_boxes_per_channel():
    aug = CoarseDropoutShuffleViews(shuffle_prob=1.0)
    base = torch.arange(V, dtype=torch.float32).view(1, 1, 32, 32, 32).repeat(200, 1, 1, 1, 1)
    x = torch.cat([base, base + V], dim=1)  # channel 1 = channel 0 + V
    g = torch.Generator().manual_seed(0)
    y = aug._coarse_shuffle(x, g)
    # a permutation of each patch's channel values
    assert torch.equal(y.flatten(2).sort(dim=-1).values, x.flatten(2))
    moved = (y != x).flatten(2).sum(-1)  # (N, C)
    assert moved.max() <= 2 * 6**3 and moved.float().mean() > 100
    # channels are shuffled independently
    assert not torch.equal(y[:, 1] - y[:, 0], torch.full_like(y[:, 0], float(V)))


def test_coarse_shuffle_probability_and_amount_match_monai():
    aug = CoarseDropoutShuffleViews(shuffle_prob=0.8)
    x = torch.arange(V, dtype=torch.float32).view(1, 1, 32, 32, 32).repeat(400, 1, 1, 1, 1)
    ours = (aug._coarse_shuffle(x, torch.Generator().manual_seed(1)) != x).flatten(1).sum(1).float().numpy()
    shuffle = aug.monai_transform().transforms[-1]
    shuffle.set_random_state(seed=1)
    ref = np.array([float((np.asarray(shuffle(x[0].clone())) != x[0].numpy()).sum()) for _ in range(400)])
    for moved in (ours, ref):
        assert 0.72 < (moved > 0).mean() < 0.88
    assert abs(ours[ours > 0].mean() - ref[ref > 0].mean()) < 0.1 * ref[ref > 0].mean()
