"""Paired comparisons of methods on the same units (ISImed Table 1).

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
- **Not testable**: with fewer than :data:`MIN_UNITS` (5) units, or when the paired differences
  do not vary (a constant difference, zero included), no p-value is given: a constant non-zero
  difference would make the t statistic infinite and p = 0, which is no evidence at all.

**Verdicts in words** (:func:`compare_to_baselines`, used by kNN segmentation, fine-tuning,
correspondence and the probe's headline): the comparisons actually made are each method
against *its own* untrained twin, every shortcut row and every positive control
(:func:`comparisons`); that method x baseline list is the Holm family, and its size is
stated in every sentence, with the smallest Holm-adjusted Wilcoxon p the number of units
allows (``min(1, m * 2 / 2**n)`` for a family of ``m``), so a reader sees at once whether the
test could have answered at all.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

__all__ = [
    "MIN_UNITS",
    "comparisons",
    "compare_to_baselines",
    "corrected_resampled_ttest",
    "family_verdicts",
    "holm",
    "min_wilcoxon_p",
    "paired_tests",
    "pvalue_matrix",
    "testable",
]

MIN_UNITS = 5  # fewer paired units than this: "not testable" (the exact Wilcoxon p cannot go below 2/2^4 = 0.125)


def min_wilcoxon_p(n: int) -> float:
    """Smallest two-sided p-value the exact Wilcoxon signed-rank test can give with ``n`` pairs (no ties): ``2 / 2**n``."""
    return 2.0 / 2.0 ** int(n) if n > 0 else float("nan")


def _constant(d: np.ndarray) -> bool:
    """True when the paired differences do not vary (up to float rounding of the inputs)."""
    return len(d) < 2 or float(np.ptp(d)) <= 1e-12 * max(1.0, float(np.abs(d).max(initial=0.0)))


def testable(diffs: np.ndarray) -> str:
    """``""`` when paired differences ``diffs`` can be tested, else the reason (few units, no variance)."""
    d = np.asarray(diffs, dtype=np.float64).ravel()
    d = d[np.isfinite(d)]
    if len(d) < MIN_UNITS:
        return f"not testable: {len(d)} units < {MIN_UNITS}"
    if _constant(d):
        return "not testable: the paired differences do not vary"
    return ""


def corrected_resampled_ttest(diffs: np.ndarray, n_train: float, n_test: float) -> tuple[float, float]:
    """Nadeau & Bengio (2003) corrected resampled t-test on per-fold differences ``(k,)``.

    ``t = mean(d) / sqrt((1/k + n_test/n_train) * var(d))`` with ``k - 1`` degrees of freedom;
    returns ``(t, two-sided p)``. ``n_train``/``n_test``: (mean) sizes of a fold's two sides.
    Differences that do not vary give ``(nan, nan)``: not testable.
    """
    d = np.asarray(diffs, dtype=np.float64).ravel()
    k = len(d)
    if _constant(d):
        return float("nan"), float("nan")
    var = d.var(ddof=1)
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
    row = {"mean_a": float(a.mean()), "mean_b": float(b.mean()), "mean_diff": float(d.mean()),
           "not_testable": testable(d)}
    if _constant(d):
        # No variance of the differences (identical values, or a constant offset): the t statistic is
        # 0/0 or +-inf and the Wilcoxon ranks are all tied or all one sign; neither is evidence.
        row.update(t_stat=float("nan"), t_pvalue=float("nan"), wilcoxon_stat=float("nan"),
                   wilcoxon_pvalue=float("nan"))
        return row
    if fold_sizes is not None:
        t_stat, t_p = corrected_resampled_ttest(d, *fold_sizes)
        row.update(t_stat=t_stat, t_pvalue=t_p)
    else:
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
        ``mean_b``, ``mean_diff`` (a - b), ``not_testable`` (empty, or why the pair cannot be
        tested: :func:`testable`), ``t_stat``, ``t_pvalue``, ``wilcoxon_stat``, ``wilcoxon_pvalue``
        (NaN when the differences do not vary), ``min_wilcoxon_p`` [, Holm columns over every
        pair; to quote a method x baseline family use :func:`compare_to_baselines`].
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


# ---------------------------------------------------------------------------- verdicts in words


def comparisons(kinds: Mapping[str, str], twins: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """The method x baseline comparisons a table makes: its Holm family.

    Every ``"method"`` row is compared with its own untrained twin (``twins[method]``, when that
    row is in the table), with every ``"baseline"`` row that is nobody's twin (the shortcuts:
    identity, aligned identity, raw intensities, position, untrained descriptors such as GVDiff)
    and with every ``"control"`` row (positive controls, e.g. registration). Another
    method's twin is not compared: it is a different architecture.

    Without ``twins`` every baseline row is compared with every method (the caller has no
    twin information; the family is then larger).
    """
    rows = list(kinds)
    methods = [r for r in rows if kinds[r] == "method"]
    baselines = [r for r in rows if kinds[r] == "baseline"]
    controls = [r for r in rows if kinds[r] == "control"]
    if twins is None:
        return [(m, b) for m in methods for b in [*baselines, *controls]]
    twin_rows = {t for t in twins.values() if t in kinds}
    shortcuts = [b for b in baselines if b not in twin_rows]
    out = []
    for m in methods:
        own = [twins[m]] if twins.get(m) in kinds else []
        out += [(m, b) for b in [*own, *shortcuts, *controls]]
    return out


def family_verdicts(
    tests: pd.DataFrame,
    pairs: Sequence[tuple[str, str]],
    higher_is_better: bool = True,
    metric: str = "score",
    what: str = "",
    unit: str = "test subject",
    alpha: float = 0.05,
    kinds: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Method-vs-baseline sentences from a :func:`paired_tests` table, Holm-adjusted over ``pairs`` only.

    Args:
        tests: :func:`paired_tests` output holding (at least) every pair of ``pairs``, in either order.
        pairs: ``[(method, baseline), ...]``: the family (:func:`comparisons`); its size ``m`` is
            the Holm factor and is written in every row.
        higher_is_better: direction of the metric (False for errors in mm).
        metric: what the values are, for the sentence ("Dice", "median error (mm)").
        what: appended to the sentence's subject (e.g. "(kNN, n = 5 atlases)").
        unit: what a unit is, for the sentence ("test subject", "fold").
        alpha: level of the Holm-adjusted paired t-test that decides "beats" / "is worse than".
        kinds: ``{row: kind}``; a ``"control"`` baseline is worded as a control.

    Returns:
        One row per pair: ``method, baseline, kind_baseline, mean_method, mean_baseline, mean_diff``
        (method - baseline), ``n, family_size, t_pvalue_holm, wilcoxon_pvalue_holm,
        min_wilcoxon_p_holm`` (the smallest Holm-adjusted Wilcoxon p ``n`` units allow in this
        family), ``not_testable`` and ``verdict``. Untestable pairs (fewer than
        :data:`MIN_UNITS` units, or differences that do not vary) have NaN p-values; they stay in
        the family (as p = 1), so ``m`` never shrinks to flatter the others.
    """
    cols = ["method", "baseline", "kind_baseline", "mean_method", "mean_baseline", "mean_diff", "n", "family_size",
            "t_pvalue_holm", "wilcoxon_pvalue_holm", "min_wilcoxon_p_holm", "not_testable", "verdict"]
    if not pairs:
        return pd.DataFrame(columns=cols)
    by_pair = {(r.method_a, r.method_b): (r, 1.0) for r in tests.itertuples(index=False)}
    by_pair.update({(r.method_b, r.method_a): (r, -1.0) for r in tests.itertuples(index=False)})
    missing = [p for p in pairs if tuple(p) not in by_pair]
    if missing:
        raise KeyError(f"the paired tests lack the comparisons {missing}")
    m = len(pairs)
    rows = []
    for method, base in pairs:
        r, sign = by_pair[(method, base)]
        mean_m, mean_b = (r.mean_a, r.mean_b) if sign > 0 else (r.mean_b, r.mean_a)
        why = str(getattr(r, "not_testable", "") or "") or testable_n(int(r.n_folds))
        rows.append({"method": method, "baseline": base, "kind_baseline": (kinds or {}).get(base, "baseline"),
                     "mean_method": mean_m, "mean_baseline": mean_b, "mean_diff": sign * r.mean_diff,
                     "n": int(r.n_folds), "family_size": m, "not_testable": why,
                     "_t": np.nan if why else r.t_pvalue, "_w": np.nan if why else r.wilcoxon_pvalue})
    out = pd.DataFrame(rows)
    # untestable pairs count as p = 1: they stay in the family without changing anyone's order
    out["t_pvalue_holm"] = holm(out["_t"].fillna(1.0).to_numpy())
    out["wilcoxon_pvalue_holm"] = holm(out["_w"].fillna(1.0).to_numpy())
    out.loc[out["not_testable"] != "", ["t_pvalue_holm", "wilcoxon_pvalue_holm"]] = np.nan
    out["min_wilcoxon_p_holm"] = [min(1.0, m * min_wilcoxon_p(n)) for n in out["n"]]
    out["verdict"] = [_sentence(r, higher_is_better, metric, what, unit, alpha) for r in out.itertuples(index=False)]
    return out[cols]


def testable_n(n: int) -> str:
    """``""`` when ``n`` units suffice for a paired test, else the reason."""
    return "" if n >= MIN_UNITS else f"not testable: {n} units < {MIN_UNITS}"


def _sentence(r: Any, higher: bool, metric: str, what: str, unit: str, alpha: float) -> str:
    control = r.kind_baseline == "control"
    diff = float(r.mean_diff)
    better = diff > 0 if higher else diff < 0
    worse = diff < 0 if higher else diff > 0
    p = r.t_pvalue_holm
    if r.not_testable:
        word = "cannot be compared with"
    elif better and p < alpha:
        word = "beats"
    elif worse and p < alpha:
        word = "stays below" if control else "is worse than"
    elif better:
        word = "is not distinguishable from"
    else:
        word = "does not reach" if control else "does not beat"
    head = f"{r.method} {word} {'the control ' if control else ''}{r.baseline}{(' ' + what) if what else ''}"
    nums = f"{metric} {r.mean_method:.3g} vs {r.mean_baseline:.3g} ({diff:+.3g})"
    if r.not_testable:
        return f"{head}: {nums}, {r.not_testable} ({r.n} {unit}s)."
    return (f"{head}: {nums}; Holm over {r.family_size} comparisons: paired t-test p = {p:.3g}, Wilcoxon p = "
            f"{r.wilcoxon_pvalue_holm:.3g} (smallest attainable {r.min_wilcoxon_p_holm:.3g}); {r.n} {unit}s.")


def compare_to_baselines(
    units: Mapping[str, np.ndarray],
    kinds: Mapping[str, str],
    twins: Mapping[str, str] | None = None,
    higher_is_better: bool = True,
    metric: str = "score",
    what: str = "",
    unit: str = "test subject",
    alpha: float = 0.05,
    fold_sizes: tuple[float, float] | None = None,
) -> pd.DataFrame:
    """Each method against its twin, the shortcut rows and the controls, on paired units, in words.

    ``units``: ``{row: (n_units,) values}`` (unit k the same subject for every row); ``kinds``:
    ``{row: "method" | "baseline" | "control" | "reference"}``; ``twins``: ``{method: its untrained
    twin}`` (:func:`medssl.evaluate.runs.matched_twins`). The family is :func:`comparisons`;
    the result is :func:`family_verdicts` (one row per comparison; empty when there is none).
    """
    present = {r: k for r, k in kinds.items() if r in units and np.isfinite(np.asarray(units[r], float)).sum() >= 1}
    pairs = comparisons(present, twins)
    if not pairs:
        return family_verdicts(pd.DataFrame(), [])
    rows = list(dict.fromkeys(r for p in pairs for r in p))
    values = {r: np.asarray(units[r], dtype=np.float64).ravel() for r in rows}
    tests = _pairwise(values, pairs, fold_sizes)
    return family_verdicts(tests, pairs, higher_is_better, metric, what, unit, alpha, kinds)


def _pairwise(values: Mapping[str, np.ndarray], pairs: Sequence[tuple[str, str]],
              fold_sizes: tuple[float, float] | None) -> pd.DataFrame:
    """:func:`paired_tests`-like rows for ``pairs`` only, each on the units finite for both rows."""
    lengths = {len(v) for v in values.values()}
    if len(lengths) > 1:
        raise ValueError(f"every row needs the same units; got unit counts { {k: len(v) for k, v in values.items()} }")
    rows = []
    for a, b in pairs:
        keep = np.isfinite(values[a]) & np.isfinite(values[b])
        n = int(keep.sum())
        if n >= 2:
            row = _paired(values[a][keep], values[b][keep], fold_sizes)
        else:
            row = {"mean_a": float(np.nanmean(values[a])) if n else np.nan,
                   "mean_b": float(np.nanmean(values[b])) if n else np.nan, "mean_diff": np.nan,
                   "not_testable": testable_n(n), "t_stat": np.nan, "t_pvalue": np.nan, "wilcoxon_stat": np.nan,
                   "wilcoxon_pvalue": np.nan}
        rows.append({"method_a": a, "method_b": b, "n_folds": n, **row, "min_wilcoxon_p": min_wilcoxon_p(n)})
    return pd.DataFrame(rows)
