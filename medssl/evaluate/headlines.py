"""Headline tables: each evaluation step's key numbers in the long format the report concatenates.

Columns: ``method, kind, metric, value, std, n, split, higher_is_better, note``
(:data:`medssl.rundir.HEADLINE_COLUMNS`). ``kind`` is ``"method"`` for pretrained methods,
``"baseline"`` for the shortcuts a method must beat (random-init, raw intensities, position
only, identity, aligned identity) and ``"reference"`` for chance and best-achievable rows.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from medssl.evaluate.correspondence import BASELINES as CORR_BASELINES
from medssl.evaluate.correspondence import REFERENCES as CORR_REFERENCES
from medssl.evaluate.probe import CONTROL as PROBE_CONTROL
from medssl.evaluate.runs import RANDOM_INIT
from medssl.evaluate.stats import min_wilcoxon_p

__all__ = ["SHORTCUT_BASELINES", "kind_of", "latent_space_headline", "probe_headline"]

# names of shortcut-baseline rows across evaluations
SHORTCUT_BASELINES = (RANDOM_INIT, "raw-intensity", "position-linear", "position-cubic", *CORR_BASELINES)
# rows trained with the labels: they show that a task can be passed (the probe's supervised CNN)
POSITIVE_CONTROLS = (PROBE_CONTROL,)


def kind_of(name: str) -> str:
    """``"baseline"``, ``"control"``, ``"reference"`` or ``"method"`` for a row name.

    Registered methods that never train (Xavier, GVDiff: descriptors a method must beat) are baselines in
    every table, as in the segmentation tables.
    """
    if name in SHORTCUT_BASELINES:
        return "baseline"
    if name in POSITIVE_CONTROLS:
        return "control"
    if name in CORR_REFERENCES:
        return "reference"
    from medssl.methods import list_methods

    return "baseline" if name in list_methods(trains=False) else "method"


def _row(method: str, metric: str, value: float, split: str, higher: bool, std: float = np.nan, n: float = np.nan,
         kind: str | None = None, note: str = "") -> dict:
    return {"method": method, "kind": kind or kind_of(method), "metric": metric, "value": float(value),
            "std": float(std), "n": n, "split": split, "higher_is_better": higher, "note": note}


def latent_space_headline(
    fidelity: pd.DataFrame,
    decoding: Mapping[str, pd.DataFrame],
    correspondence: pd.DataFrame | None,
    collapse: pd.DataFrame,
    split: str,
) -> pd.DataFrame:
    """The latent-space step's headline rows.

    Args:
        fidelity: :func:`medssl.evaluate.fidelity.fidelity_table` (one row per method).
        decoding: ``{method: decode_coordinates summary}``.
        correspondence: :func:`medssl.evaluate.correspondence.summarize_correspondence` or None.
        collapse: ``method, effective_rank, ...``.
        split: the split all of them were measured on.
    """
    rows = []
    for _, r in fidelity.iterrows():
        rows.append(_row(r["method"], "distance_spearman", r["spearman"], split, True, n=r.get("n_pairs", np.nan)))
        if np.isfinite(r.get("abs_err_median_mm", np.nan)):
            rows.append(_row(r["method"], "distance_abs_err_median_mm", r["abs_err_median_mm"], split, False,
                             n=r.get("n_pairs", np.nan), note="metric latent: |D_latent - D_mm| after the method's scale"))
    for name, d in decoding.items():
        xyz = d.set_index("axis").loc["xyz"]
        rows.append(_row(name, "decoding_r2", xyz["r2"], split, True, std=xyz["r2_std"], n=xyz["n_folds"]))
        rows.append(_row(name, "decoding_error_mm", xyz["error_mm"], split, False, std=xyz["error_mm_std"],
                         n=xyz["n_folds"]))
    if correspondence is not None and not correspondence.empty:
        for _, r in correspondence.iterrows():
            rows.append(_row(r["method"], "correspondence_median_mm", r["median_error_mm"], split, False,
                             n=r["n_points"]))
    for _, r in collapse.iterrows():
        # rank is a property, not a score to beat: the random-init row is a reference here
        kind = "reference" if kind_of(r["method"]) == "baseline" else "method"
        rows.append(_row(r["method"], "effective_rank", r["effective_rank"], split, True, kind=kind))
    return pd.DataFrame(rows)


def probe_headline(table: pd.DataFrame, tests: pd.DataFrame | None, split: str, unit: str) -> pd.DataFrame:
    """The probe step's headline rows: AUC per feature set (mean and std over ``unit``s), with a note per method.

    The note of each method names the strongest shortcut baseline and the Holm-adjusted
    p-values of the paired tests against it (and the smallest p the number of units allows).
    """
    auc = table[table["metric"] == "auc"].set_index("method")
    baselines = [m for m in auc.index if kind_of(m) == "baseline"]
    strongest = auc.loc[baselines, "mean"].idxmax() if baselines else None
    rows = []
    for name, r in auc.iterrows():
        note = ""
        if strongest is not None and kind_of(name) == "method" and tests is not None and not tests.empty:
            note = _vs_note(name, strongest, tests, unit)
        rows.append(_row(name, "auc", r["mean"], split, True, std=r["std"], n=r["n"], note=note))
        if np.isfinite(r.get("pooled", np.nan)):
            rows.append(_row(name, "auc_pooled", r["pooled"], split, True, n=r["n"]))
    return pd.DataFrame(rows)


def _vs_note(name: str, other: str, tests: pd.DataFrame, unit: str) -> str:
    sel = tests[((tests.method_a == name) & (tests.method_b == other)) | ((tests.method_a == other) & (tests.method_b == name))]
    if sel.empty:
        return ""
    t = sel.iloc[0]
    n = int(t["n_folds"])
    return (f"{name} vs {other}: paired t-test Holm p = {t['t_pvalue_holm']:.3g}, Wilcoxon Holm p = "
            f"{t['wilcoxon_pvalue_holm']:.3g} over {n} {unit}s (smallest possible Wilcoxon p: {min_wilcoxon_p(n):.3g}).")
