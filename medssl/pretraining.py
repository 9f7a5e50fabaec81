"""Pretraining one method into a run: the one function behind ``10_pretrain.ipynb``, ``medssl train``,
``medssl sweep`` and the reference study's pretraining units.

::

    result = pretrain("mine", "isimed", "demo", data={"n_subjects": 48}, train_overrides={"epochs": 10})
    result.summary                                   # the validation summary (also in summary.csv)

or in two steps, to look at the model and the data before training (what ``10_pretrain.ipynb`` does)::

    job = Pretraining("mine", "isimed", "demo")
    job.describe()                                   # registry facts, patches per step, forward passes
    result = job.run(callbacks=[LiveCurves()])       # live curves while it trains

Whoever calls it, the method's folder (``RunDir(run).method_dir(name)``) ends up with the same files:
``config.json``, ``provenance.json``, ``metrics.jsonl``, TensorBoard event files, ``checkpoints/``
(``last.pt``, epoch files; ``best.pt`` with early stopping), the figures of its training curves
(``loss_curves.png`` first, then collapse, effective rank, realised IoU where the method logs them) and
``summary.csv`` (distance fidelity and effective rank on the validation subjects, with the steps trained and
why training stopped). A run without validation subjects gets no summary, and says so.

This module sits above ``train``, ``evaluate`` and ``viz`` (it uses all three), beside the other entry
points (``select``, ``study``, ``cli``); ``medssl.pretrain`` is this :func:`pretrain`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from medssl.rundir import RunDir, method_files

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from medssl.data.source import DataSource
    from medssl.train.config import TrainConfig
    from medssl.train.loop import FitResult

__all__ = ["Pretraining", "PretrainResult", "pretrain", "figure_file"]


@dataclass
class PretrainResult:
    """What :meth:`Pretraining.run` made.

    Attributes:
        method: the registry name; ``name``: its folder in the run (the method, or a sweep's
            ``<method>-<param>-<value>``); ``method_dir``: that folder.
        fit: :class:`medssl.train.loop.FitResult` (steps, checkpoints, why training stopped).
        summary: the validation summary written to ``summary.csv`` (None without validation subjects).
        figures: ``[(title, matplotlib figure)]`` of the training curves, saved as ``figure_files``
            (empty unless ``figures=True``; the caller shows and closes them, see ``keep_figures``).
    """

    method: str
    name: str
    method_dir: Path
    fit: "FitResult"
    summary: "pd.DataFrame | None"
    figures: list[tuple[str, Any]] = field(default_factory=list)
    figure_files: list[Path] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return self.fit.step


def figure_file(method_dir: str | os.PathLike, index: int, title: str) -> Path:
    """Where the ``index``-th training figure goes: ``loss_curves.png`` first, then one file per title."""
    files = method_files(method_dir)
    if index == 0:
        return files.curves
    return files.dir / (re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_") + ".png")


class Pretraining:
    """One method's pretraining in a run, set up but not started: model, training configuration and data.

    Args:
        run: run name (``runs/<run>/``), a path, or a :class:`RunDir`.
        method: a registered method or variant.
        preset: ``"demo"``, ``"paper"``, ``"tiny"`` (:mod:`medssl.presets`).
        data: a :class:`~medssl.data.source.DataSource` (used as it is), or None for the run's data
            (:meth:`medssl.rundir.RunDir.data_spec`: what ``00_data`` recorded, else the demo's defaults),
            or a mapping of :class:`~medssl.data.spec.DataSpec` fields that override it (``source``,
            ``n_subjects``, ``target_spacing_mm``, ...). The data are opened with the method's input size,
            so a case smaller than a patch is reported before any step is trained; a run without a
            recorded spec gets this one (so its evaluation notebooks open the same data).
        method_overrides, train_overrides: on top of the preset (unknown names and wrong types raise here,
            before any data is opened).
        seed: initialisation, sampling and the validation summary's patch set.
        name: the folder in the run (default: the method's name).

    Building the model and checking every setting happens here; the data are opened on first use
    (:attr:`data`, or :meth:`run`, which also checks every case against the input size before the first step).
    """

    def __init__(
        self,
        run: "str | os.PathLike | RunDir",
        method: str,
        preset: str = "demo",
        data: "DataSource | Mapping[str, Any] | None" = None,
        *,
        method_overrides: Mapping[str, Any] | None = None,
        train_overrides: Mapping[str, Any] | None = None,
        seed: int = 0,
        name: str | None = None,
        progress: bool = True,
    ) -> None:
        from medssl.presets import build_run
        from medssl.train.precision import check_device

        self.run_dir = RunDir(run)  # refuses names that would leave the runs folder
        self.method, self.preset, self.seed = str(method), str(preset), int(seed)
        self.name = str(name or method)
        self.method_dir = self.run_dir.method_dir(self.name)
        self.progress = progress
        self.model, self.train_config = build_run(method, preset, seed=seed,
                                                  method_overrides=dict(method_overrides or {}),
                                                  train_overrides=dict(train_overrides or {}))
        self.train_config: "TrainConfig"
        check_device(self.train_config.device)  # before any data is built
        self._data_arg = data

    @cached_property
    def data(self) -> "DataSource":
        """The data, opened on first use (the command line starts DDP between building the model and this)."""
        return self._open(self._data_arg)

    @cached_property
    def train_volumes(self) -> list:
        volumes = self.data.volumes("train")
        if not volumes:
            raise ValueError(f"{self.data.source}: no training volumes (splits found: {self.data.splits})")
        return volumes

    @cached_property
    def val_volumes(self) -> list:
        return self.data.volumes("val") if "val" in self.data.splits else []

    def _open(self, data: Any) -> "DataSource":
        from medssl.data.source import DataSource
        from medssl.distributed import rank

        if isinstance(data, DataSource):
            return data
        spec = self.run_dir.data_spec(data)
        opened = spec.open(progress=self.progress, patch_size_vox=self.model.input_size_vox)
        if not self.run_dir.data_spec_file.is_file() and rank() == 0:
            self.run_dir.write_data_spec(spec)
        return opened

    def describe(self) -> "pd.DataFrame":
        """What the registry knows about the method, its data budget per step and its forward passes per step."""
        import pandas as pd

        from medssl.methods import method_info

        m = self.model
        return pd.Series({**method_info(self.method), "distinct patches per step": m.patches_per_step,
                          "forward passes per step": m.patches_per_step * m.views_per_patch},
                         name=self.name).to_frame()

    def run(
        self,
        *,
        resume: bool = True,
        callbacks: Sequence[Callable[[dict[str, Any]], Any]] | None = None,
        tensorboard: bool = True,
        figures: bool = True,
        keep_figures: bool = False,
        summary: bool = True,
    ) -> PretrainResult:
        """Train (resuming from ``last.pt`` when it exists), then write the figures and the validation summary.

        Args:
            resume: continue an existing run (False: an existing ``last.pt`` is an error).
            callbacks: called with every ``metrics.jsonl`` record (a notebook's live curves).
            tensorboard: also write TensorBoard event files beside ``metrics.jsonl``.
            figures: save the training-curve figures beside ``metrics.jsonl``.
            keep_figures: return the figures open (a notebook shows them; the caller closes them).
            summary: write ``summary.csv`` from the validation subjects (when there are any).

        Under ``torchrun`` every rank trains; only rank 0 writes the figures and the summary.
        """
        from medssl.distributed import rank
        from medssl.train.loop import fit

        result = fit(self.model, self.train_volumes, self.train_config, self.method_dir,
                     val_volumes=self.val_volumes or None, resume=resume, progress=self.progress,
                     callbacks=callbacks, tensorboard=tensorboard)
        out = PretrainResult(self.method, self.name, self.method_dir, result, None)
        if rank() != 0:
            return out
        if figures:
            out.figures, out.figure_files = self._figures(keep_figures)
        if summary and self.val_volumes:
            out.summary = self._summary(result)
        return out

    def _figures(self, keep: bool) -> tuple[list[tuple[str, Any]], list[Path]]:
        import matplotlib.pyplot as plt

        from medssl.train.metrics import read_metrics
        from medssl.viz.training import pretraining_figures

        figs = pretraining_figures(read_metrics(self.method_dir), title=f"{self.name} ({self.preset} preset)")
        paths = []
        for i, (title, fig) in enumerate(figs):
            paths.append(figure_file(self.method_dir, i, title))
            fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
            if not keep:
                plt.close(fig)
        return (figs if keep else []), paths

    def _summary(self, result: "FitResult") -> "pd.DataFrame":
        """The validation summary of the state the evaluations read (``best.pt`` where early stopping kept one)."""
        from medssl._files import atomic_write_text
        from medssl.evaluate.summary import pretraining_summary
        from medssl.train.checkpoint import load_method

        model = load_method(result.best_checkpoint_path) if result.best_checkpoint_path is not None else self.model
        table = pretraining_summary(model, self.val_volumes, seed=self.seed, run=self.run_dir)
        table = table.assign(split="val", steps=result.step, best_step=result.best_step,
                             stop_reason=result.stop_reason)
        atomic_write_text(method_files(self.method_dir).summary, table.to_csv(index=False))
        return table


def pretrain(
    run: "str | os.PathLike | RunDir",
    method: str,
    preset: str = "demo",
    data: "DataSource | Mapping[str, Any] | None" = None,
    *,
    method_overrides: Mapping[str, Any] | None = None,
    train_overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
    name: str | None = None,
    progress: bool = True,
    **run_options: Any,
) -> PretrainResult:
    """Pretrain ``method`` into ``runs/<run>/<name or method>/``: :class:`Pretraining` then :meth:`Pretraining.run`
    (``run_options``: ``resume``, ``callbacks``, ``tensorboard``, ``figures``, ``keep_figures``, ``summary``)."""
    job = Pretraining(run, method, preset, data, method_overrides=method_overrides, train_overrides=train_overrides,
                      seed=seed, name=name, progress=progress)
    return job.run(**run_options)
