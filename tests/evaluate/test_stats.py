"""Paired tests between methods agree with scipy; Holm correction; degenerate inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from medssl.evaluate.stats import (
    MIN_UNITS,
    compare_to_baselines,
    comparisons,
    family_verdicts,
    holm,
    min_wilcoxon_p,
    paired_tests,
    pvalue_matrix,
)

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


def test_differences_without_variance_are_not_testable_instead_of_p_zero():
    """A constant non-zero difference gave t = inf, p = 0 (and identical values p = 1): neither is evidence."""
    for offset in (0.0, 0.05, -0.3):
        t = paired_tests({"a": AUC["isimed"] + offset, "b": AUC["isimed"].copy()}).iloc[0]
        assert np.isnan(t["t_pvalue"]) and np.isnan(t["t_stat"]) and np.isnan(t["wilcoxon_pvalue"])
        assert "do not vary" in t["not_testable"]
        assert t["mean_diff"] == pytest.approx(offset)
    # the fold-corrected t-test too
    t = paired_tests({"a": AUC["isimed"] + 0.1, "b": AUC["isimed"]}, fold_sizes=(90.0, 10.0)).iloc[0]
    assert np.isnan(t["t_pvalue"])
    v = compare_to_baselines({"m": AUC["isimed"] + 0.1, "random-init[x]": AUC["isimed"]},
                             {"m": "method", "random-init[x]": "baseline"}, {"m": "random-init[x]"}, metric="AUC")
    assert v["not_testable"].iloc[0] and np.isnan(v["t_pvalue_holm"].iloc[0])
    assert "not testable" in v["verdict"].iloc[0] and "p =" not in v["verdict"].iloc[0]


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


# ---------------------------------------------------------------------------- method x baseline families

ROWS = {
    "isimed": ("method", 0.80), "simclr": ("method", 0.70), "reg2d": ("method", 0.60),
    "random-init[smallcnn]": ("baseline", 0.60), "xavier": ("baseline", 0.55),
    "identity": ("baseline", 0.65), "raw-intensity": ("baseline", 0.62), "registration (affine)": ("control", 0.90),
}
TWINS = {"isimed": "random-init[smallcnn]", "simclr": "random-init[smallcnn]", "reg2d": "xavier"}


def _units(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: mean + rng.normal(0, 0.03, n) for name, (_, mean) in ROWS.items()}


def test_each_method_is_compared_with_its_own_twin_the_shortcuts_and_the_control_only():
    kinds = {name: kind for name, (kind, _) in ROWS.items()}
    pairs = comparisons(kinds, TWINS)
    by_method = {m: [b for mm, b in pairs if mm == m] for m in TWINS}
    assert by_method["isimed"] == ["random-init[smallcnn]", "identity", "raw-intensity", "registration (affine)"]
    assert by_method["reg2d"] == ["xavier", "identity", "raw-intensity", "registration (affine)"]
    assert not any(b == "xavier" for m, b in pairs if m != "reg2d")  # another method's twin is not compared


def test_the_holm_family_is_methods_times_baselines_and_stated_in_every_verdict():
    kinds = {name: kind for name, (kind, _) in ROWS.items()}
    v = compare_to_baselines(_units(8), kinds, TWINS, metric="AUC")
    n_methods, n_baselines = 3, 4  # twin + identity + raw-intensity + control, for every method
    assert len(v) == n_methods * n_baselines
    assert (v["family_size"] == n_methods * n_baselines).all()
    assert all(f"Holm over {n_methods * n_baselines} comparisons" in s for s in v["verdict"])
    # Holm over exactly this family: the adjusted p-values from the raw ones of the same pairs
    raw = paired_tests({k: u for k, u in _units(8).items()}, correction=None).set_index(["method_a", "method_b"])
    p = [raw.loc[(m, b), "t_pvalue"] if (m, b) in raw.index else raw.loc[(b, m), "t_pvalue"]
         for m, b in zip(v["method"], v["baseline"])]
    np.testing.assert_allclose(v["t_pvalue_holm"], holm(np.array(p)))
    # the smallest attainable adjusted Wilcoxon p is printed with each verdict
    floor = min(1.0, 12 * min_wilcoxon_p(8))
    assert np.allclose(v["min_wilcoxon_p_holm"], floor)
    assert all(f"smallest attainable {floor:.3g}" in s for s in v["verdict"])
    # words follow direction and significance (isimed is far above its twin, far below the control)
    said = v.set_index(["method", "baseline"])["verdict"]
    assert said[("isimed", "random-init[smallcnn]")].startswith("isimed beats random-init[smallcnn]")
    assert said[("isimed", "registration (affine)")].startswith("isimed stays below the control")


def test_errors_lower_is_better_flip_the_words():
    units = {"m": np.array([5.0, 6.0, 4.0, 5.5, 6.5, 5.2]), "identity": np.array([9.0, 10.0, 9.5, 8.0, 11.0, 9.9])}
    v = compare_to_baselines(units, {"m": "method", "identity": "baseline"}, {}, higher_is_better=False,
                             metric="median error (mm)")
    assert v["verdict"].iloc[0].startswith("m beats identity") and v["mean_diff"].iloc[0] < 0


def test_fewer_than_five_units_are_not_testable_but_stay_in_the_family():
    kinds = {name: kind for name, (kind, _) in ROWS.items()}
    v = compare_to_baselines(_units(MIN_UNITS - 1), kinds, TWINS, metric="AUC")
    assert len(v) == 12 and v["t_pvalue_holm"].isna().all()
    assert all("not testable: 4 units < 5" in s for s in v["verdict"])
    # and from a paired_tests table too (the probe's headline reads one)
    tests = paired_tests(_units(MIN_UNITS - 1), correction=None)
    fv = family_verdicts(tests, comparisons(kinds, TWINS))
    assert fv["t_pvalue_holm"].isna().all() and (fv["family_size"] == 12).all()


# ---------------------------------------------------------------------------- every verdict word, Holm across the family

N_UNITS = 10
_Z = np.random.default_rng(7).normal(size=N_UNITS)
Z = (_Z - _Z.mean()) / _Z.std(ddof=1)  # mean 0, sd 1: a difference mu + s * Z has t = mu * sqrt(n) / s exactly
METHOD = 0.70 + 0.05 * np.random.default_rng(8).normal(size=N_UNITS)
# method - baseline = mu + s * Z per unit: (mu, s, kind, the word when the family is all of these rows)
DESIGN = {
    "random-init[cnn]": (0.20, 0.03, "baseline", "beats"),  # its twin, far below
    "identity": (-0.20, 0.03, "baseline", "is worse than"),  # a shortcut far above
    "position": (0.005, 0.03, "baseline", "is not distinguishable from"),  # a hair above, noise
    "aligned identity": (-0.005, 0.03, "baseline", "does not beat"),  # a hair below, noise
    "raw-intensity": (0.028, 0.0316, "baseline", "is not distinguishable from"),  # raw p ~ 0.02: beats alone, not x5
    "registration": (-0.005, 0.03, "control", "does not reach"),
    "gvdiff": (0.30, 0.03, "baseline", "cannot be compared with"),  # only 4 finite units: not testable
}


def _design_units(sign: float = 1.0) -> dict[str, np.ndarray]:
    units = {"m": METHOD.copy()}
    for name, (mu, s, _, _) in DESIGN.items():
        units[name] = METHOD - (mu + s * Z)
    units["gvdiff"][4:] = np.nan
    return {k: sign * v for k, v in units.items()}


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_every_verdict_word_and_holm_over_the_whole_family_with_untestable_pairs_counted(higher_is_better):
    """beats / is worse than / is not distinguishable from / does not beat / does not reach / cannot be compared
    with, decided by the Holm-adjusted paired t-test over the 7 comparisons, the untestable one counted as p = 1.
    Errors (lower is better): the same design negated gives the same words."""
    sign = 1.0 if higher_is_better else -1.0
    units = _design_units(sign)
    kinds = {"m": "method", **{name: kind for name, (_, _, kind, _) in DESIGN.items()}}
    v = compare_to_baselines(units, kinds, {"m": "random-init[cnn]"}, higher_is_better=higher_is_better,
                             metric="Dice", what="(kNN, n = 5 atlases)", unit="query subject").set_index("baseline")
    assert sorted(v.index) == sorted(DESIGN) and (v["family_size"] == len(DESIGN)).all()
    for name, (_, _, kind, word) in DESIGN.items():
        control = "the control " if kind == "control" else ""
        assert v.loc[name, "verdict"].startswith(f"m {word} {control}{name} (kNN, n = 5 atlases): Dice "), name
        assert v.loc[name, "kind_baseline"] == kind
    # the raw p-values from scipy on the same units; the untestable pair enters Holm as p = 1
    testable_rows = [n for n in DESIGN if n != "gvdiff"]
    raw = np.array([stats.ttest_rel(units["m"], units[n]).pvalue for n in testable_rows])
    np.testing.assert_allclose(v.loc[testable_rows, "t_pvalue_holm"], holm(np.append(raw, 1.0))[:-1], rtol=1e-9)
    assert not np.allclose(holm(np.append(raw, 1.0))[:-1], holm(raw))  # the 7th comparison does change the others
    # the design does what it says: raw-intensity is significant alone and not after Holm over 7
    p_raw = raw[testable_rows.index("raw-intensity")]
    assert 0.01 < p_raw < 0.05 and v.loc["raw-intensity", "t_pvalue_holm"] > 0.05
    # the untestable pair: no p-value, says why and on how many units
    g = v.loc["gvdiff"]
    assert g["n"] == 4 and np.isnan(g["t_pvalue_holm"]) and np.isnan(g["wilcoxon_pvalue_holm"])
    assert "not testable: 4 units < 5 (4 query subjects)" in g["verdict"] and "p =" not in g["verdict"]
    assert (v.loc[testable_rows, "n"] == N_UNITS).all()
    # mean_diff is method - baseline in the metric's own units, whatever the direction
    for name in testable_rows:
        assert v.loc[name, "mean_diff"] == pytest.approx(np.mean(units["m"] - units[name]))


def test_the_same_comparison_alone_beats_so_the_family_decides():
    units = _design_units()
    alone = compare_to_baselines({"m": units["m"], "raw-intensity": units["raw-intensity"]},
                                 {"m": "method", "raw-intensity": "baseline"}, {}, metric="Dice").iloc[0]
    assert alone["family_size"] == 1
    assert alone["t_pvalue_holm"] == pytest.approx(stats.ttest_rel(units["m"], units["raw-intensity"]).pvalue)
    assert alone["verdict"].startswith("m beats raw-intensity: Dice ")


def test_family_verdicts_reads_pairs_stored_either_way_round_and_refuses_missing_ones():
    units = _design_units()
    # paired_tests stores (identity, m): identity first, so its mean_diff is identity - m
    tests = paired_tests({"identity": units["identity"], "m": units["m"], "position": units["position"]},
                         correction=None)
    v = family_verdicts(tests, [("m", "identity"), ("m", "position")], metric="Dice").set_index("baseline")
    assert v.loc["identity", "mean_diff"] == pytest.approx(np.mean(units["m"] - units["identity"]))
    assert v.loc["identity", "mean_diff"] < 0
    assert v.loc["identity", "mean_method"] == pytest.approx(units["m"].mean())
    assert v.loc["identity", "verdict"].startswith("m is worse than identity")
    assert v.loc["position", "verdict"].startswith("m is not distinguishable from position")
    with pytest.raises(KeyError, match="lack the comparisons"):
        family_verdicts(tests, [("m", "registration")])
