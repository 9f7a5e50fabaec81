"""The README's results table: generated from one run's headline tables, and checked against them.

The README quotes numbers; :func:`check_readme_results` (run by ``tests/test_provenance.py``) makes
sure they are the numbers of the run it names. The results section holds one generated block::

    <!-- medssl-results run=demo commit=0123456789ab config_hash=89abcdef01234567 csv=docs/results/demo-headlines.csv -->
    ...caption and table made by results_markdown() from that CSV...
    <!-- /medssl-results -->

``csv`` is a committed copy of the run's headline tables (:func:`export_headlines`: every
``headline.csv`` of the run with its ``commit`` and ``config_hash`` columns). After a new run::

    medssl report demo --export-csv docs/results/demo-headlines.csv --update-readme README.md

rewrites both, and ``medssl report --check-readme README.md`` says whether they agree. The words
around the block are still written by hand: re-read them against the new table.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import os
import re
from pathlib import Path
from typing import Sequence

import pandas as pd

from medssl.rundir import HEADLINE_COLUMNS, RunDir, _normalise_headline, read_headline_csv

__all__ = ["README_METRICS", "export_headlines", "read_headlines_csv", "results_markdown", "update_readme_results",
           "check_readme_results"]

# (step, metric) patterns (fnmatch) of the README table's columns, in order
README_METRICS: tuple[tuple[str, str], ...] = (
    ("20_latent_space", "distance_spearman"),
    ("20_latent_space", "decoding_r2"),
    ("20_latent_space", "decoding_error_mm"),
    ("20_latent_space", "correspondence_median_mm"),
    ("20_latent_space", "effective_rank"),
    ("30_linear_probe/*", "auc"),
    ("50_segmentation", "knn_dice_n*"),
    ("50_segmentation", "finetune_dice_n*"),
)
_BEGIN = re.compile(r"<!-- medssl-results (?P<attrs>[^>]*?) -->")
_END = "<!-- /medssl-results -->"
_ROW_RANK = {"method": 0, "baseline": 1, "reference": 2}


def export_headlines(run: "str | os.PathLike | RunDir", csv_path: str | os.PathLike) -> Path:
    """Write every headline table of ``run`` (with its provenance columns) to one CSV, atomically."""
    from medssl._files import atomic_write_text

    head = RunDir(run).headlines()
    if head.empty:
        raise ValueError(f"{RunDir(run).path}: no headline tables to export (run the evaluation notebooks first)")
    path = Path(csv_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, head.to_csv(index=False))


def read_headlines_csv(csv_path: str | os.PathLike) -> pd.DataFrame:
    """An exported headline CSV (:func:`export_headlines`), normalised like the run's own tables."""
    return _normalise_headline(read_headline_csv(csv_path), default_step="")[HEADLINE_COLUMNS]


def _stamp(head: pd.DataFrame, csv_name: str) -> tuple[str, str]:
    """The one (commit, config_hash) of the tables; ValueError naming the steps when they disagree."""
    pairs = head[["commit", "config_hash"]].drop_duplicates()
    if len(pairs) != 1:
        by = {f"{c or '?'} / {h or '?'}": sorted(set(g["step"])) for (c, h), g in head.groupby(["commit", "config_hash"])}
        raise ValueError(f"{csv_name}: the headline tables come from {len(pairs)} code/config states {by}; "
                         "export the tables of one run made by one commit")
    commit, chash = (str(v) for v in pairs.iloc[0])
    return commit or "unknown", chash or "unknown"


def _fmt(v: float, std: float) -> str:
    if v is None or not math.isfinite(v):
        return ""
    return f"{v:.4g}" + (f" ± {std:.2g}" if std is not None and math.isfinite(std) else "")


def results_markdown(head: pd.DataFrame, *, run: str = "", csv_name: str = "",
                     metrics: Sequence[tuple[str, str]] = README_METRICS) -> str:
    """The README's caption and table from headline rows: one row per method/baseline/reference, one column
    per (step, metric, split) matching ``metrics``; values with ``± sd`` where the table has one, ``n`` in
    the header (or in the cell where rows differ)."""
    commit, chash = _stamp(head, csv_name or "the tables")
    cols: list[tuple[str, str, str]] = []
    for step_pat, metric_pat in metrics:
        hit = [fnmatch.fnmatchcase(str(s), step_pat) and fnmatch.fnmatchcase(str(m), metric_pat)
               for s, m in zip(head["step"], head["metric"])]
        sel = head[hit]
        for key in sel[["step", "metric", "split"]].drop_duplicates().itertuples(index=False):
            if tuple(key) not in cols:
                cols.append(tuple(key))
    if not cols:
        raise ValueError(f"no headline rows match the README's metrics {list(metrics)}")
    chosen = head.set_index(["step", "metric", "split"]).loc[cols].reset_index()
    kinds = chosen.drop_duplicates("method").set_index("method")["kind"]
    seen = list(dict.fromkeys(chosen["method"]))
    rows = sorted(seen, key=lambda m: (_ROW_RANK.get(kinds[m], 0), seen.index(m)))
    header, cells = ["row", "kind"], {m: [m, str(kinds[m])] for m in rows}
    for step, metric, split in cols:
        g = chosen[(chosen["step"] == step) & (chosen["metric"] == metric) & (chosen["split"] == split)]
        g = g.drop_duplicates("method").set_index("method")
        ns = {float(n) for n in g["n"] if pd.notna(n)}
        same_n = len(ns) == 1
        header.append(f"{step}: {metric} ({split}{f', n={_num(ns.pop())}' if same_n else ''})")
        for m in rows:
            if m not in g.index:
                cells[m].append("")
                continue
            r = g.loc[m]
            text = _fmt(float(r["value"]), float(r["std"]))
            if text and not same_n and pd.notna(r["n"]):
                text += f" (n={_num(float(r['n']))})"
            cells[m].append(text)
    lines = [f"Run `{run or '?'}`, commit `{commit}`, config hash `{chash}`"
             + (f"; the numbers are `{csv_name}`" if csv_name else "")
             + ". Values are means over the split's units, ± sd where the step reports one; n counts those units.",
             "",
             "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells[m]) + " |" for m in rows]
    return "\n".join(lines)


def _num(n: float) -> str:
    return str(int(n)) if float(n).is_integer() else f"{n:g}"


def _block(text: str, path: Path) -> tuple[re.Match, int, dict[str, str]]:
    begins = list(_BEGIN.finditer(text))
    if len(begins) != 1 or text.count(_END) != 1:
        raise ValueError(f"{path}: needs exactly one '<!-- medssl-results ... -->' ... '{_END}' block "
                         f"(found {len(begins)} begin and {text.count(_END)} end markers)")
    begin = begins[0]
    end = text.index(_END)
    if end < begin.end():
        raise ValueError(f"{path}: '{_END}' comes before its begin marker")
    attrs = dict(a.split("=", 1) for a in begin.group("attrs").split() if "=" in a)
    return begin, end, attrs


def update_readme_results(readme: str | os.PathLike, csv_path: str | os.PathLike, run: str) -> Path:
    """Rewrite the README's results block from ``csv_path`` (a path relative to the README's folder is stored)."""
    from medssl._files import atomic_write_text

    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    begin, end, _ = _block(text, readme)
    csv_path = Path(csv_path)
    rel = os.path.relpath(csv_path.resolve(), readme.resolve().parent)
    head = read_headlines_csv(csv_path)
    commit, chash = _stamp(head, rel)
    marker = f"<!-- medssl-results run={run} commit={commit} config_hash={chash} csv={rel} -->"
    body = results_markdown(head, run=run, csv_name=rel)
    return atomic_write_text(readme, text[: begin.start()] + marker + "\n" + body + "\n" + text[end:])


def check_readme_results(readme: str | os.PathLike) -> list[str]:
    """Problems with the README's results block (empty when its table is the one its CSV generates)."""
    readme = Path(readme)
    try:
        begin, end, attrs = _block(readme.read_text(encoding="utf-8"), readme)
    except (OSError, ValueError) as e:
        return [str(e)]
    missing = [k for k in ("run", "commit", "config_hash", "csv") if k not in attrs]
    if missing:
        return [f"{readme}: the results marker lacks {missing}"]
    csv_path = readme.parent / attrs["csv"]
    if not csv_path.is_file():
        return [f"{readme}: the results marker names {attrs['csv']}, which does not exist"]
    problems = []
    try:
        head = read_headlines_csv(csv_path)
        commit, chash = _stamp(head, attrs["csv"])
        want = results_markdown(head, run=attrs["run"], csv_name=attrs["csv"])
    except ValueError as e:
        return [str(e)]
    if (attrs["commit"], attrs["config_hash"]) != (commit, chash):
        problems.append(f"{readme}: the marker cites commit {attrs['commit']} / config hash {attrs['config_hash']}, "
                        f"but {attrs['csv']} was made by commit {commit} / config hash {chash}")
    text = readme.read_text(encoding="utf-8")
    got = text[begin.end(): end].strip()
    if got != want.strip():
        diff = [f"  README: {a}\n  CSV:    {b}" for a, b in zip(got.splitlines(), want.splitlines()) if a != b]
        problems.append(f"{readme}: the results table differs from the one {attrs['csv']} generates "
                        f"({len(diff)} lines differ; first: {diff[0] if diff else 'a different number of lines'})")
    return problems


# ----------------------------------------------------------------------------- medssl report --markdown ...


def report_options_main(args: argparse.Namespace) -> int:
    """``medssl report`` with README options (the command itself is registered in :mod:`medssl.report`)."""
    if args.check_readme:
        problems = check_readme_results(args.check_readme)
        print("\n".join(problems) if problems else f"{args.check_readme}: the results table equals its CSV")
        return 1 if problems else 0
    if len(args.runs) != 1:
        print("medssl report: --markdown, --export-csv and --update-readme take one run")
        return 2
    run = args.runs[0]
    if args.update_readme and not args.export_csv:
        print("medssl report: --update-readme needs --export-csv CSV (the copy the README will cite)")
        return 2
    if args.export_csv:
        print(f"headline tables written to {export_headlines(run, args.export_csv)}")
    if args.update_readme:
        print(f"results block rewritten in {update_readme_results(args.update_readme, args.export_csv, run)}")
    if args.markdown:
        print(results_markdown(RunDir(run).headlines(), run=run))
    return 0
