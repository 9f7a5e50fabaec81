"""One comparison across methods, read from a run directory, and its HTML report.

Everything here reads files the notebooks wrote (``runs/<run>/...``); nothing is
recomputed, so the report shows exactly what the notebooks measured.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from medssl import paths

# file -> what it holds; missing files are listed in the report, not an error
_TABLES = {
    "fidelity": "20_latent_space/fidelity.csv",
    "decoding": "20_latent_space/decoding.csv",
    "collapse": "20_latent_space/collapse.csv",
    "correspondence": "20_latent_space/correspondence.csv",
}
# the linear probe writes one folder per target: 30_linear_probe/<lesion|organ name>/


@dataclass
class RunResults:
    """The tables a run produced (empty DataFrames where a step has not run)."""

    run_dir: Path
    methods: list[str]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    probes: dict[str, pd.DataFrame] = field(default_factory=dict)  # target -> probe_summary
    paired_tests: dict[str, pd.DataFrame] = field(default_factory=dict)  # target -> paired tests on AUC
    pretrain: pd.DataFrame = field(default_factory=pd.DataFrame)
    missing: list[str] = field(default_factory=list)


def _run_dir(run: str | os.PathLike) -> Path:
    p = Path(run)
    return p if p.is_absolute() or p.exists() else paths.runs_dir() / str(run)


def collect_results(run: str | os.PathLike, methods: Sequence[str] | None = None) -> RunResults:
    """Read every result table of ``run`` (a name under ``runs/`` or a path)."""
    run_dir = _run_dir(run)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory; run the pipeline (make demo) first")
    if methods is None:
        methods = sorted(p.parent.parent.name for p in run_dir.glob("*/checkpoints/last.pt"))
    res = RunResults(run_dir=run_dir, methods=list(methods))
    for key, rel in _TABLES.items():
        path = run_dir / rel
        if path.is_file():
            res.tables[key] = pd.read_csv(path)
        else:
            res.tables[key] = pd.DataFrame()
            res.missing.append(rel)
    probe_dirs = sorted(p.parent for p in (run_dir / "30_linear_probe").glob("*/probe_summary.csv"))
    # the lesion task (ISImed Table 1) first, organ variants after
    for d in sorted(probe_dirs, key=lambda d: (d.name != "lesion", d.name)):
        res.probes[d.name] = pd.read_csv(d / "probe_summary.csv")
        if (d / "paired_tests_auc.csv").is_file():
            res.paired_tests[d.name] = pd.read_csv(d / "paired_tests_auc.csv")
    if not res.probes:
        res.missing.append("30_linear_probe/<target>/probe_summary.csv")
    res.pretrain = _pretrain_table(run_dir, res.methods, res.missing)
    return res


def _pretrain_table(run_dir: Path, methods: Sequence[str], missing: list[str]) -> pd.DataFrame:
    rows = []
    for m in methods:
        metrics_path = run_dir / m / "metrics.jsonl"
        if not metrics_path.is_file():
            missing.append(f"{m}/metrics.jsonl")
            continue
        recs = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        train = [r for r in recs if r.get("split", "train") == "train"]
        val = [r for r in recs if r.get("split") == "val"]
        row = {"method": m, "steps": max((r.get("step", 0) for r in recs), default=0),
               "train_minutes": max((r.get("time_s", 0.0) for r in recs), default=0.0) / 60.0,
               "final_train_loss": train[-1].get("loss") if train else float("nan")}
        summary = run_dir / m / "summary.csv"
        if summary.is_file():
            s = pd.read_csv(summary).iloc[0]
            row["test_spearman"] = s.get("spearman")
        if val:
            row["val_effective_rank"] = val[-1].get("effective_rank")
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_table(res: RunResults) -> pd.DataFrame:
    """One row per method (and baseline): the headline number of every evaluation.

    Columns (where the step has run): distance-fidelity Spearman and median |D_lat - D_mm|,
    coordinate-decoding R^2 and mean error, correspondence median error, effective rank,
    linear-probe AUC per probe target (mean ± std), and pretraining minutes.
    """
    t = res.tables
    parts: list[pd.DataFrame] = []
    if not t["fidelity"].empty:
        parts.append(t["fidelity"].set_index("method")[["spearman", "abs_err_median_mm"]]
                     .rename(columns={"spearman": "fidelity_spearman", "abs_err_median_mm": "fidelity_abs_err_median_mm"}))
    if not t["decoding"].empty:
        d = t["decoding"][t["decoding"]["axis"] == "xyz"].set_index("method")
        parts.append(d[["r2", "error_mm"]].rename(columns={"r2": "decoding_r2", "error_mm": "decoding_error_mm"}))
    if not t["correspondence"].empty:
        parts.append(t["correspondence"].set_index("method")[["median_error_mm"]]
                     .rename(columns={"median_error_mm": "correspondence_median_mm"}))
    if not t["collapse"].empty:
        parts.append(t["collapse"].set_index("method")[["effective_rank"]])
    for target, probe in res.probes.items():
        p = probe[probe["metric"] == "auc"].set_index("method")
        parts.append(p[["mean", "std"]].rename(columns={"mean": f"probe_auc_{target}", "std": f"probe_auc_{target}_std"}))
    if not res.pretrain.empty:
        parts.append(res.pretrain.set_index("method")[["train_minutes"]])
    if not parts:
        return pd.DataFrame(columns=["method"])
    table = pd.concat(parts, axis=1)
    table.index.name = "method"
    # pretrained methods first, in run order, then baselines and references
    order = {m: i for i, m in enumerate(res.methods)}
    table = table.reset_index()
    return table.sort_values("method", key=lambda s: s.map(lambda m: order.get(m, len(order)))).reset_index(drop=True)


def key_figures(res: RunResults) -> list[tuple[str, Path]]:
    """The PNG figures the report shows, in order, where they exist."""
    d = res.run_dir
    wanted = [
        ("Distance fidelity (latent vs physical distance, held-out subjects)", d / "20_latent_space" / "fidelity_histograms.png"),
        ("Coordinate decoding (ridge, subject-grouped CV)", d / "20_latent_space" / "decoding.png"),
        ("Cross-subject correspondence error", d / "20_latent_space" / "correspondence_errors.png"),
        ("Per-dimension variance (collapse check)", d / "20_latent_space" / "dim_variance.png"),
    ]
    for target in res.probes:
        wanted.append((f"Linear probe ({target}): AUC per fold", d / "30_linear_probe" / target / "probe_auc_per_fold.png"))
        wanted.append((f"Linear probe ({target}): paired tests on per-fold AUC",
                       d / "30_linear_probe" / target / "paired_tests_auc.png"))
    for m in res.methods:
        wanted.append((f"{m}: latent coordinate map (PC1-3 as RGB)", d / "20_latent_space" / f"latent_map_{m}.png"))
        wanted.append((f"{m}: PCA of patch embeddings coloured by position", d / "20_latent_space" / f"pca_{m}.png"))
    for m in res.methods:
        wanted.append((f"{m}: training curves", d / m / "loss_curves.png"))
    return [(title, p) for title, p in wanted if p.is_file()]


def write_report(run: str | os.PathLike, *, out_path: str | os.PathLike | None = None,
                 provenance: str | None = None, methods: Sequence[str] | None = None) -> Path:
    """Write ``runs/<run>/40_report/report.html``: comparison table, detail tables, key figures."""
    from medssl.viz.html import write_html_report

    res = collect_results(run, methods)
    out = Path(out_path) if out_path is not None else res.run_dir / "40_report" / "report.html"
    sections: list[tuple[str, list]] = [("Comparison across methods", [
        comparison_table(res),
        "Higher is better for Spearman, R², effective rank and AUC; lower for errors in mm. "
        "random-init is the same backbone untrained; chance and grid_floor are correspondence references.",
    ])]
    if not res.pretrain.empty:
        sections.append(("Pretraining", [res.pretrain]))
    details = [("Distance fidelity", "fidelity"), ("Coordinate decoding", "decoding"),
               ("Cross-subject correspondence", "correspondence"), ("Collapse and capacity", "collapse")]
    for title, key in details:
        if not res.tables[key].empty:
            sections.append((title, [res.tables[key]]))
    for target, probe in res.probes.items():
        sections.append((f"Linear probe: patch contains {target} (mean ± std over subject-grouped folds)", [
            probe, *([res.paired_tests[target]] if target in res.paired_tests else [])]))
    sections.append(("Figures", [item for title, p in key_figures(res) for item in (title, p)]))
    if res.missing:
        sections.append(("Not available in this run", [", ".join(res.missing)]))
    return write_html_report(out, f"medssl report: run {res.run_dir.name}", sections, provenance=provenance)
