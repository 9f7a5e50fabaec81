"""Paired tests between methods agree with scipy; Holm correction; degenerate inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from medssl.evaluate.stats import holm, paired_tests, pvalue_matrix

AUC = {
    "isimed": np.array([0.81, 0.84, 0.79, 0.88, 0.83, 0.80, 0.86, 0.82, 0.85, 0.87]),
    "simclr": np.array([0.74, 0.79, 0.77, 0.80, 0.76, 0.78, 0.75, 0.81, 0.79, 0.77]),
    "random-init": np.array([0.62, 0.60, 0.66, 0.59, 0.64, 0.61, 0.63, 0.65, 0.58, 0.67]),
}


def test_paired_tests_agree_with_scipy_for_every_pair():
    t = paired_tests(AUC)
    pairs = [("isimed", "simclr"), ("isimed", "random-init"), ("simclr", "random-init")]
    assert list(zip(t["method_a"], t["method_b"])) == pairs
    for _, r in t.iterrows():
        a, b = AUC[r["method_a"]], AUC[r["method_b"]]
        tt, w = stats.ttest_rel(a, b), stats.wilcoxon(a, b)
        assert r["t_stat"] == pytest.approx(tt.statistic) and r["t_pvalue"] == pytest.approx(tt.pvalue)
        assert r["wilcoxon_stat"] == pytest.approx(w.statistic) and r["wilcoxon_pvalue"] == pytest.approx(w.pvalue)
        assert r["mean_diff"] == pytest.approx(np.mean(a - b))
        assert r["n_folds"] == 10


def test_holm_matches_a_hand_computation():
    p = np.array([0.01, 0.04, 0.03, 0.20])
    # sorted 0.01, 0.03, 0.04, 0.20 -> x4, x3, x2, x1 = 0.04, 0.09, 0.08 -> 0.09 (monotone), 0.20
    np.testing.assert_allclose(holm(p), [0.04, 0.09, 0.09, 0.20])
    np.testing.assert_allclose(holm(np.array([0.5, np.nan, 0.6])), [1.0, np.nan, 1.0])


def test_holm_columns_are_added_over_all_pairs():
    t = paired_tests(AUC)
    np.testing.assert_allclose(t["t_pvalue_holm"], holm(t["t_pvalue"].to_numpy()))
    assert (t["t_pvalue_holm"] >= t["t_pvalue"]).all()
    assert "t_pvalue_holm" not in paired_tests(AUC, correction=None)


def test_identical_methods_give_p_one_instead_of_an_error():
    t = paired_tests({"a": AUC["isimed"], "b": AUC["isimed"].copy()})
    r = t.iloc[0]
    assert r["t_pvalue"] == 1.0 and r["wilcoxon_pvalue"] == 1.0 and r["mean_diff"] == 0.0


def test_folds_with_nan_are_dropped_for_every_pair():
    vals = {k: v.copy() for k, v in AUC.items()}
    vals["simclr"][3] = np.nan
    t = paired_tests(vals).set_index(["method_a", "method_b"])
    keep = np.arange(10) != 3
    expected = stats.ttest_rel(AUC["isimed"][keep], AUC["random-init"][keep]).pvalue
    assert t.loc[("isimed", "random-init"), "t_pvalue"] == pytest.approx(expected)
    assert (t["n_folds"] == 9).all()


def test_different_fold_counts_are_rejected():
    with pytest.raises(ValueError, match="same folds"):
        paired_tests({"a": AUC["isimed"], "b": AUC["simclr"][:5]})


def test_pvalue_matrix_is_symmetric():
    m = pvalue_matrix(paired_tests(AUC))
    assert list(m.index) == list(AUC)
    np.testing.assert_allclose(m.to_numpy(), m.to_numpy().T)
    assert np.isnan(np.diag(m.to_numpy())).all()
