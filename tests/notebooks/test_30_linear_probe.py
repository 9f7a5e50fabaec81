"""notebooks/30_linear_probe.ipynb runs headlessly on a tiny run and writes the probe tables into the run folder."""

from __future__ import annotations

import os

import pandas as pd
import pytest
import torch


def test_30_linear_probe_notebook_follows_the_notebook_conventions(check_notebook_conventions):
    nb = check_notebook_conventions("30_linear_probe.ipynb")
    params = next(c for c in nb.cells if c.cell_type == "code").source
    for name in ("run", "methods", "task", "organ", "n_per_class", "fit_split", "score_split", "negatives", "seed",
                 "cohort_seed", "source", "positives", "lesion_patch_size_vox", "control", "control_epochs"):
        assert f"{name} = " in params


def _train_tiny_run(run_dir, names):
    """A tiny run directory: each method trained for one step on a 4-subject demo cohort at 6 mm."""
    from medssl.data.source import open_data
    from medssl.methods import create_method
    from medssl.train.config import TrainConfig
    from medssl.train.loop import fit

    data = open_data("demo", n_subjects=12, target_spacing_mm=6.0, progress=False)
    train = data.volumes("train")
    config = TrainConfig(epochs=1, steps_per_epoch=1, device="cpu", precision="fp32", log_every=1)
    for name in names:
        torch.manual_seed(0)
        method = create_method(name, backbone="smallcnn", patch_size_vox=16, volumes_per_batch=2, patches_per_volume=4)
        fit(method, train, config, run_dir / name, progress=False)


@pytest.mark.network
@pytest.mark.slow
def test_30_linear_probe_notebook_writes_tables_skips_untrained_methods_and_states_provenance(run_notebook):
    from medssl import paths

    run = "nb30"
    run_dir = paths.runs_dir() / run  # the fixture points MEDSSL_RUNS at the test's tmp folder
    assert str(run_dir).startswith(os.environ["MEDSSL_RUNS"])
    trained = ["isimed", "simclr", "simsiam", "reg2d"]  # SimSiam and a 2.5D context method through the probe too
    _train_tiny_run(run_dir, trained)

    params = {
        "methods": [*trained, "barlowtwins"],  # barlowtwins has no checkpoint in this run
        "n_subjects": 12,  # 8 train / 2 val / 2 test
        "target_spacing_mm": 6.0,
        "patch_size_vox": 16,
        "lesion_patch_size_vox": 8,  # 48 mm at 6 mm, as the demo's 16 at 3 mm
        "n_per_class": 12,
        "control_n_per_class": 12,
        "control_epochs": 1,
        "inner_splits": 2,
        "raw_size_vox": 4,
    }
    res = run_notebook("30_linear_probe.ipynb", params, run=run)
    out = res.run_dir / "30_linear_probe" / "lesion"

    summary = pd.read_csv(out / "probe_summary.csv")
    twins = {m for m in summary["method"] if m.startswith("random-init[")}
    assert "random-init[smallcnn]" in twins  # isimed and simclr share one untrained SmallCNN twin
    baselines = twins | {"raw-intensity", "position-linear", "position-cubic"}
    assert set(summary["method"]) == set(trained) | baselines | {"supervised-cnn"}
    assert set(summary["metric"]) == {"auc", "accuracy", "f1", "sensitivity", "specificity"}
    assert (summary["split"] == "test").all()
    per_subject = pd.read_csv(out / "probe_per_subject.csv")
    # fit on the 2 val subjects, scored once on each of the 2 test subjects, for every feature set
    assert per_subject.groupby("method").size().eq(2).all()
    assert per_subject.groupby("unit").ngroups == 2
    assert summary.loc[summary["metric"] == "auc", "mean"].between(0, 1).all()
    tests = pd.read_csv(out / "paired_tests_auc.csv")
    n_rows = len(trained) + len(baselines) + 1  # and the control
    assert len(tests) == n_rows * (n_rows - 1) // 2
    # 2 test subjects: fewer than 5 units, so every pair is "not testable" (its raw p is kept for reading only)
    assert tests["not_testable"].str.startswith("not testable: 2 units").all()
    assert tests["t_pvalue_holm"].dropna().between(0, 1).all()
    assert (tests["min_wilcoxon_p"] == 0.5).all()
    head = pd.read_csv(out / "headline.csv")
    assert set(head[head.kind == "baseline"].method) == baselines and (head["split"] == "test").all()
    control = head[(head.kind == "control") & (head.metric == "auc")]
    assert control.method.tolist() == ["supervised-cnn"] and "control" in control.note.iloc[0]
    # the positive control trained on the 8 train subjects, its epoch chosen on validation
    history = pd.read_csv(out / "control_history.csv")
    assert list(history.columns) == ["epoch", "train_loss", "select_auc"] and len(history) == 1
    by_share = pd.read_csv(out / "probe_auc_by_share.csv")
    assert set(by_share.stratum) == {"< 1 %", "1-3 %", "3-10 %", ">= 10 %"}
    assert set(by_share.method) == set(summary.method) and (by_share.split == "test").all()
    assert (out / "probe_auc_by_lesion_kind.csv").is_file()
    for png in ("probe_auc_per_subject.png", "paired_tests_auc.png", "probe_positions.png"):
        assert (out / png).stat().st_size > 5_000

    # the shared patch set and the embedding cache live in runs/<run>/eval/
    assert len(list((res.run_dir / "eval" / "patchsets").glob("probe_lesion_seed0_*.npz"))) == 1
    assert len(list((res.run_dir / "eval" / "patchsets").glob("probe_lesion_control_seed0_*.npz"))) == 1
    assert len(list((res.run_dir / "eval" / "embeddings").glob("*.npy"))) == len(trained) + len(twins)

    text = res.text_outputs()
    assert "barlowtwins: no checkpoint" in text and "corresponding" in text  # the negative rule is stated
    assert "centred" in text and "positive control" in text  # the positive rule and the control's verdict
    assert "SYNTHETIC" in text and "SYNTHETIC" in (out / "provenance.txt").read_text()
