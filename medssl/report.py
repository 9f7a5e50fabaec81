"""One comparison across methods, read from a run directory, and its HTML report.

Everything here reads files the notebooks wrote (``runs/<run>/...``); nothing is
recomputed, so the report shows exactly what the notebooks measured. Every evaluation step
writes a **headline table** (:meth:`medssl.rundir.RunDir.write_headline`) and its key
figures; the report concatenates whatever is there, so a new evaluation appears here with
no edit to this module.

The report also says, in words, for every headline metric whether the best method beats
the best **shortcut baseline** (random init, raw intensities, position only, identity,
aligned identity): a table whose best method does not clearly beat them must say so.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from medssl.rundir import RunDir

__all__ = ["PROTOCOL", "RunResults", "collect_results", "comparison_table", "verdicts", "pretraining_table",
           "key_figures", "write_report"]

PROTOCOL = (
    "Protocol: methods are pretrained on the train split only. Every choice made from results (the ISImed "
    "latent scale, the number of steps, the probe's C, the ridge's alpha) was made on the validation split; "
    "the test split is scored once, at the end, and the split of every number is in its row. Every method "
    "sees the same number of distinct patches per step (two-view methods embed two views of each, which "
    "costs about twice the compute: see the pretraining table). p-values are Holm-adjusted over all pairs "
    "compared; with n test subjects the smallest possible Wilcoxon p is 2/2^n."
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
    return RunResults(run_dir=rd.path, methods=names, headlines=head, pretrain=pretraining_table(rd, names),
                      figures=rd.key_figures() + _training_figures(rd, names), missing=missing)


# ----------------------------------------------------------------------------- tables


def _row_order(head: pd.DataFrame, methods: Sequence[str]) -> list[str]:
    kinds = head.drop_duplicates("method").set_index("method")["kind"].to_dict()
    seen = list(dict.fromkeys(head["method"]))
    first = [m for m in methods if m in seen]
    rest = [m for m in seen if m not in first]
    rank = {"method": 0, "baseline": 1, "control": 2, "reference": 3}
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


def verdicts(res: RunResults) -> list[str]:
    """For every (step, metric, split): does the best method beat the best shortcut baseline? In words."""
    h = res.headlines
    out: list[str] = []
    for (step, metric, split), g in h.groupby(["step", "metric", "split"], sort=False):
        methods = g[g["kind"] == "method"].dropna(subset=["value"])
        baselines = g[g["kind"] == "baseline"].dropna(subset=["value"])
        if methods.empty or baselines.empty:
            continue
        higher = bool(g["higher_is_better"].iloc[0])
        pick = (lambda d: d.loc[d["value"].idxmax()]) if higher else (lambda d: d.loc[d["value"].idxmin()])
        best, base = pick(methods), pick(baselines)
        what = f"{step} · {metric} ({split})"
        beaten = [b for _, b in baselines.iterrows() if _better(best["value"], b["value"], higher)]
        if len(beaten) == len(baselines):
            margin = abs(best["value"] - base["value"])
            text = (f"{what}: the best method, {best['method']} ({_fmt(best['value'])}), beats every shortcut "
                    f"baseline; the strongest is {base['method']} ({_fmt(base['value'])}), a margin of {_fmt(margin)}.")
        else:
            text = (f"{what}: NO method beats the shortcut baseline {base['method']} ({_fmt(base['value'])}); "
                    f"the best method, {best['method']}, reaches {_fmt(best['value'])}. On this metric the "
                    "methods have not shown more than the shortcut.")
        note = str(best.get("note", "") or "")
        out.append(text + (f" {note}" if note else ""))
    return out


def _fmt(v: float) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def pretraining_table(run: "str | os.PathLike | RunDir", methods: Sequence[str]) -> pd.DataFrame:
    """Per method: steps, minutes, distinct patches and forward passes per step, last losses, val summary."""
    rd = RunDir(run)
    rows = []
    for m in methods:
        files = rd.files(m)
        cfg_path, metrics_path = files.config, files.metrics
        if not metrics_path.is_file():
            continue
        recs = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        train = [r for r in recs if r.get("split", "train") == "train"]
        val = [r for r in recs if r.get("split") == "val"]
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        resolved = cfg.get("resolved", {})
        per_step, views = resolved.get("patches_per_step"), resolved.get("views_per_patch", 1)
        row = {
            "method": m,
            "trains": resolved.get("trains", True),
            "steps": max((r.get("step", 0) for r in recs), default=0),
            "train_minutes": max((r.get("time_s", 0.0) for r in recs), default=0.0) / 60.0,
            "patches_per_step": per_step,
            "forward_passes_per_step": None if per_step is None else per_step * views,
            "final_train_loss": train[-1].get("loss") if train else float("nan"),
            "val_effective_rank": val[-1].get("effective_rank") if val else float("nan"),
        }
        for key in ("collapse_z", "collapse_p"):
            if val and key in val[-1]:
                row[f"val_{key}"] = val[-1][key]
        summary = files.summary
        if summary.is_file():
            s = pd.read_csv(summary).iloc[0]
            row["val_spearman"] = s.get("spearman")
        rows.append(row)
    return pd.DataFrame(rows)


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
        t = g.drop(columns=["step"]).copy()
        t["value"] = [f"{v:.4g}" + (f" ± {s:.2g}" if isinstance(s, float) and np.isfinite(s) else "")
                      for v, s in zip(t["value"], t["std"])]
        out.append((str(step), t.drop(columns=["std"])))
    return out


def write_report(run: "str | os.PathLike | RunDir", *, out_path: str | os.PathLike | None = None,
                 provenance: str | None = None, methods: Sequence[str] | None = None) -> Path:
    """Write ``runs/<run>/40_report/report.html``: protocol, verdicts, comparison, details, pretraining, figures."""
    from medssl.viz.html import write_html_report

    res = collect_results(run, methods)
    out = Path(out_path) if out_path is not None else res.run_dir / "40_report" / "report.html"
    sections: list[tuple[str, list]] = [("Protocol", [PROTOCOL])]
    said = verdicts(res)
    if said:
        sections.append(("Do the methods beat the shortcuts?", said))
    sections.append(("Comparison across methods", [
        comparison_table(res),
        "kind: method = a pretrained method; baseline = a shortcut a method must beat (random-init: the same "
        "architecture untrained; raw-intensity; position-*: the patch centre in mm; identity: the same world "
        "coordinate in the other subject; aligned-identity: the same after aligning the two bodies); "
        "reference = chance or the best achievable (grid floor).",
    ]))
    for step, table in _detail_tables(res.headlines):
        sections.append((f"Details: {step}", [table]))
    if not res.pretrain.empty:
        sections.append(("Pretraining", [res.pretrain]))
    sections.append(("Figures", [item for title, p in key_figures(res) for item in (title, p)]))
    if res.missing:
        sections.append(("Not available in this run", [", ".join(res.missing)]))
    return write_html_report(out, f"medssl report: run {res.run_dir.name}", sections, provenance=provenance)
