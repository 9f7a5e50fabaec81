"""fit: resume equals uninterrupted training, train/eval switching, the non-finite guard, logs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from medssl.data.volume import Volume
from medssl.methods import base as method_base
from medssl.methods.base import Method, StepOutput, register_method
from medssl.sampling import UniformPatchSampler
from medssl.train import NonFiniteLossError, TrainConfig, fit, load_checkpoint, load_method, read_metrics

_TEST_NAME = "_test_tiny_regressor"


@dataclass(frozen=True)
class _TinyConfig:
    backbone: str = "tiny-linear"
    patch_size_vox: int = 4
    volumes_per_batch: int = 2
    patches_per_volume: int = 3
    in_channels: int = 1
    foreground_only: bool = False
    embed_dim: int | None = 6
    nan_loss_at_call: int = -1  # 0-based training call whose loss becomes NaN
    nan_grad_at_calls: tuple[int, ...] = ()  # training calls whose gradients become NaN (loss stays finite)


class _TinyBackbone(nn.Module):
    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        # Dropout makes the result depend on torch's RNG, so resume must restore it.
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _TinyRegressor(Method):
    """Regresses patch centres (in cm) from 4^3 patches; records the mode of every call."""

    Config = _TinyConfig

    def __init__(self, config: _TinyConfig) -> None:
        super().__init__(config)
        self.backbone = _TinyBackbone(config.embed_dim)
        self.head = nn.Linear(config.embed_dim, 3)
        self.sampler = UniformPatchSampler(config.patch_size_vox, config.volumes_per_batch, config.patches_per_volume)
        self.calls: list[tuple[str, bool, bool, bool]] = []  # (kind, training, grad enabled, autocast)
        self.n_train_calls = 0

    def sample(self, volumes, rng):
        return self.sampler(volumes, rng)

    def training_step(self, batch):
        self.calls.append(("step", self.training, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        e = self.backbone(batch.patches)
        if self.training:
            if self.n_train_calls in self.config.nan_grad_at_calls:
                e.register_hook(lambda g: g * float("nan"))
            self.n_train_calls += 1
        loss = nn.functional.mse_loss(self.head(e).float(), batch.centres_mm / 10.0)
        if self.training and self.n_train_calls - 1 == self.config.nan_loss_at_call:
            loss = loss * float("nan")
        return StepOutput(loss=loss, logs={"tiny_log": 7.0})

    def embed(self, x):
        self.calls.append(("embed", self.training, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        return super().embed(x)


@pytest.fixture
def registered():
    register_method(_TEST_NAME)(_TinyRegressor)
    yield _TinyRegressor
    method_base._REGISTRY.pop(_TEST_NAME, None)


def _volumes(n: int, seed: int = 0, shape=(8, 7, 9)) -> list[Volume]:
    rng = np.random.default_rng(seed)
    affine = np.array([[0.0, -2.0, 0.3, 10.0], [1.5, 0.0, 0.0, -4.0], [0.0, 0.2, 3.0, 2.0], [0, 0, 0, 1]])
    return [
        Volume(data=rng.normal(size=(1, *shape)).astype(np.float32), affine=affine, case_id=f"s{seed}-{i}")
        for i in range(n)
    ]


def _new_method(init_seed: int = 0, **overrides) -> _TinyRegressor:
    torch.manual_seed(init_seed)
    return _TinyRegressor(_TinyConfig(**overrides))


_CFG = TrainConfig(epochs=3, steps_per_epoch=4, lr=3e-3, seed=5, device="cpu", precision="fp32", log_every=1, keep_last=None)


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("stop_at_step", [6, 8])  # mid-epoch and at an epoch boundary
def test_resumed_training_ends_with_the_same_parameters_as_uninterrupted_training(
    tmp_path, registered, stop_at_step, prefetch
):
    from dataclasses import replace

    cfg = replace(_CFG, prefetch=prefetch)
    train, val = _volumes(5), _volumes(2, seed=1)
    full = _new_method()
    fit(full, train, cfg, tmp_path / "full", val_volumes=val, progress=False)

    first = _new_method()
    stopped = fit(
        first, train, cfg, tmp_path / "split", val_volumes=val, progress=False,
        callbacks=[lambda r: r["split"] == "train" and r["step"] == stop_at_step],
    )
    assert stopped.stopped_early and stopped.step == stop_at_step
    second = _new_method(init_seed=123)  # a fresh object with different weights: all state must come from last.pt
    resumed = fit(second, train, cfg, tmp_path / "split", val_volumes=val, progress=False)
    assert resumed.step == 12 and not resumed.stopped_early

    for (name, p_full), p_resumed in zip(full.named_parameters(), second.parameters()):
        torch.testing.assert_close(p_resumed, p_full, rtol=1e-5, atol=1e-6, msg=f"parameter {name} differs")
    full_log, split_log = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "split")
    cols = ["split", "step", "loss", "lr"]
    assert len(full_log) == len(split_log)  # no duplicated or lost records around the stop
    np.testing.assert_allclose(split_log["loss"], full_log["loss"], rtol=1e-5)
    assert (split_log[cols[:2]].values == full_log[cols[:2]].values).all()


def test_module_is_in_train_mode_for_training_steps_and_in_eval_mode_without_grad_for_evaluation(tmp_path, registered):
    method = _new_method()
    cfg = TrainConfig(epochs=2, steps_per_epoch=3, device="cpu", precision="fp32", val_batches=2)
    fit(method, _volumes(4), cfg, tmp_path, val_volumes=_volumes(2, seed=1), progress=False)
    steps = [c for c in method.calls if c[0] == "step"]
    train_calls = [c for c in steps if c[1]]
    eval_calls = [c for c in steps if not c[1]]
    assert len(train_calls) == 6 and all(grad for _, _, grad, _ in train_calls)
    assert len(eval_calls) == 3 * 2  # before training + after each epoch, 2 val batches each
    assert not any(grad for _, _, grad, _ in eval_calls)
    embeds = [c for c in method.calls if c[0] == "embed"]
    assert embeds and all(not training and not grad for _, training, grad, _ in embeds)
    # training resumes in train mode right after every evaluation (the ISImed authors' bug)
    kinds = [("train" if c[1] else "eval") for c in steps]
    assert kinds == ["eval"] * 2 + ["train"] * 3 + ["eval"] * 2 + ["train"] * 3 + ["eval"] * 2
    assert method.training


@pytest.mark.parametrize(("precision", "autocast_on"), [("fp32", False), ("bf16", True)])
def test_training_step_runs_under_autocast_only_when_precision_asks_for_it(tmp_path, registered, precision, autocast_on):
    method = _new_method()
    config = TrainConfig(epochs=1, steps_per_epoch=2, device="cpu", precision=precision)
    fit(method, _volumes(2), config, tmp_path, progress=False)
    assert [c[3] for c in method.calls] == [autocast_on, autocast_on]


def test_non_finite_loss_stops_with_a_clear_message_and_leaves_the_last_good_checkpoint(tmp_path, registered):
    method = _new_method(nan_loss_at_call=6)  # the 7th step, in the second epoch
    cfg = TrainConfig(epochs=3, steps_per_epoch=4, device="cpu", precision="fp32")
    with pytest.raises(NonFiniteLossError) as err:
        fit(method, _volumes(3), cfg, tmp_path, progress=False)
    message = str(err.value)
    for expected in ("non-finite loss", "step 7", "epoch 2 of 3", "tiny_log", "lower lr", "check the input"):
        assert expected in message
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 4 and state["epoch"] == 1
    restored = load_method(tmp_path / "checkpoints" / "last.pt")
    assert all(torch.isfinite(p).all() for p in restored.parameters())
    epoch_one = load_checkpoint(tmp_path / "checkpoints" / "epoch-0001.pt")["model"]
    for k, v in restored.state_dict().items():
        torch.testing.assert_close(v, epoch_one[k], rtol=0, atol=0)


def test_a_single_non_finite_gradient_skips_that_update_but_repeated_ones_stop_training(tmp_path, registered):
    cfg = TrainConfig(epochs=1, steps_per_epoch=6, device="cpu", precision="fp32", log_every=1)
    method = _new_method(nan_grad_at_calls=(2,))
    result = fit(method, _volumes(3), cfg, tmp_path / "once", progress=False)
    log = read_metrics(tmp_path / "once")
    assert result.step == 6 and all(torch.isfinite(p).all() for p in method.parameters())
    assert log.set_index("step")["skipped_nonfinite_grad_steps"].loc[[2, 3, 6]].tolist() == [0, 1, 1]

    with pytest.raises(NonFiniteLossError, match="non-finite gradient norm"):
        fit(_new_method(nan_grad_at_calls=(1, 2, 3, 4)), _volumes(3), cfg, tmp_path / "often", progress=False)


def test_metrics_jsonl_and_config_json_record_training_and_fixed_set_validation(tmp_path, registered):
    method = _new_method()
    cfg = TrainConfig(epochs=2, steps_per_epoch=4, lr=1e-3, lr_decay_per_epoch=0.5, device="cpu", precision="fp32", log_every=2)
    fit(method, _volumes(4), cfg, tmp_path, val_volumes=_volumes(3, seed=2), progress=False)
    log = read_metrics(tmp_path)
    train, val = log[log.split == "train"], log[log.split == "val"]
    assert train.step.tolist() == [2, 4, 6, 8]
    np.testing.assert_allclose(train.lr, [1e-3, 1e-3, 5e-4, 5e-4])  # exponential decay, stepped per epoch
    assert train.epoch.tolist() == [0.5, 1.0, 1.5, 2.0]
    assert (train.samples_per_s > 0).all() and train.sample_share.between(0, 1).all()
    assert (train.tiny_log == 7.0).all() and train.time_s.is_monotonic_increasing
    assert val.step.tolist() == [0, 4, 8]
    assert ((val.effective_rank >= 1) & (val.effective_rank <= 6)).all()
    assert (val.n_patches == 6).all()  # one fixed batch: 2 volumes x 3 patches
    first_line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first_line["split"] == "val" and math.isfinite(first_line["loss"])

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["method"] == _TEST_NAME
    assert config["method_config"]["patches_per_volume"] == 3
    assert config["train"]["lr_decay_per_epoch"] == 0.5 and config["resolved"]["steps_per_epoch"] == 4


def test_validation_patches_are_the_same_at_every_evaluation(tmp_path, registered, monkeypatch):
    seen = []
    original = _TinyRegressor.embed

    def spy(self, x):
        seen.append(x.clone())
        return original(self, x)

    monkeypatch.setattr(_TinyRegressor, "embed", spy)
    fit(_new_method(), _volumes(4), TrainConfig(epochs=2, steps_per_epoch=2, device="cpu", precision="fp32"), tmp_path,
        val_volumes=_volumes(4, seed=3), progress=False)
    assert len(seen) == 3
    assert all(torch.equal(seen[0], s) for s in seen[1:])


def test_steps_per_epoch_defaults_to_one_pass_over_the_volumes(tmp_path, registered):
    result = fit(_new_method(), _volumes(5), TrainConfig(epochs=1, device="cpu", precision="fp32"), tmp_path, progress=False)
    assert result.step == 3  # ceil(5 volumes / 2 per batch)


def test_keeps_only_the_newest_epoch_checkpoints(tmp_path, registered):
    cfg = TrainConfig(epochs=4, steps_per_epoch=1, device="cpu", precision="fp32", keep_last=2)
    fit(_new_method(), _volumes(2), cfg, tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-0003.pt", "epoch-0004.pt", "last.pt"]


def test_refuses_to_overwrite_an_existing_run_without_resume(tmp_path, registered):
    cfg = TrainConfig(epochs=1, steps_per_epoch=1, device="cpu", precision="fp32")
    fit(_new_method(), _volumes(2), cfg, tmp_path, progress=False)
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(FileExistsError, match="resume=True"):
        fit(_new_method(), _volumes(2), cfg, tmp_path, resume=False, progress=False)
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before


def test_resuming_with_a_different_method_config_is_refused(tmp_path, registered):
    cfg = TrainConfig(epochs=2, steps_per_epoch=1, device="cpu", precision="fp32")
    fit(_new_method(), _volumes(2), cfg, tmp_path, progress=False, callbacks=[lambda r: True])
    with pytest.raises(ValueError, match="differs from the method given"):
        fit(_new_method(embed_dim=4), _volumes(2), cfg, tmp_path, progress=False)


def test_presets_give_the_paper_settings_and_every_demo_method_the_same_distinct_patches_per_step():
    from medssl.methods import create_method, list_methods, method_info
    from medssl.presets import preset

    overrides, cfg = preset("isimed", "paper")
    assert overrides == {"backbone": "densenet121", "patch_size_vox": 32, "volumes_per_batch": 64, "patches_per_volume": 16}
    assert (cfg.epochs, cfg.lr, cfg.lr_decay_per_epoch) == (50, 1e-3, 0.9)
    demo_isimed, demo_cfg = preset("isimed", "demo")
    demo_simclr, _ = preset("simclr", "demo")
    assert demo_isimed["backbone"] == "smallcnn"
    assert (demo_cfg.epochs, demo_cfg.steps_per_epoch) == (30, 7)  # 210 steps: make demo < 30 min with 11 methods
    steps = {n: preset(n, "demo")[1].epochs * preset(n, "demo")[1].steps_per_epoch
             for n in list_methods(trains=True, demo=True)}
    assert {steps[n] for n in ("isimed", "regisimed", "simclr", "barlowtwins", "reg2d", "heatmap", "doersch")} == {210}
    budgets = {}
    for name in list_methods(trains=True, demo=True):
        if method_info(name)["family"] == "context prediction":
            continue  # pairs of planar slabs or of cubes, not single cubes: budgeted by time (README, methods/context.py)
        m_over, _ = preset(name, "demo")
        budgets[name] = create_method(name, **{**m_over, "backbone": "smallcnn"}).patches_per_step
    assert len(set(budgets.values())) == 1, budgets  # equal data budgets (two-view methods pay 2 views each)
    # ISImed-type methods get a latent scale the SmallCNN can reach (chosen on validation; presets.py)
    assert demo_isimed["scale_mm"] == preset("regisimed", "demo")[0]["scale_mm"] == 50.0
    assert "scale_mm" not in demo_simclr
    with pytest.raises(KeyError, match="unknown preset"):
        preset("isimed", "fast")


def test_the_default_optimiser_is_adamw_and_the_lr_follows_lr_times_0_9_to_the_epoch(tmp_path, registered):
    cfg = TrainConfig(epochs=4, steps_per_epoch=2, lr=2e-3, device="cpu", precision="fp32", log_every=1)
    method = _new_method()
    optimizer, scheduler = method.configure_optimizers(cfg)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == cfg.weight_decay
    fit(method, _volumes(3), cfg, tmp_path, progress=False)
    log = read_metrics(tmp_path)
    train = log[log.split == "train"]
    epochs_done = (train.step.to_numpy() - 1) // cfg.steps_per_epoch  # the lr in use during that step
    np.testing.assert_allclose(train.lr.to_numpy(), 2e-3 * 0.9 ** epochs_done, rtol=1e-12)


def test_a_method_can_bring_its_own_optimiser_and_schedule(tmp_path, registered):
    class _SgdRegressor(_TinyRegressor):
        def configure_optimizers(self, config):
            opt = torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)
            return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)

    torch.manual_seed(0)
    method = _SgdRegressor(_TinyConfig())
    fit(method, _volumes(3), TrainConfig(epochs=2, steps_per_epoch=1, device="cpu", precision="fp32", log_every=1),
        tmp_path, progress=False)
    np.testing.assert_allclose(read_metrics(tmp_path).lr.dropna().tolist(), [0.5, 0.05])
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert "momentum" in state["optimizer"]["param_groups"][0]


def test_an_untrained_baseline_is_not_optimised_but_its_initial_state_is_checkpointed(tmp_path, registered):
    class _Untrained(_TinyRegressor):
        trains = False

    torch.manual_seed(0)
    method = _Untrained(_TinyConfig())
    before = [p.detach().clone() for p in method.parameters()]
    result = fit(method, _volumes(3), _CFG, tmp_path, val_volumes=_volumes(2, seed=1), progress=False)
    assert result.step == 0 and not result.stopped_early
    assert all(torch.equal(a, b) for a, b in zip(before, method.parameters()))
    assert not [c for c in method.calls if c[0] == "step" and c[1]]  # no training step ran
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 0 and all(torch.equal(state["model"][k], v) for k, v in method.state_dict().items())
    assert read_metrics(tmp_path).split.tolist() == ["val"]


@pytest.mark.parametrize("name", ["isimed", "regisimed", "simclr", "barlowtwins"])
def test_the_tiny_preset_trains_each_builtin_method_end_to_end(tmp_path, name):
    from medssl.methods import create_method
    from medssl.presets import preset

    overrides, cfg = preset(name, "tiny")
    vols = _volumes(3, shape=(20, 18, 17))
    result = fit(create_method(name, **overrides), vols, cfg, tmp_path, val_volumes=vols[:2], progress=False)
    log = read_metrics(tmp_path)
    assert result.step == 4 and np.isfinite(log.loss).all()
    assert np.isfinite(log[log.split == "val"].effective_rank).all()
    assert load_method(result.checkpoint_path).name == name


def test_prefetching_batches_trains_on_exactly_the_same_batches_as_drawing_them_inline(tmp_path):
    from dataclasses import replace

    from medssl.methods import create_method
    from medssl.presets import preset

    overrides, cfg = preset("simclr", "tiny")  # two-view: the views consume the sampling rng too
    cfg = replace(cfg, epochs=2, steps_per_epoch=3)
    vols = _volumes(3, shape=(20, 18, 17))
    params = {}
    for prefetch in (False, True):
        torch.manual_seed(0)
        model = create_method("simclr", **overrides)
        fit(model, vols, replace(cfg, prefetch=prefetch), tmp_path / str(prefetch), progress=False)
        params[prefetch] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(params[False], params[True]))
    # the checkpoint stores the rng after the last TRAINED batch, not after the prefetched one
    ck = {p: load_checkpoint(tmp_path / str(p) / "checkpoints" / "last.pt")["numpy_rng"] for p in (False, True)}
    assert ck[False] == ck[True]
