"""Bring your own scans: the `folder` plan on a few real scans of mixed modality runs end to end.

Real volumes shipped with the packages medssl installs: the TotalSegmentator example CT crop (with its
model-made labels), its MR and DICOM CT examples, and nibabel's T1 brain. They do not share a world frame
and there are too few for the full protocol: every notebook must run and say what it had to give up.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from medssl import pipeline


def _own_scans(examples: Path, root: Path) -> Path:
    import nibabel

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    shutil.copy(examples / "example_ct_sm.nii.gz", root / "images" / "abdomen_ct.nii.gz")
    shutil.copy(examples / "example_seg_fast.nii.gz", root / "labels" / "abdomen_ct.nii.gz")
    shutil.copy(examples / "example_mr_sm.nii.gz", root / "images" / "abdomen_mr.nii.gz")
    shutil.copy(examples / "example_seg_mr.nii.gz", root / "labels" / "abdomen_mr.nii.gz")
    shutil.copytree(examples / "example_ct_dicom", root / "images" / "abdomen_ct_dicom")
    shutil.copy(Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii", root / "images" / "brain_t1.nii")
    return root


@pytest.mark.network
@pytest.mark.slow
def test_the_folder_plan_runs_on_a_few_real_mixed_modality_scans(tmp_path, notebook_data_dir, monkeypatch):
    from medssl.data.demo import fetch_totalseg_examples

    monkeypatch.setenv("MEDSSL_DATA", str(notebook_data_dir))
    monkeypatch.delenv("MEDSSL_CACHE", raising=False)
    monkeypatch.setenv("MPLBACKEND", "agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    folder = _own_scans(fetch_totalseg_examples(progress=False), tmp_path / "my_scans")
    overrides = {
        "source": str(folder), "target_spacing_mm": 4.0,
        "10_pretrain.preset": "tiny", "10_pretrain.method_overrides": {"patch_size_vox": 8},
        "20_latent_space.patch_size_vox": 8, "20_latent_space.n_patches_per_volume": 12,
        "20_latent_space.stride_vox": 4, "20_latent_space.umap": False, "20_latent_space.batch_size": 64,
        "25_latent_viewer.stride_vox": 4, "25_latent_viewer.max_scatter_points": 200,
        "30_linear_probe.patch_size_vox": 8, "30_linear_probe.n_per_class": 8,
    }  # fmt: skip
    runs = tmp_path / "runs"
    res = pipeline.run_pipeline("folder", "mine", methods=["isimed"], overrides=overrides, runs_root=runs,
                                progress=False)
    status = {s.notebook: s.status for s in res.steps}
    assert res.ok and status["00_data.ipynb"] == status["10_pretrain.ipynb"] == status["20_latent_space.ipynb"] == "ok"
    assert status["40_report.ipynb"] == "ok"
    run = runs / "mine"
    summary = pd.read_csv(run / "00_data" / "cohort_summary.csv").set_index("case_id")
    assert summary.loc["abdomen_ct", "modality"] == "ct" and summary.loc["abdomen_ct", "intensity"] == "ct_window"
    assert summary.loc["brain_t1", "intensity"] == "percentile"  # modality-aware defaults, stated in 00_data
    nb20 = (run / "20_latent_space" / "20_latent_space.ipynb").read_text(encoding="utf-8")
    assert "do NOT share a world frame" in nb20 and "correspondence skipped" in nb20
    assert (run / "20_latent_space" / "headline.csv").is_file()
    if status["30_linear_probe.ipynb"] == "not applicable":  # the held-out scans carry no labelled organ
        step = next(s for s in json.loads((run / "pipeline.json").read_text())["steps"]
                    if s["notebook"] == "30_linear_probe.ipynb")
        assert "no evaluated subject has a labelled" in step["message"]
        assert "not applicable" in (run / "40_report" / "report.html").read_text(encoding="utf-8")
