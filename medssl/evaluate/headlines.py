"""Headline tables: each evaluation step's key numbers in the long format the report concatenates.

Columns: ``method, kind, metric, value, std, n, split, higher_is_better, note``
(:data:`medssl.rundir.HEADLINE_COLUMNS`). ``kind`` (:func:`kind_of`, the one rule) is:

- ``"method"``: pretrained methods;
- ``"baseline"``: what a method must beat: its untrained twin (``random-init[...]``, ``xavier``),
  and the shortcuts (raw intensities, position only, identity, ``aligned-identity (scale+shift)``,
  ``aligned-identity (body affine)``, untrained descriptors such as GVDiff);
- ``"control"``: positive controls, which show that the task can be solved at all
  (``registration (...)``, supervised models: ``supervised...``);
- ``"reference"``: chance and best-achievable rows.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from medssl.evaluate.correspondence import BASELINES as CORR_BASELINES
from medssl.evaluate.correspondence import REFERENCES as CORR_REFERENCES
from medssl.evaluate.registration import ALIGNED_BODY, REGISTRATION
from medssl.evaluate.runs import RANDOM_INIT, is_random_init
from medssl.rundir import ROW_KINDS

__all__ = ["CONTROL_PREFIXES", "KINDS", "SHORTCUT_BASELINES", "control_sentence", "kind_of", "latent_space_headline",
           "probe_headline"]

KINDS = ROW_KINDS  # every row kind, in report order
# names of shortcut-baseline rows across evaluations (plus every random-init[...] twin)
SHORTCUT_BASELINES = (RANDOM_INIT, "raw-intensity", "position-linear", "position-cubic", *CORR_BASELINES)
# rows whose name starts with one of these are positive controls
CONTROL_PREFIXES = (REGISTRATION, "supervised")


def kind_of(name: str) -> str:
    """``"baseline"``, ``"control"``, ``"reference"`` or ``"method"`` for a row name.

    Registered methods that never train (Xavier, GVDiff: descriptors a method must beat) are baselines in
    every table, as in the segmentation tables.
    """
    if name in SHORTCUT_BASELINES or is_random_init(name) or name.startswith(ALIGNED_BODY):
        return "baseline"
    if name.startswith(CONTROL_PREFIXES):
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
    correspondence_verdicts: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The latent-space step's headline rows.

    Args:
        fidelity: :func:`medssl.evaluate.fidelity.fidelity_table` (one row per method).
        decoding: ``{method: decode_coordinates summary}``.
        correspondence: :func:`medssl.evaluate.correspondence.summarize_correspondence` or None.
        collapse: ``method, effective_rank, ...``.
        split: the split all of them were measured on.
        correspondence_verdicts: :meth:`CorrespondenceResult.verdicts` (the method rows' notes).
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
        said = _notes_by_method(correspondence_verdicts)
        for _, r in correspondence.iterrows():
            n_subj = r.get("n_subjects", np.nan)
            base = (f"median over {int(r['n_points'])} points of {int(r['n_pairs'])} subject pairs; n = query "
                    "subjects (the paired-test unit)")
            note = "; ".join(x for x in (base, str(r.get("note", "") or ""), said.get(r["method"], "")) if x)
            rows.append(_row(r["method"], "correspondence_median_mm", r["median_error_mm"], split, False,
                             n=n_subj, kind=r.get("kind") or None, note=note))
    for _, r in collapse.iterrows():
        # rank is a property, not a score to beat: the random-init row is a reference here
        kind = "reference" if kind_of(r["method"]) == "baseline" else "method"
        rows.append(_row(r["method"], "effective_rank", r["effective_rank"], split, True, kind=kind))
    return pd.DataFrame(rows)


def _notes_by_method(verdicts: pd.DataFrame | None) -> dict[str, str]:
    """``{method: its verdict sentences joined}`` from a :func:`medssl.evaluate.stats.family_verdicts` table."""
    if verdicts is None or verdicts.empty:
        return {}
    return {m: " ".join(g["verdict"]) for m, g in verdicts.groupby("method", sort=False)}


def probe_headline(table: pd.DataFrame, tests: pd.DataFrame | None, split: str, unit: str,
                   twins: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The probe step's headline rows: AUC per feature set (mean and std over ``unit``s), with a note per method.

    The note of each method says, in words, how it compares with its own untrained twin, every
    shortcut row and every control (:func:`medssl.evaluate.stats.family_verdicts`): Holm-adjusted
    over those method x baseline comparisons only (the family size is in the note), with the
    smallest adjusted Wilcoxon p the number of units allows. ``tests``: the probe's paired tests
    (every pair of rows, unadjusted p-values are read); ``twins``: ``{method: twin row}``
    (:func:`medssl.evaluate.runs.matched_twins`); without it every baseline is compared with
    every method.
    """
    from medssl.evaluate.stats import comparisons, family_verdicts

    auc = table[table["metric"] == "auc"].set_index("method")
    said: dict[str, str] = {}
    if tests is not None and not tests.empty:
        kinds = {m: kind_of(m) for m in auc.index}
        tested = set(tests["method_a"]) | set(tests["method_b"])
        pairs = [p for p in comparisons({m: k for m, k in kinds.items() if m in tested}, twins)]
        said = _notes_by_method(family_verdicts(tests, pairs, True, "AUC", unit=unit, kinds=kinds))
    rows = []
    for name, r in auc.iterrows():
        rows.append(_row(name, "auc", r["mean"], split, True, std=r["std"], n=r["n"], note=said.get(name, "")))
        if np.isfinite(r.get("pooled", np.nan)):
            rows.append(_row(name, "auc_pooled", r["pooled"], split, True, n=r["n"]))
    return pd.DataFrame(rows)


def control_sentence(values: Mapping[str, float], chance: float, best: float, what: str, near: float = 0.25) -> str:
    """One sentence on the positive control(s) among ``values`` (``{row: value}``).

    A control that closes less than ``near`` of the gap from ``chance`` to ``best`` (the best
    attainable value; either direction, so errors and scores both work) "sits near chance": the
    table then says that the task measures nothing. Returns ``""`` when ``values`` holds no control row.
    """
    out = []
    for row, v in values.items():
        if kind_of(row) != "control" or not np.isfinite(v):
            continue
        gap = (v - chance) / (best - chance) if best != chance else np.nan
        if np.isfinite(gap) and gap < near:
            out.append(f"The positive control {row} reaches only {v:.3g} on {what} (chance {chance:.3g}, best "
                       f"attainable {best:.3g}): it sits near chance, so this task measures nothing; no method's "
                       "result on it means anything.")
        else:
            out.append(f"The positive control {row} reaches {v:.3g} on {what} (chance {chance:.3g}, best attainable "
                       f"{best:.3g}): the task can be solved, and the gap between a method and the control is what "
                       "the method leaves on the table.")
    return " ".join(out)
