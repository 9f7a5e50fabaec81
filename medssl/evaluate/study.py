"""A study's tables with uncertainty, paired comparisons and figures, from every seed's evaluation files.

A study (:mod:`medssl.study`) keeps one ordinary run per seed in ``runs/<run>/seed<k>/``. This
module reads what their evaluation notebooks wrote and combines the seeds:

- **Per-unit scores** (:func:`collect_units`): one value per (seed, metric, row, test subject):
  kNN Dice per query subject and number of atlases (``50_segmentation/knn_scores.csv``, mean over
  organs and draws), fine-tuned Dice (``finetune_scores.csv``), probe AUC per test subject
  (``30_linear_probe/<target>/probe_per_subject.csv``) and the correspondence error per query
  subject (``20_latent_space/correspondence_points.csv``, median over its points).
- **The study table** (:func:`study_table`): per metric and row, the mean over seeds and subjects,
  a **95 % bootstrap interval over test subjects** (each subject's score averaged over the seeds,
  subjects resampled with replacement), the **spread over seeds** (s.d. of the seeds' means) and
  their counts. Metrics without per-subject values (distance fidelity, coordinate decoding,
  effective rank: ``headline.csv``) get the spread over seeds only, and say so.
- **Paired comparisons** (:func:`paired_comparisons`): each method against its matched untrained
  twin, its strongest shortcut row and the best positive control, on the seed-averaged subject
  scores, with :func:`medssl.evaluate.stats.paired_tests` per pair and
  :func:`medssl.evaluate.stats.holm` over the method x comparator family of each metric (its size
  and the smallest attainable adjusted Wilcoxon p are in every row). Thin on purpose: the verdict
  wording lives in :mod:`medssl.evaluate.stats`.
- **Figures**: kNN Dice against the number of atlases with interval bands, downstream score
  against the IoU interval, pretext learning curves per method and seed, and the context methods'
  ordering next to Blendowski et al.'s Table 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from medssl.rundir import RunDir

__all__ = ["BLENDOWSKI_TABLE2", "QUESTIONS", "THESIS_DSC", "collect_headlines", "collect_units", "context_ordering",
           "head_to_head", "keep_rows", "learning_curves", "metric_groups", "paired_comparisons", "seed_runs", "settings_table",
           "study_table", "table_cells", "twins_of", "unit_budget"]

# Blendowski et al., MICCAI 2019, Table 2: mean Dice of the few-shot segmentation from each descriptor (%)
BLENDOWSKI_TABLE2 = {"heatmap": 64.2, "reg2d": 60.0, "doersch": 55.2, "gvdiff": 50.4, "xavier": 28.4}
# Konieczkowicz (MSc thesis, AGH 2023): fine-tuned DSC with IoU-interval positives [0.3, 0.6] vs random crops [0, 1]
THESIS_DSC = {"simsiam": 0.853, "simsiam-iou-0-1": 0.824}
# The three questions the study answers (issue 17), as head-to-head comparisons on the downstream metrics.
QUESTIONS = {
    "Q1: does ISImed's spatial pretraining help downstream more than SimCLR and BarlowTwins (ISImed, Table 1)?":
        [("isimed", "simclr"), ("isimed", "barlowtwins")],
    "Q2: do IoU-interval positives [0.3, 0.6] beat random crops [0, 1] (thesis: DSC 0.853 vs 0.824)?":
        [("simsiam", "simsiam-iou-0-1")],
    "Q3: is the ordering Heatmap > Reg2D > Doersch > GVDiff > Xavier (Blendowski et al., Table 2)?":
        [("heatmap", "reg2d"), ("reg2d", "doersch"), ("doersch", "gvdiff"), ("gvdiff", "xavier")],
}


def seed_runs(run: "str | os.PathLike | RunDir", seeds: Sequence[int] | None = None) -> dict[int, RunDir]:
    """``{seed: RunDir}`` of the study's replicates (``seeds``: a subset; default every ``seed<k>/`` found)."""
    found = RunDir(run).seed_runs()
    if seeds:
        missing = [k for k in seeds if k not in found]
        if missing:
            raise FileNotFoundError(f"{RunDir(run).path}: no replicate folder for seeds {missing} (found {list(found)})")
        return {k: found[k] for k in seeds}
    return found


def _kind(name: str, given: Any = None) -> str:
    if isinstance(given, str) and given:
        return given
    from medssl.evaluate.headlines import kind_of

    return kind_of(name)


def collect_units(run: "str | os.PathLike | RunDir", seeds: Sequence[int] | None = None) -> pd.DataFrame:
    """Every seed's per-subject scores, long: ``seed, metric, method, kind, unit, value, higher_is_better, split``."""
    frames = []
    for seed, rd in seed_runs(run, seeds).items():
        for frame in (_knn_units(rd), _finetune_units(rd), _probe_units(rd), _correspondence_units(rd)):
            if frame is not None and not frame.empty:
                frames.append(frame.assign(seed=seed))
    cols = ["seed", "metric", "method", "kind", "unit", "value", "higher_is_better", "split"]
    if not frames:
        return pd.DataFrame(columns=cols)
    out = pd.concat(frames, ignore_index=True)
    out["kind"] = [_kind(m, k) for m, k in zip(out["method"], out["kind"])]
    return out[cols]


def _read(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() else None


def _knn_units(rd: RunDir) -> pd.DataFrame | None:
    s = _read(rd.step_dir("50_segmentation", create=False) / "knn_scores.csv")
    if s is None or s.empty:
        return None
    keys = ["method", "kind", "n_atlases", "query"]
    per_draw = s.groupby([*keys, "draw"], sort=False)["dice"].mean().reset_index()  # organs present in the truth
    q = per_draw.groupby(keys, sort=False)["dice"].mean().reset_index()
    return pd.DataFrame({"metric": [f"knn_dice@{int(n)}" for n in q["n_atlases"]], "method": q["method"],
                         "kind": q["kind"], "unit": q["query"].astype(str), "value": q["dice"],
                         "higher_is_better": True, "split": s["split"].iloc[0] if "split" in s else "test"})


def _finetune_units(rd: RunDir) -> pd.DataFrame | None:
    s = _read(rd.step_dir("50_segmentation", create=False) / "finetune_scores.csv")
    if s is None or s.empty:
        return None
    q = s.groupby(["method", "n_subjects", "query"], sort=False)["dice"].mean().reset_index()
    return pd.DataFrame({"metric": [f"finetune_dice@{int(n)}" for n in q["n_subjects"]], "method": q["method"],
                         "kind": None, "unit": q["query"].astype(str), "value": q["dice"], "higher_is_better": True,
                         "split": s["split"].iloc[0] if "split" in s else "test"})


def _probe_units(rd: RunDir) -> pd.DataFrame | None:
    frames = []
    for f in sorted(rd.step_dir("30_linear_probe", create=False).glob("*/probe_per_subject.csv")):
        p = pd.read_csv(f)
        if p.empty or "auc" not in p:
            continue
        frames.append(pd.DataFrame({"metric": f"probe_auc_{f.parent.name}", "method": p["method"], "kind": None,
                                    "unit": p["unit"].astype(str), "value": p["auc"], "higher_is_better": True,
                                    "split": "test"}))
    return pd.concat(frames, ignore_index=True) if frames else None


def _correspondence_units(rd: RunDir) -> pd.DataFrame | None:
    p = _read(rd.step_dir("20_latent_space", create=False) / "correspondence_points.csv")
    if p is None or p.empty:
        return None
    from medssl.evaluate.correspondence import REFERENCES

    p = p[~p["method"].isin(REFERENCES)]
    q = p.groupby(["method", "case_a"], sort=False)["error_mm"].median().reset_index()
    kinds = dict(zip(p["method"], p["kind"])) if "kind" in p else {}
    return pd.DataFrame({"metric": "correspondence_median_mm", "method": q["method"],
                         "kind": [kinds.get(m) for m in q["method"]], "unit": q["case_a"].astype(str),
                         "value": q["error_mm"], "higher_is_better": False, "split": "test"})


def keep_rows(table: pd.DataFrame, methods: Sequence[str] | None) -> pd.DataFrame:
    """``table`` with only the listed trained methods; baseline, control and reference rows always stay."""
    if not methods or table is None or table.empty:
        return table
    return table[(table["kind"] != "method") | table["method"].isin(list(methods))]


def collect_headlines(run: "str | os.PathLike | RunDir", seeds: Sequence[int] | None = None) -> pd.DataFrame:
    """Every seed's headline rows (``RunDir.headlines``) with a ``seed`` column."""
    frames = [rd.headlines().assign(seed=k) for k, rd in seed_runs(run, seeds).items()]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ---------------------------------------------------------------------------- the table


def metric_groups(table: pd.DataFrame) -> dict[str, list[str]]:
    """The table's metrics by role: ``knn`` (by number of atlases), ``downstream`` (fine-tuning, probes), ``other``."""
    names = list(dict.fromkeys(table["metric"])) if table is not None and not table.empty else []
    knn = sorted((m for m in names if m.startswith("knn_dice@")), key=lambda m: int(m.split("@")[1]))
    downstream = [m for m in names if m.startswith(("finetune_dice@", "probe_auc_"))]
    return {"knn": knn, "downstream": downstream, "other": [m for m in names if m not in knn and m not in downstream]}


def bootstrap_interval(values: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0
                       ) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (units resampled with replacement); NaN below 2 units."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(int(n_boot), len(v)))].mean(axis=1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def seed_averaged(units: pd.DataFrame) -> pd.DataFrame:
    """Each (metric, method, unit) averaged over the seeds that scored it: the units of the intervals and tests."""
    keys = ["metric", "method", "kind", "unit", "higher_is_better", "split"]
    return units.groupby(keys, sort=False, dropna=False)["value"].agg(["mean", "size"]).reset_index().rename(
        columns={"mean": "value", "size": "n_seeds"})


def study_table(units: pd.DataFrame, headlines: pd.DataFrame | None = None, *, n_boot: int = 2000,
                level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per (metric, row): mean, bootstrap interval over test subjects, spread over seeds, counts.

    Columns: ``metric, method, kind, mean, ci_low, ci_high, seed_sd, n_units, n_seeds, unit, split,
    higher_is_better, interval``. ``interval`` says what the interval is (or that only seeds vary).
    """
    rows = []
    if units is not None and not units.empty:
        per_seed = units.groupby(["metric", "method", "seed"])["value"].mean().sort_index()
        for (metric, method), g in seed_averaged(units).groupby(["metric", "method"], sort=False):
            lo, hi = bootstrap_interval(g["value"].to_numpy(), n_boot, level, seed)
            seeds = per_seed.loc[(metric, method)]
            rows.append({"metric": metric, "method": method, "kind": g["kind"].iloc[0], "mean": float(g["value"].mean()),
                         "ci_low": lo, "ci_high": hi, "seed_sd": float(seeds.std(ddof=1)) if len(seeds) > 1 else np.nan,
                         "n_units": int(g["value"].notna().sum()), "n_seeds": int(len(seeds)), "unit": "test subject",
                         "split": g["split"].iloc[0], "higher_is_better": bool(g["higher_is_better"].iloc[0]),
                         "interval": f"{level:.0%} bootstrap over test subjects (seed-averaged)"})
    have = {r["metric"] for r in rows}
    if headlines is not None and not headlines.empty:
        h = headlines[~headlines["metric"].isin(have) & headlines["metric"].isin(
            ["distance_spearman", "decoding_r2", "decoding_error_mm", "effective_rank", "distance_abs_err_median_mm"])]
        for (metric, method), g in h.groupby(["metric", "method"], sort=False):
            v = g["value"].astype(float)
            rows.append({"metric": metric, "method": method, "kind": g["kind"].iloc[0], "mean": float(v.mean()),
                         "ci_low": np.nan, "ci_high": np.nan, "seed_sd": float(v.std(ddof=1)) if len(v) > 1 else np.nan,
                         "n_units": g["n"].iloc[0], "n_seeds": int(g["seed"].nunique()), "unit": "",
                         "split": g["split"].iloc[0], "higher_is_better": bool(g["higher_is_better"].iloc[0]),
                         "interval": "spread over seeds only (no per-subject values)"})
    return pd.DataFrame(rows)


def table_cells(table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """The study table as text cells, rows x metrics: ``mean [ci_low, ci_high] +-seed_sd (n)``."""
    if table is None or table.empty:
        return pd.DataFrame()
    f = f"{{:.{digits}f}}"
    cells = []
    for r in table.itertuples(index=False):
        ci = f" [{f.format(r.ci_low)}, {f.format(r.ci_high)}]" if np.isfinite(r.ci_low) else ""
        sd = f" ±{f.format(r.seed_sd)}" if np.isfinite(r.seed_sd) else ""
        cells.append(f"{f.format(r.mean)}{ci}{sd}")
    t = table.assign(cell=cells)
    return t.pivot_table(index=["kind", "method"], columns="metric", values="cell", aggfunc="first", sort=False)


# ---------------------------------------------------------------------------- paired comparisons


def twins_of(run: "str | os.PathLike | RunDir", seed: int | None = None) -> dict[str, str]:
    """``{method: its untrained twin's row}`` in the study's first (or given) replicate.

    Uses :func:`medssl.evaluate.runs.matched_twins` where medssl has it (same architecture, untrained);
    otherwise the 2.5D context methods' twin is ``xavier`` (their untrained start) and every other
    method's the run's ``random-init`` row, as this medssl's evaluations build it.
    """
    runs = seed_runs(run)
    if not runs:
        return {}
    k = seed if seed is not None else next(iter(runs))
    rd = runs[k]
    try:
        from medssl.evaluate.runs import matched_twins  # type: ignore[attr-defined]
    except ImportError:
        matched_twins = None
    if matched_twins is not None:
        from medssl.evaluate.runs import load_run_methods
        from medssl.train.checkpoint import CheckpointError

        try:
            return dict(matched_twins(load_run_methods(rd, None, include_random_init=True, seed=k, verbose=False)))
        except CheckpointError as err:  # a replicate copied without its weights: the configs still name the twins
            print(f"twins from the methods' configs ({err})")
    out = {}
    for m in rd.trained_methods():
        cfg = rd.files(m).config
        info = json.loads(cfg.read_text()) if cfg.is_file() else {}
        if not info.get("resolved", {}).get("trains", True):
            continue
        backbone = info.get("method_config", {}).get("backbone")
        out[m] = "xavier" if backbone == "d2d" and "xavier" in rd.trained_methods() else "random-init"
    return out


def paired_comparisons(units: pd.DataFrame, twins: Mapping[str, str], metrics: Sequence[str] | None = None,
                       alpha: float = 0.05) -> pd.DataFrame:
    """Each method against its twin, its strongest shortcut and the best positive control, per metric.

    The units are test subjects, each averaged over the seeds. One row per (metric, method,
    comparator): ``role`` (twin / strongest shortcut / positive control), means, difference
    (method - comparator, in the metric's unit), ``n``, paired t-test and Wilcoxon p (via
    :func:`medssl.evaluate.stats.paired_tests`), their Holm adjustment over the metric's method x
    comparator family, ``family_size``, the smallest attainable adjusted Wilcoxon p, and ``verdict``.
    """
    from medssl.evaluate.stats import holm, min_wilcoxon_p, paired_tests

    if units is None or units.empty:
        return pd.DataFrame()
    avg = seed_averaged(units)
    rows = []
    for metric, g in avg.groupby("metric", sort=False):
        if metrics is not None and metric not in metrics:
            continue
        wide = g.pivot_table(index="unit", columns="method", values="value", sort=False)
        kinds = dict(zip(g["method"], g["kind"]))
        higher = bool(g["higher_is_better"].iloc[0])
        means = wide.mean()
        twin_rows = set(twins.values())
        shortcuts = [r for r in wide.columns if kinds.get(r) == "baseline" and r not in twin_rows]
        controls = [r for r in wide.columns if kinds.get(r) == "control"]
        strongest, control = _best(shortcuts, means, higher), _best(controls, means, higher)
        family = []
        for m in [r for r in wide.columns if kinds.get(r) == "method"]:
            for role, comp in (("twin", twins.get(m)), ("strongest shortcut", strongest), ("positive control", control)):
                if comp is not None and comp in wide.columns and comp != m:
                    family.append((m, role, comp))
        start = len(rows)
        for m, role, comp in family:
            pair = wide[[m, comp]].dropna()
            n = len(pair)
            row = {"metric": metric, "method": m, "role": role, "comparator": comp, "n": n,
                   "mean_method": float(pair[m].mean()) if n else np.nan,
                   "mean_comparator": float(pair[comp].mean()) if n else np.nan, "higher_is_better": higher}
            row["diff"] = row["mean_method"] - row["mean_comparator"]
            t_p = w_p = np.nan
            if n >= 5 and np.ptp(pair[m].to_numpy() - pair[comp].to_numpy()) > 0:
                t = paired_tests({m: pair[m].to_numpy(), comp: pair[comp].to_numpy()}, correction=None).iloc[0]
                t_p, w_p = float(t["t_pvalue"]), float(t["wilcoxon_pvalue"])
            row.update(t_pvalue=t_p, wilcoxon_pvalue=w_p,
                       not_testable="" if np.isfinite(t_p) else
                       (f"not testable: {n} units < 5" if n < 5 else "not testable: the differences do not vary"))
            rows.append(row)
        block = pd.DataFrame(rows[start:])
        if block.empty:
            continue
        m_family = len(block)
        t_holm = holm(block["t_pvalue"].fillna(1.0).to_numpy())
        w_holm = holm(block["wilcoxon_pvalue"].fillna(1.0).to_numpy())
        for i, r in enumerate(rows[start:]):
            testable = not r["not_testable"]
            r.update(t_pvalue_holm=t_holm[i] if testable else np.nan, wilcoxon_pvalue_holm=w_holm[i] if testable else np.nan,
                     family_size=m_family, min_wilcoxon_p_holm=min(1.0, m_family * min_wilcoxon_p(r["n"])) if r["n"] else np.nan)
            r["verdict"] = _verdict(r, alpha)
    return pd.DataFrame(rows)


def head_to_head(units: pd.DataFrame, pairs: Sequence[tuple[str, str]], metrics: Sequence[str] | None = None,
                 alpha: float = 0.05) -> pd.DataFrame:
    """``a`` against ``b`` for each pair and metric on seed-averaged test subjects, Holm over all of them.

    One row per (metric, a, b): means, ``diff`` (a - b), a 95 % bootstrap interval of the paired
    difference over subjects, ``n``, paired t-test and Wilcoxon p and their Holm adjustment over the
    ``family_size`` comparisons made here, the smallest attainable adjusted Wilcoxon p, and ``verdict``
    (``a better`` / ``b better`` / ``not distinguishable`` / not testable).
    """
    from medssl.evaluate.stats import holm, min_wilcoxon_p, paired_tests

    if units is None or units.empty:
        return pd.DataFrame()
    avg = seed_averaged(units)
    rows = []
    for metric, g in avg.groupby("metric", sort=False):
        if metrics is not None and metric not in metrics:
            continue
        wide = g.pivot_table(index="unit", columns="method", values="value", sort=False)
        higher = bool(g["higher_is_better"].iloc[0])
        for a, b in pairs:
            if a not in wide.columns or b not in wide.columns:
                continue
            pair = wide[[a, b]].dropna()
            d = (pair[a] - pair[b]).to_numpy()
            lo, hi = bootstrap_interval(d)
            row = {"metric": metric, "a": a, "b": b, "n": len(d), "mean_a": float(pair[a].mean()),
                   "mean_b": float(pair[b].mean()), "diff": float(d.mean()) if len(d) else np.nan,
                   "diff_ci_low": lo, "diff_ci_high": hi, "higher_is_better": higher, "t_pvalue": np.nan,
                   "wilcoxon_pvalue": np.nan}
            if len(d) >= 5 and np.ptp(d) > 0:
                t = paired_tests({a: pair[a].to_numpy(), b: pair[b].to_numpy()}, correction=None).iloc[0]
                row.update(t_pvalue=float(t["t_pvalue"]), wilcoxon_pvalue=float(t["wilcoxon_pvalue"]))
            rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    m = len(out)
    testable = out["t_pvalue"].notna()
    out["t_pvalue_holm"] = np.where(testable, holm(out["t_pvalue"].fillna(1.0).to_numpy()), np.nan)
    out["wilcoxon_pvalue_holm"] = np.where(testable, holm(out["wilcoxon_pvalue"].fillna(1.0).to_numpy()), np.nan)
    out["family_size"] = m
    out["min_wilcoxon_p_holm"] = [min(1.0, m * min_wilcoxon_p(n)) for n in out["n"]]
    verdicts = []
    for r in out.itertuples(index=False):
        if not np.isfinite(r.t_pvalue):
            verdicts.append(f"not testable ({r.n} units)" if r.n < 5 else "not testable: the differences do not vary")
        elif r.t_pvalue_holm < alpha:
            a_better = r.diff > 0 if r.higher_is_better else r.diff < 0
            verdicts.append(f"{r.a if a_better else r.b} better")
        else:
            verdicts.append("not distinguishable")
    out["verdict"] = verdicts
    return out


def _best(rows: Sequence[str], means: pd.Series, higher: bool) -> str | None:
    """The row with the best mean (None when there is none)."""
    if not rows:
        return None
    return max(rows, key=lambda r: means[r]) if higher else min(rows, key=lambda r: means[r])


def _verdict(r: Mapping[str, Any], alpha: float) -> str:
    if r["not_testable"]:
        return r["not_testable"]
    better = r["diff"] > 0 if r["higher_is_better"] else r["diff"] < 0
    p = r["t_pvalue_holm"]
    if p < alpha:
        return "better" if better else "worse"
    return "not distinguishable"


# ---------------------------------------------------------------------------- learning curves, budget, settings


def learning_curves(run: "str | os.PathLike | RunDir", seeds: Sequence[int] | None = None) -> pd.DataFrame:
    """Validation pretext measure per (method, seed, step): ``method, seed, step, measure, mode, value, best_step,
    stop_reason`` (from ``metrics.jsonl`` and ``early_stopping.json``)."""
    from medssl.methods import get_method_class
    from medssl.train import read_metrics

    rows = []
    for k, rd in seed_runs(run, seeds).items():
        for m in rd.trained_methods():
            es_file = rd.method_dir(m) / "early_stopping.json"
            es = json.loads(es_file.read_text()) if es_file.is_file() else {}
            try:
                cls = get_method_class(m)
            except KeyError:
                continue
            if not cls.trains:  # an untrained baseline has no curve
                continue
            measure, mode = es.get("measure") or cls.val_measure[0], es.get("mode") or cls.val_measure[1]
            if not rd.files(m).metrics.is_file():
                continue
            log = read_metrics(rd.method_dir(m))
            if log.empty or "split" not in log or measure not in log:
                continue
            val = log[log["split"] == "val"]
            for step, value in zip(val["step"], val[measure]):
                rows.append({"method": m, "seed": k, "step": int(step), "measure": measure, "mode": mode,
                             "value": float(value), "best_step": es.get("best_step"),
                             "stop_reason": es.get("stop_reason", "")})
    return pd.DataFrame(rows)


def unit_budget(run: "str | os.PathLike | RunDir") -> pd.DataFrame:
    """Every unit of ``study.json``: kind, seed, method, seconds, and for pretraining the steps, best step and stop."""
    path = RunDir(run).path / "study.json"
    if not path.is_file():
        return pd.DataFrame()
    units = json.loads(path.read_text())["units"]
    rows = []
    for uid, u in units.items():
        row = {"unit": uid, "kind": u.get("kind"), "seed": u.get("seed"), "method": u.get("method"),
               "status": u.get("status"), "seconds": u.get("seconds")}
        if u.get("kind") == "pretrain":
            es_file = Path(u["output"]) / "early_stopping.json"
            es = json.loads(es_file.read_text()) if es_file.is_file() else {}
            row.update(steps=es.get("step"), best_step=es.get("best_step"), cap_steps=es.get("cap_steps"),
                       stop=es.get("stop_reason", u.get("message", "")))
        rows.append(row)
    return pd.DataFrame(rows)


def settings_table(run: "str | os.PathLike | RunDir", methods: Sequence[str] | None = None) -> pd.DataFrame:
    """The study's settings next to each paper's (the ``paper`` preset), method by method; ``differs`` lists the keys.

    Read from the first replicate's ``config.json`` files (what was trained) and
    :func:`medssl.presets.preset` (what the paper did).
    """
    from medssl.methods import make_config
    from medssl.presets import preset

    runs = seed_runs(run)
    if not runs:
        return pd.DataFrame()
    rd = next(iter(runs.values()))
    keys_m = ("backbone", "patch_size_vox", "volumes_per_batch", "patches_per_volume", "embed_dim")
    rows = []
    for m in methods or rd.trained_methods():
        cfg = rd.files(m).config
        if not cfg.is_file():
            continue
        info = json.loads(cfg.read_text())
        try:
            paper_m, paper_t = preset(m, "paper")
        except KeyError:
            continue
        study_m = info.get("method_config", {})
        study_t = info.get("train", {})
        row = {"method": m}
        differs = []
        defaults = make_config(m)  # a Config's defaults are its paper's (the contract tests check it)
        for k in keys_m:
            a, b = study_m.get(k), paper_m.get(k, getattr(defaults, k, None))
            row[f"{k} (study)"], row[f"{k} (paper)"] = a, b
            if a != b:
                differs.append(k)
        steps_study = int(study_t.get("epochs", 0)) * int(study_t.get("steps_per_epoch") or 0)
        steps_paper = paper_t.epochs * (paper_t.steps_per_epoch or 0) if paper_t.steps_per_epoch else None
        row.update({"lr (study)": study_t.get("lr"), "lr (paper)": paper_t.lr, "cap steps (study)": steps_study,
                    "steps (paper)": steps_paper if steps_paper else f"{paper_t.epochs} epochs",
                    "early stopping (study)": json.dumps(study_t.get("early_stopping"))})
        if study_t.get("lr") != paper_t.lr:
            differs.append("lr")
        differs.append("steps")
        row["differs"] = ", ".join(differs)
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- figures


def _band_plot(ax, x, mean, lo, hi, label, dashed=False, color=None):
    line = ax.plot(x, mean, "--" if dashed else "-", marker="o", ms=3, label=label, color=color)[0]
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)


# The kNN figure's panels: each paper's methods together (20 lines in one panel could not be told apart).
# SimSiam variants are found by their method class; rows of no panel that are not baselines or controls
# (a user's own method) get a panel of their own; baselines and controls of no panel appear in every panel.
KNN_PANELS = {
    "ISImed paper": ("isimed", "regisimed", "simclr", "barlowtwins"),
    "SimSiam thesis (IoU intervals)": (),
    "Blendowski et al. (context)": ("heatmap", "reg2d", "doersch", "gvdiff", "xavier"),
}


def _knn_panel_of(method: str) -> str | None:
    for panel, members in KNN_PANELS.items():
        if method in members:
            return panel
    return "SimSiam thesis (IoU intervals)" if _interval_of(method) is not None else None


def knn_curve_figure(table: pd.DataFrame, title: str = ""):
    """kNN Dice against the number of atlases, the bootstrap interval as a band: one panel per paper.

    Each panel holds that paper's methods (solid) and every shared baseline and control (dashed, grey to
    black: identity rows, the untrained encoders, registration), so each method is seen against the rows
    it must beat.
    """
    import matplotlib.pyplot as plt

    t = table[table["metric"].str.startswith("knn_dice@")].copy()
    if t.empty:
        fig, ax = plt.subplots(figsize=(8, 5))
        ax.text(0.5, 0.5, "no kNN results", ha="center")
        return fig
    t["n"] = t["metric"].str.split("@").str[1].astype(int)
    kinds = t.groupby("method", sort=False)["kind"].first()
    panel_of = {m: _knn_panel_of(m) for m in kinds.index}
    for m, kind in kinds.items():
        if panel_of[m] is None and kind == "method":
            panel_of[m] = "other methods"
    shared = [m for m in kinds.index if panel_of[m] is None]
    panels = [p for p in [*KNN_PANELS, "other methods"] if any(v == p for v in panel_of.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.2), sharey=True, squeeze=False)
    greys = plt.get_cmap("Greys")(np.linspace(0.35, 0.95, max(1, len(shared))))
    colours = plt.get_cmap("tab10").colors
    for ax, panel in zip(axes[0], panels):
        own = [m for m in kinds.index if panel_of[m] == panel]
        for j, method in enumerate(own):
            g = t[t["method"] == method].sort_values("n")
            _band_plot(ax, g["n"], g["mean"], g["ci_low"], g["ci_high"], method,
                       dashed=kinds[method] != "method", color=colours[j % len(colours)])
        for j, method in enumerate(shared):
            g = t[t["method"] == method].sort_values("n")
            _band_plot(ax, g["n"], g["mean"], g["ci_low"], g["ci_high"], method, dashed=True, color=greys[j])
        ax.set_xticks(sorted(t["n"].unique()))
        ax.set(xlabel="number of labelled atlases", title=panel)
        ax.legend(fontsize=6.5, loc="upper left")
    axes[0][0].set_ylabel("mean Dice (test subjects)")
    fig.suptitle(title or "kNN label transfer: mean over seeds, 95 % bootstrap band over test subjects "
                 "(dashed grey: shared baselines and controls)")
    fig.tight_layout()
    return fig


def _interval_of(method: str) -> tuple[float, float] | None:
    from medssl.methods import get_method_class, make_config

    try:
        if get_method_class(method).name != "simsiam":
            return None
        cfg = make_config(method)
    except KeyError:
        return None
    return float(cfg.iou_min), float(cfg.iou_max)


def iou_interval_figure(table: pd.DataFrame, metrics: Sequence[str]):
    """Downstream score against the IoU interval of the SimSiam variants (mean, 95 % interval), one panel per metric."""
    import matplotlib.pyplot as plt

    rows = [(m, iv) for m in dict.fromkeys(table["method"]) if (iv := _interval_of(m)) is not None]
    rows.sort(key=lambda x: (x[1][0] + x[1][1], x[1][1]))
    metrics = [m for m in metrics if m in set(table["metric"])]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4.5 * max(1, len(metrics)), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        t = table[table["metric"] == metric].set_index("method")
        xs = [f"[{a:g}, {b:g}]" for _, (a, b) in rows]
        got = [(i, t.loc[m]) for i, (m, _) in enumerate(rows) if m in t.index]
        if got:
            i, r = zip(*got)
            mean = np.array([x["mean"] for x in r])
            err = np.array([[x["mean"] - x["ci_low"] for x in r], [x["ci_high"] - x["mean"] for x in r]])
            ax.errorbar(i, mean, yerr=np.nan_to_num(err), fmt="o-", capsize=3)
        ax.set_xticks(range(len(xs)), xs, rotation=30)
        ax.set(title=metric, xlabel="IoU interval of the positive pairs")
        if metric.startswith("finetune_dice"):
            ax.annotate("thesis (fine-tuned DSC): [0.3, 0.6] 0.853, [0, 1] 0.824", (0.02, 0.02), xycoords="axes fraction",
                        fontsize=7, color="0.3")
    fig.suptitle("SimSiam: downstream score per IoU interval (mean over seeds, 95 % bootstrap over test subjects)")
    fig.tight_layout()
    return fig


def learning_curve_figure(curves: pd.DataFrame):
    """The validation pretext measure against steps, one panel per method, one line per seed; the best step marked."""
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(curves["method"])) if not curves.empty else []
    n = max(1, len(methods))
    cols = min(4, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4 * cols, 3 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, m in zip(axes.ravel(), methods):
        g = curves[curves["method"] == m]
        for seed, s in g.groupby("seed"):
            line = ax.plot(s["step"], s["value"], label=f"seed {seed}")[0]
            best = s["best_step"].iloc[0]
            if best is not None and np.isfinite(best) and (s["step"] == best).any():
                ax.plot([best], s.loc[s["step"] == best, "value"].iloc[:1], "*", color=line.get_color(), ms=10)
        ax.set(title=f"{m}: val {g['measure'].iloc[0]} ({g['mode'].iloc[0]})", xlabel="step")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(methods):]:
        ax.axis("off")
    fig.suptitle("Pretext learning curves on the fixed validation patches (star: the best step, kept as best.pt)")
    fig.tight_layout()
    return fig


def context_ordering(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The context methods and their baselines on ``metric`` next to Blendowski et al.'s Table 2, with both ranks."""
    t = table[(table["metric"] == metric) & table["method"].isin(list(BLENDOWSKI_TABLE2))].set_index("method")
    rows = [{"method": m, "paper_dice_pct": BLENDOWSKI_TABLE2[m], "study_mean": t.loc[m, "mean"] if m in t.index else np.nan,
             "study_ci_low": t.loc[m, "ci_low"] if m in t.index else np.nan,
             "study_ci_high": t.loc[m, "ci_high"] if m in t.index else np.nan} for m in BLENDOWSKI_TABLE2]
    out = pd.DataFrame(rows)
    out["paper_rank"] = out["paper_dice_pct"].rank(ascending=False).astype(int)
    out["study_rank"] = out["study_mean"].rank(ascending=False)
    out["metric"] = metric
    return out


def context_ordering_figure(ordering: pd.DataFrame):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(ordering))
    ax.bar(x - 0.2, ordering["paper_dice_pct"] / 100, 0.4, label="Blendowski et al., Table 2 (Dice)")
    err = np.array([ordering["study_mean"] - ordering["study_ci_low"], ordering["study_ci_high"] - ordering["study_mean"]])
    ax.bar(x + 0.2, ordering["study_mean"], 0.4, yerr=np.nan_to_num(err), capsize=3,
           label=f"this study ({ordering['metric'].iloc[0]}, 95 % interval)")
    ax.set_xticks(x, ordering["method"])
    ax.set(ylabel="Dice", title="Context methods: the paper's ordering and this study's")
    ax.legend(fontsize=8)
    return fig
