"""notebooks/60_study.ipynb combines a study's seeds into tables with intervals, comparisons, figures and a report."""

from __future__ import annotations

import pandas as pd

from tests.evaluate.test_study_aggregate import make_fake_study


def test_60_study_follows_the_notebook_conventions(check_notebook_conventions):
    nb = check_notebook_conventions("60_study.ipynb")
    params = next(c for c in nb.cells if c.cell_type == "code").source
    for name in ("run", "seeds", "methods", "n_boot", "alpha", "publish_dir"):
        assert f"{name} = " in params


def test_60_study_writes_the_tables_the_figures_the_report_and_publishes_them(run_notebook, tmp_path):
    make_fake_study(tmp_path / "runs" / "s")  # the fixture's MEDSSL_RUNS
    res = run_notebook("60_study.ipynb", {"n_boot": 300, "publish_dir": str(tmp_path / "pub"),
                                          "methods": ["isimed", "simclr"]}, run="s")
    out = res.run_dir / "60_study"
    table = pd.read_csv(out / "study_table.csv")
    assert {"isimed", "simclr", "random-init", "identity"} <= set(table["method"])  # baselines stay with a filter
    assert (table.loc[table.metric == "knn_dice@3", "n_seeds"] == 2).all()
    comp = pd.read_csv(out / "paired_comparisons.csv")
    assert set(comp["role"]) == {"twin", "strongest shortcut"}
    q1 = pd.read_csv(out / "question_1.csv")
    assert set(q1["b"]) == {"simclr"} and (q1["a"] == "isimed").all()  # barlowtwins is not in this study
    for png in ("knn_dice_vs_atlases.png", "score_vs_iou_interval.png", "pretext_learning_curves.png"):
        assert (out / png).stat().st_size > 1000, png
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "The three questions" in html and "Settings against each paper" in html and "knn_dice@3" in html
    assert {p.name for p in (tmp_path / "pub").iterdir()} >= {"report.html", "study_table.csv", "paired_comparisons.csv"}
