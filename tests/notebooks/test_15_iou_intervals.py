"""notebooks/15_iou_intervals.ipynb: shared-organ fraction per interval, realised IoU, collapse of trained variants."""

from __future__ import annotations

import json

import pandas as pd
import pytest


def test_15_iou_intervals_notebook_follows_the_notebook_conventions(check_notebook_conventions):
    nb = check_notebook_conventions("15_iou_intervals.ipynb")
    params = next(c for c in nb.cells if c.cell_type == "code").source
    for name in ("run", "source", "cohort_seed", "methods", "intervals", "split", "crop_size_vox", "seed"):
        assert f"{name} = " in params


@pytest.mark.network
@pytest.mark.slow
def test_15_iou_intervals_notebook_measures_the_intervals_and_reads_the_trained_variant(run_notebook, tmp_path):
    from medssl.data.source import open_data
    from medssl.presets import build_run
    from medssl.train import fit

    data = open_data("demo", n_subjects=4, cohort_seed=0, target_spacing_mm=6.0, progress=False)
    model, train = build_run("simsiam-iou-0-1", "tiny", train_overrides={"epochs": 1, "steps_per_epoch": 2})
    fit(model, data.volumes("train"), train, tmp_path / "runs" / "nb15" / "simsiam-iou-0-1",
        val_volumes=data.volumes("val"), progress=False)
    res = run_notebook("15_iou_intervals.ipynb", {
        "n_subjects": 4, "target_spacing_mm": 6.0, "crop_size_vox": 16, "pairs_per_volume": 10,
    }, run="nb15")
    out = res.run_dir / "15_iou_intervals"
    summary = pd.read_csv(out / "shared_organ_fraction.csv")
    assert summary["interval"].tolist() == ["simsiam-iou-0-1"]  # the run's trained IoU-pair method
    assert 0 <= summary.loc[0, "shared_fraction"] <= 1 and summary.loc[0, "n_pairs"] > 0
    headline = pd.read_csv(out / "headline.csv")
    assert {"shared_organ_fraction", "pair_fallback_rate", "collapse_p", "collapse_z"} <= set(headline["metric"])
    assert set(headline["split"]) == {"train", "val"}
    titles = [f["title"] for f in json.loads((out / "key_figures.json").read_text())]
    assert "Pairs sharing an organ per IoU interval" in titles and any("Collapse" in t for t in titles)
    assert "SYNTHETIC" in res.text_outputs()
