"""SimSiam with IoU-interval pairs: heads, optimiser (no decay on biases/norms, fixed predictor lr), logs, variants."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from medssl.methods import create_method, list_methods, make_config, method_info
from medssl.methods.simsiam import IOU_STUDY, SimSiam
from medssl.presets import build_run, preset
from medssl.sampling.iou_pairs import IOU_HIST_EDGES
from medssl.train import TrainConfig, fit, read_metrics
from tests.methods.test_shared_method_contract import TINY, _volumes

SMALL_HEADS = {"projector_dim": 16, "predictor_hidden_dim": 4}


def _tiny(**kw) -> SimSiam:
    torch.manual_seed(0)
    return create_method("simsiam", **{**TINY, **SMALL_HEADS, **kw})


def test_heads_follow_the_simsiam_paper():
    m = create_method("simsiam", backbone="smallcnn")  # default widths: 2048 and 512
    proj = [type(x).__name__ for x in m.projector.layers]
    assert proj == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    linears = [x for x in m.projector.layers if isinstance(x, nn.Linear)]
    assert [(x.in_features, x.out_features) for x in linears] == [(128, 2048), (2048, 2048), (2048, 2048)]
    assert m.projector.layers[-1].affine is False and m.projector.layers[1].affine is True
    pred = list(m.predictor.layers)
    assert [type(x).__name__ for x in pred] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert (pred[0].in_features, pred[0].out_features, pred[-1].out_features) == (2048, 512, 2048)
    assert pred[-1].bias is not None  # no BN on the output layer


def test_optimizer_is_sgd_with_lr_scaled_by_pairs_and_no_weight_decay_on_biases_and_norms():
    m = _tiny(backbone="swin-tiny")  # LayerNorms and biases in the backbone too
    cfg = TrainConfig(epochs=4, lr=0.025, weight_decay=1e-5)
    opt, _ = m.configure_optimizers(cfg)
    assert isinstance(opt, torch.optim.SGD) and all(g["momentum"] == 0.9 for g in opt.param_groups)
    pairs = TINY["volumes_per_batch"] * TINY["patches_per_volume"] // 2
    assert all(g["lr"] == pytest.approx(0.025 * pairs / 128) for g in opt.param_groups)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert len(decay_of) == sum(1 for p in m.parameters() if p.requires_grad)  # every parameter, once
    norms = (nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm)
    for mod_name, module in m.named_modules():
        for name, p in module.named_parameters(recurse=False):
            expected = 0.0 if isinstance(module, norms) or name == "bias" else 1e-5
            assert decay_of[id(p)] == expected, f"{mod_name}.{name}"
    assert any(isinstance(x, nn.LayerNorm) for x in m.backbone.modules())


def test_predictor_lr_stays_fixed_while_the_rest_follows_the_cosine():
    m = _tiny()
    epochs = 10
    opt, sched = m.configure_optimizers(TrainConfig(epochs=epochs, lr=0.05, weight_decay=1e-5))
    predictor = {id(p) for p in m.predictor.parameters()}
    lr0 = opt.param_groups[0]["lr"]
    assert not any(id(p) in predictor for p in opt.param_groups[0]["params"])  # the logged group is the encoder's
    final = m.config.final_lr_fraction
    for epoch in range(1, epochs + 1):
        opt.step()
        sched.step()
        cosine = lr0 * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * epoch / epochs)))
        for g in opt.param_groups:
            is_pred = all(id(p) in predictor for p in g["params"])
            assert g["lr"] == pytest.approx(lr0 if is_pred else cosine), (epoch, g["name"])
    assert opt.param_groups[0]["lr"] == pytest.approx(lr0 * final)


def test_training_step_logs_collapse_on_h_and_p_the_iou_histogram_and_the_fallback_rate():
    m = _tiny().train()
    batch = m.sample(_volumes(), np.random.default_rng(0))
    assert batch.extras["views"].shape == batch.patches.shape
    logs = m.training_step(batch).logs
    for key in ("loss", "collapse_h", "collapse_p", "view_cosine", "iou_mean", "fallback_rate"):
        assert key in logs and np.isfinite(logs[key]), key
    assert "collapse_z" not in logs  # blind in train mode (batch-standardised): only on validation
    hist = {k: v for k, v in logs.items() if k.startswith("iou_hist_")}
    assert len(hist) == len(IOU_HIST_EDGES) and sum(hist.values()) == pytest.approx(1.0)
    assert 0 <= logs["collapse_h"] <= 1 and 0 <= logs["collapse_p"] <= 1
    iou = batch.extras["pair_iou"].numpy()
    assert logs["iou_mean"] == pytest.approx(iou.mean())
    with torch.no_grad():
        val_logs = m.eval().training_step(batch).logs
    assert 0 <= val_logs["collapse_z"] <= 1


class _RankOne(nn.Module):
    """A backbone whose output is ``a_i * v``: one direction for every input, a positive scale per input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embed_dim, self.v = dim, nn.Parameter(torch.rand(dim) + 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1).mean(1, keepdim=True).abs() + 0.5) * self.v


def _warm(m: SimSiam, dim: int) -> None:
    """Running BatchNorm statistics from full-rank features, as after training on a healthy backbone."""
    with torch.no_grad():
        m.train()
        for _ in range(30):
            m.projector(torch.relu(torch.randn(64, dim)))


def test_a_rank_1_backbone_reads_as_collapsed_where_no_batchnorm_hides_it():
    """Issue 16: a rank-1 backbone read 0.04 (0.015 here) on z after the final BatchNorm, plotted as z's collapse."""
    m = _tiny(projector_dim=64, predictor_hidden_dim=16)
    dim = m.backbone.embed_dim
    batch = m.sample(_volumes(), np.random.default_rng(0))
    healthy_train = m.train().training_step(batch).logs
    m.backbone = _RankOne(dim)
    _warm(m, dim)
    collapsed_train = m.train().training_step(batch).logs
    assert collapsed_train["collapse_h"] == pytest.approx(1.0, abs=1e-6)  # the backbone's own output
    assert healthy_train["collapse_h"] < 0.7
    assert "collapse_z" not in collapsed_train  # z after its BatchNorm read ~0 here: the curve is gone
    from medssl.capacity import collapse_coefficient

    x = batch.extras["views"]
    h = m.backbone(x)
    after_bn = collapse_coefficient(m.projector(h).detach())
    before_bn = collapse_coefficient(m.projector.layers[:-1](h).detach())
    assert after_bn < 0.1 and before_bn < 0.6  # even before the final BN, the hidden BNs re-spread it in train mode


def test_validation_reads_z_before_the_final_batchnorm_and_sees_a_collapsed_last_layer():
    m = _tiny(projector_dim=64, predictor_hidden_dim=16)
    batch = m.sample(_volumes(), np.random.default_rng(0))
    _warm(m, m.backbone.embed_dim)
    with torch.no_grad():
        healthy = m.eval().training_step(batch).logs
        last = [x for x in m.projector.layers if isinstance(x, nn.Linear)][-1]
        last.weight.copy_(torch.rand(64, 1) @ torch.rand(1, last.in_features))  # rank 1, positive: one direction
        collapsed = m.eval().training_step(batch).logs
    assert collapsed["collapse_z"] == pytest.approx(1.0, abs=1e-4)  # read before the final BatchNorm
    assert healthy["collapse_z"] < 0.9


def test_collapse_logs_read_one_for_a_constant_output():
    from medssl.methods.simsiam import collapse_logs

    z = torch.ones(6, 8)
    logs = collapse_logs(z, z, z)
    assert logs == pytest.approx({"collapse_h": 1.0, "collapse_p": 1.0, "collapse_z": 1.0})
    assert "collapse_z" not in collapse_logs(z, z)


def test_patches_per_volume_counts_crops_and_must_be_even():
    with pytest.raises(ValueError, match="even"):
        create_method("simsiam", **{**TINY, "patches_per_volume": 3})
    m = _tiny()
    assert m.patches_per_step == 8 and m.pairs_per_step == 4 and m.views_per_patch == 1


def test_the_interval_study_variants_are_registered_with_their_intervals_and_demo_flags():
    assert set(IOU_STUDY) <= set(list_methods())
    for name, (lo, hi) in IOU_STUDY.items():
        cfg = make_config(name)
        assert (cfg.iou_min, cfg.iou_max) == (lo, hi)
        assert method_info(name)["family"] == "positive-pair selection"
        assert method_info(name)["in_demo"] == (name in ("simsiam", "simsiam-iou-0-1"))
    assert IOU_STUDY["simsiam"] == (0.3, 0.6) and IOU_STUDY["simsiam-iou-0-1"] == (0.0, 1.0)
    assert {"simsiam", "simsiam-iou-0-1"} <= set(list_methods(demo=True))


def test_demo_preset_uses_the_shared_budget_of_210_steps_of_192_patches_and_the_thesis_optimiser_settings():
    """Issue 16: SimSiam ran 168 steps against the others' 210."""
    for name in IOU_STUDY:  # the interval study's variants share the preset
        overrides, train = preset(name, "demo")
        m = create_method(name, **overrides)
        assert m.patches_per_step == 192 and m.pairs_per_step == 96
        assert train.epochs * train.steps_per_epoch == 210 == preset("isimed", "demo")[1].epochs * 7
        assert train.weight_decay == 1e-5 and m.config.foreground_only


def test_2d_simsiam_trains_on_axial_slices_and_embeds_2d_inputs():
    m = _tiny(spatial_dims=2).train()
    batch = m.sample(_volumes(), np.random.default_rng(1))
    assert batch.patches.shape == (8, 1, 16, 16)
    out = m.training_step(batch)
    out.loss.backward()
    assert m.input_size_vox == (16, 16, 1)
    vol = _volumes()[0]
    cut = m.cut_inputs(vol.data, np.array([[10, 10, 9], [8, 9, 5]]))
    assert cut.shape == (2, 1, 16, 16)
    np.testing.assert_array_equal(cut[0, 0], vol.data[0, 2:18, 2:18, 9])
    assert m.eval().embed(torch.from_numpy(cut)).shape == (2, m.embed_dim)


def test_a_short_fit_writes_collapse_iou_histogram_and_fallback_rate_to_metrics(tmp_path):
    model, train = build_run("simsiam-iou-0-1", "tiny", method_overrides={**TINY, **SMALL_HEADS},
                             train_overrides={"epochs": 2, "steps_per_epoch": 2, "log_every": 1})
    fit(model, _volumes(), train, tmp_path / "run", val_volumes=_volumes(2), progress=False)
    metrics = read_metrics(tmp_path / "run")
    train_rows = metrics[metrics["split"] == "train"]
    assert len(train_rows) == 4
    for col in ("collapse_h", "collapse_p", "fallback_rate", "iou_mean", "iou_hist_0", "iou_hist_0.9_1.0"):
        assert col in metrics and train_rows[col].notna().all(), col
    val_rows = metrics[metrics["split"] == "val"]
    assert (val_rows["effective_rank"] > 0).all() and val_rows["collapse_z"].between(0, 1).all()
    assert train_rows["collapse_z"].isna().all() if "collapse_z" in train_rows else True
    assert isinstance(metrics, pd.DataFrame)


def test_pretraining_summary_embeds_the_2d_variant_through_its_own_cut():
    from medssl.evaluate.summary import pretraining_summary

    table = pretraining_summary(_tiny(spatial_dims=2), _volumes(), n_per_volume=8)
    assert table.loc[0, "n_patches"] == 24 and table.loc[0, "effective_rank"] > 0
