"""Choosing a setting on the validation split: train one run per value, summarise each on val, pick.

Any choice made from results (the ISImed latent scale, the number of steps, ...) must look
at the **validation** subjects only; the test split is scored once, after the choice. This
module makes that the easy path::

    table = sweep("isimed", "scale_mm", [1, 10, 50, 100], preset="demo", run="scale-sweep")
    best = choose(table, "spearman")            # on val, by construction

or ``medssl sweep --method isimed --param scale_mm --values 1 10 50 100``. Each value
trains into ``runs/<run>/<method>-<param>-<value>/`` (resumable) and is summarised with
:func:`medssl.evaluate.summary.pretraining_summary` on the validation volumes.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import pandas as pd

__all__ = ["sweep", "choose"]


def _slug(value: Any) -> str:
    return str(value).replace("/", "_").replace(" ", "")


def sweep(
    method: str,
    param: str,
    values: Sequence[Any],
    *,
    preset: str = "demo",
    run: "str | os.PathLike" = "sweep",
    source: str = "demo",
    n_subjects: int = 48,
    cohort_seed: int = 0,
    seed: int = 0,
    train_overrides: dict[str, Any] | None = None,
    method_overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Train ``method`` once per value of config field ``param`` (method config, else TrainConfig); summarise on val.

    Returns one row per value: ``param``, ``value``, ``split="val"``, the summary columns
    (``spearman``, ``pearson``, ``abs_err_median_mm``, ``effective_rank``, ...), ``steps``
    and ``run_dir``. The test split is never loaded.
    """
    from dataclasses import fields

    from medssl.data.source import open_data
    from medssl.evaluate.summary import pretraining_summary
    from medssl.methods import get_method_class
    from medssl.presets import build_run
    from medssl.rundir import RunDir
    from medssl.train import TrainConfig, fit

    in_method = param in {f.name for f in fields(get_method_class(method).Config)}
    if not in_method and param not in {f.name for f in fields(TrainConfig)}:
        raise ValueError(f"{param!r} is neither a {method} config field nor a TrainConfig field")
    data = open_data(source, n_subjects=n_subjects, cohort_seed=cohort_seed, progress=progress)
    train, val = data.volumes("train"), data.volumes("val")
    rd = RunDir(run)
    rows = []
    for value in values:
        m_over = {**(method_overrides or {}), **({param: value} if in_method else {})}
        t_over = {**(train_overrides or {}), **({} if in_method else {param: value})}
        model, config = build_run(method, preset, method_overrides=m_over, train_overrides=t_over, seed=seed)
        run_dir = rd.method_dir(f"{method}-{param}-{_slug(value)}")
        result = fit(model, train, config, run_dir, val_volumes=val, progress=progress)
        summary = pretraining_summary(model, val, seed=seed, run_dir=run_dir).iloc[0].to_dict()
        rows.append({"param": param, "value": value, "split": "val", **summary, "steps": result.step,
                     "run_dir": str(run_dir)})
    table = pd.DataFrame(rows)
    table.to_csv(rd.step_dir("sweeps") / f"{method}-{param}.csv", index=False)
    return table


def choose(table: pd.DataFrame, metric: str = "spearman", higher_is_better: bool = True) -> Any:
    """The value with the best validation ``metric`` in a :func:`sweep` table (refuses other splits)."""
    if "split" in table and not (table["split"] == "val").all():
        raise ValueError("choose() only picks on validation rows; this table holds other splits")
    ranked = table.sort_values(metric, ascending=not higher_is_better)
    return ranked.iloc[0]["value"]
