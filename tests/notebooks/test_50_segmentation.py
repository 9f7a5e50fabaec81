"""notebooks/50_segmentation.ipynb runs headlessly on a tiny run and writes the kNN and fine-tuning tables into the run folder."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch


def test_50_segmentation_notebook_follows_the_notebook_conventions(check_notebook_conventions):
    nb = check_notebook_conventions("50_segmentation.ipynb")
    params = next(c for c in nb.cells if c.cell_type == "code").source
    for name in ("run", "methods", "cohort_seed", "seed", "stride_vox", "n_atlases", "n_draws", "k_candidates",
                 "registration", "registration_vote", "body_alignment", "finetune_methods", "finetune_n",
                 "finetune_steps", "freeze_encoder"):
        assert f"{name} = " in params
    assert 'methods = []' in params  # every trained method of the run by default


def _train_tiny_run(run_dir, names):
    from medssl.data.source import open_data
    from medssl.methods import create_method
    from medssl.train.config import TrainConfig
    from medssl.train.loop import fit

    data = open_data("demo", n_subjects=6, target_spacing_mm=6.0, progress=False)
    config = TrainConfig(epochs=1, steps_per_epoch=1, device="cpu", precision="fp32", log_every=1)
    for name in names:
        torch.manual_seed(0)
        method = create_method(name, backbone="smallcnn", patch_size_vox=16, volumes_per_batch=2, patches_per_volume=4)
        fit(method, data.volumes("train"), config, run_dir / name, progress=False)


@pytest.mark.network
@pytest.mark.slow
def test_50_segmentation_notebook_writes_knn_and_finetuning_tables_with_baselines_and_the_report_inputs(run_notebook):
    from medssl import paths

    run = "nb50"
    trained = ["isimed", "simclr", "simsiam", "reg2d"]  # SimSiam and a 2.5D context method through kNN too
    _train_tiny_run(paths.runs_dir() / run, trained)
    params = {
        "n_subjects": 6, "target_spacing_mm": 6.0, "stride_vox": 6, "atlas_pool": 2, "n_atlases": [1, 2],
        "n_draws": 2, "k_candidates": [3, 5], "n_val_queries": 1, "raw_patch_vox": 8, "raw_pooled_vox": 2,
        "finetune_n": [1], "finetune_steps": 2, "finetune_crop_vox": 32, "finetune_methods": "demo",
        "batch_size": 64, "surface_tolerance_mm": 6.0,
    }  # fmt: skip
    res = run_notebook("50_segmentation.ipynb", params, run=run)
    out = res.run_dir / "50_segmentation"

    curve = pd.read_csv(out / "knn_curve.csv")
    rows = set(curve["method"])
    shortcuts = ["raw-intensity", "identity", "aligned-identity (scale+shift)", "aligned-identity (body affine)"]
    twins = sorted(m for m in rows if m.startswith("random-init["))
    assert "random-init[smallcnn]" in twins  # isimed and simclr share one untrained SmallCNN twin
    assert {*trained, "registration (affine)", *shortcuts, *twins} == rows
    kinds = curve.drop_duplicates("method").set_index("method")["kind"]
    assert kinds[[*shortcuts, *twins]].eq("baseline").all() and kinds["registration (affine)"] == "control"
    assert kinds[trained].eq("method").all()
    assert set(curve["n_atlases"]) == {1, 2} and curve["mean"].between(0, 1).all()
    assert set(pd.read_csv(out / "knn_k_choice_val.csv")["k"]) == {3, 5}  # k chosen on validation subjects
    assert set(pd.read_csv(out / "knn_scores.csv")["split"]) == {"test"}

    table = pd.read_csv(out / "finetune_table.csv", index_col=0)
    assert {"isimed", "simsiam"} <= set(table.index) <= {"isimed", "simsiam", *twins}  # "demo": ISImed, SimSiam, twins
    assert "random-init[smallcnn]" in table.index
    assert (out / "finetune" / "simsiam" / "n1" / "metrics.jsonl").is_file()
    verdicts = pd.read_csv(out / "knn_verdicts.csv")
    assert set(verdicts.loc[verdicts.method == "isimed", "baseline"]) == {"registration (affine)", "random-init[smallcnn]",
                                                                          *shortcuts}
    # the Holm family is the comparisons made: each method against its own twin, the shortcuts and the control
    assert set(verdicts["method"]) == set(trained) and (verdicts["family_size"] == len(verdicts)).all()
    fp = pd.read_csv(out / "knn_false_positives.csv")
    assert {"fp_ml", "absent_fp_ml"} <= set(fp.columns) and (fp["fp_ml"] >= 0).all()
    assert (out / "finetune" / "isimed" / "n1" / "metrics.jsonl").is_file()
    head = pd.read_csv(out / "headline.csv")
    assert {"knn_dice_n1", "knn_dice_n2", "knn_fp_ml_n2", "finetune_dice_n1", "finetune_fp_ml_n1"} <= set(head["metric"])
    assert set(head.loc[head["method"] == "registration (affine)", "kind"]) == {"control"}
    assert set(head.loc[head["method"] == "identity", "kind"]) == {"baseline"}
    figures = json.loads((out / "key_figures.json").read_text())
    assert len(figures) == 4 and all((res.run_dir / f["file"]).stat().st_size > 5_000 for f in figures)
    assert "SYNTHETIC" in res.text_outputs()
