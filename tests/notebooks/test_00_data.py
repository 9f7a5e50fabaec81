"""notebooks/00_data.ipynb runs headlessly and writes the cohort table and figures into the run folder."""

from __future__ import annotations

import json

import pandas as pd
import pytest


def test_00_data_notebook_follows_the_notebook_conventions(check_notebook_conventions):
    nb = check_notebook_conventions("00_data.ipynb")
    params = next(c for c in nb.cells if c.cell_type == "code").source
    for name in ("run", "source", "layout", "target_spacing_mm", "n_subjects", "cohort_seed", "split_seed", "registered",
                 "show_subjects"):
        assert f"{name} = " in params


@pytest.mark.network
@pytest.mark.slow
def test_00_data_notebook_writes_summary_figures_and_provenance_into_the_run_dir(run_notebook):
    res = run_notebook("00_data.ipynb", {"n_subjects": 4, "target_spacing_mm": 6.0, "show_subjects": 2}, run="nb00")
    out = res.run_dir / "00_data"

    summary = pd.read_csv(out / "cohort_summary.csv")
    assert set(summary["split"]) == {"train", "val", "test", "external"}
    synthetic = summary[summary["split"] != "external"]
    assert len(synthetic) == 4
    assert (synthetic["spacing_mm"] == "6x6x6").all()
    assert (synthetic["lesion_voxels"] > 0).all() and (synthetic["n_labels"] > 40).all()
    external = set(summary.loc[summary["split"] == "external", "case_id"])
    assert external == {"totalseg-ct", "totalseg-mr", "totalseg-dicom"}
    # the run's data spec: what every later notebook of the run opens (issue 19 item 4)
    spec = json.loads((out / "data_spec.json").read_text())
    assert spec["n_subjects"] == 4 and spec["target_spacing_mm"] == 6.0 and spec["source"] == "demo"

    pngs = {p.name for p in out.glob("*.png")}
    train_ids = sorted(synthetic.loc[synthetic["split"] == "train", "case_id"])
    assert {f"slices_{c}.png" for c in train_ids[:2]} <= pngs
    assert f"lesions_{train_ids[0]}.png" in pngs
    assert f"correspondence_{train_ids[1]}.png" in pngs
    assert {"slices_totalseg-ct.png", "slices_totalseg-mr.png", "slices_totalseg-dicom.png"} <= pngs
    assert all((out / p).stat().st_size > 5_000 for p in pngs)

    text = res.text_outputs()
    assert "SYNTHETIC" in text and "not manual masks" in text  # the provenance statement is printed
    assert "VBox" in text  # the interactive viewer was created (and did not block the headless run)
