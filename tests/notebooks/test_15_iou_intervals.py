"""notebooks/15_iou_intervals.ipynb: shared-organ fraction per interval, realised IoU, collapse of trained variants."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from medssl.data.source import open_data
from medssl.evaluate.pairs import iou_interval_pairs, shared_label_summary, study_intervals

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def test_15_iou_intervals_notebook_follows_the_notebook_conventions(check_notebook_conventions):
    nb = check_notebook_conventions("15_iou_intervals.ipynb")
    params = next(c for c in nb.cells if c.cell_type == "code").source
    for name in ("run", "source", "cohort_seed", "methods", "intervals", "split", "crop_size_vox", "seed"):
        assert f"{name} = " in params


def _default_parameters() -> dict:
    """The notebook's parameters cell (literal assignments only, see the conventions test) as a dict."""
    nb = nbformat.read(str(NOTEBOOKS / "15_iou_intervals.ipynb"), as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code")
    return {stmt.targets[0].id: ast.literal_eval(stmt.value) for stmt in ast.parse(cell.source).body}


# README ("The interval study"): the share of pairs sharing an organ per interval, demo cohort, train split, 96 mm
# crops (32 vox at 3 mm there), crop 1 on the body, FLARE organs; [0, 1] (random cropping) is close to [0, 0]
README_SHARED = {"[0, 0]": 0.13, "[0.0001, 0.3]": 0.52, "[0.3, 0.6]": 0.81, "[0.6, 1]": 0.91, "[0, 1]": 0.22}


@pytest.mark.network
def test_the_share_of_pairs_sharing_an_organ_grows_with_the_iou_interval_as_the_readme_says(notebook_data_dir,
                                                                                                monkeypatch):
    """The functions 15_iou_intervals calls, on the 12-subject demo cohort at 6 mm (8 train subjects x 60 pairs)."""
    monkeypatch.setenv("MEDSSL_DATA", str(notebook_data_dir))
    monkeypatch.delenv("MEDSSL_CACHE", raising=False)
    p = _default_parameters()
    data = open_data("demo", n_subjects=12, cohort_seed=0, target_spacing_mm=6.0, progress=False)
    intervals = study_intervals(pd.DataFrame(), p["intervals"])  # no trained method: the notebook's intervals
    assert list(intervals) == list(README_SHARED)
    summary = shared_label_summary(iou_interval_pairs(
        data.volumes(p["split"]), intervals, crop_size_vox=16, pairs_per_volume=60, crop1_on_body=p["crop1_on_body"],
        labels=p["organs"], seed=p["seed"])).set_index("interval")  # fmt: skip
    share = summary["shared_fraction"]
    print(share.round(3).to_dict())
    rising = share[["[0, 0]", "[0.0001, 0.3]", "[0.3, 0.6]", "[0.6, 1]"]].to_numpy()
    assert (np.diff(rising) > 0.05).all(), share.to_dict()  # grows with the interval
    assert share["[0, 0]"] < share["[0, 1]"] < share["[0.0001, 0.3]"] - 0.1  # random cropping: near [0, 0]
    for name, value in README_SHARED.items():  # the README's numbers, within sampling noise of this smaller cohort
        assert abs(share[name] - value) <= 0.1, (name, share[name], value)
    assert (summary["n_subjects"] == len(data.volumes(p["split"]))).all()


@pytest.mark.network
@pytest.mark.slow
def test_15_iou_intervals_notebook_measures_the_intervals_and_reads_the_trained_variant(run_notebook, tmp_path):
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
    # the notebook's table is what the package computes for the notebook's parameters (its default organs, crop 1
    # on the body, the train split, the method's [0, 1] interval), on the same cohort
    p = _default_parameters()
    expected = shared_label_summary(iou_interval_pairs(
        data.volumes(p["split"]), {"simsiam-iou-0-1": (0.0, 1.0)}, crop_size_vox=16, pairs_per_volume=10,
        crop1_on_body=p["crop1_on_body"], labels=p["organs"], seed=p["seed"]))  # fmt: skip
    assert summary.loc[0, "n_pairs"] == expected.loc[0, "n_pairs"] > 0
    assert summary.loc[0, "shared_fraction"] == pytest.approx(expected.loc[0, "shared_fraction"], abs=1e-12)
    headline = pd.read_csv(out / "headline.csv")
    assert {"shared_organ_fraction", "pair_fallback_rate", "collapse_p", "collapse_z"} <= set(headline["metric"])
    assert set(headline["split"]) == {"train", "val"}
    titles = [f["title"] for f in json.loads((out / "key_figures.json").read_text())]
    assert "Pairs sharing an organ per IoU interval" in titles and any("Collapse" in t for t in titles)
    assert "SYNTHETIC" in res.text_outputs()
