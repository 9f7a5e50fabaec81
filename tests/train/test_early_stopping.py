"""Early stopping in ``fit``: patience and min_delta on a scripted validation measure, best.pt, resume, the cap."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from torch import nn

from medssl.data.volume import Volume
from medssl.methods import base as method_base
from medssl.methods.base import Method, StepOutput, register_method
from medssl.rundir import RunDir
from medssl.sampling import UniformPatchSampler
from medssl.train import TrainConfig, fit, load_checkpoint, read_metrics
from medssl.train.checkpoint import config_from_json, config_to_json
from medssl.train.config import EarlyStopping

_NAME = "_test_scripted_val"


@dataclass(frozen=True)
class _Config:
    backbone: str = "tiny-linear"
    patch_size_vox: int = 4
    volumes_per_batch: int = 2
    patches_per_volume: int = 3
    in_channels: int = 1
    foreground_only: bool = False
    embed_dim: int | None = 5
    script: tuple[float, ...] = ()  # the validation measure at validation 0, 1, 2, ... (then its last value)


class _Scripted(Method):
    """Trains a small regressor; its validation record's ``score`` follows ``config.script``.

    The count of validations is a buffer, so it travels in checkpoints like the weights (a resumed
    run reads the script where the interrupted one stopped).
    """

    Config = _Config
    val_measure = ("score", "min")

    def __init__(self, config: _Config) -> None:
        super().__init__(config)
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, config.embed_dim))
        self.backbone.embed_dim = config.embed_dim
        self.head = nn.Linear(config.embed_dim, 3)
        self.sampler = UniformPatchSampler(config.patch_size_vox, config.volumes_per_batch, config.patches_per_volume)
        self.register_buffer("n_vals", torch.zeros((), dtype=torch.long))

    def training_step(self, batch):
        loss = nn.functional.mse_loss(self.head(self.backbone(batch.patches)), batch.centres_mm / 10.0)
        logs = {"other": 1.0}
        if not self.training:
            k = min(int(self.n_vals), len(self.config.script) - 1)
            logs["score"] = float(self.config.script[k])
            self.n_vals += 1
        return StepOutput(loss=loss, logs=logs)


@pytest.fixture
def scripted():
    register_method(_NAME)(_Scripted)
    yield _Scripted
    method_base._REGISTRY.pop(_NAME, None)


def _volumes(n: int, seed: int) -> list[Volume]:
    rng = np.random.default_rng(seed)
    affine = np.array([[0.0, -2.0, 0.3, 10.0], [1.5, 0.0, 0.0, -4.0], [0.0, 0.2, 3.0, 2.0], [0, 0, 0, 1]])
    return [Volume(rng.normal(size=(1, 8, 7, 9)).astype(np.float32), affine, f"s{seed}-{i}") for i in range(n)]


def _method(script, init_seed: int = 0) -> _Scripted:
    torch.manual_seed(init_seed)
    m = _Scripted(_Config(script=tuple(script)))
    m.registry_name = _NAME
    return m


def _cfg(**early) -> TrainConfig:
    return TrainConfig(epochs=10, steps_per_epoch=2, lr=3e-3, seed=1, device="cpu", precision="fp32", log_every=1,
                       keep_last=None, early_stopping=early or {"patience": 2})


TRAIN, VAL = _volumes(4, 0), _volumes(2, 1)


def test_training_stops_after_patience_validations_without_improvement_and_keeps_the_best_state(tmp_path, scripted):
    # validations at steps 0, 2, 4, ...: best 3.0 at step 4, then 3.5, 3.2 (no improvement) -> stop at step 8
    result = fit(_method([5, 4, 3, 3.5, 3.2, 1, 1]), TRAIN, _cfg(patience=2), tmp_path, val_volumes=VAL, progress=False)
    assert result.step == 8 and result.stopped_early and result.best_step == 4
    assert "early stopping at step 8" in result.stop_reason and "score" in result.stop_reason
    assert "best 3 at step 4" in result.stop_reason
    val = read_metrics(tmp_path).query("split == 'val'")
    assert val["step"].tolist() == [0, 2, 4, 6, 8] and val["score"].tolist() == [5, 4, 3, 3.5, 3.2]
    best = load_checkpoint(result.best_checkpoint_path)
    epoch2 = load_checkpoint(tmp_path / "checkpoints" / "epoch-0002.pt")  # the state after step 4
    assert best["step"] == 4
    for name, tensor in epoch2["model"].items():
        assert torch.equal(best["model"][name], tensor), name
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["step"] == 8 and last["stop_reason"] == result.stop_reason
    state = json.loads(last["early_stopping"])
    assert state["stopped"] and state["best_step"] == 4 and state["bad_validations"] == 2
    on_disk = json.loads((tmp_path / "early_stopping.json").read_text())
    assert on_disk["stop_reason"] == result.stop_reason and on_disk["history"][2] == [4, 3.0]
    assert on_disk["cap_steps"] == 20


def test_min_delta_decides_what_counts_as_an_improvement(tmp_path, scripted):
    script = [5, 4, 3.95, 3.92, 3.91, 3.0]  # then 3.0 for ever
    lax = fit(_method(script), TRAIN, _cfg(patience=3), tmp_path / "lax", val_volumes=VAL, progress=False)
    strict = fit(_method(script), TRAIN, _cfg(patience=3, min_delta=0.1), tmp_path / "strict", val_volumes=VAL,
                 progress=False)
    # without min_delta every value below the best counts: best 3.0 at step 10, then three repeats
    assert lax.stopped_early and (lax.best_step, lax.step) == (10, 16)
    # with 0.1, 3.95 / 3.92 / 3.91 do not beat 4 by more than 0.1
    assert strict.stopped_early and (strict.best_step, strict.step) == (2, 8)


def test_a_maximised_measure_and_a_measure_named_in_the_setting(tmp_path, scripted):
    script = [0.1, 0.5, 0.4, 0.45, 0.3]
    res = fit(_method(script), TRAIN, _cfg(patience=2, measure="score", mode="max"), tmp_path, val_volumes=VAL,
              progress=False)
    assert res.stopped_early and res.best_step == 2 and res.step == 6
    with pytest.raises(ValueError, match="minimised or maximised"):
        fit(_method(script), TRAIN, _cfg(patience=2, measure="other"), tmp_path / "x", val_volumes=VAL, progress=False)


def test_a_resumed_run_keeps_the_count_and_ends_as_an_uninterrupted_one(tmp_path, scripted):
    script = [5, 4, 3, 3.5, 3.2, 1, 1]
    full = fit(_method(script), TRAIN, _cfg(patience=2), tmp_path / "full", val_volumes=VAL, progress=False)
    # interrupted right after the first validation without improvement (step 6), then resumed in a new object
    first = fit(_method(script), TRAIN, _cfg(patience=2), tmp_path / "split", val_volumes=VAL, progress=False,
                callbacks=[lambda r: r["split"] == "val" and r["step"] == 6])
    assert first.step == 6 and not json.loads((tmp_path / "split" / "early_stopping.json").read_text())["stopped"]
    second = _method(script, init_seed=99)
    resumed = fit(second, TRAIN, _cfg(patience=2), tmp_path / "split", val_volumes=VAL, progress=False)
    assert (resumed.step, resumed.best_step, resumed.stop_reason) == (full.step, full.best_step, full.stop_reason)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "best.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "best.pt")["model"]
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7)
    # a stopped run stays stopped: no further step, no new record
    before = (tmp_path / "split" / "metrics.jsonl").read_text()
    again = fit(_method(script, init_seed=7), TRAIN, replace(_cfg(patience=2), epochs=50), tmp_path / "split",
                val_volumes=VAL, progress=False)
    assert again.step == 8 and again.stopped_early and "early stopping" in again.stop_reason
    assert (tmp_path / "split" / "metrics.jsonl").read_text() == before


def test_reaching_the_cap_says_so_and_evaluations_read_best_pt(tmp_path, scripted):
    res = fit(_method([5, 4, 3, 2, 1, 0.5]), TRAIN, replace(_cfg(patience=3), epochs=3), tmp_path / "run" / "m",
              val_volumes=VAL, progress=False)
    assert res.step == 6 and not res.stopped_early and res.best_step == 6
    assert res.stop_reason == "reached the cap of 6 steps (3 epochs)"
    rd = RunDir(tmp_path / "run")
    assert rd.checkpoints(["m"]) == {"m": tmp_path / "run" / "m" / "checkpoints" / "best.pt"}
    assert rd.eval_checkpoint("nothing-here") is None
    plain = fit(_method([1]), TRAIN, replace(_cfg(), early_stopping=None, epochs=1), tmp_path / "run" / "p",
                val_volumes=VAL, progress=False)
    assert plain.best_checkpoint_path is None and rd.checkpoints(["p"])["p"].name == "last.pt"


def test_missing_measure_or_validation_set_is_a_clear_error(tmp_path, scripted):
    with pytest.raises(ValueError, match="needs val_volumes"):
        fit(_method([1]), TRAIN, _cfg(), tmp_path / "a", progress=False)
    with pytest.raises(KeyError, match="'nope'.*set early_stopping.measure"):
        fit(_method([1]), TRAIN, _cfg(patience=2, measure="nope", mode="min"), tmp_path / "b", val_volumes=VAL,
            progress=False)


def test_the_setting_is_a_dict_in_overrides_and_round_trips_through_checkpoint_json():
    cfg = TrainConfig(early_stopping={"patience": 4, "min_delta": 0.5})
    assert cfg.early_stopping == EarlyStopping(patience=4, min_delta=0.5)
    assert config_from_json(TrainConfig, config_to_json(cfg)) == cfg
    with pytest.raises(TypeError, match="no settings"):
        TrainConfig(early_stopping={"patients": 3})
    with pytest.raises(ValueError, match="patience"):
        TrainConfig(early_stopping={"patience": 0})
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(mode="lowest")
