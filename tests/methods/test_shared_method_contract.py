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
from medssl.methods import MethodConfig, create_method, get_method_class, list_methods, make_config
from medssl.methods.base import Method
from medssl.presets import PRESETS, list_presets, preset
from medssl.sampling.base import PatchBatch
from tests.helpers import oblique_affine

# MethodConfig's defaults: the ISImed paper's (DenseNet121, 32^3, 16 patches x 64 volumes); a method's Config
# keeps them unless its paper fixes another value, which the presets then leave alone (below).
COMMON_FIELDS = {
    "backbone": "densenet121",
    "patch_size_vox": 32,
    "volumes_per_batch": 64,
    "patches_per_volume": 16,
    "in_channels": 1,
    "foreground_only": False,
    "embed_dim": None,
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


def test_the_common_defaults_are_the_isimed_papers():
    assert {f.name: f.default for f in fields(MethodConfig)} == COMMON_FIELDS


@pytest.mark.parametrize("name", METHODS)
def test_config_is_frozen_with_the_common_fields(name):
    cfg = get_method_class(name).Config()
    assert {f.name for f in fields(MethodConfig)} <= {f.name for f in fields(cfg)}
    with pytest.raises(FrozenInstanceError):
        cfg.patch_size_vox = 8  # type: ignore[misc]


@pytest.mark.parametrize("preset_name", [p for p in list_presets() if not PRESETS[p].get("for_every_method")])
@pytest.mark.parametrize("name", METHODS)
def test_a_shared_preset_never_overwrites_a_methods_own_default(name, preset_name):
    """A shared preset value applies where the method keeps the common default; where its class (its paper) says
    otherwise, the class's value stands unless the method's own preset names the field."""
    own = get_method_class(name).presets.get(preset_name, {}).get("method", {})
    defaults = asdict(make_config(name))
    config = asdict(make_config(name, **preset(name, preset_name)[0]))
    common = {f.name: f.default for f in fields(MethodConfig)}
    for key, shared in PRESETS[preset_name]["method"].items():
        if key in own:
            expected = own[key]
        elif defaults[key] != common[key]:
            expected = defaults[key]
        else:
            expected = shared
        assert config[key] == expected, (name, preset_name, key)


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


@pytest.mark.network
@pytest.mark.parametrize("name", METHODS)
def test_the_10_pretrain_steps_at_the_tiny_preset_train_validate_summarise_and_reload_the_method(
        name, tmp_path, notebook_data_dir, monkeypatch):
    """What ``10_pretrain.ipynb`` does, without a kernel (its notebook test runs one method through papermill):
    :class:`medssl.pretraining.Pretraining` at the ``tiny`` preset on the demo cohort (opened for the method's
    input size), trained with validation, its training figures, validation summary and checkpoint, for every
    registered method and variant."""
    import matplotlib.pyplot as plt

    from medssl.methods import method_info
    from medssl.pretraining import Pretraining
    from medssl.train import load_method, read_metrics

    monkeypatch.setenv("MEDSSL_DATA", str(notebook_data_dir))
    monkeypatch.delenv("MEDSSL_CACHE", raising=False)
    info = method_info(name)
    job = Pretraining(tmp_path / "run", name, "tiny", {"n_subjects": 4, "target_spacing_mm": 6.0},
                      train_overrides={"epochs": 1, "steps_per_epoch": 2}, progress=False)  # 2 epochs: 10's test
    model = job.model
    result = job.run(keep_figures=True)
    out = result.method_dir
    assert out == tmp_path / "run" / name
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["method"] == name and config["base_method"] == info["base"]
    assert config["train"]["epochs"] == 1 and config["resolved"]["steps_per_epoch"] == 2
    metrics = read_metrics(out)
    train, val = metrics[metrics["split"] == "train"], metrics[metrics["split"] == "val"]
    if info["trains"]:  # 2 steps, each logged; validated before training and after the epoch
        assert list(train["step"]) == [1, 2] and list(val["step"]) == [0, 2]
    else:  # an untrained baseline logs its validation step only
        assert train.empty and list(val["step"]) == [0]
    assert metrics["loss"].notna().all() and np.isfinite(metrics["loss"].to_numpy(float)).all()
    measure = info["val_measure"][0]  # what early stopping and the sweep read
    assert np.isfinite(val[measure].to_numpy(float)).all(), (name, measure)

    iou_pairs = info["base"] == "simsiam"  # SimSiam and its IoU-interval variants log collapse and realised IoU
    figures = result.figures
    titles = [title for title, _ in figures]
    assert titles == ["Loss curves", *(["Collapse coefficient"] if iou_pairs else []), "Effective rank (val)",
                      *(["Realised IoU and fallback rate"] if iou_pairs else [])], titles
    for _, fig in figures:
        plt.close(fig)

    assert [p.name for p in result.figure_files][0] == "loss_curves.png" and all(p.is_file() for p in result.figure_files)
    summary = result.summary.iloc[0]
    assert summary["method"] == name and summary["n_volumes"] == len(job.data.volumes("val")) and summary["n_patches"] > 0
    assert -1 <= summary["spearman"] <= 1 and summary["effective_rank"] >= 1
    metric = type(model).metric_latent is not Method.metric_latent  # ISImed's mm latent: errors in mm
    assert np.isfinite(summary["abs_err_median_mm"]) == metric, name

    loaded = load_method(out / "checkpoints" / "last.pt")
    assert loaded.registry_name == name and loaded.config == model.config
    # the checkpoint says how open_data prepared the training volumes (issue 21): 6 mm, cut for this method
    assert loaded.preprocessing["config"]["target_spacing_mm"] == [6.0, 6.0, 6.0]
    assert loaded.preprocessing["patch_size_vox"] == list(model.patch_size_vox)
    assert list(out.glob("events.out.tfevents.*"))  # live curves for TensorBoard beside metrics.jsonl
