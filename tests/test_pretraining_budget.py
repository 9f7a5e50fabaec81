"""Equal pretraining budgets (issue 16): steps and distinct patches per step in the demo, and the table that says
where they cannot be equal."""

from __future__ import annotations

import json

import pytest

from medssl.methods import create_method, list_methods
from medssl.methods.simsiam import IOU_STUDY
from medssl.presets import preset
from medssl.report import pretraining_table
from medssl.rundir import RunDir


def test_every_trained_demo_method_runs_210_steps_of_192_distinct_patches():
    names = sorted(set(list_methods(trains=True, demo=True)) | set(IOU_STUDY))
    assert {"isimed", "simclr", "simsiam", "reg2d", "heatmap", "doersch"} <= set(names)
    for name in names:
        overrides, train = preset(name, "demo")
        assert train.epochs * train.steps_per_epoch == 210, name  # SimSiam ran 168 until issue 16
        method = create_method(name, **overrides)
        assert method.patches_per_step == 192, (name, method.patches_per_step)
    # what a "patch" is differs: the 2.5D methods cut 6 planar 42 x 42 x 3 patches per anchor, Doersch 2 cubes per pair
    assert preset("reg2d", "demo")[0]["volumes_per_batch"] * 6 == 192
    assert preset("doersch", "demo")[0]["volumes_per_batch"] * preset("doersch", "demo")[0]["patches_per_volume"] * 2 == 192


def _write(rd: RunDir, name: str, steps: int, per_step: int, method_config: dict, trains: bool = True) -> None:
    d = rd.method_dir(name)
    d.mkdir(parents=True)
    recs = [{"step": s, "loss": 1.0 / s, "time_s": 3.0 * s} for s in range(1, steps + 1)]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    (d / "config.json").write_text(json.dumps({"method_config": method_config, "resolved": {
        "patches_per_step": per_step, "views_per_patch": 1, "trains": trains}}))


def test_the_pretraining_table_gives_wall_time_patch_kind_and_says_where_budgets_differ(tmp_path):
    rd = RunDir(tmp_path / "r")
    _write(rd, "isimed", 210, 192, {"patch_size_vox": 32, "backbone": "smallcnn"})
    _write(rd, "simclr", 210, 192, {"patch_size_vox": 32, "backbone": "smallcnn"})
    _write(rd, "reg2d", 210, 192, {"patch_size_vox": 42, "n_slices": 3, "backbone": "d2d"})
    _write(rd, "simsiam", 168, 192, {"patch_size_vox": 32, "backbone": "smallcnn", "spatial_dims": 3})
    _write(rd, "gvdiff", 0, 8, {"patch_size_vox": 42, "backbone": "gvdiff"}, trains=False)
    t = pretraining_table(rd, ["isimed", "simclr", "reg2d", "simsiam", "gvdiff"]).set_index("method")
    assert t.loc["isimed", "train_minutes"] == pytest.approx(210 * 3.0 / 60)  # wall time of the run
    assert t.loc["isimed", "patch"] == "32^3 cube" and t.loc["reg2d", "patch"] == "42x42x3 planar"
    assert t.loc["isimed", "budget"] == t.loc["simclr", "budget"] == "equal"
    assert t.loc["reg2d", "budget"] == ("unequal: 42x42x3 planar patches vs 32^3 cube: 2.5D planes cannot equal "
                                        "cubes in content")
    assert t.loc["simsiam", "budget"] == "unequal: steps 168 vs 210"
    assert t.loc["gvdiff", "budget"] == "not trained"
    assert list(t.columns[:6]) == ["trains", "steps", "train_minutes", "patches_per_step", "patch", "budget"]
