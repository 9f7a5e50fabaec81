"""The run report concatenates every step's headline table, says whether methods beat the shortcuts, and states provenance."""

import json

import numpy as np
import pandas as pd
import pytest

from medssl.report import PROTOCOL, best_vs_shortcuts, collect_results, comparison_table, write_report
from medssl.rundir import RunDir


def _fake_run(root, methods=("isimed", "simclr")):
    rd = RunDir(root / "r")
    for m in methods:
        rd.checkpoint(m).parent.mkdir(parents=True)
        rd.checkpoint(m).write_bytes(b"")
        recs = [{"step": s, "loss": 10.0 / s, "time_s": 6.0 * s} for s in range(1, 11)] + [
            {"step": 10, "split": "val", "loss": 1.2, "effective_rank": 7.5}]
        (rd.method_dir(m) / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
        (rd.method_dir(m) / "config.json").write_text(json.dumps(
            {"resolved": {"patches_per_step": 192, "views_per_patch": 2 if m == "simclr" else 1, "trains": True}}))
    corr = pd.DataFrame({"method": [*methods, "random-init[smallcnn]", "identity", "aligned-identity (scale+shift)",
                                    "registration (affine)", "chance"],
                         "kind": ["method", "method", "baseline", "baseline", "baseline", "control", "reference"],
                         "metric": "correspondence_median_mm", "value": [14.0, 30.0, 60.0, 26.0, 20.0, 10.0, 170.0],
                         "split": "test", "higher_is_better": False})
    rd.write_headline(rd.step_dir("20_latent_space"), corr)
    probe = pd.DataFrame({"method": [*methods, "position-cubic", "raw-intensity"],
                          "kind": ["method", "method", "baseline", "baseline"], "metric": "auc",
                          "value": [0.70, 0.66, 0.90, 0.60], "std": 0.05, "n": 8, "split": "test",
                          "note": ["isimed vs position-cubic: Holm p = 0.01", "", "", ""]})
    rd.write_headline(rd.step_dir("30_linear_probe", "lesion"), probe)
    return rd


def test_comparison_table_lines_up_every_headline_by_method_with_methods_first(tmp_path):
    rd = _fake_run(tmp_path)
    res = collect_results(rd)
    assert res.methods == ["isimed", "simclr"]
    t = comparison_table(res).set_index("method")
    assert list(t.index[:2]) == ["isimed", "simclr"] and t.index[-1] == "chance"
    assert t.loc["isimed", "20_latent_space: correspondence_median_mm (test)"] == 14.0
    assert t.loc["position-cubic", "30_linear_probe/lesion: auc (test)"] == 0.90
    assert np.isnan(t.loc["identity", "30_linear_probe/lesion: auc (test)"])
    assert t.loc["identity", "kind"] == "baseline"
    pre = res.pretrain.set_index("method")
    assert pre.loc["isimed", "train_minutes"] == pytest.approx(1.0)
    assert pre.loc["simclr", "forward_passes_per_step"] == 2 * pre.loc["isimed", "forward_passes_per_step"] == 384


def test_verdicts_say_in_words_when_no_method_beats_a_shortcut(tmp_path):
    res = collect_results(_fake_run(tmp_path))
    said = " ".join(best_vs_shortcuts(res))
    assert "correspondence_median_mm (test): the best method, isimed (14), beats every shortcut baseline" in said
    assert "auc (test): NO method beats the shortcut baseline position-cubic (0.9)" in said
    assert "Holm p = 0.01" in said
    # the positive control is named and the gap to it said; it is not a shortcut the method "beats"
    assert "The positive control registration (affine) reaches 10; the best method leaves 4 to it." in said
    t = comparison_table(res)
    assert list(t["method"][-2:]) == ["registration (affine)", "chance"]  # methods, baselines, controls, references


def test_a_new_evaluation_step_appears_in_the_report_with_no_edit(tmp_path):
    rd = _fake_run(tmp_path)
    rd.write_headline(rd.step_dir("60_toy_eval"), pd.DataFrame(
        {"method": ["isimed", "identity"], "kind": ["method", "baseline"], "metric": "toy_score",
         "value": [0.8, 0.5], "split": "test"}))
    (rd.step_dir("60_toy_eval") / "toy.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 100)
    rd.write_key_figures(rd.step_dir("60_toy_eval"), [("Toy figure", "toy.png")])
    res = collect_results(rd)
    assert "60_toy_eval: toy_score (test)" in comparison_table(res).columns
    assert ("Toy figure", rd.path / "60_toy_eval" / "toy.png") in res.figures
    text = write_report(rd, provenance="SYNTHETIC cohort statement").read_text(encoding="utf-8")
    assert "toy_score" in text and "Toy figure" in text


def test_report_html_states_provenance_protocol_and_what_is_missing(tmp_path):
    rd = _fake_run(tmp_path)
    out = write_report(rd, provenance="SYNTHETIC cohort statement", methods=["isimed", "simclr", "barlowtwins"])
    text = out.read_text(encoding="utf-8")
    assert out == rd.path / "40_report" / "report.html"
    assert "SYNTHETIC cohort statement" in text and PROTOCOL[:60] in text
    assert "Not available in this run" in text and "barlowtwins" in text


def test_collect_results_names_a_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        collect_results(tmp_path / "nope")
