"""notebooks/10_pretrain.ipynb trains every registered method headlessly and leaves a complete run folder."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from medssl.methods import method_info
from medssl.train import load_method


def test_10_pretrain_notebook_follows_the_notebook_conventions(check_notebook_conventions):
    nb = check_notebook_conventions("10_pretrain.ipynb")
    params = next(c for c in nb.cells if c.cell_type == "code").source
    for name in ("run", "method", "preset", "data_overrides", "method_overrides", "train_overrides", "seed", "resume"):
        assert f"{name} = " in params


@pytest.mark.network
@pytest.mark.slow
def test_10_pretrain_notebook_trains_a_method_at_tiny_parameters_and_leaves_a_complete_run_folder(run_notebook):
    """One papermill run (issue 18: each notebook once); every registered method goes through the same steps
    without a kernel in the contract tests (tests/methods/test_shared_method_contract.py). SimSiam here: it
    shows every training figure (loss, collapse, effective rank, realised IoU); the pipeline test runs ISImed
    and SimCLR through this notebook."""
    method = "simsiam"
    res = run_notebook("10_pretrain.ipynb", {
        "method": method, "preset": "tiny", "data_overrides": {"n_subjects": 4, "target_spacing_mm": 6.0},
        "train_overrides": {"epochs": 2, "steps_per_epoch": 2},
    }, run="nb10")
    out = res.run_dir / method
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and config["base_method"] == method_info(method)["base"]
    assert config["train"]["epochs"] == 2 and config["resolved"]["steps_per_epoch"] == 2
    metrics = pd.read_json(out / "metrics.jsonl", lines=True)
    assert metrics["loss"].notna().all()  # 2 epochs x 2 steps, each logged; validated before and after each epoch
    assert list(metrics.loc[metrics.split == "train", "step"]) == [1, 2, 3, 4]
    assert list(metrics.loc[metrics.split == "val", "step"]) == [0, 2, 4]
    assert (out / "loss_curves.png").stat().st_size > 5_000
    pngs = sorted(out.glob("*.png"))  # loss, collapse, effective rank (val), realised IoU: each figure saved
    assert len(pngs) == 4 and all(p.stat().st_size > 5_000 for p in pngs), [p.name for p in pngs]
    summary = pd.read_csv(out / "summary.csv")
    assert summary.loc[0, "n_volumes"] >= 1 and summary.loc[0, "split"] == "val"  # chosen on, and shown for, val
    assert summary.loc[0, "method"] == method
    model = load_method(out / "checkpoints" / "last.pt")
    assert model.registry_name == method
    # the checkpoint says how open_data prepared the training volumes (issue 21): the notebook's 6 mm, as cached
    assert model.preprocessing["config"]["target_spacing_mm"] == [6.0, 6.0, 6.0]
    assert model.preprocessing["patch_size_vox"] == list(model.patch_size_vox)
    assert list(out.glob("events.out.tfevents.*"))  # live curves for TensorBoard beside metrics.jsonl
    assert "SYNTHETIC" in res.text_outputs()  # provenance is stated
