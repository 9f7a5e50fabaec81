"""`medssl pipeline --plan demo` end to end at tiny parameters: every notebook runs, the report is written."""

from __future__ import annotations

import pandas as pd
import pytest

from medssl import pipeline

TINY = {
    "n_subjects": 12, "target_spacing_mm": 6.0, "seed": 0, "cohort_seed": 0,
    "00_data.show_subjects": 1,
    "10_pretrain.preset": "tiny",
    "20_latent_space.n_patches_per_volume": 12, "20_latent_space.stride_vox": 8, "20_latent_space.n_corr_points": 30,
    "20_latent_space.n_corr_partners": 1, "20_latent_space.n_map_train_subjects": 1, "20_latent_space.umap": False,
    "20_latent_space.batch_size": 64,
    "25_latent_viewer.stride_vox": 8, "25_latent_viewer.max_scatter_points": 200, "25_latent_viewer.batch_size": 64,
    "30_linear_probe.n_per_class": 12, "30_linear_probe.patch_size_vox": 16,
    "30_linear_probe.inner_splits": 2, "30_linear_probe.raw_size_vox": 4,
    "50_segmentation.stride_vox": 8, "50_segmentation.atlas_pool": 2, "50_segmentation.n_atlases": [1, 2],
    "50_segmentation.n_draws": 1, "50_segmentation.n_queries": 1, "50_segmentation.raw_patch_vox": 8,
    "50_segmentation.raw_pooled_vox": 2, "50_segmentation.finetune_n": [1], "50_segmentation.finetune_steps": 2,
    "50_segmentation.finetune_crop_vox": 32, "50_segmentation.finetune_test_subjects": 1,
    "50_segmentation.batch_size": 64,
}  # fmt: skip


@pytest.mark.network
@pytest.mark.slow
def test_demo_plan_runs_every_notebook_in_order_and_writes_the_html_report(tmp_path, notebook_data_dir, monkeypatch):
    monkeypatch.setenv("MEDSSL_DATA", str(notebook_data_dir))
    monkeypatch.delenv("MEDSSL_CACHE", raising=False)
    monkeypatch.setenv("MPLBACKEND", "agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # pytest -n 2 already uses both cores
    runs = tmp_path / "runs"
    res = pipeline.run_pipeline("demo", "e2e", methods=["isimed", "simclr"], overrides=TINY, runs_root=runs,
                                progress=False)
    assert [s.status for s in res.steps] == ["ok"] * 9  # 00, 10 x 2, 20, 25, 30 x 2, 50, 40
    run = runs / "e2e"
    for f in ["00_data/00_data.ipynb", "isimed/10_pretrain.ipynb", "simclr/checkpoints/last.pt",
              "20_latent_space/fidelity.csv", "30_linear_probe/lesion/probe_summary.csv",
              "30_linear_probe/liver/probe_summary.csv", "50_segmentation/knn_curve.csv", "40_report/40_report.ipynb"]:
        assert (run / f).is_file(), f
    table = pd.read_csv(run / "40_report" / "comparison.csv")
    assert {"isimed", "simclr", "random-init[smallcnn]", "identity", "aligned-identity (scale+shift)", "position-cubic",
            "registration (affine)"} <= set(table["method"])
    assert {"20_latent_space: distance_spearman (test)", "20_latent_space: decoding_r2 (test)",
            "20_latent_space: correspondence_median_mm (test)", "30_linear_probe/lesion: auc (test)",
            "30_linear_probe/liver: auc (test)", "50_segmentation: knn_dice_n2 (test)",
            "50_segmentation: finetune_dice_n1 (test)"} <= set(table.columns)
    html = (run / "40_report" / "report.html").read_text(encoding="utf-8")
    assert "SYNTHETIC" in html and "not manual masks" in html
    assert "Do the methods beat the shortcuts?" in html and "validation split" in html
    assert "<img src=\"data:image/png;base64," in html
