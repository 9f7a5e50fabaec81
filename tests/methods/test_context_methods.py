"""The context-prediction methods: curriculum progress, resume, validation measures, baselines, evaluation inputs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from medssl.evaluate.dense import dense_embeddings
from medssl.evaluate.summary import pretraining_summary
from medssl.methods import create_method, make_config, method_info
from medssl.presets import build_run, preset
from medssl.sampling.context import triplanar_patches
from medssl.train import TrainConfig, fit, load_checkpoint, load_method, read_metrics
from tests.helpers import coordinate_volume, oblique_affine

AFFINE = oblique_affine((1.0, 1.2, 2.0), (20.0, -10.0, 5.0), (4.0, 2.0, -7.0))
# Tiny 2.5D methods: 2D SmallCNN on 16 x 16 planar patches (the D2D-CNN needs 42).
PLANAR_TINY = {"backbone": "smallcnn", "patch_size_vox": 16, "volumes_per_batch": 2, "patches_per_volume": 3,
               "curriculum_steps": 4}
TINY_CFG = TrainConfig(epochs=2, steps_per_epoch=2, lr=1e-3, seed=3, device="cpu", precision="fp32", log_every=1,
                       keep_last=None)


def _volumes(n: int, seed: int = 0, shape=(22, 20, 16)) -> list:
    rng = np.random.default_rng(seed)
    vols = []
    for k in range(n):
        v = coordinate_volume(f"v{seed}-{k}", shape, AFFINE, channels="x")
        data = np.sin(v.data / 7.0) + 0.1 * rng.normal(size=v.data.shape).astype(np.float32)
        vols.append(v.with_(data=data.astype(np.float32)))
    return vols


def _planar(name: str = "reg2d", **overrides):
    torch.manual_seed(0)
    return create_method(name, **{**PLANAR_TINY, **overrides})


def test_registry_lists_the_five_with_their_families_and_which_train():
    info = {n: method_info(n) for n in ("reg2d", "heatmap", "doersch", "xavier", "gvdiff")}
    assert {n: i["family"] for n, i in info.items()} == {
        "reg2d": "context prediction", "heatmap": "context prediction", "doersch": "context prediction",
        "xavier": "untrained baseline", "gvdiff": "untrained baseline"}
    assert {n for n, i in info.items() if not i["trains"]} == {"xavier", "gvdiff"}
    assert all(i["in_demo"] for i in info.values())


def test_paper_presets_use_adam_at_5e_5_batch_8_and_the_table_1_networks():
    for name, backbone in (("reg2d", "d2d"), ("heatmap", "d2d"), ("doersch", "d3d")):
        overrides, cfg = preset(name, "paper")
        method = create_method(name, **overrides)  # the paper's networks and batch are the Config's defaults
        assert method.config.backbone == backbone and cfg.lr == 5e-5
        assert method.config.volumes_per_batch * method.config.patches_per_volume == 8  # batch 8 (anchors or pairs)
        assert method.patches_per_step == (48 if name != "doersch" else 16)  # distinct patches: planes or cubes
        optimizer, scheduler = method.configure_optimizers(cfg)
        assert type(optimizer) is torch.optim.Adam and optimizer.param_groups[0]["weight_decay"] == 0
        for _ in range(3):
            optimizer.step()
            scheduler.step()
        assert optimizer.param_groups[0]["lr"] == 5e-5  # constant: the paper states no schedule
    assert make_config("reg2d", **preset("reg2d", "paper")[0]).curriculum_steps == 800_000 == \
        preset("reg2d", "paper")[1].epochs * 1000


TASK_FIELDS = ("patch_size_vox", "n_slices", "normal_gap_hw", "offset_start", "offset_end", "foreground_only")


def test_the_paper_and_demo_presets_train_the_papers_task_and_offsets_reach_1_75_half_widths():
    """Issue 16: PlanarContextConfig rejected offsets above 1 half-width, so not even `paper` had the paper's range."""
    vol = coordinate_volume("big", (96, 90, 84), AFFINE, channels="x")
    for name in ("reg2d", "heatmap"):
        configs = {p: create_method(name, **preset(name, p)[0]).config for p in ("paper", "demo")}
        for config in configs.values():
            assert (config.offset_start, config.offset_end) == ((0.625, 0.75), (0.0, 1.75))  # the paper's x 2.5
            assert config.normal_gap_hw == (0.3125, 0.625) and config.patch_size_vox == 42
        assert {f: getattr(configs["paper"], f) for f in TASK_FIELDS} == {f: getattr(configs["demo"], f) for f in TASK_FIELDS}
        method = create_method(name, **preset(name, "paper")[0]).eval()  # eval mode: the end of the curriculum
        offsets = torch.cat([method.sample([vol], np.random.default_rng(k)).extras["offsets"] for k in range(40)]).abs()
        assert float(offsets.max()) >= 1.7 and float(offsets.max()) <= 1.75 + 1 / 42  # 36-37 voxels of 21
    with pytest.raises(ValueError, match="heatmap's extent"):
        create_method("reg2d", offset_end=(0.0, 2.6))
    create_method("reg2d", offset_end=(0.0, 2.5))  # the heatmap's border is allowed


def _record_progress(method) -> list[float]:
    """Wrap the method's sampler so every draw's curriculum progress is recorded."""
    seen: list[float] = []
    real = method.sampler

    def recording(volumes, rng, progress=1.0):
        seen.append(progress)
        return real(volumes, rng, progress)

    method.sampler = recording
    return seen


def test_the_curriculum_counter_follows_training_steps_and_eval_mode_draws_the_full_range():
    method = _planar().train()
    vols = _volumes(2)
    seen = _record_progress(method)
    for _ in range(3):
        method.training_step(method.sample(vols, np.random.default_rng(0)))
    with torch.no_grad():
        method.training_step(method.sample(vols, np.random.default_rng(0)))  # no grad: not a training step
    method.eval()
    method.training_step(method.sample(vols, np.random.default_rng(0)))
    assert seen == [0.0, 0.25, 0.5, 0.75, 1.0]  # curriculum_steps = 4; eval mode: the end range
    assert int(method.steps_done) == 3
    assert "steps_done" in method.state_dict()


def test_fit_draws_the_val_set_at_the_full_range_and_training_batches_along_the_curriculum(tmp_path):
    method = _planar()
    seen = _record_progress(method)
    fit(method, _volumes(3), TINY_CFG, tmp_path, val_volumes=_volumes(2, seed=1), progress=False)
    assert seen == [1.0, 0.0, 0.25, 0.5, 0.75]  # val set first (in eval mode), then steps 0..3 of 4
    val = read_metrics(tmp_path).query("split == 'val'")
    assert (val.offset_hi == 1.75).all() and (val.offset_lo == 0.0).all()
    for column in ("offset_err_hw", "offset_err_mm", "offset_err_zero_hw"):
        assert np.isfinite(val[column]).all()
    assert val.anchor_eligible_share.between(0.05, 0.2).all() and (val.anchor_fallback_rate == 0).all()


@pytest.mark.parametrize("name", ["heatmap"])  # Reg2D shares every line but the head
def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(tmp_path, name):
    vols, val = _volumes(3), _volumes(2, seed=1)
    full = _planar(name)
    fit(full, vols, TINY_CFG, tmp_path / "full", val_volumes=val, progress=False)
    first = _planar(name)
    fit(first, vols, replace(TINY_CFG, epochs=1), tmp_path / "split", val_volumes=val, progress=False)
    second = _planar(name)  # a fresh process: the counter comes back from the checkpoint
    fit(second, vols, TINY_CFG, tmp_path / "split", val_volumes=val, progress=False)
    assert int(second.steps_done) == int(full.steps_done) == 4
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), second.state_dict().values()))
    full_log, split_log = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "split")
    np.testing.assert_allclose(split_log.loss, full_log.loss, rtol=1e-6)


def test_doersch_logs_its_six_class_accuracy_on_validation(tmp_path):
    torch.manual_seed(0)
    method = create_method("doersch", backbone="smallcnn", patch_size_vox=8, volumes_per_batch=2, patches_per_volume=4,
                           gap_mm=2.0, jitter_mm=2.0)
    fit(method, _volumes(3), TINY_CFG, tmp_path, val_volumes=_volumes(2, seed=1), progress=False)
    log = read_metrics(tmp_path)
    val = log.query("split == 'val'")
    assert len(val) == 3 and val.accuracy.between(0, 1).all()
    assert log.anchor_eligible_share.between(0.05, 0.2).all() and (log.anchor_fallback_rate == 0).all()
    assert load_method(tmp_path / "checkpoints" / "last.pt").name == "doersch"


def test_the_untrained_baselines_only_write_their_initial_state(tmp_path):
    for name, overrides in (("xavier", {"backbone": "smallcnn", "patch_size_vox": 16}), ("gvdiff", {"patch_size_vox": 12})):
        torch.manual_seed(0)
        method = create_method(name, volumes_per_batch=2, patches_per_volume=3, **overrides)
        before = {k: v.clone() for k, v in method.state_dict().items()}
        result = fit(method, _volumes(2), TINY_CFG, tmp_path / name, val_volumes=_volumes(2, seed=1), progress=False)
        assert result.step == 0
        state = load_checkpoint(result.checkpoint_path)["model"]
        assert all(torch.equal(state[k], v) for k, v in before.items())
        val = read_metrics(tmp_path / name)
        assert val.split.tolist() == ["val"] and val.descriptor_std.iloc[0] > 0


def test_gvdiff_descriptors_are_deterministic_for_a_seed_and_are_grey_value_differences():
    vol = coordinate_volume("c", (70, 68, 66), AFFINE)  # channels: world x, y, z mm (linear: smoothing keeps them)
    centres = np.array([[35, 34, 33], [30, 38, 30]])
    a, b, c = (create_method("gvdiff", pattern_seed=s, in_channels=3, patch_size_vox=12) for s in (7, 7, 8))
    emb = [m.embed(torch.from_numpy(m.cut_inputs(vol.data, centres))) for m in (a, b, c)]
    assert torch.equal(emb[0], emb[1]) and not torch.equal(emb[0], emb[2])
    assert emb[0].shape == (2, 3 * 192) and a.embed_dim == 3 * 192
    p, q = a.backbone.pattern_vox.numpy()  # (192, 3) each: a linear image makes each difference A (p - q)
    inside = np.all(np.abs(np.concatenate([p, q], 1)) <= 20, axis=1)  # away from the border, where smoothing pads
    expected = (p - q) @ AFFINE[:3, :3].T  # (192, 3) world mm, per channel x, y, z
    np.testing.assert_allclose(emb[0][0].numpy().reshape(3, 192)[:, inside], expected.T[:, inside], atol=2e-3)
    with pytest.raises(ValueError, match="backbone must be 'gvdiff'"):
        create_method("gvdiff", backbone="smallcnn")


def test_gvdiffs_pattern_has_the_papers_sigma_and_reads_smoothed_grey_values():
    """sigma 0.4 in the paper's image units = 1 patch half-width (its patch side is 0.8): 21 voxels for S = 42."""
    m = create_method("gvdiff")  # the paper's and the demo's settings
    pattern = m.backbone.pattern_vox.numpy().reshape(-1, 3)  # 384 points
    assert m.config.sigma_hw * m.config.patch_size_vox / 2 == 21.0
    np.testing.assert_allclose(pattern.std(0), 21.0, rtol=0.12)  # 384 draws per axis: about 4 % standard error
    assert pattern.std() > 18  # the old pattern, truncated to the 42-voxel cube, had about 11
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(1, 40, 40, 40)).astype(np.float32)  # pure voxel noise, std 1
    centres = np.array([[20, 20, 20]])
    smooth = create_method("gvdiff", patch_size_vox=12, n_pairs=2000)
    raw = create_method("gvdiff", patch_size_vox=12, n_pairs=2000, smooth_sigma_vox=0.0)
    d_smooth, d_raw = (mm.embed(torch.from_numpy(mm.cut_inputs(noise, centres))).numpy()[0] for mm in (smooth, raw))
    p, q = smooth.backbone.pattern_vox.numpy()
    ok = np.all(np.abs(np.concatenate([p, q], 1)) < 14, axis=1)  # both points well inside (no padding, no border)
    # raw differences of two independent voxels: std sqrt(2); a Gaussian of sigma s voxels leaves white noise a std
    # of (2 sqrt(pi) s)^(-3/2) = 0.053 for s = 2 (the pairs are far apart: their smoothed values are independent)
    assert np.std(d_raw[ok]) == pytest.approx(np.sqrt(2), rel=0.1)
    assert np.std(d_smooth[ok]) == pytest.approx(np.sqrt(2) * (2 * np.sqrt(np.pi) * 2.0) ** -1.5, rel=0.2)
    from scipy.ndimage import gaussian_filter

    expected = gaussian_filter(noise[0], 2.0, mode="nearest", truncate=4.0)
    pick = lambda o: expected[tuple((centres[0] + o[ok]).T)]  # noqa: E731
    np.testing.assert_allclose(d_smooth[ok], pick(p) - pick(q), atol=1e-5)


def test_xavier_is_the_untrained_start_of_the_2_5d_methods():
    torch.manual_seed(5)
    xavier = create_method("xavier")
    torch.manual_seed(5)
    reg2d = create_method("reg2d")
    assert all(torch.equal(p, reg2d.backbone.state_dict()[k]) for k, p in xavier.backbone.state_dict().items())
    assert xavier.embed_dim == 192 and not xavier.trains


def test_dense_descriptors_through_cut_inputs_equal_embedding_each_point_alone():
    method = _planar("heatmap").eval()
    vol = _volumes(1, shape=(18, 15, 12))[0]
    dense = dense_embeddings(method, vol, stride_vox=5, progress=False, batch_size=7, precision="fp32")
    (gx, gy, gz) = dense.grid_shape
    anchors = np.stack(np.meshgrid(*[np.arange(g) for g in (gx, gy, gz)], indexing="ij"), -1).reshape(-1, 3)
    centres = np.round(dense.centres_vox.reshape(-1, 3) + 0.5).astype(int)  # box centre + 0.5 = centre voxel (even S)
    one_by_one = np.concatenate([method.embed(torch.from_numpy(triplanar_patches(vol.data, c[None], 16))).numpy()
                                 for c in centres])
    assert len(anchors) == len(centres) and dense.embed_dim == method.embed_dim == 3 * 128
    np.testing.assert_allclose(dense.flat_embeddings, one_by_one, rtol=1e-4, atol=1e-5)


def test_the_pretraining_summary_cuts_each_methods_own_input(tmp_path):
    for name, overrides in (("reg2d", PLANAR_TINY), ("gvdiff", {"patch_size_vox": 12})):
        torch.manual_seed(0)
        table = pretraining_summary(create_method(name, **overrides), _volumes(2, shape=(26, 24, 20)), n_per_volume=8,
                                    run=tmp_path / name)
        assert table.n_patches.item() == 16 and np.isfinite(table.effective_rank.item())


def test_every_preset_builds_every_context_method():
    for name in ("reg2d", "heatmap", "doersch", "xavier", "gvdiff"):
        for preset_name in ("paper", "demo", "tiny"):
            method, _ = build_run(name, preset_name)
            assert method.embed_dim > 0


def test_demo_presets_build_and_a_demo_step_runs_for_every_context_method():
    vols = _volumes(2, shape=(30, 28, 26))
    for name in ("reg2d", "heatmap", "doersch", "xavier", "gvdiff"):
        method, cfg = build_run(name, "demo", method_overrides={"volumes_per_batch": 2, "patches_per_volume": 1})
        batch = method.train().sample(vols, np.random.default_rng(0))
        out = method.training_step(batch)
        assert torch.isfinite(out.loss) and method.embed(batch.patches).shape == (2, method.embed_dim)
        assert method.embed_dim == 192
