"""Lesion-labelled collections (MSD / autoPET / BraTS style): the foreground is the body, not the lesion.

Issue found in review: with ``foreground_only`` every training patch was centred on a lesion
(the label map), evaluation sets shrank to lesions and the probe found no negatives.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from medssl.data.source import open_data
from medssl.evaluate import draw_labelled_patch_set, draw_uniform_patch_set
from medssl.sampling import UniformPatchSampler
from tests.helpers import oblique_affine


def _write_msd(root, n=6, shape=(40, 36, 30)):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    body = ((x - 20) / 15.0) ** 2 + ((y - 18) / 13.0) ** 2 <= 1.0
    for k in range(n):
        hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 10, shape)
        lesion = np.zeros(shape, np.uint8)
        c = np.array([16 + k, 16, 12 + k])
        lesion[tuple(slice(v - 1, v + 2) for v in c)] = 1  # 27 voxels: ~0.06 % of the grid
        affine = oblique_affine((1.5, 1.5, 2.5), (10.0, 0.0, 5.0), (0.0, 0.0, 10.0 * k))
        nib.save(nib.Nifti1Image(hu.astype(np.float32), affine), root / "imagesTr" / f"case{k}.nii.gz")
        nib.save(nib.Nifti1Image(lesion, affine), root / "labelsTr" / f"case{k}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "tumour"}, "modality": {"0": "CT"}}))


def test_lesion_labelled_folder_gives_body_patches_and_the_probe_finds_negatives(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path / "cache"))
    _write_msd(tmp_path / "Task99_Lesions")
    data = open_data(tmp_path / "Task99_Lesions", layout="msd", target_spacing_mm=3.0, progress=False)
    vols = data.volumes(None)
    assert all("body" in v.aux for v in vols)
    for v in vols:
        lesion_share = float((np.asarray(v.label) > 0).mean())
        assert lesion_share < 0.01 and float(np.asarray(v.aux["body"]).mean()) > 0.3

    batch = UniformPatchSampler(8, volumes_per_batch=len(vols), patches_per_volume=50, foreground_only=True)(
        vols, np.random.default_rng(0))
    by_id = {v.case_id: v for v in vols}
    centres = batch.boxes_vox.numpy()[:, :3] + 4
    on_lesion = [by_id[batch.case_ids[i]].label[tuple(c)] > 0 for i, c in zip(batch.volume_index.numpy(), centres)]
    on_body = [by_id[batch.case_ids[i]].aux["body"][tuple(c)] > 0 for i, c in zip(batch.volume_index.numpy(), centres)]
    assert np.mean(on_body) == 1.0 and np.mean(on_lesion) < 0.05  # centres spread over the body

    uniform = draw_uniform_patch_set(vols, 30, 8, seed=0)
    assert len(uniform) == 30 * len(vols)
    probe = draw_labelled_patch_set(vols, "tumour", n_per_class=12, patch_size_vox=8, seed=0)
    assert probe.labels.sum() == 12 and (probe.labels == 0).sum() == 12
