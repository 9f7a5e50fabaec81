"""Choosing a setting on the validation split: train one run per value, summarise each on val, pick.

Any choice made from results (the ISImed latent scale, the number of steps, ...) must look
at the **validation** subjects only; the test split is scored once, after the choice. This
module makes that the easy path::

    table = sweep("isimed", "scale_mm", [1, 10, 50, 100], preset="demo", run="scale-sweep")
    best = choose(table, "spearman")            # on val, by construction

or ``medssl sweep --method isimed --param scale_mm --values 1 10 50 100``. Each value is one
:func:`medssl.pretraining.pretrain` into ``runs/<run>/<method>-<param>-<value>/`` (resumable; the same
files as ``10_pretrain.ipynb``), summarised on the validation volumes.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import pandas as pd

from medssl._files import atomic_write_text

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
    data: "Mapping[str, Any] | Any | None" = None,
    seed: int = 0,
    train_overrides: dict[str, Any] | None = None,
    method_overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Pretrain ``method`` once per value of config field ``param`` (method config, else TrainConfig); summarise on val.

    Each value is one :func:`medssl.pretraining.pretrain` into ``runs/<run>/<method>-<param>-<value>/``
    (the files ``10_pretrain.ipynb`` and ``medssl train`` write; resumable), on ``data`` opened with that
    value's input size (``data``: as in :func:`~medssl.pretraining.pretrain`).

    Returns one row per value: ``param``, ``value``, ``split="val"``, the summary columns
    (``spearman``, ``pearson``, ``abs_err_median_mm``, ``effective_rank``, ...), ``steps``
    and ``method_dir``. The test split is never loaded.
    """
    from dataclasses import fields

    from medssl.methods import get_method_class
    from medssl.pretraining import pretrain
    from medssl.rundir import RunDir
    from medssl.train.config import TrainConfig

    in_method = param in {f.name for f in fields(get_method_class(method).Config)}
    if not in_method and param not in {f.name for f in fields(TrainConfig)}:
        raise ValueError(f"{param!r} is neither a {method} config field nor a TrainConfig field")
    rd = RunDir(run)
    rows = []
    for value in values:
        m_over = {**(method_overrides or {}), **({param: value} if in_method else {})}
        t_over = {**(train_overrides or {}), **({} if in_method else {param: value})}
        result = pretrain(rd, method, preset, data, method_overrides=m_over, train_overrides=t_over, seed=seed,
                          name=f"{method}-{param}-{_slug(value)}", progress=progress)
        if result.summary is None:
            raise ValueError(f"sweep chooses on the validation split, and the data of {rd.path} have none")
        summary = result.summary.iloc[0].to_dict()
        rows.append({**summary, "param": param, "value": value, "split": "val", "steps": result.steps,
                     "method_dir": str(result.method_dir)})
    table = pd.DataFrame(rows)
    first = ["param", "value", "split"]
    table = table[first + [c for c in table.columns if c not in first]]
    atomic_write_text(rd.step_dir("sweeps") / f"{method}-{param}.csv", table.to_csv(index=False))
    return table


def choose(table: pd.DataFrame, metric: str = "spearman", higher_is_better: bool = True) -> Any:
    """The value with the best validation ``metric`` in a :func:`sweep` table (refuses other splits)."""
    if "split" in table and not (table["split"] == "val").all():
        raise ValueError("choose() only picks on validation rows; this table holds other splits")
    ranked = table.sort_values(metric, ascending=not higher_is_better)
    return ranked.iloc[0]["value"]
