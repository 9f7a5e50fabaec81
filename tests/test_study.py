"""The reference study plan: every (method, seed) a resumable unit; a killed study resumes and ends as an uninterrupted one."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medssl.methods import list_methods
from medssl.study import STUDY_PLANS, StudyError, load_study, plan_units, run_study, train_settings
from medssl.train import load_checkpoint

# one worker builds its module-scoped tiny study once: `make test` runs pytest-xdist --dist loadgroup, and a module
# split over two workers builds its module-scoped fixtures on each
pytestmark = pytest.mark.xdist_group("study")

REPO = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("_study_run.py")

TINY_STUDY = {
    "seeds": [0, 1],
    "methods": ["isimed", "simclr"],
    "data": {"source": "demo", "n_subjects": 4, "cohort_seed": 0, "target_spacing_mm": 6.0},
    "preset": "tiny",
    "train_overrides": {"*": {"keep_last": 0, "log_every": 1}},
    "steps_per_validation": 2,
    "patience": 2,
    "caps_steps": {"default": 6},
    "data_notebook": False,
    "evaluations": [],
    "report": False,
    "publish_dir": "",
}


def _args(**kw) -> argparse.Namespace:
    base = {"plan": "study", "run": "study", "methods": None, "only": None, "param": [], "dry_run": True}
    return argparse.Namespace(**{**base, **kw})


def test_dry_run_lists_every_method_seed_unit_with_its_cap_and_early_stopping(capsys, tmp_path, monkeypatch):
    from medssl.cli import pipeline_main as _cli_main

    monkeypatch.setenv("MEDSSL_RUNS", str(tmp_path))
    assert _cli_main(_args(run=None)) == 0
    out = capsys.readouterr().out
    trained = list_methods(trains=True)
    assert {"simsiam-iou-0-1", "simsiam-iou-0.6-1", "reg2d", "doersch"} <= set(trained)  # IoU variants included
    for seed in STUDY_PLANS["study"]["seeds"]:
        for m in list_methods():
            line = next(ln for ln in out.splitlines() if ln.startswith(f"seed{seed}/{m} "))
            assert "pretrain" in line and str(tmp_path / "study" / f"seed{seed}" / m) in line
            if m in trained:
                cap = {"isimed": 600, "reg2d": 600, "heatmap": 600, "doersch": 600, "simsiam-iou-0-0": 200,
                       "simsiam-iou-0.0001-0.3": 200, "simsiam-iou-0.6-1": 200}.get(m, 400)
                assert f"cap {cap} steps; early stopping every 20 steps, patience 5" in line
            else:
                assert "untrained" in line
        assert f"seed{seed}/50_segmentation " in out
    assert len(STUDY_PLANS["study"]["seeds"]) >= 3
    assert f"{3 * len(list_methods())} (method, seed) pretraining units" in out
    assert not (tmp_path / "study").exists()  # a dry run writes nothing


def test_overrides_change_settings_or_go_to_the_notebooks_and_bad_plans_are_refused(tmp_path):
    settings, nb = load_study("study", {"caps_steps.isimed": 800, "seeds": [0, 1, 2, 3], "stride_vox": 4})
    assert settings["caps_steps"]["isimed"] == 800 and settings["caps_steps"]["default"] == 400
    assert settings["seeds"] == [0, 1, 2, 3]
    assert nb == {"stride_vox": 4}
    m_over, t_over = train_settings(settings, "isimed")
    assert t_over["epochs"] * t_over["steps_per_epoch"] == 800 and t_over["eval_every_epochs"] == 1
    assert t_over["early_stopping"] == {"patience": 5, "min_delta": 0.5}  # 0.5 mm of ISImed's distance error
    assert t_over["lr_decay_per_epoch"] ** t_over["epochs"] == pytest.approx(0.05, rel=1e-3)
    assert "early_stopping" not in train_settings(settings, "xavier")[1]
    units = plan_units(settings, "s", runs_root=tmp_path, notebook_overrides=nb)
    latent = next(u for u in units if u.id == "seed3/20_latent_space")
    assert latent.settings["parameters"]["stride_vox"] == 4 and latent.settings["parameters"]["seed"] == 3
    # the registration control does not depend on the seed: computed on the first seed only
    first = next(u for u in units if u.id == "seed0/50_segmentation").settings["parameters"]
    later = next(u for u in units if u.id == "seed2/50_segmentation").settings["parameters"]
    assert first["registration"] == "affine" and later["registration"] == "" and later["body_alignment"] is False
    probe = next(u for u in units if u.id == "seed2/30_linear_probe").settings["parameters"]
    assert "registration" not in probe  # only the parameters a step has are replaced
    with pytest.raises(ValueError, match="unknown settings"):
        load_study({**TINY_STUDY, "sedes": [1]})
    with pytest.raises(ValueError, match="seeds"):
        load_study({**TINY_STUDY, "seeds": [0, 0]})
    with pytest.raises(ValueError, match="unknown"):
        load_study({**TINY_STUDY, "methods": ["isimedd"]})
    with pytest.raises(ValueError, match="caps_steps"):
        load_study({**TINY_STUDY, "caps_steps": {"isimed": 10}})


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A MEDSSL_DATA with the 4-subject, 6 mm demo cohort built and cached (the examples linked, not fetched)."""
    from medssl.data.demo import fetch_totalseg_examples

    shared = fetch_totalseg_examples(progress=False)
    data = tmp_path_factory.mktemp("medssl-data")
    (data / "demo").mkdir()
    (data / "demo" / shared.name).symlink_to(shared.resolve(), target_is_directory=True)
    env = {**os.environ, "MEDSSL_DATA": str(data), "PYTHONPATH": str(REPO)}
    env.pop("MEDSSL_CACHE", None)
    code = ("from medssl.data.source import open_data; open_data('demo', n_subjects=4, target_spacing_mm=6.0, "
            "progress=False).volumes()")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600)
    return data


def _study(tiny_data: Path, tmp_path: Path, run: str, kill: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(TINY_STUDY))
    env = {**os.environ, "MEDSSL_DATA": str(tiny_data), "PYTHONPATH": str(REPO), "MEDSSL_RUNS": str(tmp_path / "runs")}
    env.pop("MEDSSL_CACHE", None)
    args = [sys.executable, str(RUNNER), str(plan), str(tmp_path / "runs"), run, *(map(str, kill) if kill else [])]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


@pytest.mark.network
@pytest.mark.slow
def test_a_study_killed_mid_unit_resumes_without_retraining_done_units_and_ends_as_an_uninterrupted_one(
        tiny_data, tmp_path):
    reference = _study(tiny_data, tmp_path, "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    killed = _study(tiny_data, tmp_path, "crashed", kill=("seed1/isimed", 3))  # dies mid-unit, after step 3 of 6
    assert killed.returncode == -9, killed.stderr[-3000:]
    root = tmp_path / "runs" / "crashed"
    state = json.loads((root / "study.json").read_text())["units"]
    assert {k: v["status"] for k, v in state.items()} == {"seed0/isimed": "done", "seed0/simclr": "done",
                                                         "seed1/isimed": "running"}
    assert load_checkpoint(root / "seed1" / "isimed" / "checkpoints" / "last.pt")["step"] == 2  # the last epoch's
    done = [root / "seed0" / m / f for m in ("isimed", "simclr")
            for f in ("config.json", "metrics.jsonl", "summary.csv", "checkpoints/last.pt", "checkpoints/best.pt")]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in done}

    resumed = _study(tiny_data, tmp_path, "crashed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "killed while running seed1/isimed" in resumed.stdout
    assert "4 units, 2 done, 2 to run" in resumed.stdout
    for p, (mtime, content) in before.items():  # not retrained, not even rewritten
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == content, p
    final = json.loads((root / "study.json").read_text())["units"]
    assert all(u["status"] == "done" for u in final.values()) and len(final) == 4

    for seed in (0, 1):
        for m in ("isimed", "simclr"):
            got, want = root / f"seed{seed}" / m, tmp_path / "runs" / "reference" / f"seed{seed}" / m
            for ckpt in ("last.pt", "best.pt"):
                a, b = _tensors(got / "checkpoints" / ckpt), _tensors(want / "checkpoints" / ckpt)
                assert all(torch.equal(a[k], b[k]) for k in b), (seed, m, ckpt)
            es_got, es_want = (json.loads((d / "early_stopping.json").read_text()) for d in (got, want))
            assert es_got == es_want, (seed, m)
            assert (got / "summary.csv").read_text() == (want / "summary.csv").read_text()
            log = [json.loads(line) for line in (got / "metrics.jsonl").read_text().splitlines()]
            steps = [r["step"] for r in log if r["split"] == "train"]
            assert steps == sorted(set(steps)), (seed, m)  # the killed unit's records after step 2 were dropped once


def test_a_study_refuses_a_run_folder_that_holds_an_ordinary_run_and_changed_settings_under_done_units(tmp_path):
    ordinary = tmp_path / "runs" / "demo" / "isimed" / "checkpoints"
    ordinary.mkdir(parents=True)
    (ordinary / "last.pt").write_bytes(b"x")
    with pytest.raises(StudyError, match="ordinary run"):
        run_study(TINY_STUDY, "demo", runs_root=tmp_path / "runs")
    root = tmp_path / "runs" / "s"
    root.mkdir()
    units = plan_units(load_study(TINY_STUDY)[0], "s", runs_root=tmp_path / "runs")
    Path(units[0].output).mkdir(parents=True)  # a unit whose folder is gone is trained again instead
    (root / "study.json").write_text(json.dumps({"pid": 1, "units": {units[0].id: {
        "kind": "pretrain", "status": "done", "fingerprint": "0000", "settings": {"cap": "other"}}}}))
    with pytest.raises(StudyError, match="trained with other settings"):
        run_study(TINY_STUDY, "s", runs_root=tmp_path / "runs")


def test_min_steps_reach_every_simsiam_variant_by_class_and_never_lower_a_curriculum():
    settings = load_study("study")[0]
    for m in ("simsiam", "simsiam-iou-0-1", "simsiam-iou-0.6-1"):
        assert train_settings(settings, m)[1]["early_stopping"]["min_steps"] == 200, m
    assert "min_steps" not in train_settings(settings, "simclr")[1]["early_stopping"]
    reg2d_floor = train_settings(settings, "reg2d")[1]["early_stopping"]["min_steps"]
    higher = load_study("study", {"min_steps.reg2d": reg2d_floor + 100})[0]
    assert train_settings(higher, "reg2d")[1]["early_stopping"]["min_steps"] == reg2d_floor + 100
    lower = load_study("study", {"min_steps.reg2d": 1})[0]
    assert train_settings(lower, "reg2d")[1]["early_stopping"]["min_steps"] == reg2d_floor  # the curriculum stays
    with pytest.raises(ValueError, match="min_steps"):
        load_study("study", {"min_steps.simclr": -1})


def _stopped_unit(tmp_path, min_steps_now: int, history, stopped: bool):
    from medssl.study import StudyUnit, _same_run_under_new_stopping

    es = {"patience": 2, "min_delta": 0.0}
    old = {"method": "simclr", "seed": 0, "train_overrides": {"epochs": 5, "early_stopping": es}}
    new = {"method": "simclr", "seed": 0, "train_overrides": {"epochs": 5,
                                                               "early_stopping": {**es, "min_steps": min_steps_now}}}
    (tmp_path / "u").mkdir(exist_ok=True)
    (tmp_path / "u" / "early_stopping.json").write_text(json.dumps(
        {"measure": "loss", "mode": "min", "history": history, "stopped": stopped}))
    unit = StudyUnit("seed0/simclr", "pretrain", str(tmp_path / "u"), 0, "simclr", settings=new)
    return _same_run_under_new_stopping(old, unit), old, unit


def test_a_done_unit_stands_under_a_new_min_steps_only_where_its_history_ends_at_the_same_step(tmp_path):
    from medssl.study import _same_run_under_new_stopping

    stopped_at_4 = [[0, 1.0], [2, 2.0], [4, 2.0]]  # no improvement after step 0: patience 2 stops at step 4
    assert "same step" in _stopped_unit(tmp_path, 4, stopped_at_4, True)[0]
    assert _stopped_unit(tmp_path, 6, stopped_at_4, True)[0] == ""  # it would have trained on past step 4
    to_cap = [[0, 3.0], [2, 2.0], [4, 1.0], [6, 0.5]]  # improving to the cap: any floor changes nothing
    assert "same step" in _stopped_unit(tmp_path, 100, to_cap, False)[0]
    assert _stopped_unit(tmp_path, 0, stopped_at_4, False)[0] == ""  # the record disagrees with its own history
    _, old, unit = _stopped_unit(tmp_path, 4, stopped_at_4, True)
    other = {**old, "train_overrides": {**old["train_overrides"], "epochs": 6}}
    assert _same_run_under_new_stopping(other, unit) == ""  # anything else changed: not the same run


def test_a_study_keeps_done_units_a_new_min_steps_does_not_change_and_retrains_a_deleted_one(tmp_path, capsys):
    plan = {**TINY_STUDY, "seeds": [0], "methods": ["simclr"]}
    runs = tmp_path / "runs"
    run_study(plan, "s", runs_root=runs, progress=False)
    last = runs / "s" / "seed0" / "simclr" / "checkpoints" / "last.pt"
    before = last.stat().st_mtime_ns
    capsys.readouterr()
    run_study({**plan, "min_steps": {"simclr": 2}}, "s", runs_root=runs, progress=False)
    out = capsys.readouterr().out
    assert "note: seed0/simclr:" in out and "kept" in out and last.stat().st_mtime_ns == before
    rec = json.loads((runs / "s" / "study.json").read_text())["units"]["seed0/simclr"]
    assert rec["settings"]["train_overrides"]["early_stopping"]["min_steps"] == 2 and "same step" in rec["message"]
    # the settings-changed error says: delete the unit's folder to train it again; that works
    import shutil

    shutil.rmtree(runs / "s" / "seed0" / "simclr")
    run_study({**plan, "min_steps": {"simclr": 4}}, "s", runs_root=runs, progress=False)
    assert last.is_file() and "kept" not in capsys.readouterr().out


def test_publish_copies_the_report_and_slimmed_evaluation_notebooks_and_leaves_the_run_as_it_was(tmp_path):
    import nbformat

    from medssl.study import publish, slim_notebook

    run = tmp_path / "runs" / "s"
    (run / "60_study").mkdir(parents=True)
    (run / "60_study" / "table.csv").write_text("a,b\n1,2\n")
    (run / "study.json").write_text("{}")
    nb = nbformat.v4.new_notebook()
    small = nbformat.v4.new_output("display_data", {"text/plain": "small table"})
    huge = nbformat.v4.new_output("display_data", {"text/html": "<b>" + "x" * 300_000 + "</b>", "text/plain": "fig"})
    nb.cells = [nbformat.v4.new_code_cell("show()", outputs=[small, huge])]
    nb.metadata["widgets"] = {"state": "y" * 200_000}
    src = run / "seed0" / "20_latent_space" / "20_latent_space.ipynb"
    src.parent.mkdir(parents=True)
    nbformat.write(nb, str(src))
    before = src.read_bytes()
    copied = publish(run, tmp_path / "docs")
    out = tmp_path / "docs" / "notebooks" / "seed0" / "20_latent_space" / "20_latent_space.ipynb"
    assert out in copied and (tmp_path / "docs" / "table.csv") in copied and src.read_bytes() == before
    slim = nbformat.read(str(out), as_version=4)
    outputs = slim.cells[0].outputs
    assert outputs[0].data == {"text/plain": "small table"}
    assert list(outputs[1].data) == ["text/plain"] and "300 kB removed" in outputs[1].data["text/plain"]
    assert "widgets" not in slim.metadata and out.stat().st_size < 5_000
    # a notebook left half-written (a killed unit) is named and skipped; the rest is still published
    broken = run / "seed1" / "50_segmentation" / "50_segmentation.ipynb"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"cells": [')
    copied = publish(run, tmp_path / "docs2")
    assert (tmp_path / "docs2" / "notebooks" / "seed0" / "20_latent_space" / "20_latent_space.ipynb") in copied
    assert not (tmp_path / "docs2" / "notebooks" / "seed1" / "50_segmentation" / "50_segmentation.ipynb").exists()
    assert broken.read_text() == '{"cells": ['
    with pytest.raises(ValueError, match=r"50_segmentation\.ipynb: not a readable notebook"):
        slim_notebook(broken, tmp_path / "x.ipynb")
