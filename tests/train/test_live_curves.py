"""Live curves: fit writes TensorBoard event files beside metrics.jsonl, and a notebook callback gets every record."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medssl.data.volume import Volume
from medssl.methods import create_method
from medssl.train import TrainConfig, fit, read_metrics
from medssl.train.metrics import TensorBoardLog
from medssl.viz.live import LiveCurves


def _volumes(n: int, seed: int = 0) -> list[Volume]:
    rng = np.random.default_rng(seed)
    affine = np.diag([1.2, 0.9, 2.5, 1.0])
    return [Volume(rng.normal(size=(1, 20, 18, 19)).astype(np.float32), affine, f"c{seed}-{i}") for i in range(n)]


def _fit(run_dir, epochs=2, **kw):
    torch.manual_seed(0)
    method = create_method("isimed", backbone="smallcnn", patch_size_vox=16, volumes_per_batch=2, patches_per_volume=3,
                           embed_dim=8)  # fmt: skip
    config = TrainConfig(epochs=epochs, steps_per_epoch=2, device="cpu", precision="fp32", log_every=1,
                         eval_every_epochs=1, val_batches=1, keep_last=None)  # fmt: skip
    return fit(method, _volumes(4), config, run_dir, val_volumes=_volumes(2, seed=1), progress=False, **kw)


def _scalars(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir))  # reads every event file in the folder, in order
    acc.Reload()
    return acc


def _series(acc: EventAccumulator, tag: str) -> tuple[list[int], list[float]]:
    events = acc.Scalars(tag)
    return [e.step for e in events], [e.value for e in events]


def test_a_tiny_run_leaves_event_files_that_hold_the_metrics_records(tmp_path):
    live = LiveCurves(title="tiny")
    _fit(tmp_path / "run", callbacks=[live])
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))  # beside metrics.jsonl
    acc = _scalars(tmp_path / "run")
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/samples_per_s", "train/grad_norm", "val/loss",
            "val/effective_rank", "val/dim_variance_fraction"} <= tags
    assert not any(t.endswith(("/step", "/epoch", "/time_s")) for t in tags)  # positions are steps, not scalars
    m = read_metrics(tmp_path / "run")
    for split, key in (("train", "loss"), ("train", "lr"), ("train", "samples_per_s"), ("val", "effective_rank")):
        rows = m[m["split"] == split]
        steps, values = _series(acc, f"{split}/{key}")
        assert steps == rows["step"].tolist()
        np.testing.assert_allclose(values, rows[key].to_numpy(dtype=float), rtol=1e-6)  # float32 in the event file
    assert _series(acc, "train/lr")[1][-1] == pytest.approx(1e-3 * 0.9)  # the schedule after epoch 1

    # the notebook's live figure got the same records, one trace per series
    traces = {t.name: t for t in live.widget.data}
    assert live.n_records == len(m)
    train = m[m["split"] == "train"]
    assert list(traces["train loss"].x) == train["step"].tolist()
    np.testing.assert_allclose(traces["train loss"].y, train["loss"].to_numpy(dtype=float))
    np.testing.assert_allclose(traces["val effective rank"].y, m[m["split"] == "val"]["effective_rank"].to_numpy())


def test_after_a_resume_from_an_older_checkpoint_tensorboard_shows_each_step_once_as_metrics_jsonl_does(tmp_path):
    run = tmp_path / "run"
    _fit(run)  # steps 1-4; epoch-0001.pt holds step 2
    shutil.copy(run / "checkpoints" / "epoch-0001.pt", run / "checkpoints" / "last.pt")  # as if it died after step 2
    _fit(run)  # retrains steps 3-4 into a second event file
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    m = read_metrics(run)
    train = m[m["split"] == "train"]
    steps, values = _series(_scalars(run), "train/loss")
    assert steps == train["step"].tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(values, train["loss"].to_numpy(dtype=float), rtol=1e-6)


def test_tensorboard_log_writes_collapse_terms_and_skips_non_numbers_and_non_finite_values(tmp_path):
    log = TensorBoardLog(tmp_path)
    log.write({"step": 5, "epoch": 1.0, "split": "train", "loss": 0.5, "collapse_z": 0.25, "collapse_p": float("nan"),
               "note": "text", "flag": True})
    log.close()
    acc = _scalars(tmp_path)
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/collapse_z"}
    assert _series(acc, "train/collapse_z") == ([5], [0.25])


def test_fit_without_tensorboard_writes_no_event_files(tmp_path):
    _fit(tmp_path / "run", epochs=1, tensorboard=False)
    assert not list((tmp_path / "run").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
