"""Figures of the downstream segmentation notebook: Dice curves, per-organ bars, learning curves, label overlays.

All static matplotlib figures (they survive HTML export); baselines are drawn dashed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from medssl.data.volume import Volume

__all__ = ["dice_curves", "organ_bars", "finetune_learning_curves", "label_comparison"]


def dice_curves(curve: pd.DataFrame, title: str = "", xlabel: str = "number of labelled atlases",
                ylabel: str = "mean Dice (organs)", x: str = "n_atlases") -> Figure:
    """Mean Dice against ``x`` per row (``curve``: ``method, kind, <x>, mean, std``); baselines dashed."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for method, g in curve.groupby("method", sort=False):
        g = g.sort_values(x)
        baseline = (g["kind"] == "baseline").all() if "kind" in g else False
        ax.errorbar(g[x], g["mean"], yerr=g["std"].fillna(0.0), label=method, capsize=2, marker="o", ms=3,
                    ls="--" if baseline else "-", lw=1.0 if baseline else 1.6, alpha=0.8 if baseline else 1.0)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, ylim=(0, 1))
    ax.set_xticks(sorted(curve[x].unique()))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def organ_bars(table: pd.DataFrame, title: str = "", ylabel: str = "Dice") -> Figure:
    """Grouped bars: one group per organ (columns of ``table``), one bar per method (rows)."""
    organs = [c for c in table.columns if c != "mean"]
    methods = list(table.index)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(organs) + 2), 4.0))
    width = 0.8 / max(len(methods), 1)
    xs = np.arange(len(organs))
    for i, m in enumerate(methods):
        ax.bar(xs + (i - (len(methods) - 1) / 2) * width, table.loc[m, organs].to_numpy(dtype=float), width, label=m)
    ax.set_xticks(xs, organs, rotation=20, fontsize=8)
    ax.set(ylabel=ylabel, title=title, ylim=(0, 1))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def finetune_learning_curves(histories: Mapping[tuple[str, int], Sequence[dict]], title: str = "") -> Figure:
    """Training loss (left) and validation Dice (right) against step, one line per (method, n)."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for (method, n), hist in histories.items():
        h = pd.DataFrame(list(hist))
        if h.empty:
            continue
        tr = h[h["split"] == "train"]
        a1.plot(tr["step"], tr["loss"], label=f"{method} n={n}", lw=1.2)
        if "dice_mean" in h:
            va = h[h["split"] == "val"]
            a2.plot(va["step"], va["dice_mean"], marker="o", label=f"{method} n={n}", lw=1.2)
    a1.set(xlabel="step", ylabel="Dice-CE loss (train crops)", title="training loss")
    a2.set(xlabel="step", ylabel="mean Dice (validation subjects)", title="validation Dice", ylim=(0, 1))
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def label_comparison(volume: Volume, labels: Mapping[str, np.ndarray], organ_names: Sequence[str],
                     point_mm: Sequence[float] | None = None, title: str = "") -> Figure:
    """One row of axial/coronal/sagittal slices per label map (e.g. truth, kNN, fine-tuned) over the image."""
    from medssl.viz.slices import orthogonal_slices

    names = {i + 1: o for i, o in enumerate(organ_names)}
    rows = list(labels.items())
    if point_mm is None:
        truth = np.asarray(rows[0][1])
        ijk = np.argwhere(truth > 0).mean(axis=0) if (truth > 0).any() else (np.asarray(truth.shape) - 1) / 2
        point_mm = (np.asarray(volume.affine)[:3, :3] @ ijk + np.asarray(volume.affine)[:3, 3]).tolist()
    fig, axes = plt.subplots(len(rows), 3, figsize=(12, 3.4 * len(rows) + 0.6), squeeze=False)
    for (name, lab), ax in zip(rows, axes):
        orthogonal_slices(volume, point_mm=point_mm, label=np.asarray(lab), label_names=names, ax=list(ax),
                          title="", max_legend=len(organ_names))
        ax[0].set_ylabel(name, fontsize=10)
        ax[0].yaxis.set_visible(True)
        ax[0].set_yticks([])
    fig.suptitle(title or f"{volume.case_id}", fontsize=10)
    fig.subplots_adjust(left=0.05, right=0.99, top=0.95, bottom=0.08, wspace=0.04, hspace=0.08)
    return fig
