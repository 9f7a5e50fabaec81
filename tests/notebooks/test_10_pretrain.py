"""notebooks/10_pretrain.ipynb trains every registered method headlessly and leaves a complete run folder."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from medssl.methods import list_methods, method_info
from medssl.train import load_method


def test_10_pretrain_notebook_follows_the_notebook_conventions(check_notebook_conventions):
    nb = check_notebook_conventions("10_pretrain.ipynb")
    params = next(c for c in nb.cells if c.cell_type == "code").source
    for name in ("run", "method", "preset", "source", "method_overrides", "train_overrides", "seed", "cohort_seed",
                 "resume"):
        assert f"{name} = " in params


# every registered method class, and every variant make demo runs; the other variants differ from their base only
# in config values, which the shared contract tests cover (saves a minute of notebook runs per suite)
NOTEBOOK_METHODS = [m for m in list_methods() if method_info(m)["base"] == m or method_info(m)["in_demo"]]


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.parametrize("method", NOTEBOOK_METHODS)
def test_10_pretrain_notebook_trains_each_method_at_tiny_parameters(run_notebook, method):
    res = run_notebook("10_pretrain.ipynb", {
        "method": method, "preset": "tiny", "n_subjects": 4, "target_spacing_mm": 6.0,
        "train_overrides": {"epochs": 2, "steps_per_epoch": 2},
    }, run="nb10")
    out = res.run_dir / method
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and config["base_method"] == method_info(method)["base"]
    assert config["train"]["epochs"] == 2 and config["resolved"]["steps_per_epoch"] == 2
    metrics = pd.read_json(out / "metrics.jsonl", lines=True)
    trains = method in list_methods(trains=True)  # untrained baselines log their validation step only
    assert metrics["step"].max() == (4 if trains else 0) and metrics["loss"].notna().all()
    assert (out / "loss_curves.png").stat().st_size > 5_000
    summary = pd.read_csv(out / "summary.csv")
    assert summary.loc[0, "n_volumes"] >= 1 and summary.loc[0, "split"] == "val"  # chosen on, and shown for, val
    model = load_method(out / "checkpoints" / "last.pt")
    assert model.registry_name == method
    # the checkpoint says how open_data prepared the training volumes (issue 21): the notebook's 6 mm, as cached
    assert model.preprocessing["config"]["target_spacing_mm"] == [6.0, 6.0, 6.0]
    assert model.preprocessing["patch_size_vox"] == list(model.patch_size_vox)
    assert list(out.glob("events.out.tfevents.*"))  # live curves for TensorBoard beside metrics.jsonl
    assert "SYNTHETIC" in res.text_outputs()  # provenance is stated
