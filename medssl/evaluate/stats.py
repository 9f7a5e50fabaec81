"""Paired comparisons of methods on the same units (ISImed Table 1; design/evaluation.md sec. 3).

The unit is a **test subject** (the default protocol: the probe is fit once on the
validation split and scored per test subject; subjects are independent draws, so the
ordinary paired t-test applies) or a **cross-validation fold** (the fallback when a
dataset has no validation split). For every pair of methods: the paired t-test, the
Wilcoxon signed-rank test, the mean difference, and **Holm-adjusted p-values** over all
pairs, which are the ones to quote.

- Folds share training data, so fold scores are not independent and the plain paired
  t-test is optimistic. With ``n_train``/``n_test`` given, :func:`paired_tests` uses the
  corrected resampled t-test of Nadeau and Bengio (2003), which inflates the variance by
  ``1/k + n_test/n_train``.
- With few units the Wilcoxon test cannot reach small p-values: its smallest exact
  two-sided p is ``2 / 2**n`` (:func:`min_wilcoxon_p`: 0.0078 for 8 subjects, 0.002 for 10
  folds); the tables say so.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Mapping

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["paired_tests", "holm", "pvalue_matrix", "min_wilcoxon_p", "corrected_resampled_ttest"]


def min_wilcoxon_p(n: int) -> float:
    """Smallest two-sided p-value the exact Wilcoxon signed-rank test can give with ``n`` pairs (no ties): ``2 / 2**n``."""
    return 2.0 / 2.0 ** int(n) if n > 0 else float("nan")


def corrected_resampled_ttest(diffs: np.ndarray, n_train: float, n_test: float) -> tuple[float, float]:
    """Nadeau & Bengio (2003) corrected resampled t-test on per-fold differences ``(k,)``.

    ``t = mean(d) / sqrt((1/k + n_test/n_train) * var(d))`` with ``k - 1`` degrees of freedom;
    returns ``(t, two-sided p)``. ``n_train``/``n_test``: (mean) sizes of a fold's two sides.
    """
    d = np.asarray(diffs, dtype=np.float64).ravel()
    k = len(d)
    var = d.var(ddof=1) if k > 1 else float("nan")
    if not var > 0:
        return (0.0, 1.0) if np.all(d == 0) else (float(np.sign(d.mean())) * float("inf"), 0.0)
    t = float(d.mean() / np.sqrt((1.0 / k + float(n_test) / float(n_train)) * var))
    return t, float(2.0 * stats.t.sf(abs(t), df=k - 1))


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


def _paired(a: np.ndarray, b: np.ndarray, fold_sizes: tuple[float, float] | None = None) -> dict[str, float]:
    d = a - b
    row = {"mean_a": float(a.mean()), "mean_b": float(b.mean()), "mean_diff": float(d.mean())}
    if np.all(d == 0):
        # Identical per-fold values: no evidence of a difference. scipy gives NaN (t) or
        # raises (Wilcoxon) here, so report the conventional statistic 0, p = 1.
        row.update(t_stat=0.0, t_pvalue=1.0, wilcoxon_stat=0.0, wilcoxon_pvalue=1.0)
        return row
    if fold_sizes is not None:
        t_stat, t_p = corrected_resampled_ttest(d, *fold_sizes)
        row.update(t_stat=t_stat, t_pvalue=t_p)
    else:
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


def paired_tests(
    per_fold: Mapping[str, np.ndarray],
    correction: str | None = "holm",
    fold_sizes: tuple[float, float] | None = None,
) -> pd.DataFrame:
    """Paired tests between every pair of methods on per-unit values (test subjects or folds).

    Args:
        per_fold: ``{method: (n_units,) values}``, unit k of every method being the same test
            subject (or fold). Units where any method is NaN are dropped for every pair.
        correction: ``"holm"`` adds ``t_pvalue_holm`` and ``wilcoxon_pvalue_holm`` over all
            pairs; ``None`` skips it.
        fold_sizes: ``(n_train, n_test)`` when the units are cross-validation folds: the
            t-test becomes the corrected resampled t-test (Nadeau & Bengio 2003).

    Returns:
        One row per pair ``(method_a, method_b)`` in input order: ``n_folds`` (units), ``mean_a``,
        ``mean_b``, ``mean_diff`` (a - b), ``t_stat``, ``t_pvalue``, ``wilcoxon_stat``,
        ``wilcoxon_pvalue``, ``min_wilcoxon_p`` [, Holm columns].
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
                     **_paired(values[a][keep], values[b][keep], fold_sizes),
                     "min_wilcoxon_p": min_wilcoxon_p(int(keep.sum()))})
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
