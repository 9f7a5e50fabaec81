"""The pretraining summary scores a perfect metric latent as perfect, and a constant one as uninformative."""

import numpy as np
import torch
from torch import nn

from medssl.evaluate.summary import pretraining_summary
from tests.helpers import coordinate_volume, oblique_affine


class _CoordinateEmbedder(nn.Module):
    """Embeds a patch as the mean of its 3 channels, which hold each voxel's world mm position."""

    name = "coords"
    patch_size_vox = (8, 8, 8)

    def __init__(self, scale_mm: float = 1.0, constant: bool = False):
        super().__init__()
        self.scale_mm = scale_mm
        self.constant = constant
        self.w = nn.Parameter(torch.zeros(1))

    def embed(self, x):
        z = x.mean(dim=(2, 3, 4)) / self.scale_mm
        return torch.zeros_like(z) if self.constant else z

    def metric_latent(self, emb):  # the Method hook: this latent is metric, scale_mm mm per unit
        return emb, self.scale_mm


def _coordinate_volumes(n=3):
    vols = []
    for k in range(n):
        aff = oblique_affine((0.9, 1.7, 3.2), (20, -15, 10), (k * 5.0, -30.0, 12.0))
        vols.append(coordinate_volume(f"c{k}", (24, 20, 14), aff))  # channels = world mm of every voxel
    return vols


def test_summary_of_a_perfect_metric_latent_has_zero_error_and_unit_spearman(tmp_path):
    vols = _coordinate_volumes()
    out = pretraining_summary(_CoordinateEmbedder(scale_mm=2.5), vols, seed=1, n_per_volume=20,
                              run=tmp_path / "run")
    row = out.iloc[0]
    assert row["n_patches"] == 60 and row["n_volumes"] == 3
    assert row["spearman"] > 0.999 and row["pearson"] > 0.999
    assert row["abs_err_median_mm"] < 1e-3 and row["abs_err_p90_mm"] < 1e-3
    assert 1.0 < row["effective_rank"] <= 3.0
    # the patch set was saved once for the run, for every method to reuse
    assert list((tmp_path / "run" / "eval").glob("patchsets/summary_uniform*"))


def test_summary_of_a_collapsed_latent_reports_no_correlation():
    row = pretraining_summary(_CoordinateEmbedder(constant=True), _coordinate_volumes(), seed=0, n_per_volume=10).iloc[0]
    assert np.isnan(row["spearman"])
    assert row["abs_err_median_mm"] > 5.0  # latent distance 0 vs real distances of many mm
