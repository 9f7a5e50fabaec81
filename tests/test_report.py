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


# ------------------------------------------------------------ two runs side by side (issue 21, item 4)


def _two_runs(tmp_path):
    """Run "seed0" and run "seed1": the same fake run, then B's headlines and seed changed."""
    from medssl.report import compare_runs  # noqa: F401  (imported here so a missing function fails every test)

    runs = {}
    for name, seed in (("seed0", 0), ("seed1", 1)):
        rd = _fake_run(tmp_path / name)
        (rd.path).rename(tmp_path / name / name)
        rd = RunDir(tmp_path / name / name)
        for m in ("isimed", "simclr"):
            cfg = json.loads(rd.files(m).config.read_text())
            rd.files(m).config.write_text(json.dumps({**cfg, "train": {"seed": seed, "epochs": 30}}))
        runs[name] = rd
    b = runs["seed1"]
    # B: isimed's correspondence error grows past aligned-identity (20 mm; lower is better): worse, and the verdict flips
    corr = pd.read_csv(b.path / "20_latent_space" / "headline.csv")
    corr.loc[corr["method"] == "isimed", "value"] = 22.0
    b.write_headline(b.step_dir("20_latent_space"), corr)
    # B: simclr's AUC rises by more than the per-unit std (0.05); raw-intensity is missing; barlowtwins is new
    probe = pd.read_csv(b.path / "30_linear_probe" / "lesion" / "headline.csv")
    probe.loc[probe["method"] == "simclr", "value"] = 0.75
    probe = probe[probe["method"] != "raw-intensity"]
    probe = pd.concat([probe, probe[probe["method"] == "simclr"].assign(method="barlowtwins", value=0.5)])
    b.write_headline(b.step_dir("30_linear_probe", "lesion"), probe)
    return runs["seed0"], b


def test_compare_runs_lines_up_two_runs_and_marks_better_worse_beyond_spread_and_one_run_rows(tmp_path):
    from medssl.report import compare_runs

    a, b = _two_runs(tmp_path)
    comp = compare_runs(a, b)
    assert (comp.name_a, comp.name_b) == ("seed0", "seed1")
    t = comp.table.set_index(["metric", "method"])
    iso = t.loc[("correspondence_median_mm", "isimed")]
    assert (iso["value_a"], iso["value_b"], iso["diff"], iso["change"]) == (14.0, 22.0, 8.0, "worse")
    assert not iso["beyond_spread"]  # no std in that table: nothing to compare the difference with
    sim = t.loc[("auc", "simclr")]
    assert sim["change"] == "better" and sim["diff"] == pytest.approx(0.09) and sim["beyond_spread"]
    assert t.loc[("auc", "isimed"), "change"] == "same" and not t.loc[("auc", "isimed"), "beyond_spread"]
    assert t.loc[("auc", "raw-intensity"), "change"] == "only in A" and np.isnan(t.loc[("auc", "raw-intensity"), "value_b"])
    assert t.loc[("auc", "barlowtwins"), "change"] == "only in B"
    assert t.loc[("auc", "position-cubic"), "split"] == "test" and t.loc[("auc", "position-cubic"), "n_b"] == 8

    changed, best_changed = comp.verdict_changes  # a flipped verdict, and another best method
    assert best_changed == ("30_linear_probe/lesion · auc (test): in seed0 the best method, isimed (0.7), does NOT beat "
                            "position-cubic (0.9); in seed1 the best method, simclr (0.75), does NOT beat position-cubic "
                            "(0.9).")
    assert changed.startswith("20_latent_space · correspondence_median_mm (test): in seed0 the best method, isimed (14), "
                              "beats every shortcut row; in seed1 the best method, isimed (22), does NOT beat "
                              "aligned-identity (scale+shift) (20)")
    assert comp.settings == ["isimed: train.seed: 0 vs 1", "simclr: train.seed: 0 vs 1"]
    assert "2 are better in B" not in comp.summary() and "1 are better in B, 1 worse" in comp.summary()

    wide = comp.wide().set_index("method")
    col = "20_latent_space: correspondence_median_mm (test)"
    assert wide.loc["isimed", [f"{col} | seed0", f"{col} | seed1", f"{col} | B-A"]].tolist() == [14.0, 22.0, 8.0]
    css = comp.highlights().set_index(comp.wide()["method"])
    auc = "30_linear_probe/lesion: auc (test)"
    assert css.loc["isimed", f"{col} | B-A"] == "background-color:#f8d7d7"  # worse for B: red
    assert css.loc["simclr", f"{auc} | B-A"] == "background-color:#d9f2d9;font-weight:bold"  # better, beyond spread
    assert css.loc["simclr", f"{auc} | seed1"] == "" and css.loc["isimed", f"{auc} | B-A"] == ""
    assert css.loc["raw-intensity", f"{auc} | seed0"] == css.loc["barlowtwins", f"{auc} | B-A"] == \
        "background-color:#fff3c4"  # one run only: yellow
    html = comp.styled().to_html()
    assert "#f8d7d7" in html and "#d9f2d9" in html and "#fff3c4" in html


def test_medssl_report_with_two_runs_writes_the_comparison_and_the_notebook_parameter_adds_it_to_the_report(
        tmp_path, capsys):
    from medssl.cli import main

    a, b = _two_runs(tmp_path)
    assert main(["report", str(a.path), str(b.path)]) == 0
    said = capsys.readouterr().out
    assert "Run A = seed0, run B = seed1" in said and "train.seed: 0 vs 1" in said
    out = a.path / "40_report" / "compare_seed1.html"
    assert f"comparison: {out}" in said
    text = out.read_text(encoding="utf-8")
    assert "seed0 vs seed1" in text and "#f8d7d7" in text and "does NOT beat aligned-identity" in text
    assert main(["report", str(a.path), str(b.path), str(b.path)]) == 1
    assert "one run or two" in capsys.readouterr().err
    report = write_report(a, compare_with=b, provenance="SYNTHETIC").read_text(encoding="utf-8")
    assert "Compared with run seed1" in report and "#d9f2d9" in report
    assert main(["report", str(a.path)]) == 0 and "report.html" in capsys.readouterr().out
