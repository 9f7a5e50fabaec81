"""One comparison across methods, read from a run directory, and its HTML report.

Everything here reads files the notebooks wrote (``runs/<run>/...``); nothing is
recomputed, so the report shows exactly what the notebooks measured. Every evaluation step
writes a **headline table** (:meth:`medssl.rundir.RunDir.write_headline`) and its key
figures; the report concatenates whatever is there, so a new evaluation appears here with
no edit to this module.

The report also says, in words, for every headline metric whether the best method beats
the best **shortcut baseline** (random-init twins, raw intensities, position only, identity,
aligned identity) and where it stands against the **positive control** (registration, a
supervised model) when the step has one (:func:`best_vs_shortcuts`, on the headline values;
the paired tests per method are in each row's note): a table whose best method does not
clearly beat them must say so.

**Two runs side by side** (two seeds, two presets): :func:`compare_runs` lines up their headline
tables row by row (run A, run B, B - A), marks every difference as better or worse for B (by
the metric's direction), flags differences larger than the per-unit spread of the headline
(its ``std``), names the rows only one run has, the verdicts that changed and the settings that
differ between the runs' ``config.json``; ``medssl report RUN_A RUN_B`` and the ``compare_with``
parameter of ``40_report.ipynb`` write it as HTML.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from medssl.rundir import RunDir

__all__ = ["PROTOCOL", "RunResults", "RunComparison", "best_vs_shortcuts", "collect_results", "compare_runs",
           "comparison_table", "pretraining_table", "key_figures", "write_comparison", "write_report", "table_stamps"]

REPORT_STEP = "40_report"  # the report notebook's step folder (RunDir.step_dir)
PROTOCOL = (
    "Protocol: methods are pretrained on the train split only. Every choice made from results (the ISImed "
    "latent scale, the context methods' learning rates, the probe's C, the ridge's alpha and, where early "
    "stopping is on, the step kept) was made on the validation split; a preset's step count is fixed in "
    "advance. The test split is scored once, at the end, and the split of every number is in its row. The "
    "pretraining table gives each method's steps, distinct patches per step, forward passes and wall time, "
    "and names every budget that differs from the common one (two-view methods embed two views of each patch; "
    "2.5D methods see planar patches). Each method is tested against its own untrained "
    "twin (the same architecture: random-init[...], or xavier for Reg2D/Heatmap), every shortcut row and every "
    "positive control; p-values are Holm-adjusted over those method x baseline comparisons (the family size is "
    "stated with each verdict), next to the smallest adjusted Wilcoxon p the n test subjects allow (2/2^n times "
    "the family size); fewer than 5 units, or paired differences that do not vary, are 'not testable'."
)


@dataclass
class RunResults:
    """What a run produced: the concatenated headline tables, pretraining facts and key figures."""

    run_dir: Path
    methods: list[str]
    headlines: pd.DataFrame
    pretrain: pd.DataFrame
    figures: list[tuple[str, Path]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)  # medssl.provenance.read_provenance, plus "tables": table_stamps


def collect_results(run: "str | os.PathLike | RunDir", methods: Sequence[str] | None = None) -> RunResults:
    """Read every headline table, the pretraining logs and the key figures of ``run``."""
    rd = RunDir(run)
    if not rd.path.is_dir():
        raise FileNotFoundError(f"{rd.path}: no such run directory; run the pipeline (make demo) first")
    names = rd.resolve_methods(methods)
    head = rd.headlines()
    missing = [m for m in names if not rd.checkpoint(m).is_file()]
    if head.empty:
        missing.append("headline tables (run the evaluation notebooks)")
    missing += _not_applicable_steps(rd)
    from medssl.provenance import read_provenance

    prov = {**read_provenance(rd.path), "tables": table_stamps(head)}
    return RunResults(run_dir=rd.path, methods=names, headlines=head, pretrain=pretraining_table(rd, names),
                      figures=rd.key_figures() + _training_figures(rd, names), missing=missing, provenance=prov)


def table_stamps(headlines: pd.DataFrame) -> dict[tuple[str, str], list[str]]:
    """``{(commit, config_hash): [steps]}`` of the headline tables (``"unknown"`` for tables written without them)."""
    if headlines.empty:
        return {}
    out: dict[tuple[str, str], list[str]] = {}
    for step, g in headlines.groupby("step", sort=False):
        for commit, chash in g[["commit", "config_hash"]].drop_duplicates().itertuples(index=False):
            out.setdefault((str(commit) or "unknown", str(chash) or "unknown"), []).append(str(step))
    return out


# ----------------------------------------------------------------------------- tables


def _row_order(head: pd.DataFrame, methods: Sequence[str]) -> list[str]:
    kinds = head.drop_duplicates("method").set_index("method")["kind"].to_dict()
    seen = list(dict.fromkeys(head["method"]))
    first = [m for m in methods if m in seen]
    rest = [m for m in seen if m not in first]
    from medssl.evaluate.headlines import KINDS

    rank = {k: i for i, k in enumerate(KINDS)}
    return first + sorted(rest, key=lambda m: (rank.get(kinds.get(m, "method"), 0), seen.index(m)))


def comparison_table(res: RunResults) -> pd.DataFrame:
    """One row per method, baseline and reference; one column per ``step: metric (split)``.

    Values are the headline ``value`` (mean over the step's units); ``±`` spreads are in the
    per-step detail tables.
    """
    h = res.headlines
    if h.empty:
        return pd.DataFrame(columns=["method"])
    h = h.assign(column=h["step"] + ": " + h["metric"] + " (" + h["split"].astype(str) + ")")
    wide = h.pivot_table(index="method", columns="column", values="value", aggfunc="first", sort=False)
    kinds = h.drop_duplicates("method").set_index("method")["kind"]
    wide.insert(0, "kind", kinds)
    order = _row_order(h, res.methods)
    return wide.loc[[m for m in order if m in wide.index]].reset_index()


def _better(a: float, b: float, higher: bool) -> bool:
    return a > b if higher else a < b


def _verdict_facts(h: pd.DataFrame) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Per (step, metric, split): the best method, the strongest shortcut baseline, whether it beats all of them,
    and the step's positive controls and references."""
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for (step, metric, split), g in h.groupby(["step", "metric", "split"], sort=False):
        methods = g[g["kind"] == "method"].dropna(subset=["value"])
        baselines = g[g["kind"] == "baseline"].dropna(subset=["value"])
        if methods.empty or baselines.empty:
            continue
        higher = bool(g["higher_is_better"].iloc[0])
        pick = (lambda d: d.loc[d["value"].idxmax()]) if higher else (lambda d: d.loc[d["value"].idxmin()])
        best, base = pick(methods), pick(baselines)
        beaten = [b for _, b in baselines.iterrows() if _better(best["value"], b["value"], higher)]
        out[(str(step), str(metric), str(split))] = {
            "best": best, "base": base, "beats_all": len(beaten) == len(baselines), "higher": higher,
            "controls": g[g["kind"] == "control"].dropna(subset=["value"]),
            "refs": g[g["kind"] == "reference"].set_index("method")["value"],
        }
    return out


def best_vs_shortcuts(res: RunResults) -> list[str]:
    """For every (step, metric, split): does the best method beat the best shortcut baseline, and where
    does it stand against the positive control? In words, on the headline values (no test: the paired
    tests of every method against its twin, the shortcuts and the control are in the rows' notes)."""
    out: list[str] = []
    for (step, metric, split), facts in _verdict_facts(res.headlines).items():
        best, base, higher, refs = facts["best"], facts["base"], facts["higher"], facts["refs"]
        what = f"{step} · {metric} ({split})"
        if facts["beats_all"]:
            margin = abs(best["value"] - base["value"])
            text = (f"{what}: the best method, {best['method']} ({_fmt(best['value'])}), beats every shortcut "
                    f"baseline; the strongest is {base['method']} ({_fmt(base['value'])}), a margin of {_fmt(margin)}.")
        else:
            text = (f"{what}: NO method beats the shortcut baseline {base['method']} ({_fmt(base['value'])}); "
                    f"the best method, {best['method']}, reaches {_fmt(best['value'])}. On this metric the "
                    "methods have not shown more than the shortcut.")
        for _, c in facts["controls"].iterrows():
            reached = not _better(c["value"], best["value"], higher)
            text += (f" The positive control {c['method']} reaches {_fmt(c['value'])}"
                     + (": the best method matches or passes it." if reached else
                        f"; the best method leaves {_fmt(abs(c['value'] - best['value']))} to it."))
            if "chance" in refs.index and "grid_floor" in refs.index:  # a control near chance: the task measures nothing
                from medssl.evaluate.headlines import control_sentence

                said = control_sentence({c["method"]: c["value"]}, refs["chance"], refs["grid_floor"], metric)
                text += " This task measures nothing." if "measures nothing" in said else ""
        note = str(best.get("note", "") or "")
        out.append(text + (f" {note}" if note else ""))
    return out


def _fmt(v: float) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def pretraining_table(run: "str | os.PathLike | RunDir", methods: Sequence[str]) -> pd.DataFrame:
    """Per method: steps, wall time, distinct patches (and their kind) and forward passes per step, last losses,
    val summary, and ``budget``: whether its budget equals the common one (the most frequent steps, patches
    per step and patch kind of the trained methods), else what differs (e.g. 2.5D planes against cubes)."""
    from medssl.train.metrics import read_metrics

    rd = RunDir(run)
    rows = []
    for m in methods:
        files = rd.files(m)
        if not files.metrics.is_file():
            continue
        recs = read_metrics(files.metrics)  # (a torn last line, from a killed run, is skipped)
        split = recs["split"].fillna("train") if "split" in recs else pd.Series("train", index=recs.index)
        train, val = recs[split == "train"], recs[split == "val"]
        cfg = json.loads(files.config.read_text(encoding="utf-8")) if files.config.is_file() else {}
        resolved = cfg.get("resolved", {})
        per_step, views = resolved.get("patches_per_step"), resolved.get("views_per_patch", 1)
        row = {
            "method": m,
            "trains": resolved.get("trains", True),
            "steps": int(recs["step"].max()) if "step" in recs and recs["step"].notna().any() else 0,
            "train_minutes": (float(recs["time_s"].max()) if "time_s" in recs and recs["time_s"].notna().any()
                              else 0.0) / 60.0,
            "patches_per_step": per_step,
            "patch": _patch_kind(cfg.get("method_config", {})),
            "forward_passes_per_step": None if per_step is None else per_step * views,
            "final_train_loss": _last(train, "loss"),
            "val_effective_rank": _last(val, "effective_rank"),
        }
        for key in ("collapse_z", "collapse_p", "collapse_h"):
            if key in val and len(val) and pd.notna(val[key].iloc[-1]):
                row[f"val_{key}"] = float(val[key].iloc[-1])
        summary = files.summary
        if summary.is_file():
            s = pd.read_csv(summary).iloc[0]
            row["val_spearman"] = s.get("spearman")
        rows.append(row)
    table = pd.DataFrame(rows)
    if not table.empty:
        table.insert(table.columns.get_loc("patch") + 1, "budget", _budget_notes(table))
    return table


def _last(records: pd.DataFrame, key: str) -> float:
    """The last record's ``key`` (NaN when there is none)."""
    return float(records[key].iloc[-1]) if key in records and len(records) else float("nan")


def _patch_kind(method_config: dict) -> str:
    """What one distinct patch is, from a run's ``method_config``: a cube, a 2D slice or a 2.5D planar patch."""
    size = method_config.get("patch_size_vox")
    if size is None:
        return ""
    if method_config.get("backbone") == "gvdiff":
        return "point pattern"
    if "n_slices" in method_config:
        return f"{size}x{size}x{method_config['n_slices']} planar"
    if method_config.get("spatial_dims") == 2:
        return f"{size}x{size} slice"
    return f"{size}^3 cube"


def _budget_notes(table: pd.DataFrame) -> list[str]:
    """Per row: "equal" when a trained method's steps, distinct patches per step and patch kind are the common
    ones (the most frequent among trained methods), else what differs; "not trained" for untrained baselines."""
    trained = table[table["trains"].astype(bool)]
    common = {c: trained[c].mode().iloc[0] if len(trained) and trained[c].notna().any() else None
              for c in ("steps", "patches_per_step", "patch")}
    notes = []
    for r in table.to_dict("records"):
        if not r["trains"]:
            notes.append("not trained")
            continue
        diff = [f"{c.replace('_', ' ')} {r[c]} vs {common[c]}" for c in ("steps", "patches_per_step")
                if common[c] is not None and r[c] != common[c]]
        if common["patch"] and r["patch"] != common["patch"]:
            why = ": 2.5D planes cannot equal cubes in content" if "planar" in str(r["patch"]) else ""
            diff.append(f"{r['patch']} patches vs {common['patch']}{why}")
        notes.append("equal" if not diff else "unequal: " + "; ".join(diff))
    return notes


def _not_applicable_steps(rd: RunDir) -> list[str]:
    """Pipeline steps that said they cannot run on this data, with their reason."""
    try:
        status = json.loads(rd.pipeline_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [f"{s['notebook']}: not applicable ({s.get('message', '')})" for s in status.get("steps", [])
            if s.get("status") == "not applicable"]


def _training_figures(rd: RunDir, methods: Sequence[str]) -> list[tuple[str, Path]]:
    return [(f"{m}: training curves", p) for m in methods if (p := rd.files(m).curves).is_file()]


def key_figures(res: RunResults) -> list[tuple[str, Path]]:
    """The PNG figures the report shows, in order."""
    return list(res.figures)


def _detail_tables(h: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    out = []
    for step, g in h.groupby("step", sort=False):
        t = g.drop(columns=["step", "commit", "config_hash"], errors="ignore").copy()  # in "Code and configuration"
        t["value"] = [f"{v:.4g}" + (f" ± {s:.2g}" if isinstance(s, float) and np.isfinite(s) else "")
                      for v, s in zip(t["value"], t["std"])]
        out.append((str(step), t.drop(columns=["std"])))
    return out


def write_report(run: "str | os.PathLike | RunDir", *, out_path: str | os.PathLike | None = None,
                 provenance: str | None = None, methods: Sequence[str] | None = None,
                 compare_with: "str | os.PathLike | RunDir | None" = None) -> Path:
    """Write ``runs/<run>/40_report/report.html``: protocol, verdicts, comparison, details, pretraining, figures.

    ``compare_with``: another run; a section puts both runs' headline tables side by side (:func:`compare_runs`).
    """
    from medssl.provenance import code_provenance_text
    from medssl.viz.html import write_html_report

    res = collect_results(run, methods)
    out = Path(out_path) if out_path is not None else RunDir(res.run_dir).step_dir(REPORT_STEP) / "report.html"
    sections: list[tuple[str, list]] = [
        ("Code and configuration", [code_provenance_text(res.provenance, res.provenance.get("tables", {}))]),
        ("Protocol", [PROTOCOL]),
    ]
    said = best_vs_shortcuts(res)
    if said:
        sections.append(("Do the methods beat the shortcuts?", said))
    sections.append(("Comparison across methods", [
        comparison_table(res),
        "kind: method = a pretrained method; baseline = a shortcut a method must beat (random-init[...]: a "
        "method's own architecture untrained, xavier for Reg2D/Heatmap; raw-intensity; position-*: the patch "
        "centre in mm; identity: the same world coordinate in the other subject; aligned-identity (scale+shift): "
        "the same after matching the two bodies' centroid and per-axis extent, no rotation); control = a positive "
        "control that shows the task can be solved (registration (...): SimpleITK intensity registration, the "
        "settings and seconds per pair in its note; supervised...: trained with the labels); reference = chance "
        "or the best achievable (grid floor).",
    ]))
    if compare_with:
        comp = compare_runs(run, compare_with, methods)
        sections.append((f"Compared with run {comp.name_b}", _comparison_items(comp)))
    for step, table in _detail_tables(res.headlines):
        sections.append((f"Details: {step}", [table]))
    if not res.pretrain.empty:
        sections.append(("Pretraining", [res.pretrain]))
    sections.append(("Figures", [item for title, p in key_figures(res) for item in (title, p)]))
    if res.missing:
        sections.append(("Not available in this run", [", ".join(res.missing)]))
    return write_html_report(out, f"medssl report: run {res.run_dir.name}", sections, provenance=provenance)


# ----------------------------------------------------------------------------- two runs side by side

_KEY = ["step", "metric", "split", "method"]
_CHANGE_COLOURS = {"better": "background-color:#d9f2d9", "worse": "background-color:#f8d7d7",
                   "only in A": "background-color:#fff3c4", "only in B": "background-color:#fff3c4"}


def _run_label(run: "str | os.PathLike | RunDir") -> str:
    return RunDir(run).name


@dataclass
class RunComparison:
    """Two runs' headline tables side by side (:func:`compare_runs`).

    Attributes:
        name_a, name_b: the runs' names (A is the reference; differences are B - A).
        table: one row per (step, metric, split, method) of either run: ``kind``,
            ``higher_is_better``, ``value_a``, ``std_a``, ``n_a``, ``value_b``, ``std_b``, ``n_b``,
            ``diff`` (B - A), ``change`` (``better`` / ``worse`` for B by the metric's direction,
            ``same``, ``only in A``, ``only in B``) and ``beyond_spread`` (``|diff|`` larger than both
            runs' per-unit ``std``; False where a std is unknown).
        verdict_changes: sentences for the metrics whose verdict against the shortcut rows differs.
        settings: sentences for the settings that differ between the runs' ``config.json`` files.
    """

    name_a: str
    name_b: str
    table: pd.DataFrame
    verdict_changes: list[str]
    settings: list[str]

    def column(self, row: pd.Series) -> str:
        return f"{row['step']}: {row['metric']} ({row['split']})"

    def wide(self) -> pd.DataFrame:
        """One row per method/baseline; per headline column three: ``<column> | A``, ``| B``, ``| B-A``."""
        t = self.table
        if t.empty:
            return pd.DataFrame(columns=["method", "kind"])
        t = t.assign(column=t.apply(self.column, axis=1))
        rows = list(dict.fromkeys(t["method"]))
        out = pd.DataFrame({"method": rows, "kind": [t.loc[t["method"] == m, "kind"].iloc[0] for m in rows]})
        for col in dict.fromkeys(t["column"]):
            part = t[t["column"] == col].set_index("method")
            for key, label in (("value_a", self.name_a), ("value_b", self.name_b), ("diff", "B-A")):
                out[f"{col} | {label}"] = out["method"].map(part[key])
        return out

    def highlights(self) -> pd.DataFrame:
        """CSS per cell of :meth:`wide`: B-A green where B is better, red where worse, bold beyond the per-unit
        spread; all three cells yellow where only one run has the row."""
        wide = self.wide()
        styles = pd.DataFrame("", index=wide.index, columns=wide.columns)
        if self.table.empty:
            return styles
        t = self.table.assign(column=self.table.apply(self.column, axis=1))
        for _, r in t.iterrows():
            i = wide.index[wide["method"] == r["method"]][0]
            css = _CHANGE_COLOURS.get(r["change"], "")
            if r["beyond_spread"]:
                css += ";font-weight:bold"
            cells = [f"{r['column']} | B-A"] if r["change"] in ("better", "worse") else \
                [f"{r['column']} | {self.name_a}", f"{r['column']} | {self.name_b}", f"{r['column']} | B-A"]
            for c in cells:
                styles.loc[i, c] = css
        return styles

    def styled(self):
        """:meth:`wide` as a pandas Styler with :meth:`highlights` (for notebooks and the HTML report)."""
        styles = self.highlights()
        return self.wide().style.apply(lambda _: styles, axis=None).format(precision=4, na_rep="–").hide(axis="index")

    def summary(self) -> str:
        """One paragraph: what B - A means and how many rows got better, worse or exist in one run only."""
        counts = self.table["change"].value_counts() if not self.table.empty else pd.Series(dtype=int)
        beyond = int(self.table["beyond_spread"].sum()) if not self.table.empty else 0
        return (f"Run A = {self.name_a}, run B = {self.name_b}; differences are B - A. Of {len(self.table)} headline "
                f"rows, {int(counts.get('better', 0))} are better in B, {int(counts.get('worse', 0))} worse, "
                f"{int(counts.get('same', 0))} unchanged, {int(counts.get('only in A', 0))} only in A and "
                f"{int(counts.get('only in B', 0))} only in B (green: better in B, red: worse, yellow: one run "
                f"only); {beyond} difference(s) exceed the per-unit spread (std) of both runs (bold). Each value "
                "keeps its own split and n (see the detail tables of each run).")


def _settings_diff(a: RunDir, b: RunDir, methods: Sequence[str]) -> list[str]:
    """Per method trained in both runs: the config.json fields that differ (the seed, a preset's values ...)."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out

    said = []
    for m in methods:
        fa, fb = a.files(m).config, b.files(m).config
        if not (fa.is_file() and fb.is_file()):
            continue
        ca, cb = (flat(json.loads(f.read_text(encoding="utf-8"))) for f in (fa, fb))
        diffs = [f"{k}: {ca.get(k)!r} vs {cb.get(k)!r}" for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]
        if diffs:
            said.append(f"{m}: " + "; ".join(diffs))
    return said


def compare_runs(run_a: "str | os.PathLike | RunDir", run_b: "str | os.PathLike | RunDir",
                 methods: Sequence[str] | None = None) -> RunComparison:
    """Line up two runs' headline tables (A the reference, differences B - A); see :class:`RunComparison`.

    ``methods``: the method rows to keep (baseline and reference rows are always kept); None keeps all.
    """
    a, b = collect_results(run_a), collect_results(run_b)
    name_a, name_b = _run_label(run_a), _run_label(run_b)
    if name_a == name_b:
        name_a, name_b = str(a.run_dir), str(b.run_dir)
    cols = _KEY + ["kind", "higher_is_better", "value", "std", "n"]
    ha, hb = a.headlines[cols], b.headlines[cols]
    t = ha.merge(hb, on=_KEY, how="outer", suffixes=("_a", "_b"), sort=False)
    t["kind"] = t["kind_a"].fillna(t["kind_b"])
    t["higher_is_better"] = t["higher_is_better_a"].fillna(t["higher_is_better_b"]).astype(bool)
    t = t.drop(columns=["kind_a", "kind_b", "higher_is_better_a", "higher_is_better_b"])
    if methods:
        t = t[(t["kind"] != "method") | t["method"].isin(list(methods))]
    va, vb = t["value_a"].astype(float), t["value_b"].astype(float)
    t["diff"] = vb - va
    sign = np.where(t["higher_is_better"], 1.0, -1.0)
    change = np.where(va.isna() & vb.notna(), "only in B", np.where(vb.isna() & va.notna(), "only in A", "same"))
    both = va.notna() & vb.notna()
    scale = np.maximum(va.abs(), vb.abs()).fillna(0.0)
    moved = both & ((t["diff"].abs() > 1e-9 * np.maximum(scale, 1.0)))
    change = np.where(moved & (sign * t["diff"] > 0), "better", np.where(moved & (sign * t["diff"] < 0), "worse", change))
    t["change"] = change
    spread = np.fmax(t["std_a"].astype(float), t["std_b"].astype(float))
    known = t["std_a"].notna() & t["std_b"].notna()
    t["beyond_spread"] = (known & both & (t["diff"].abs() > spread)).astype(bool)
    order = {m: i for i, m in enumerate(_row_order(pd.concat([a.headlines, b.headlines]), a.methods + b.methods))}
    t = t.sort_values(["step", "metric", "split"], kind="stable")
    t = t.assign(_o=t["method"].map(order)).sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True)
    t = t[_KEY[:3] + ["method", "kind", "higher_is_better", "value_a", "std_a", "n_a", "value_b", "std_b", "n_b",
                      "diff", "change", "beyond_spread"]]

    fa, fb = _verdict_facts(a.headlines), _verdict_facts(b.headlines)
    changes = []
    for key in [k for k in fa if k in fb]:
        x, y = fa[key], fb[key]
        if x["beats_all"] != y["beats_all"] or x["best"]["method"] != y["best"]["method"]:
            changes.append(f"{key[0]} · {key[1]} ({key[2]}): {_says(x, name_a)}; {_says(y, name_b)}.")
    common = [m for m in a.methods if m in b.methods]
    return RunComparison(name_a, name_b, t, changes, _settings_diff(RunDir(run_a), RunDir(run_b), common))


def _says(facts: dict[str, Any], run: str) -> str:
    best, base = facts["best"], facts["base"]
    verb = "beats every shortcut row" if facts["beats_all"] else f"does NOT beat {base['method']} ({_fmt(base['value'])})"
    return f"in {run} the best method, {best['method']} ({_fmt(best['value'])}), {verb}"


def _comparison_items(comp: RunComparison) -> list[Any]:
    items: list[Any] = [comp.summary(), comp.styled()]
    if comp.verdict_changes:
        items += ["Verdicts that differ between the runs:"] + comp.verdict_changes
    else:
        items.append("Every verdict against the shortcut rows is the same in both runs.")
    if comp.settings:
        items += ["Settings that differ (config.json):"] + comp.settings
    return items


def write_comparison(run_a: "str | os.PathLike | RunDir", run_b: "str | os.PathLike | RunDir", *,
                     out_path: str | os.PathLike | None = None, provenance: str | None = None,
                     methods: Sequence[str] | None = None) -> Path:
    """Write the comparison as HTML (default ``runs/<A>/40_report/compare_<B>.html``)."""
    from medssl.viz.html import write_html_report

    comp = compare_runs(run_a, run_b, methods)
    out = (Path(out_path) if out_path is not None
           else RunDir(run_a).step_dir(REPORT_STEP) / f"compare_{Path(comp.name_b).name}.html")
    sections = [("Protocol", [PROTOCOL]), (f"{comp.name_a} vs {comp.name_b}", _comparison_items(comp))]
    return write_html_report(out, f"medssl report: run {comp.name_a} vs run {comp.name_b}", sections,
                             provenance=provenance)


# --------------------------------------------------------------------------- medssl report ...


def add_cli_parser(sub: "argparse._SubParsersAction") -> None:
    """Add ``medssl report`` to the ``medssl`` command's subparsers (:mod:`medssl.cli`)."""
    p = sub.add_parser(
        "report",
        help="the HTML report of a run, or two runs' headline tables side by side",
        description="With one run: write runs/<run>/40_report/report.html from the files the notebooks wrote. With two "
        "(e.g. two seeds or two presets): print and write their headline tables side by side (A, B, B - A; better "
        "or worse for B, differences beyond the per-unit spread, rows only one run has, changed verdicts and the "
        "settings that differ) to runs/<A>/40_report/compare_<B>.html.",
    )
    p.add_argument("runs", nargs="*", metavar="RUN", help="one or two run names (or run folders)")
    p.add_argument("-o", "--out", type=Path, default=None, help="HTML file to write")
    p.add_argument("--methods", nargs="*", default=None, help="method rows to keep (default all)")
    p.add_argument("--source", default=None, help="data source of the run(s), for the provenance statement "
                   "(default: the run's data spec, runs/<run>/00_data/data_spec.json)")
    # the README's results block (medssl.readme_results): generated from a run, checked against the CSV it cites
    p.add_argument("--markdown", action="store_true", help="print the README results table of the run")
    p.add_argument("--export-csv", metavar="CSV",
                   help="write the run's headline tables to CSV (e.g. docs/results/demo-headlines.csv)")
    p.add_argument("--update-readme", metavar="README", help="rewrite README's results block from --export-csv's CSV")
    p.add_argument("--check-readme", metavar="README", help="check README's results block against the CSV it cites")
    p.set_defaults(func=_run_report)


def _run_arg(text: str) -> "str | Path":
    """A plain name is a run in the runs folder; anything with a separator (or an existing folder) is a path."""
    return Path(text) if (os.sep in text or Path(text).is_dir()) else text


def _run_report(args: argparse.Namespace) -> int:
    from medssl import readme_results
    from medssl.provenance import provenance_statement

    if args.check_readme or args.markdown or args.export_csv or args.update_readme:
        return readme_results.report_options_main(args)
    if not args.runs:
        raise ValueError("medssl report: name a run (or two to compare), or use --check-readme README")
    if len(args.runs) > 2:
        raise ValueError(f"medssl report takes one run or two to compare, got {len(args.runs)}: {args.runs}")
    runs = [_run_arg(r) for r in args.runs]
    spec_file = RunDir(runs[0]).data_spec_file  # the run's data (00_data), unless --source names it
    source = args.source or (RunDir(runs[0]).data_spec().source if spec_file.is_file() else None)
    provenance = provenance_statement(source) if source else None
    if len(runs) == 1:
        out = write_report(runs[0], out_path=args.out, provenance=provenance, methods=args.methods)
        print(f"report: {out}")
        return 0
    comp = compare_runs(runs[0], runs[1], args.methods)
    print(comp.summary())
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        shown = comp.table[comp.table["change"] != "same"]
        print(shown.drop(columns=["higher_is_better"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for line in comp.verdict_changes + comp.settings:
        print(f"- {line}")
    out = write_comparison(runs[0], runs[1], out_path=args.out, provenance=provenance, methods=args.methods)
    print(f"comparison: {out}")
    return 0
