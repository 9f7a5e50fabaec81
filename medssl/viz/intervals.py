"""Figures of the IoU-interval study: shared-organ fraction, realised IoU per interval, collapse per variant."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

__all__ = ["shared_fraction_figure", "interval_iou_histograms", "collapse_by_method_figure"]


def shared_fraction_figure(summary: pd.DataFrame, title: str = ""):
    """Bars: fraction of pairs whose crops share an organ label per interval (thesis Fig. 3.2), +- std over subjects."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.3 * len(summary) + 2.5, 3.4))
    x = np.arange(len(summary))
    ax.bar(x, summary["shared_fraction"], yerr=summary["shared_fraction_std"].fillna(0), capsize=3, color="C0")
    labels = [f"{r.interval}\n[{r.iou_min:g}, {r.iou_max:g}]" if not str(r.interval).startswith("[")
              else str(r.interval) for r in summary.itertuples()]
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("pairs sharing >= 1 organ label")
    ax.set_title(title or "pairs whose two crops share an organ (both-background pairs excluded)", fontsize=9)
    for xi, (v, fb) in enumerate(zip(summary["shared_fraction"], summary["fallback_rate"])):
        ax.text(xi, min(v + 0.03, 1.0), f"{v:.2f}" + (f"\nfallback {fb:.0%}" if fb > 0 else ""), ha="center", fontsize=7)
    fig.tight_layout()
    return fig


def interval_iou_histograms(pairs: pd.DataFrame, bins: int = 20, title: str = ""):
    """One panel per interval: histogram of the realised IoU of its pairs (fallback pairs drawn separately)."""
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(pairs["interval"]))
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.6), squeeze=False, sharey=False)
    edges = np.linspace(0, 1, bins + 1)
    for ax, name in zip(axes[0], names):
        g = pairs[pairs["interval"] == name]
        lo, hi = g["iou_min"].iloc[0], g["iou_max"].iloc[0]
        ax.hist(g.loc[~g["fallback"], "iou"], bins=edges, color="C0", label="accepted")
        if g["fallback"].any():
            ax.hist(g.loc[g["fallback"], "iou"], bins=edges, color="C3", alpha=0.7, label="fallback")
            ax.legend(fontsize=6)
        ax.axvspan(lo, max(hi, lo + 0.005), color="0.85", zorder=0)
        ax.set_title(f"{name}" if str(name).startswith("[") else f"{name}\n[{lo:g}, {hi:g}]", fontsize=8)
        ax.set_xlabel("IoU", fontsize=8)
    axes[0][0].set_ylabel("pairs")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def collapse_by_method_figure(metrics: Mapping[str, pd.DataFrame], column: str = "collapse_p", smooth: int = 5):
    """Collapse coefficient during training for every method (thesis Fig. 4.3 measures it on p)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name, m in metrics.items():
        train = m[m.get("split", "train") == "train"] if "split" in m else m
        if column in train and train[column].notna().any():
            ax.plot(train["step"], train[column].astype(float).rolling(smooth, min_periods=1).mean(), label=name)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel(f"collapse coefficient ({column.split('_')[-1]})")
    ax.set_title(f"collapse coefficient of {column.split('_')[-1]} during pretraining (0 = spread, 1 = collapsed)",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
