"""ThesisViewAugment: the batched augmentations equal MONAI's transforms crop by crop, with the thesis's probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medssl.augment_thesis import ThesisViewAugment, ViewParams


def _crops(n: int, dims: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = np.stack(np.meshgrid(*[np.arange(size)] * dims, indexing="ij")).astype(np.float64)
    rng = np.random.default_rng(seed)
    out = [np.sin(g[0] / rng.uniform(2, 4)) + np.cos(g[1] / rng.uniform(2, 5) + g[-1] / 3.0) + 0.05 * g[0]
           + 0.1 * rng.normal(size=g.shape[1:]) for _ in range(n)]
    return torch.tensor(np.stack(out)[:, None], dtype=torch.float32)


@pytest.mark.parametrize("dims", [3, 2])
def test_batched_augmentations_equal_monais_deterministic_transforms_crop_by_crop(dims):
    aug = ThesisViewAugment(spatial_dims=dims, zoom_prob=0.9, flip_prob=0.5, rot90_prob=0.7, blur_prob=0.6,
                            noise_prob=0.5)
    x = _crops(40, dims)
    params = aug.draw(len(x), np.random.default_rng(3))
    assert (params.zoom > 1).any() and (params.zoom < 1).any() and params.flip.any() and params.noise.any()
    assert set(params.rot90_k.tolist()) == {0, 1, 2, 3} and (params.blur_sigma > 0).any()
    torch.testing.assert_close(aug.apply(x, params), aug.apply_monai(x, params), rtol=0, atol=1e-4)


def test_each_transform_alone_matches_monai_including_zoom_out_edges():
    aug = ThesisViewAugment(shift=0.1)  # the fine-tuning shift too, so it stays checked against MONAI
    x = _crops(6, 3, size=12)
    n = len(x)
    none = dict(zoom=np.ones(n), flip=np.zeros(n, bool), rot90_k=np.zeros(n, int), scale=np.zeros(n),
                shift=np.zeros(n), blur_sigma=np.zeros((n, 3)), noise=np.zeros(n, bool), noise_seed=1)
    cases = {
        "zoom": dict(zoom=np.array([0.8, 0.85, 0.93, 1.07, 1.13, 1.2])),
        "flip": dict(flip=np.ones(n, bool)),
        "rot90": dict(rot90_k=np.array([1, 2, 3, 1, 2, 3])),
        "intensity": dict(scale=np.linspace(-0.1, 0.1, n), shift=np.linspace(0.1, -0.1, n)),
        "blur": dict(blur_sigma=np.linspace(0.25, 1.5, 3 * n).reshape(n, 3)),
        "noise": dict(noise=np.ones(n, bool)),
    }
    for name, change in cases.items():
        p = ViewParams(**{**none, **change})
        out = aug.apply(x, p)
        torch.testing.assert_close(out, aug.apply_monai(x, p), rtol=0, atol=1e-4, msg=name)
        assert not torch.equal(out, x), name
    identity = aug.apply(x, ViewParams(**none))
    torch.testing.assert_close(identity, x)


def test_probabilities_and_ranges_are_the_thesis_values():
    aug = ThesisViewAugment()
    p = aug.draw(40_000, np.random.default_rng(0))
    tol = 0.015
    assert np.mean(p.zoom != 1) == pytest.approx(0.75, abs=tol)
    assert p.zoom.min() >= 0.8 and p.zoom.max() <= 1.2
    assert np.mean(p.flip) == pytest.approx(0.5, abs=tol)
    assert np.mean(p.rot90_k > 0) == pytest.approx(0.5, abs=tol)
    assert np.bincount(p.rot90_k[p.rot90_k > 0])[1:] / np.sum(p.rot90_k > 0) == pytest.approx([1 / 3] * 3, abs=tol)
    assert np.mean(p.scale != 0) == pytest.approx(0.75, abs=tol) and np.abs(p.scale).max() <= 0.1
    assert not p.shift.any()  # the thesis shifts intensities only when fine-tuning (sec. 4.5)
    blurred = p.blur_sigma.max(axis=1) > 0
    assert np.mean(blurred) == pytest.approx(0.25, abs=tol)
    assert p.blur_sigma[blurred].min() >= 0.25 and p.blur_sigma.max() <= 1.5
    assert np.mean(p.noise) == pytest.approx(0.25, abs=tol)
    noise = aug._noise((200_000,), 0)
    assert float(noise.std()) == pytest.approx(0.01, rel=0.02)


def test_pretraining_views_keep_every_crops_intensity_mean_up_to_the_scaling():
    """Without a shift, a constant crop stays constant times (1 + a): its sign and zero level never move."""
    aug = ThesisViewAugment(blur_prob=0.0, noise_prob=0.0)
    x = torch.zeros(300, 1, 8, 8, 8)
    x[150:] = 0.5
    out = aug(x, np.random.default_rng(1))
    assert torch.equal(out[:150], torch.zeros_like(out[:150]))  # a shift of up to 0.1 would move 3/4 of them
    ratio = out[150:].mean(dim=(1, 2, 3, 4)) / 0.5
    assert float(ratio.min()) >= 0.9 - 1e-6 and float(ratio.max()) <= 1.1 + 1e-6
    shifted = ThesisViewAugment(shift=0.1, blur_prob=0.0, noise_prob=0.0)(x, np.random.default_rng(1))
    assert (shifted[:150].abs().amax(dim=(1, 2, 3, 4)) > 0).float().mean() == pytest.approx(0.75, abs=0.1)


def test_same_rng_state_gives_the_same_views_and_the_input_is_unchanged():
    aug = ThesisViewAugment()
    x = _crops(12, 3)
    before = x.clone()
    a, b = aug(x, np.random.default_rng(5)), aug(x, np.random.default_rng(5))
    c = aug(x, np.random.default_rng(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(x, before) and a.dtype == torch.float32 and a.shape == x.shape


def test_the_random_monai_pipeline_lists_the_thesis_pretraining_transforms_without_an_intensity_shift():
    names = [type(t).__name__ for t in ThesisViewAugment().monai_transform().transforms]
    assert names == ["RandZoom", "RandFlip", "RandRotate90", "RandScaleIntensity", "RandGaussianSmooth",
                     "RandGaussianNoise"]
    with_shift = [type(t).__name__ for t in ThesisViewAugment(shift=0.1).monai_transform().transforms]
    assert with_shift[4] == "RandShiftIntensity" and len(with_shift) == 7
    out = ThesisViewAugment().monai_transform()(_crops(1, 3)[0])
    assert tuple(out.shape) == (1, 16, 16, 16)


def test_bad_input_is_named():
    aug = ThesisViewAugment()
    with pytest.raises(ValueError, match="square in x and y"):
        aug(torch.zeros(2, 1, 8, 6, 8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="3 spatial dims"):
        aug(torch.zeros(2, 1, 8, 8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="zoom_prob"):
        ThesisViewAugment(zoom_prob=1.5)


@pytest.mark.parametrize("size", [(32, 32, 32), (20, 24, 28), (30, 26)])
def test_the_separable_zoom_grid_equals_affine_grid_then_the_clip(size):
    import torch.nn.functional as F

    from medssl.augment_thesis import _separable_grid

    rng, d, n = np.random.default_rng(0), len(size), 7
    theta, bound = np.zeros((n, d, d + 1)), rng.uniform(0.5, 1.0, (n, d))
    for k in range(n):
        theta[k, :, :-1] = np.diag(rng.uniform(0.6, 1.5, d))
        theta[k, :, -1] = rng.uniform(-0.3, 0.3, d)
    grid = F.affine_grid(torch.from_numpy(theta).float(), [n, 1, *size], align_corners=False)
    b = torch.from_numpy(bound).float().view(n, *([1] * d), d)
    expected = torch.maximum(torch.minimum(grid, b), -b)
    torch.testing.assert_close(_separable_grid(theta, bound, size, torch.float32), expected, atol=3e-7, rtol=0)
