"""IsimedDistanceLoss against its definition: strict upper triangle, within-volume pairs, mm scale."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medssl.losses import isimed as isimed_module
from medssl.losses.isimed import IsimedDistanceLoss


def _batch(n_per_volume=(4, 3), seed=0, d=8):
    g = torch.Generator().manual_seed(seed)
    n = sum(n_per_volume)
    centres_mm = torch.rand(n, 3, generator=g, dtype=torch.float64).float() * torch.tensor([300.0, 200.0, 150.0])
    volume_index = torch.cat([torch.full((k,), v) for v, k in enumerate(n_per_volume)])
    embeddings = torch.randn(n, d, generator=g) * 50
    return embeddings, centres_mm, volume_index


def _reference_loss(e, c, v, s_mm=1.0, within=True, rho=lambda r: r * r):
    """Explicit double loop over i < j, written from the definition."""
    total, count = 0.0, 0
    n = e.shape[0]
    for i in range(n):
        for j in range(i + 1, n):
            if within and v[i] != v[j]:
                continue
            lat = s_mm * math.sqrt(sum((float(e[i, k]) - float(e[j, k])) ** 2 for k in range(e.shape[1])))
            phys = math.sqrt(sum((float(c[i, k]) - float(c[j, k])) ** 2 for k in range(3)))
            total += rho(lat - phys)
            count += 1
    return total / count


@pytest.mark.parametrize("scale_mm", [1.0, 2.5])
def test_isimed_loss_is_zero_when_latent_distances_equal_mm_distances(scale_mm):
    _, c, v = _batch()
    # embeddings = centres / s padded with zeros: ||e_i - e_j|| * s == ||c_i - c_j||
    e = torch.cat([c / scale_mm, torch.zeros(c.shape[0], 5)], dim=1)
    loss_fn = IsimedDistanceLoss(scale_mm=scale_mm)
    assert loss_fn(e, c, v).item() == pytest.approx(0.0, abs=1e-6)
    assert loss_fn.latent_distance_scale_mm == pytest.approx(scale_mm)
    moved = e.clone()
    moved[0, 0] += 3.0
    assert loss_fn(moved, c, v).item() > 1.0


@pytest.mark.parametrize("within", [True, False])
def test_isimed_loss_equals_explicit_double_loop_over_strict_upper_triangle(within):
    e, c, v = _batch(seed=1)
    loss_fn = IsimedDistanceLoss(pairs="within_volume" if within else "all", scale_mm=1.7)
    expected = _reference_loss(e, c, v, s_mm=1.7, within=within)
    assert loss_fn(e, c, v).item() == pytest.approx(expected, rel=1e-5)


def test_within_volume_loss_ignores_cross_volume_pairs():
    e, c, v = _batch(n_per_volume=(3, 3), seed=2)
    loss_fn = IsimedDistanceLoss()
    before = loss_fn(e, c, v)
    # moving a whole volume rigidly (embeddings and centres) changes only cross-volume distances
    e2, c2 = e.clone(), c.clone()
    e2[v == 1] += 1000.0
    c2[v == 1] += torch.tensor([500.0, -80.0, 30.0])
    assert loss_fn(e2, c2, v).item() == pytest.approx(before.item(), rel=1e-5)
    # ... while the all-pairs loss sees the change
    all_pairs = IsimedDistanceLoss(pairs="all")
    assert all_pairs(e2, c2, v).item() != pytest.approx(all_pairs(e, c, v).item(), rel=1e-3)


def test_huber_variant_matches_torch_huber_loss_on_the_same_pairs():
    e, c, v = _batch(seed=3)
    loss_fn = IsimedDistanceLoss(loss="huber", huber_delta_mm=7.0)
    i, j = torch.triu_indices(len(v), len(v), offset=1)
    keep = v[i] == v[j]
    i, j = i[keep], j[keep]
    lat = (e[i] - e[j]).norm(dim=1)
    phys = (c[i] - c[j]).norm(dim=1)
    expected = F.huber_loss(lat, phys, delta=7.0)
    assert loss_fn(e, c, v).item() == pytest.approx(expected.item(), rel=1e-5)
    # and Huber really is different from MSE here (residuals exceed delta)
    assert IsimedDistanceLoss()(e, c, v).item() > 2 * expected.item()


def test_coincident_embeddings_give_finite_gradients():
    _, c, v = _batch(n_per_volume=(2,))
    e = torch.ones(2, 4, requires_grad=True)
    loss = IsimedDistanceLoss()(e, c, v)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(e.grad).all()
    # the learned scale path too
    e2 = torch.zeros(2, 4, requires_grad=True)
    loss_fn = IsimedDistanceLoss(scale="learned")
    loss_fn(e2, c, v).backward()
    assert torch.isfinite(e2.grad).all() and torch.isfinite(loss_fn.log_scale_mm.grad)


def test_gram_path_for_large_batches_matches_direct_differences(monkeypatch):
    e, c, v = _batch(n_per_volume=(5, 6), seed=4, d=16)
    e = e + 1e3  # far from the origin: the Gram path must centre to stay accurate
    direct = IsimedDistanceLoss(pairs="all")(e, c, v)
    monkeypatch.setattr(isimed_module, "_DIRECT_MAX_ELEMENTS", 0)
    gram = IsimedDistanceLoss(pairs="all")(e, c, v)
    assert gram.item() == pytest.approx(direct.item(), rel=1e-4)


def test_learned_scale_is_a_parameter_that_receives_gradient():
    e, c, v = _batch(seed=5)
    loss_fn = IsimedDistanceLoss(scale="learned", scale_mm=3.0)
    assert any(p is loss_fn.log_scale_mm for p in loss_fn.parameters())
    loss_fn(e, c, v).backward()
    assert loss_fn.log_scale_mm.grad.abs().item() > 0
    assert list(IsimedDistanceLoss().parameters()) == []


@pytest.mark.parametrize(
    "kwargs, args, message",
    [
        ({}, (torch.zeros(4), torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)), "embeddings must be (N, D)"),
        ({}, (torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)), "centres_mm must be (N, 3)"),
        ({}, (torch.zeros(4, 2), torch.zeros(4, 3), torch.zeros(3, dtype=torch.long)), "volume_index must be (N,)"),
        ({}, (torch.zeros(2, 2), torch.zeros(2, 3), torch.tensor([0, 1])), "found no pair of patches"),
    ],
)
def test_isimed_loss_rejects_bad_inputs_with_clear_errors(kwargs, args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        IsimedDistanceLoss(**kwargs)(*args)


@pytest.mark.parametrize("kwargs", [{"loss": "l1"}, {"pairs": "cross"}, {"scale": "auto"}, {"scale_mm": 0.0}])
def test_isimed_loss_rejects_unknown_options(kwargs):
    with pytest.raises(ValueError):
        IsimedDistanceLoss(**kwargs)


def test_cross_volume_pairs_are_refused_for_subjects_that_do_not_share_a_world_frame():
    import numpy as np

    from medssl.data.volume import Volume
    from medssl.methods import create_method

    def vol(k, frame):
        data = np.random.default_rng(k).normal(size=(1, 20, 20, 20)).astype(np.float32)
        body = np.ones((20, 20, 20), np.uint8)
        return Volume(data, np.eye(4), f"c{k}", aux={"body": body}, meta={"frame": frame})

    tiny = dict(backbone="smallcnn", patch_size_vox=8, volumes_per_batch=2, patches_per_volume=3)
    for name in ("isimed", "regisimed"):
        all_pairs = create_method(name, pairs="all", **tiny)
        with pytest.raises(ValueError, match="registered cohort"):
            all_pairs.sample([vol(0, "own:c0"), vol(1, "own:c1")], np.random.default_rng(0))
        all_pairs.sample([vol(0, "shared:demo"), vol(1, "shared:demo")], np.random.default_rng(0))  # registered: fine
        create_method(name, **tiny).sample([vol(0, "own:c0"), vol(1, "own:c1")], np.random.default_rng(0))
