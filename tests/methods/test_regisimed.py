"""regISImed: head widths D/2 and 2D, the lambda weighting of the BarlowTwins term, shared centres of both views."""

from __future__ import annotations

import numpy as np
import torch

from medssl.augment import CoarseDropoutShuffleViews
from medssl.losses.barlow_twins import BarlowTwinsLoss
from medssl.methods import create_method
from tests.methods.test_shared_method_contract import TINY, _volumes


def _tiny(**kw):
    torch.manual_seed(0)
    return create_method("regisimed", **{**TINY, **kw})


def test_heads_are_linear_d_over_2_for_isimed_and_2d_for_barlowtwins():
    m = _tiny()
    d = m.backbone.embed_dim
    assert (m.isimed_head.in_features, m.isimed_head.out_features) == (d, d // 2)
    assert (m.barlow_head.in_features, m.barlow_head.out_features) == (d, 2 * d)
    assert m.views_per_patch == 2


def test_loss_is_isimed_on_both_views_plus_lambda_times_barlowtwins_over_the_head_width():
    m = _tiny().train()
    batch = m.sample(_volumes(), np.random.default_rng(0))
    out = m.training_step(batch)
    # recompute from the formula with the method's own parts
    views = batch.extras["views"]
    h = m.backbone(views.flatten(0, 1))
    h_a, h_b = h[: views.shape[1]], h[views.shape[1] :]
    c, v = batch.centres_mm, batch.volume_index
    iso = 0.5 * sum(m.isimed_loss(m.isimed_head(x), c, v) for x in (h_a, h_b))  # SAME centres for both views
    bt = BarlowTwinsLoss(lambda_offdiag=m.config.lambda_offdiag)(m.barlow_head(h_a), m.barlow_head(h_b))
    expected = iso + 1e3 * bt / m.barlow_head.out_features
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    assert out.logs["isimed_loss"] == pytest_approx(float(iso)) and out.logs["barlow_loss"] == pytest_approx(float(bt))
    # with the centres of view b scrambled, the ISImed term changes: the logged loss used shared centres
    perm = torch.randperm(len(c), generator=torch.Generator().manual_seed(1))
    scrambled = 0.5 * (m.isimed_loss(m.isimed_head(h_a), c, v) + m.isimed_loss(m.isimed_head(h_b), c[perm], v))
    assert abs(float(scrambled) - float(iso)) > 1e-3


def test_both_views_are_augmentations_of_the_same_patches():
    m = _tiny(view_mode="foreground", shuffle_prob=0.0)
    m.views = CoarseDropoutShuffleViews(mode="foreground", holes=6, fg_hole_size=(3, 10), bg_keep_size=(3, 21),
                                        shuffle_prob=0.0, shuffle_holes=2, shuffle_size=6, fill_value=-7.0)
    batch = m.sample(_volumes(), np.random.default_rng(3))
    for view in batch.extras["views"]:
        same = (view == batch.patches) | (view == -7.0)  # every voxel is the patch's own, or a dropped hole
        assert bool(same.all())
        assert float((view == batch.patches).float().mean()) > 0.3


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-5, abs=1e-6)
