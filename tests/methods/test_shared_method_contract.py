"""Every registered method honours the Method contract (runs over ``list_methods()``).

Each method is built with a tiny SmallCNN config (16^3 patches, 2 volumes x 4 patches)
and tiny in-memory volumes on oblique, anisotropic grids.
"""

from __future__ import annotations

import json
import math
from dataclasses import FrozenInstanceError, asdict, fields

import numpy as np
import pytest
import torch

from medssl.data.volume import Volume
from medssl.methods import create_method, get_method_class, list_methods, make_config
from medssl.methods.base import Method
from medssl.sampling.base import PatchBatch
from tests.helpers import oblique_affine

COMMON_FIELDS = {
    "backbone": "densenet121",
    "patch_size_vox": 32,
    "volumes_per_batch": 64,
    "patches_per_volume": 16,
    "in_channels": 1,
    "foreground_only": False,
    "embed_dim": None,
}
# Methods whose paper fixes other defaults for some common fields (Blendowski et al.: Table 1's networks,
# 42 x 42 planar / 25^3 patches, batch 8 as one anchor from each of 8 volumes, anchors on the body).
_CONTEXT = {"volumes_per_batch": 8, "patches_per_volume": 1, "foreground_only": True}
PAPER_DEFAULTS = {
    "reg2d": {**_CONTEXT, "backbone": "d2d", "patch_size_vox": 42},
    "heatmap": {**_CONTEXT, "backbone": "d2d", "patch_size_vox": 42},
    "xavier": {**_CONTEXT, "backbone": "d2d", "patch_size_vox": 42},
    "doersch": {**_CONTEXT, "backbone": "d3d", "patch_size_vox": 25},
    "gvdiff": {**_CONTEXT, "backbone": "gvdiff", "patch_size_vox": 42},
}
TINY = {"backbone": "smallcnn", "patch_size_vox": 16, "volumes_per_batch": 2, "patches_per_volume": 4}
TINY_OVERRIDES = {"gvdiff": {"backbone": "gvdiff"}}  # a handcrafted descriptor has no network to swap

METHODS = list_methods()


def _volumes(n: int = 3) -> list[Volume]:
    rng = np.random.default_rng(123)
    vols = []
    for k in range(n):
        shape = (22 + k, 20, 18)
        ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
        # smooth structure plus noise, so patches differ by position
        data = np.sin(ijk[0] / 3.0) + np.cos(ijk[1] / 4.0) * ijk[2] / 18.0 + 0.1 * rng.normal(size=shape)
        affine = oblique_affine((0.8, 1.5, 3.5), (25.0, 10.0, -15.0), (10.0 * k, -5.0, 3.0))
        vols.append(Volume(data=data[None].astype(np.float32), affine=affine, case_id=f"case{k}"))
    return vols


def _tiny_config(name: str) -> dict:
    return {**TINY, **TINY_OVERRIDES.get(name, {})}


def _tiny(name: str):
    torch.manual_seed(0)
    return create_method(name, **_tiny_config(name))


def _first_conv(module: torch.nn.Module) -> torch.nn.Module:
    return next(m for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))


def test_the_four_isimed_paper_methods_are_registered():
    assert {"isimed", "regisimed", "simclr", "barlowtwins"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_config_is_frozen_with_the_common_fields_and_paper_defaults(name):
    cfg = get_method_class(name).Config()
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    for key, default in {**COMMON_FIELDS, **PAPER_DEFAULTS.get(name, {})}.items():
        assert values[key] == default, f"{name}.Config.{key}"
    with pytest.raises(FrozenInstanceError):
        cfg.patch_size_vox = 8  # type: ignore[misc]


@pytest.mark.parametrize("name", METHODS)
def test_config_round_trips_through_asdict_and_json(name):
    cfg = make_config(name, **_tiny_config(name))
    restored = make_config(name, **json.loads(json.dumps(asdict(cfg))))
    assert restored == cfg


@pytest.mark.parametrize("name", list_methods(trains=True))
def test_one_cpu_training_step_gives_a_finite_loss_and_gradients_reach_the_backbone(name):
    method = _tiny(name).train()
    batch = method.sample(_volumes(), np.random.default_rng(0))
    assert isinstance(batch, PatchBatch) and len(batch) == 2 * 4
    out = method.training_step(batch)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.logs and all(isinstance(v, float) and np.isfinite(v) for v in out.logs.values())
    out.loss.backward()
    grad = _first_conv(method.backbone).weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", list_methods(trains=False))
def test_an_untrained_baseline_step_logs_finite_values_and_a_zero_loss(name):
    method = _tiny(name).train()
    batch = method.sample(_volumes(), np.random.default_rng(0))
    assert isinstance(batch, PatchBatch) and len(batch) == 2 * 4
    out = method.training_step(batch)  # fit runs it on the validation batch only
    assert out.loss.ndim == 0 and float(out.loss) == 0.0
    assert out.logs and all(isinstance(v, float) and np.isfinite(v) for v in out.logs.values())


@pytest.mark.parametrize("name", list_methods(trains=True))
def test_one_training_step_and_embed_work_with_the_swin_backbone(name):
    # the SwinUNETR encoder (a CPU-sized one) behind the same interface, for every method
    torch.manual_seed(0)
    method = create_method(name, **{**TINY, "backbone": "swin-tiny"}).train()
    out = method.training_step(method.sample(_volumes(), np.random.default_rng(0)))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.backbone.parameters())
    x = torch.from_numpy(method.cut_inputs(_volumes()[0].data, np.array([[10, 10, 9]])))
    assert method.eval().embed(x).shape == (1, method.embed_dim)



@pytest.mark.parametrize("name", METHODS)
def test_embed_takes_what_cut_inputs_cuts_and_returns_batch_by_embed_dim(name):
    method = _tiny(name).eval()
    vol = _volumes(1)[0]
    centres = np.array([[0, 0, 0], [5, 6, 7], [10, 10, 9], [21, 19, 17], [3, 15, 2]])  # corners reach outside
    x = torch.from_numpy(np.asarray(method.cut_inputs(vol.data, centres), dtype=np.float32))
    e = method.embed(x)
    assert e.shape == (5, method.embed_dim) and torch.isfinite(e).all()
    assert method.embed_dim == method.backbone.embed_dim
    assert len(method.input_size_vox) == 3


@pytest.mark.parametrize("name", METHODS)
def test_sample_is_reproducible_for_the_same_rng_seed(name):
    method = _tiny(name)
    vols = _volumes()
    a = method.sample(vols, np.random.default_rng(7))
    b = method.sample(vols, np.random.default_rng(7))
    c = method.sample(vols, np.random.default_rng(8))
    for field in ("patches", "centres_mm", "boxes_vox", "volume_index"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.case_ids == b.case_ids
    assert a.extras.keys() == b.extras.keys()
    for key in a.extras:
        assert torch.equal(a.extras[key], b.extras[key]), key
    assert not torch.equal(a.boxes_vox, c.boxes_vox)


@pytest.mark.parametrize("name", METHODS)
def test_a_checkpoint_rebuilds_the_method_with_equal_weights_eval_embeddings_and_metric_latent(name, tmp_path):
    """fit writes last.pt (one step for a method that trains, the initial state for a baseline); load_method
    rebuilds it in eval mode: same class, config and registry name, every tensor of the state dict equal, and
    the same eval-mode embeddings and metric latent (``None``, or ``(latent (B, D'), mm per unit)``)."""
    from medssl.train import TrainConfig, fit, load_method

    method = _tiny(name)
    config = TrainConfig(epochs=1, steps_per_epoch=1, lr=1e-2, device="cpu", precision="fp32", log_every=1)
    result = fit(method, _volumes(), config, tmp_path, progress=False, tensorboard=False)
    torch.manual_seed(999)  # a rebuild that kept its fresh initialisation would differ from the trained weights
    loaded = load_method(result.checkpoint_path)
    assert type(loaded) is type(method) and loaded.config == method.config and loaded.registry_name == name
    assert not loaded.training and all(not m.training for m in loaded.modules())
    want, got = method.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), f"{name}: {key} differs after the round trip"
    if method.trains:  # the check can tell: the trained weights are not those of a fresh initialisation
        fresh = _tiny(name).state_dict()
        assert any(not torch.equal(fresh[k], v) for k, v in want.items() if v.is_floating_point()), name

    centres = np.array([[5, 6, 7], [10, 10, 9], [15, 12, 4], [11, 3, 14]])
    x = torch.from_numpy(np.asarray(method.cut_inputs(_volumes(1)[0].data, centres), dtype=np.float32))
    method.eval()
    e_want, e_got = method.embed(x), loaded.embed(x)
    torch.testing.assert_close(e_got, e_want, rtol=0, atol=0)
    m_want, m_got = method.metric_latent(e_want), loaded.metric_latent(e_got)
    overrides = type(method).metric_latent is not Method.metric_latent
    assert (m_want is None) == (m_got is None) == (not overrides), name  # None exactly when not overridden
    if m_want is not None:
        (latent, scale_mm), (latent_got, scale_got) = m_want, m_got
        assert latent.shape[0] == len(centres) and latent.ndim == 2 and torch.isfinite(latent).all()
        assert isinstance(scale_mm, float) and math.isfinite(scale_mm) and scale_mm > 0 and scale_got == scale_mm
        torch.testing.assert_close(latent_got, latent, rtol=0, atol=0)


@pytest.mark.parametrize("name", list_methods(trains=True))
def test_configure_optimizers_holds_every_trainable_parameter_once_and_its_step_moves_the_backbone(name):
    from medssl.train import TrainConfig

    method = _tiny(name).train()
    optimizer, scheduler = method.configure_optimizers(TrainConfig(lr=1e-3, epochs=4))
    ids = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(ids) == len(set(ids)), f"{name}: a parameter is in two groups"
    assert set(ids) == {id(p) for p in method.parameters() if p.requires_grad}, f"{name}: parameters left out or frozen"
    assert all(math.isfinite(g["lr"]) and g["lr"] > 0 for g in optimizer.param_groups)
    first = _first_conv(method.backbone).weight
    before = first.detach().clone()
    out = method.training_step(method.sample(_volumes(), np.random.default_rng(0)))
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    assert not torch.equal(first.detach(), before), f"{name}: the optimiser step left the backbone unchanged"
    lrs = [g["lr"] for g in optimizer.param_groups]
    scheduler.step()  # once per epoch: a schedule, never a growing or broken lr
    assert all(math.isfinite(g["lr"]) and 0 <= g["lr"] <= lr for g, lr in zip(optimizer.param_groups, lrs))
