"""The one object that knows the layout of a run directory.

``fit``, the notebooks, the pipeline, the evaluations and the report all go through
:class:`RunDir`; nothing else spells out where a run keeps what::

    runs/<run>/
      pipeline.json                       status of every pipeline step
      provenance.json                     commit, dirty tree, packages, machine, plan (medssl.provenance)
      00_data/ ...                        data notebook outputs
      <method>/                           one per pretrained method (or variant)
        config.json  provenance.json  metrics.jsonl  checkpoints/last.pt  10_pretrain.ipynb  summary.csv
                                          (+ checkpoints/best.pt, early_stopping.json with early stopping)
      seed<k>/                            a study's replicates (medssl.study): each an ordinary run
      eval/                               shared evaluation artefacts (patch sets, embedding caches)
      <step>/                             one per evaluation notebook, e.g. 20_latent_space/
        headline.csv                      the step's headline numbers (the report concatenates them)
        key_figures.json                  the step's key figures, [{"title", "file"}] (the report shows them)
        <target>/headline.csv             a step may keep several (e.g. 30_linear_probe/lesion/)

**Headline tables** are long tables with the columns of :data:`HEADLINE_COLUMNS`: one row
per (method, metric) with its value, spread, sample size, the split it was measured on,
which direction is better, and whether the row is a method, a shortcut baseline or a
reference; and the code and configuration that made it (:data:`PROVENANCE_COLUMNS`:
``commit``, 12 hex digits with ``+dirty`` for uncommitted changes, and the run's
``config_hash``, :func:`medssl.provenance.table_stamp`; empty in tables written before they
existed). A new evaluation writes one with :meth:`RunDir.write_headline` and appears in
the report with no edit to the report.

A run is named by a plain string (``"demo"``: ``$MEDSSL_RUNS/demo``); names with path
separators or ``..`` are refused so that a run never writes outside the runs folder. Code
that really means another folder passes a :class:`pathlib.Path`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from medssl import paths

__all__ = ["RunDir", "MethodFiles", "method_files", "HEADLINE_COLUMNS", "PROVENANCE_COLUMNS", "ROW_KINDS",
           "InvalidRunNameError", "read_headline_csv"]

PROVENANCE_COLUMNS = ["commit", "config_hash"]  # last, so that readers of the older columns are unaffected
HEADLINE_COLUMNS = ["step", "method", "kind", "metric", "value", "std", "n", "split", "higher_is_better", "note",
                    *PROVENANCE_COLUMNS]
ROW_KINDS = ("method", "baseline", "control", "reference")  # baseline: a shortcut a method must beat; control: a
# positive control that shows the task can be solved (registration, supervised); reference: chance/floor
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_EVAL = "eval"
_HEADLINE = "headline.csv"
_FIGURES = "key_figures.json"


@dataclass(frozen=True)
class MethodFiles:
    """The files of one method's folder (what ``fit`` writes and the evaluations read)."""

    dir: Path
    checkpoints: Path  # <method>/checkpoints/
    last: Path  # <method>/checkpoints/last.pt: the newest state, the resume point
    metrics: Path  # <method>/metrics.jsonl
    config: Path  # <method>/config.json
    summary: Path  # <method>/summary.csv (validation summary of 10_pretrain)
    curves: Path  # <method>/loss_curves.png
    best: Path | None = None  # <method>/checkpoints/best.pt: the best validation state (early stopping only)


def method_files(method_dir: str | os.PathLike) -> MethodFiles:
    """The layout inside a method folder (``runs/<run>/<method>/``), for any folder ``fit`` writes to."""
    d = Path(method_dir)
    return MethodFiles(dir=d, checkpoints=d / "checkpoints", last=d / "checkpoints" / "last.pt",
                       metrics=d / "metrics.jsonl", config=d / "config.json", summary=d / "summary.csv",
                       curves=d / "loss_curves.png", best=d / "checkpoints" / "best.pt")


class InvalidRunNameError(ValueError):
    """A run name that would leave the runs folder (separators, ``..``) or is empty."""


class RunDir:
    """A run directory: ``RunDir("demo")`` or ``RunDir(Path("/somewhere/run"))``.

    Args:
        run: a run name (a plain string without separators: ``runs_root / name``), a
            :class:`pathlib.Path`, or another :class:`RunDir`.
        runs_root: the runs folder for names (default :func:`medssl.paths.runs_dir`).
    """

    def __init__(self, run: "str | os.PathLike | RunDir", runs_root: str | os.PathLike | None = None) -> None:
        if isinstance(run, RunDir):
            self.path: Path = run.path
        elif isinstance(run, os.PathLike) and not isinstance(run, str):
            self.path = Path(run).expanduser()
        else:
            name = str(run)
            if not _NAME.match(name) or ".." in name:
                raise InvalidRunNameError(
                    f"run name {name!r} is not a plain name (letters, digits, '.', '_', '-', '+'; no '/' or '..'): "
                    "runs always live inside the runs folder "
                    f"({Path(runs_root) if runs_root else paths.runs_dir()}; set MEDSSL_RUNS to move it)"
                )
            self.path = (Path(runs_root) if runs_root is not None else paths.runs_dir()) / name

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    # ------------------------------------------------------------------ layout

    def method_dir(self, method: str) -> Path:
        """``<run>/<method>/``: where ``fit`` writes (not created)."""
        return self.path / _plain(method, "method")

    def files(self, method: str) -> MethodFiles:
        """The files of ``method``'s folder (:class:`MethodFiles`)."""
        return method_files(self.method_dir(method))

    def checkpoint(self, method: str, which: str = "last.pt") -> Path:
        return self.files(method).checkpoints / which

    def step_dir(self, step: str, *sub: str, create: bool = True) -> Path:
        """``<run>/<step>/[<sub>/...]`` of an evaluation step (created unless ``create=False``)."""
        d = self.path / _plain(step, "step")
        for s in sub:
            d = d / _plain(s, "sub-folder")
        if create:
            d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def eval_dir(self) -> Path:
        """``<run>/eval/``: patch sets and embedding caches shared by every step (created)."""
        return self.step_dir(_EVAL)

    @property
    def pipeline_json(self) -> Path:
        return self.path / "pipeline.json"

    # ------------------------------------------------------------------ methods of the run

    def trained_methods(self) -> list[str]:
        """Methods (and variants) with a ``checkpoints/last.pt`` here, in the registry's report order."""
        if not self.path.is_dir():
            return []
        found = {d.name for d in self.path.iterdir() if d.is_dir() and method_files(d).last.is_file()}
        from medssl.methods import list_methods

        known = [m for m in list_methods() if m in found]
        return known + sorted(found - set(known))

    def checkpoints(self, methods: Sequence[str] | None = None) -> dict[str, Path | None]:
        """``{method: the checkpoint to evaluate, or None when the method has not been trained in this run}``.

        The checkpoint to evaluate is ``best.pt`` where training kept one (early stopping on
        validation), else ``last.pt``. ``methods``: None or empty for every trained method.
        """
        return {m: self.eval_checkpoint(m) for m in self.resolve_methods(methods)}

    def eval_checkpoint(self, method: str) -> Path | None:
        """``best.pt`` when training early-stopped on validation kept one, else ``last.pt``; None when untrained."""
        files = self.files(method)
        if not files.last.is_file():
            return None
        return files.best if files.best is not None and files.best.is_file() else files.last

    # ------------------------------------------------------------------ seeds of a study

    def seed_run(self, seed: int) -> "RunDir":
        """``<run>/seed<k>/``: replicate ``k`` of a study (an ordinary run: methods, evaluation steps)."""
        return RunDir(self.path / f"seed{int(seed)}")

    def seed_runs(self) -> dict[int, "RunDir"]:
        """``{k: RunDir}`` of the ``seed<k>/`` replicates found here, by seed."""
        if not self.path.is_dir():
            return {}
        found = [(int(d.name[4:]), d) for d in self.path.iterdir() if d.is_dir() and re.fullmatch(r"seed\d+", d.name)]
        return {k: RunDir(d) for k, d in sorted(found)}

    def resolve_methods(self, methods: Sequence[str] | None) -> list[str]:
        """``methods`` as given, or every trained method of the run when it is empty or None."""
        return list(methods) if methods else self.trained_methods()

    # ------------------------------------------------------------------ headline tables

    def write_headline(self, step_dir: str | os.PathLike, table: pd.DataFrame) -> Path:
        """Write ``<step_dir>/headline.csv`` (a step folder of this run, or a sub-folder of one).

        ``table`` needs ``method``, ``metric``, ``value`` and ``split``; missing optional
        columns get defaults (``kind="method"``, ``higher_is_better=True``, ...); ``step``
        defaults to the folder's path relative to the run. ``commit`` and ``config_hash`` are
        stamped now (:func:`medssl.provenance.table_stamp`) unless the table has them.
        """
        from medssl._files import atomic_write_text
        from medssl.provenance import table_stamp

        d = Path(step_dir) if Path(step_dir).is_absolute() else self.path / step_dir
        stamp = table_stamp(self.path)
        table = table.assign(**{k: v for k, v in stamp.items() if k not in table.columns})
        t = _normalise_headline(table, default_step=str(d.relative_to(self.path)))
        d.mkdir(parents=True, exist_ok=True)
        path = d / _HEADLINE
        atomic_write_text(path, t.to_csv(index=False))
        return path

    def write_key_figures(self, step_dir: str | os.PathLike, figures: Sequence[tuple[str, str | os.PathLike]]) -> Path:
        """Record ``[(title, figure file), ...]`` as the step's key figures (``key_figures.json``), for the report.

        Files are stored relative to the run, so a moved run still finds them.
        """
        import json

        from medssl._files import atomic_write_text

        d = Path(step_dir) if Path(step_dir).is_absolute() else self.path / step_dir
        items = []
        for title, f in figures:
            p = Path(f)
            items.append({"title": str(title), "file": str((p if p.is_absolute() else d / p).relative_to(self.path))})
        d.mkdir(parents=True, exist_ok=True)
        path = d / _FIGURES
        atomic_write_text(path, json.dumps(items, indent=1))
        return path

    def key_figures(self) -> list[tuple[str, Path]]:
        """Every step's key figures that exist, as ``(title, absolute path)``, steps in folder order."""
        import json

        out = []
        for f in sorted(self.path.glob(f"*/{_FIGURES}")) + sorted(self.path.glob(f"*/*/{_FIGURES}")):
            for item in json.loads(f.read_text(encoding="utf-8")):
                p = self.path / item["file"]
                if p.is_file():
                    out.append((item["title"], p))
        return out

    def headlines(self) -> pd.DataFrame:
        """Every ``headline.csv`` of the run, concatenated (steps in folder order)."""
        files = sorted(self.path.glob(f"*/{_HEADLINE}")) + sorted(self.path.glob(f"*/*/{_HEADLINE}"))
        if not files:
            return pd.DataFrame(columns=HEADLINE_COLUMNS)
        frames = [_normalise_headline(read_headline_csv(f), str(f.parent.relative_to(self.path))) for f in files]
        return pd.concat(frames, ignore_index=True)


def read_headline_csv(path: str | os.PathLike) -> pd.DataFrame:
    """A headline table from CSV, its text columns kept as text (a commit or hash of digits stays a string)."""
    return pd.read_csv(path, dtype={c: str for c in ("step", "method", "note", *PROVENANCE_COLUMNS)},
                       keep_default_na=False, na_values={"value": ["", "nan", "NaN"], "std": ["", "nan", "NaN"],
                                                         "n": ["", "nan", "NaN"]})


def _plain(name: str, what: str) -> str:
    if not _NAME.match(str(name)) or ".." in str(name):
        raise InvalidRunNameError(f"{what} name {name!r} must be a plain name without '/' or '..'")
    return str(name)


def _normalise_headline(table: pd.DataFrame, default_step: str) -> pd.DataFrame:
    missing = [c for c in ("method", "metric", "value", "split") if c not in table.columns]
    if missing:
        raise ValueError(f"a headline table needs the columns method, metric, value, split; missing {missing}")
    t = table.copy()
    defaults = {"step": default_step, "kind": "method", "std": float("nan"), "n": float("nan"),
                "higher_is_better": True, "note": "", "commit": "", "config_hash": ""}
    for col, value in defaults.items():
        if col not in t.columns:
            t[col] = value
    bad = sorted(set(t["kind"]) - set(ROW_KINDS))
    if bad:
        raise ValueError(f"headline kind must be one of {ROW_KINDS}, got {bad}")
    for col in ("note", *PROVENANCE_COLUMNS):  # text: empty, never NaN (a CSV reads an empty cell as NaN)
        t[col] = t[col].astype(object).where(t[col].notna(), "").astype(str)
    return t[HEADLINE_COLUMNS]
