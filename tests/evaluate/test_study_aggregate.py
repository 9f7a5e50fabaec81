"""Combining a study's seeds: per-subject units, bootstrap intervals, seed spread, paired comparisons, questions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from medssl.evaluate import study as st
from medssl.study import write_study_report

SUBJECTS = [f"demo-s{40 + i:03d}" for i in range(8)]
ORGANS = ["liver", "spleen"]


def _knn_rows(seed: int, method: str, kind: str, base: float, rng) -> list[dict]:
    rows = []
    for n in (1, 3):
        for draw in range(2):
            for i, q in enumerate(SUBJECTS):
                for organ in ORGANS:
                    rows.append({"method": method, "kind": kind, "k": 21, "n_atlases": n, "draw": draw, "atlases": "",
                                 "query": q, "organ": organ, "dice": base + 0.01 * i + 0.02 * n + rng.normal(0, 0.01),
                                 "split": "test"})
    return rows


@pytest.fixture
def fake_study(tmp_path):
    return make_fake_study(tmp_path / "s")


def make_fake_study(root):
    """Two seeds; ISImed beats its twin (random-init) by 0.1 Dice on every subject; identity is a baseline."""
    rng = np.random.default_rng(0)
    for seed in (0, 1):
        d = root / f"seed{seed}"
        (d / "50_segmentation").mkdir(parents=True)
        rows = (_knn_rows(seed, "isimed", "method", 0.5, rng) + _knn_rows(seed, "simclr", "method", 0.42, rng)
                + _knn_rows(seed, "random-init", "baseline", 0.4, rng) + _knn_rows(seed, "identity", "baseline", 0.3, rng))
        pd.DataFrame(rows).to_csv(d / "50_segmentation" / "knn_scores.csv", index=False)
        (d / "30_linear_probe" / "lesion").mkdir(parents=True)
        pd.DataFrame([{"method": m, "unit": q, "auc": a + 0.01 * i}
                      for m, a in (("isimed", 0.6), ("random-init", 0.5)) for i, q in enumerate(SUBJECTS[:4])]
                     ).to_csv(d / "30_linear_probe" / "lesion" / "probe_per_subject.csv", index=False)
        (d / "20_latent_space").mkdir()
        pts = [{"method": m, "case_a": a, "case_b": b, "point": p, "error_mm": e + p + seed}
               for m, e in (("isimed", 20.0), ("identity", 30.0), ("chance", 150.0))
               for a in SUBJECTS for b in SUBJECTS[:2] if a != b for p in range(3)]
        pd.DataFrame(pts).to_csv(d / "20_latent_space" / "correspondence_points.csv", index=False)
        for m, backbone in (("isimed", "smallcnn"), ("reg2d", "d2d"), ("xavier", "d2d")):
            (d / m / "checkpoints").mkdir(parents=True)
            (d / m / "checkpoints" / "last.pt").write_bytes(b"")
            (d / m / "config.json").write_text(json.dumps({"method_config": {"backbone": backbone},
                                                           "resolved": {"trains": m != "xavier"}}))
        val = [{"split": "val", "step": k, "abs_err_mm": e} for k, e in ((0, 50.0), (20, 30.0 + seed), (40, 31.0))]
        (d / "isimed" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
        (d / "isimed" / "early_stopping.json").write_text(json.dumps(
            {"measure": "abs_err_mm", "mode": "min", "best_step": 20, "stop_reason": "early stopping at step 40"}))
    return root


def test_units_are_one_value_per_seed_metric_row_and_test_subject(fake_study):
    units = st.collect_units(fake_study)
    knn = units[units.metric == "knn_dice@3"]
    assert set(knn.method) == {"isimed", "simclr", "random-init", "identity"}
    assert len(knn) == 2 * 4 * 8  # seeds x rows x subjects: organs and draws are averaged
    raw = pd.read_csv(fake_study / "seed1" / "50_segmentation" / "knn_scores.csv")
    one = raw[(raw.method == "isimed") & (raw.n_atlases == 3) & (raw["query"] == SUBJECTS[2])]
    got = knn[(knn.seed == 1) & (knn.method == "isimed") & (knn.unit == SUBJECTS[2])].value.item()
    assert got == pytest.approx(one.dice.mean())
    corr = units[units.metric == "correspondence_median_mm"]
    assert set(corr.method) == {"isimed", "identity"}  # chance is a reference, not a row to compare
    assert not corr.higher_is_better.any() and corr.unit.nunique() == 8
    # the median over a query subject's points: errors e + point (0, 1, 2) + seed, over its pairs
    assert corr[(corr.seed == 0) & (corr.method == "isimed") & (corr.unit == SUBJECTS[5])].value.item() == 21.0
    assert set(units[units.metric == "probe_auc_lesion"].kind) == {"method", "baseline"}


def test_the_table_has_a_bootstrap_interval_over_subjects_and_the_spread_over_seeds(fake_study):
    units = st.collect_units(fake_study)
    table = st.study_table(units, n_boot=4000).set_index(["metric", "method"])
    r = table.loc[("knn_dice@3", "isimed")]
    per_subject = units[(units.metric == "knn_dice@3") & (units.method == "isimed")].groupby("unit").value.mean()
    assert r["mean"] == pytest.approx(per_subject.mean())
    assert r["ci_low"] < r["mean"] < r["ci_high"]
    # the percentile bootstrap of a mean is close to mean +- 1.96 s / sqrt(n) (n = 8 subjects: within 25 %)
    half = 1.96 * per_subject.std(ddof=0) / np.sqrt(len(per_subject))
    assert (r["ci_high"] - r["ci_low"]) / 2 == pytest.approx(half, rel=0.25)
    per_seed = units[(units.metric == "knn_dice@3") & (units.method == "isimed")].groupby("seed").value.mean()
    assert r["seed_sd"] == pytest.approx(per_seed.std(ddof=1))
    assert (r["n_units"], r["n_seeds"]) == (8, 2)
    lo, hi = st.bootstrap_interval(np.full(6, 0.7))
    assert lo == hi == pytest.approx(0.7)
    assert np.isnan(st.bootstrap_interval(np.array([0.5]))[0])  # one unit: no interval


def test_paired_comparisons_use_the_twin_the_strongest_shortcut_and_holm_over_the_family(fake_study):
    units = st.collect_units(fake_study)
    comp = st.paired_comparisons(units, {"isimed": "random-init", "simclr": "random-init"})
    knn = comp[comp.metric == "knn_dice@3"].set_index(["method", "role"])
    assert knn.loc[("isimed", "twin"), "comparator"] == "random-init"
    assert knn.loc[("isimed", "strongest shortcut"), "comparator"] == "identity"  # the twin is not a shortcut
    assert (knn["family_size"] == 4).all()  # 2 methods x (twin, shortcut); no control row in this run
    row = knn.loc[("isimed", "twin")]
    avg = units[units.metric == "knn_dice@3"].groupby(["method", "unit"]).value.mean().unstack(0)
    p = stats.ttest_rel(avg["isimed"], avg["random-init"]).pvalue
    assert row["t_pvalue"] == pytest.approx(p)
    assert row["diff"] == pytest.approx((avg["isimed"] - avg["random-init"]).mean())
    assert row["verdict"] == "better" and row["t_pvalue_holm"] >= row["t_pvalue"]
    smallest = knn["t_pvalue"].min()
    assert knn["t_pvalue_holm"].min() == pytest.approx(min(1.0, 4 * smallest))  # Holm's first step: m * p_(1)
    assert row["min_wilcoxon_p_holm"] == pytest.approx(4 * 2 / 2**8)
    probe = comp[comp.metric == "probe_auc_lesion"]
    assert (probe["verdict"] == "not testable: 4 units < 5").all() and probe["t_pvalue_holm"].isna().all()


def test_head_to_head_reads_the_metric_direction_and_errors_lower_is_better(fake_study):
    units = st.collect_units(fake_study)
    h = st.head_to_head(units, [("isimed", "simclr"), ("isimed", "identity")]).set_index(["metric", "b"])
    assert h.loc[("knn_dice@3", "simclr"), "verdict"] == "isimed better"
    corr = h.loc[("correspondence_median_mm", "identity")]
    assert corr["diff"] == pytest.approx(-10.0) and corr["diff_ci_high"] == pytest.approx(-10.0)
    # a constant difference on every subject gives t = inf and p = 0: no evidence, so no test
    assert corr["verdict"] == "not testable: the differences do not vary" and np.isnan(corr["t_pvalue_holm"])
    assert (h["family_size"] == len(h)).all()


def test_keep_rows_keeps_every_baseline_and_the_twin_fallback_follows_the_architecture(fake_study):
    units = st.collect_units(fake_study)
    kept = st.keep_rows(units, ["isimed"])
    assert set(kept.method) == {"isimed", "random-init", "identity"}
    assert st.twins_of(fake_study) == {"isimed": "random-init", "reg2d": "xavier"}


def test_context_ordering_ranks_the_study_next_to_the_paper():
    table = pd.DataFrame([{"metric": "knn_dice@9", "method": m, "mean": v, "ci_low": v - 0.01, "ci_high": v + 0.01}
                          for m, v in (("heatmap", 0.3), ("reg2d", 0.35), ("doersch", 0.2), ("gvdiff", 0.25),
                                       ("xavier", 0.1))])
    o = st.context_ordering(table, "knn_dice@9").set_index("method")
    assert o.loc["heatmap", "paper_rank"] == 1 and o.loc["xavier", "paper_rank"] == 5
    assert o.loc["reg2d", "study_rank"] == 1 and o.loc["heatmap", "study_rank"] == 2


def test_the_report_is_one_html_file_with_the_tables(fake_study, tmp_path):
    units = st.collect_units(fake_study)
    table = st.study_table(units, n_boot=200)
    path = write_study_report(fake_study, tmp_path / "out", sections=[("Table", [st.table_cells(table).reset_index()]),
                                                                         ("Curve", [st.knn_curve_figure(table)])])
    html = path.read_text()
    assert "knn_dice@3" in html and "data:image/png;base64" in html and "<script" not in html


def test_learning_curves_read_the_validation_measure_of_every_trained_unit(fake_study):
    curves = st.learning_curves(fake_study)
    assert set(curves.method) == {"isimed"}  # reg2d has no metrics here; xavier never trains
    one = curves[curves.seed == 1]
    assert one.step.tolist() == [0, 20, 40] and one.value.tolist() == [50.0, 31.0, 31.0]
    assert (curves.best_step == 20).all() and (curves.measure == "abs_err_mm").all()
    fig = st.learning_curve_figure(curves)
    assert fig.axes[0].get_title() == "isimed: val abs_err_mm (min)"


def test_the_knn_figure_has_one_panel_per_paper_with_the_shared_baselines_in_each():
    rows = [("isimed", "method"), ("simclr", "method"), ("simsiam-iou-0-1", "method"), ("reg2d", "method"),
            ("xavier", "baseline"), ("identity", "baseline"), ("registration (affine)", "control"),
            ("my-own", "method")]
    table = pd.DataFrame([{"metric": f"knn_dice@{n}", "method": m, "kind": k, "mean": 0.1 * n, "ci_low": 0.0,
                           "ci_high": 1.0} for m, k in rows for n in (1, 3)])
    fig = st.knn_curve_figure(table)
    legends = {ax.get_title(): [t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes}
    shared = ["identity", "registration (affine)"]
    assert legends == {"ISImed paper": ["isimed", "simclr", *shared],
                       "SimSiam thesis (IoU intervals)": ["simsiam-iou-0-1", *shared],
                       "Blendowski et al. (context)": ["reg2d", "xavier", *shared],
                       "other methods": ["my-own", *shared]}
    solid = {line.get_label(): line.get_linestyle() for line in fig.axes[2].get_lines()}
    assert solid == {"reg2d": "-", "xavier": "--", "identity": "--", "registration (affine)": "--"}
