"""RunDir: the one place that knows the run layout; names cannot escape the runs folder; headline tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from medssl.rundir import HEADLINE_COLUMNS, InvalidRunNameError, RunDir


@pytest.mark.parametrize("bad", ["../../escape", "a/b", "..", "", ".hidden", "x/../y", "/abs"])
def test_run_names_that_would_leave_the_runs_folder_are_refused(tmp_path, bad):
    with pytest.raises(InvalidRunNameError, match="plain name"):
        RunDir(bad, runs_root=tmp_path)


def test_a_name_lives_under_the_runs_root_and_a_path_is_taken_as_given(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSSL_RUNS", str(tmp_path / "runs"))
    rd = RunDir("demo")
    assert rd.path == tmp_path / "runs" / "demo" and rd.name == "demo"
    assert RunDir(tmp_path / "elsewhere").path == tmp_path / "elsewhere"
    assert RunDir(rd).path == rd.path
    assert rd.checkpoint("isimed") == rd.path / "isimed" / "checkpoints" / "last.pt"
    assert rd.eval_dir.is_dir() and rd.eval_dir == rd.path / "eval"
    assert rd.step_dir("30_linear_probe", "lesion").is_dir()
    with pytest.raises(InvalidRunNameError):
        rd.step_dir("../out")


def test_trained_methods_are_found_in_registry_order_and_empty_means_all(tmp_path):
    rd = RunDir(tmp_path)
    for name in ("simclr", "isimed", "my-own"):
        (rd.checkpoint(name)).parent.mkdir(parents=True)
        rd.checkpoint(name).write_bytes(b"x")
    (rd.path / "regisimed").mkdir()  # no checkpoint: not trained
    assert rd.trained_methods() == ["isimed", "simclr", "my-own"]  # registry order, unknown names last
    assert rd.resolve_methods([]) == rd.trained_methods() == rd.resolve_methods(None)
    assert rd.resolve_methods(["simclr"]) == ["simclr"]
    assert rd.checkpoints(["regisimed", "isimed"]) == {"regisimed": None, "isimed": rd.checkpoint("isimed")}


def test_headline_tables_are_written_with_defaults_and_concatenated(tmp_path):
    rd = RunDir(tmp_path)
    rd.write_headline(rd.step_dir("20_latent_space"), pd.DataFrame(
        {"method": ["isimed", "identity"], "metric": ["corr_median_mm"] * 2, "value": [14.0, 26.0],
         "split": "test", "kind": ["method", "baseline"], "higher_is_better": False}))
    rd.write_headline(rd.step_dir("30_linear_probe", "lesion"), pd.DataFrame(
        {"method": ["isimed"], "metric": ["auc"], "value": [0.7], "split": ["test"], "std": [0.1], "n": [8]}))
    h = rd.headlines()
    assert list(h.columns) == HEADLINE_COLUMNS and len(h) == 3
    assert set(h.step) == {"20_latent_space", "30_linear_probe/lesion"}
    probe = h[h.step == "30_linear_probe/lesion"].iloc[0]
    assert probe.kind == "method" and bool(probe.higher_is_better) and probe.n == 8
    with pytest.raises(ValueError, match="kind"):
        rd.write_headline(rd.step_dir("x"), pd.DataFrame({"method": ["a"], "metric": ["m"], "value": [1],
                                                          "split": ["test"], "kind": ["oops"]}))
    with pytest.raises(ValueError, match="split"):
        rd.write_headline(rd.step_dir("x"), pd.DataFrame({"method": ["a"], "metric": ["m"], "value": [1]}))
    assert not list(Path(tmp_path).rglob("*.tmp"))


def test_key_figures_are_recorded_relative_to_the_run_and_listed_when_they_exist(tmp_path):
    rd = RunDir(tmp_path / "run")
    d = rd.step_dir("20_latent_space")
    (d / "a.png").write_bytes(b"png")
    rd.write_key_figures(d, [("First", d / "a.png"), ("Missing", "b.png")])
    moved = tmp_path / "moved"
    rd.path.rename(moved)
    figs = RunDir(moved).key_figures()
    assert figs == [("First", moved / "20_latent_space" / "a.png")]
