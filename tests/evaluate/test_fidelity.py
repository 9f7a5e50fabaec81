"""Distance fidelity: latent versus physical pair distances within volumes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from medssl.evaluate.fidelity import distance_fidelity, fidelity_table, metric_latent, within_volume_pairs


def _cohort(n_cases: int = 3, n_per_case: int = 25, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-100, 100, size=(n_cases * n_per_case, 3))
    cases = np.repeat([f"case{k}" for k in range(n_cases)], n_per_case)
    return centres, cases


def test_perfect_metric_embedding_has_zero_error_and_spearman_one():
    centres, cases = _cohort()
    r = distance_fidelity(centres, centres, cases, scale_mm=1.0, n_pairs=None)
    assert r.summary["abs_err_median_mm"] == pytest.approx(0.0, abs=1e-9)
    assert r.summary["abs_err_p90_mm"] == pytest.approx(0.0, abs=1e-9)
    assert r.summary["spearman"] == pytest.approx(1.0)
    assert r.summary["pearson"] == pytest.approx(1.0)
    assert r.summary["n_pairs"] == 3 * 25 * 24 / 2


def test_scale_maps_latent_units_to_mm():
    centres, cases = _cohort()
    emb = centres / 4.0  # one latent unit = 4 mm
    r = distance_fidelity(emb, centres, cases, scale_mm=4.0, n_pairs=500, seed=1)
    assert r.summary["abs_err_p90_mm"] == pytest.approx(0.0, abs=1e-9)
    unscaled = distance_fidelity(emb, centres, cases, scale_mm=1.0, n_pairs=500, seed=1)
    # |d/4 - d| = 3d/4 on every pair
    np.testing.assert_allclose(unscaled.abs_error_mm, 0.75 * unscaled.physical_mm)


def test_error_and_correlations_match_a_direct_computation_on_noisy_embeddings():
    centres, cases = _cohort(seed=2)
    rng = np.random.default_rng(3)
    emb = np.c_[centres, 10 * rng.standard_normal((len(centres), 2))]
    r = distance_fidelity(emb, centres, cases, scale_mm=1.0, n_pairs=300, seed=4)
    i, j = within_volume_pairs(cases, 300, 4).T
    lat = np.linalg.norm(emb[i] - emb[j], axis=1)
    phys = np.linalg.norm(centres[i] - centres[j], axis=1)
    assert r.summary["abs_err_median_mm"] == pytest.approx(np.median(np.abs(lat - phys)))
    assert r.summary["abs_err_p90_mm"] == pytest.approx(np.percentile(np.abs(lat - phys), 90))
    assert r.summary["spearman"] == pytest.approx(stats.spearmanr(lat, phys).statistic)
    assert r.summary["pearson"] == pytest.approx(stats.pearsonr(lat, phys).statistic)
    counts, edges = r.histogram()
    assert counts.sum() == 300 and edges[0] == 0


def test_non_metric_latent_reports_the_affine_fit_and_no_mm_error():
    centres, cases = _cohort()
    emb = 0.02 * centres  # distances are 0.02 x mm: perfectly linear, but not in mm
    r = distance_fidelity(emb, centres, cases, scale_mm=None, n_pairs=400)
    assert np.isnan(r.summary["abs_err_median_mm"])
    assert r.summary["affine_a"] == pytest.approx(50.0)
    assert r.summary["affine_b"] == pytest.approx(0.0, abs=1e-6)
    assert r.summary["affine_resid_p90_mm"] == pytest.approx(0.0, abs=1e-6)
    assert r.summary["spearman"] == pytest.approx(1.0)


def test_pairs_never_cross_volumes_and_are_subsampled_without_repeats():
    _, cases = _cohort(n_cases=4, n_per_case=10)
    pairs = within_volume_pairs(cases, 100, seed=0)
    assert len(pairs) == 100
    assert np.all(cases[pairs[:, 0]] == cases[pairs[:, 1]])
    assert np.all(pairs[:, 0] < pairs[:, 1])
    assert len({tuple(p) for p in pairs}) == 100
    assert len(within_volume_pairs(cases, None, 0)) == 4 * 45


def test_explicit_cross_volume_pairs_are_rejected():
    centres, cases = _cohort()
    with pytest.raises(ValueError, match="within one case"):
        distance_fidelity(centres, centres, cases, pairs=np.array([[0, 30]]))


def test_fidelity_table_has_one_row_per_method():
    centres, cases = _cohort()
    rng = np.random.default_rng(0)
    t = fidelity_table({
        "perfect": distance_fidelity(centres, centres, cases, scale_mm=1.0),
        "random": distance_fidelity(rng.standard_normal((75, 8)), centres, cases),
    })
    assert list(t["method"]) == ["perfect", "random"]
    assert t.loc[0, "spearman"] > 0.99 and abs(t.loc[1, "spearman"]) < 0.2


def test_metric_latent_finds_the_isimed_scale_and_regisimed_head():
    import torch

    from medssl.methods import create_method

    kw = dict(backbone="smallcnn", patch_size_vox=16, volumes_per_batch=2, patches_per_volume=4)
    emb = np.random.default_rng(0).standard_normal((6, 128)).astype(np.float32)
    iso = create_method("isimed", scale_mm=2.5, **kw)
    out, scale = metric_latent(iso, emb)
    assert scale == pytest.approx(2.5) and np.array_equal(out, emb)
    reg = create_method("regisimed", **kw)
    out, scale = metric_latent(reg, emb)
    with torch.no_grad():
        expected = reg.isimed_head(torch.from_numpy(emb)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    assert scale == pytest.approx(1.0)
    assert metric_latent(create_method("simclr", **kw), emb) == (emb, None)


def test_method_fidelity_embeds_frozen_and_uses_the_patch_set_pairs():
    import torch

    from medssl.evaluate.embed import embed_patches
    from medssl.evaluate.fidelity import method_fidelity
    from medssl.evaluate.patchsets import PatchSet
    from medssl.methods import create_method

    torch.manual_seed(0)
    method = create_method("isimed", backbone="smallcnn", patch_size_vox=16, volumes_per_batch=2,
                           patches_per_volume=4, scale_mm=3.0).train()
    rng = np.random.default_rng(0)
    n = 8
    ps = PatchSet(patches=rng.standard_normal((n, 1, 16, 16, 16)).astype(np.float32),
                  centres_mm=rng.uniform(-50, 50, (n, 3)), boxes_vox=np.zeros((n, 6)),
                  case_ids=["a"] * 4 + ["b"] * 4, groups=["a"] * 4 + ["b"] * 4, seed=0,
                  pairs=np.array([[0, 1], [0, 3], [4, 7]]))
    r = method_fidelity(method, ps, progress=False)
    emb = embed_patches(method, ps, progress=False)
    expected = distance_fidelity(emb, ps.centres_mm, ps.case_ids, scale_mm=3.0, pairs=ps.pairs)
    np.testing.assert_allclose(r.latent_mm, expected.latent_mm, rtol=1e-6)
    assert r.summary["n_pairs"] == 3 and r.scale_mm == pytest.approx(3.0)
    assert method.training  # mode restored
