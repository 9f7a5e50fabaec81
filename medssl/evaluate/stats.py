"""Paired comparisons of methods on the same folds (ISImed Table 1; design/evaluation.md sec. 3).

For every pair of methods: the paired t-test (``scipy.stats.ttest_rel``) and the
Wilcoxon signed-rank test (``scipy.stats.wilcoxon``) on per-fold values (e.g. AUC),
the mean difference, and Holm-corrected p-values over all pairs.

With only 5-10 folds the Wilcoxon test cannot reach small p-values (its exact
minimum two-sided p with 10 folds is 2/1024); read both tests together. Cross-validation
folds share training data, so fold scores are not independent and the t-test tends to be
optimistic (Nadeau & Bengio, 2003); it is the comparison the ISImed paper reports.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Mapping

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["paired_tests", "holm", "pvalue_matrix"]


def holm(pvalues: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (Holm 1979), same order as the input; NaNs stay NaN.

    Sorted ascending, ``p_(k)`` becomes ``max_{j<=k} min(1, (m - j + 1) p_(j))`` (m = number of finite p-values).
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adjusted = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(adjusted)
    return out


def _paired(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    d = a - b
    row = {"mean_a": float(a.mean()), "mean_b": float(b.mean()), "mean_diff": float(d.mean())}
    if np.all(d == 0):
        # Identical per-fold values: no evidence of a difference. scipy gives NaN (t) or
        # raises (Wilcoxon) here, so report the conventional statistic 0, p = 1.
        row.update(t_stat=0.0, t_pvalue=1.0, wilcoxon_stat=0.0, wilcoxon_pvalue=1.0)
        return row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant non-zero difference: t = +-inf, p = 0
        t = stats.ttest_rel(a, b)
    row.update(t_stat=float(t.statistic), t_pvalue=float(t.pvalue))
    try:
        w = stats.wilcoxon(a, b)
        row.update(wilcoxon_stat=float(w.statistic), wilcoxon_pvalue=float(w.pvalue))
    except ValueError:
        row.update(wilcoxon_stat=float("nan"), wilcoxon_pvalue=float("nan"))
    return row


def paired_tests(per_fold: Mapping[str, np.ndarray], correction: str | None = "holm") -> pd.DataFrame:
    """Paired tests between every pair of methods on per-fold values from the same folds.

    Args:
        per_fold: ``{method: (n_folds,) values}``, fold k of every method on the same test
            subjects (e.g. ``ProbeComparison.per_fold_metric("auc")``). Folds where any
            method is NaN are dropped for every pair.
        correction: ``"holm"`` adds ``t_pvalue_holm`` and ``wilcoxon_pvalue_holm`` over all
            pairs; ``None`` skips it.

    Returns:
        One row per pair ``(method_a, method_b)`` in input order: ``n_folds``, ``mean_a``,
        ``mean_b``, ``mean_diff`` (a - b), ``t_stat``, ``t_pvalue``, ``wilcoxon_stat``,
        ``wilcoxon_pvalue`` [, Holm columns].
    """
    names = list(per_fold)
    values = {k: np.asarray(v, dtype=np.float64).ravel() for k, v in per_fold.items()}
    lengths = {len(v) for v in values.values()}
    if len(lengths) > 1:
        counts = {k: len(v) for k, v in values.items()}
        raise ValueError(f"every method needs the same folds; got fold counts {counts}")
    if len(names) < 2:
        raise ValueError("paired tests need at least two methods")
    keep = np.all(np.isfinite(np.stack(list(values.values()))), axis=0)
    if keep.sum() < 2:
        raise ValueError(f"paired tests need >= 2 folds with finite values for every method, got {int(keep.sum())}")
    rows = []
    for a, b in itertools.combinations(names, 2):
        rows.append({"method_a": a, "method_b": b, "n_folds": int(keep.sum()),
                     **_paired(values[a][keep], values[b][keep])})
    table = pd.DataFrame(rows)
    if correction == "holm":
        table["t_pvalue_holm"] = holm(table["t_pvalue"].to_numpy())
        table["wilcoxon_pvalue_holm"] = holm(table["wilcoxon_pvalue"].to_numpy())
    elif correction is not None:
        raise ValueError(f'correction must be "holm" or None, got {correction!r}')
    return table


def pvalue_matrix(tests: pd.DataFrame, column: str = "t_pvalue") -> pd.DataFrame:
    """Symmetric method x method matrix of ``column`` from :func:`paired_tests` (NaN diagonal)."""
    names = list(dict.fromkeys([*tests["method_a"], *tests["method_b"]]))
    m = pd.DataFrame(np.nan, index=names, columns=names)
    for _, r in tests.iterrows():
        m.loc[r["method_a"], r["method_b"]] = r[column]
        m.loc[r["method_b"], r["method_a"]] = r[column]
    return m
