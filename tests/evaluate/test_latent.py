"""Latent space against physical axes: PCA/UMAP frames, grouped coordinate decoding, PC-axis correlation, collapse."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medssl.evaluate.latent import (
    collapse_coefficient,
    collapse_stats,
    decode_coordinates,
    pc_axis_correlation,
    pca_frame,
    umap_frame,
)


def _points(n_subjects: int = 8, n_per: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-120, 120, size=(n_subjects * n_per, 3)) * np.array([1.0, 0.7, 1.6])
    groups = np.repeat([f"pat{k}" for k in range(n_subjects)], n_per)
    return centres, groups


def test_decoding_a_random_linear_map_of_the_centres_gives_r2_above_099():
    centres, groups = _points()
    rng = np.random.default_rng(1)
    emb = centres @ rng.standard_normal((3, 32)) + 0.01 * rng.standard_normal((len(centres), 32))
    table = decode_coordinates(emb, centres, groups, n_splits=4).set_index("axis")
    assert (table.loc[["x", "y", "z"], "r2"] > 0.99).all()
    assert table.loc["xyz", "error_mm"] < 2.0
    assert (table["n_folds"] == 4).all()


def test_decoding_random_embeddings_gives_r2_near_zero_or_below():
    centres, groups = _points()
    emb = np.random.default_rng(2).standard_normal((len(centres), 32))
    table = decode_coordinates(emb, centres, groups, n_splits=4).set_index("axis")
    assert (table.loc[["x", "y", "z"], "r2"] < 0.05).all()


def test_decoding_is_scored_on_held_out_subjects_only():
    # Each subject has its own offset and the embedding is a subject fingerprint plus noise:
    # with subjects on both sides the fingerprint would "decode" the offset; grouped, it cannot.
    rng = np.random.default_rng(3)
    n_sub, n_per = 8, 30
    groups = np.repeat([f"p{k}" for k in range(n_sub)], n_per)
    offsets = rng.uniform(-100, 100, size=(n_sub, 3))
    centres = np.repeat(offsets, n_per, axis=0) + rng.normal(0, 1, size=(n_sub * n_per, 3))
    fingerprints = rng.standard_normal((n_sub, 16))
    emb = np.repeat(fingerprints, n_per, axis=0) + 0.01 * rng.standard_normal((n_sub * n_per, 16))
    table, per_fold = decode_coordinates(emb, centres, groups, n_splits=4, return_per_fold=True)
    assert table.set_index("axis").loc["xyz", "r2"] < 0.5
    assert len(per_fold) == 4 and per_fold["n_test"].sum() == n_sub * n_per


def test_decoding_with_two_subjects_holds_out_z_slabs_and_says_so():
    centres, groups = _points(n_subjects=2, n_per=40)
    with pytest.warns(UserWarning, match="z-slabs"):
        table, per_fold = decode_coordinates(centres, centres, groups, n_splits=5, return_per_fold=True)
    assert len(per_fold) == 5 and per_fold["n_test"].sum() == len(centres)
    # the embedding is the position itself: decoding it across slabs stays near-perfect along x and y
    assert table.set_index("axis").loc["x", "r2"] > 0.9


def test_pca_frame_carries_coordinates_and_variance_ratios():
    centres, groups = _points(n_subjects=2, n_per=30)
    frame = pca_frame(centres, n=3, centres_mm=centres, case_ids=groups)
    assert list(frame.columns) == ["index", "PC1", "PC2", "PC3", "x_mm", "y_mm", "z_mm", "case_id"]
    ratios = frame.attrs["explained_variance_ratio"]
    assert sum(ratios) == pytest.approx(1.0) and ratios[0] >= ratios[1] >= ratios[2]


def test_pc_axis_correlation_finds_the_axis_each_component_follows():
    rng = np.random.default_rng(0)
    c = np.c_[rng.uniform(-150, 150, 400), rng.uniform(-50, 50, 400), rng.uniform(-10, 10, 400)]
    emb = np.c_[c, 0.1 * rng.standard_normal((400, 5))]  # variance order: x > y > z
    t = pc_axis_correlation(emb, c)
    assert list(t.index) == ["PC1", "PC2", "PC3"]
    assert abs(t.loc["PC1", "x"]) > 0.99 and abs(t.loc["PC2", "y"]) > 0.99 and abs(t.loc["PC3", "z"]) > 0.99
    assert abs(t.loc["PC1", "y"]) < 0.2


def test_collapse_stats_see_a_collapsed_embedding():
    rng = np.random.default_rng(0)
    healthy = rng.standard_normal((500, 16))
    collapsed = np.c_[rng.standard_normal((500, 2)), 1e-6 * rng.standard_normal((500, 14))]
    h, c = collapse_stats(healthy), collapse_stats(collapsed)
    assert h["used_dim_fraction"] == 1.0 and c["used_dim_fraction"] == pytest.approx(2 / 16)
    assert h["effective_rank_centred"] > 14 and c["effective_rank_centred"] < 2.5
    assert c["dim_variance"].shape == (16,) and np.all(np.diff(c["dim_variance"]) <= 0)


def test_collapse_coefficient_is_zero_for_spread_outputs_and_one_for_a_constant():
    rng = np.random.default_rng(0)
    d = 64
    spread = rng.standard_normal((4000, d))
    # unit vectors of an isotropic Gaussian have per-channel std ~ 1/sqrt(d): coefficient ~ 0
    assert collapse_coefficient(spread) < 0.02
    constant = np.tile(rng.standard_normal(d), (100, 1))
    assert collapse_coefficient(constant) == pytest.approx(1.0)
    # written out: 1 - sqrt(d) * mean std of the normalised rows
    z = rng.standard_normal((50, 8)) + 2.0
    u = z / np.linalg.norm(z, axis=1, keepdims=True)
    assert collapse_coefficient(z) == pytest.approx(max(0.0, 1 - np.sqrt(8) * u.std(axis=0).mean()))


def test_umap_frame_is_seeded_and_subsamples():
    rng = np.random.default_rng(0)
    emb = np.r_[rng.normal(0, 1, (60, 8)), rng.normal(8, 1, (60, 8))]
    a = umap_frame(emb, n=2, seed=0, n_neighbors=10, max_points=80)
    b = umap_frame(emb, n=2, seed=0, n_neighbors=10, max_points=80)
    assert len(a) == 80 and list(a.columns[:3]) == ["index", "UMAP1", "UMAP2"]
    np.testing.assert_allclose(a[["UMAP1", "UMAP2"]], b[["UMAP1", "UMAP2"]])
    # the two clusters stay apart
    cluster = a["index"].to_numpy() >= 60
    gap = np.linalg.norm(a.loc[cluster, ["UMAP1", "UMAP2"]].mean() - a.loc[~cluster, ["UMAP1", "UMAP2"]].mean())
    assert gap > 3 * a.loc[cluster, ["UMAP1", "UMAP2"]].std().max()


def test_latent_figures_build_in_both_backends_and_reject_missing_position_columns(tmp_path):
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    from medssl.evaluate.fidelity import distance_fidelity
    from medssl.evaluate.stats import paired_tests, pvalue_matrix
    from medssl.viz import latent_figures as vz

    centres, groups = _points(n_subjects=4, n_per=20)
    frame = pca_frame(centres, 3, centres_mm=centres, case_ids=groups)
    fid = {"perfect": distance_fidelity(centres, centres, groups, scale_mm=1.0),
           "scaled": distance_fidelity(0.1 * centres, centres, groups)}
    decoding = {"perfect": decode_coordinates(centres, centres, groups, n_splits=4)}
    per_fold = pd.DataFrame({"method": ["a"] * 4 + ["b"] * 4, "unit": [0, 1, 2, 3] * 2,
                             "auc": [0.8, 0.9, 0.85, 0.7, 0.5, 0.6, 0.55, 0.4]})
    pm = pvalue_matrix(paired_tests({"a": per_fold["auc"][:4].to_numpy(), "b": per_fold["auc"][4:].to_numpy()}))
    for backend in ("matplotlib", "plotly"):
        figs = [
            vz.fidelity_histograms(fid, backend=backend),
            vz.latent_scatter(frame, backend=backend),
            vz.latent_scatter(frame, columns=["PC1", "PC2"], backend=backend),
            vz.decoding_bars(decoding, backend=backend),
            vz.probe_boxplot(per_fold, backend=backend),
            vz.pvalue_heatmap(pm, backend=backend),
        ]
        for k, fig in enumerate(figs):
            path = tmp_path / f"{backend}_{k}.{'png' if backend == 'matplotlib' else 'html'}"
            vz.save_figure(fig, path)
            assert path.stat().st_size > 1000
        plt.close("all")
    with pytest.raises(ValueError, match="x_mm"):
        vz.latent_scatter(pca_frame(centres, 3))
