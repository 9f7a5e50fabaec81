"""Figures of a training run, read from its ``metrics.jsonl``."""

from __future__ import annotations

import math

import pandas as pd


def _loss_columns(train: pd.DataFrame) -> list[str]:
    # the total loss first, then each method-specific loss term it logs
    cols = [c for c in train.columns if c == "loss" or (c.startswith("loss_") or c.endswith("_loss"))]
    return sorted(set(cols), key=lambda c: (c != "loss", c))


def loss_curves(metrics: pd.DataFrame, title: str = "", smooth: int = 10):
    """Static matplotlib figure: training loss terms (raw + running mean), val loss, lr and effective rank.

    Args:
        metrics: the frame from ``medssl.train.read_metrics(run_dir)``; rows with
            ``split == "val"`` are evaluation records, the rest training steps.
        smooth: window of the running mean drawn over the raw curve.
    """
    import matplotlib.pyplot as plt

    split = metrics["split"] if "split" in metrics else pd.Series(["train"] * len(metrics), index=metrics.index)
    train = metrics[split.fillna("train") == "train"]
    val = metrics[split == "val"]
    loss_cols = _loss_columns(train)
    extra = [c for c in ("lr",) if c in train] + [c for c in ("effective_rank",) if c in val]
    n = len(loss_cols) + len(extra)
    ncols = min(3, max(n, 1))
    nrows = math.ceil(max(n, 1) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    flat = list(axes.ravel())
    for ax, col in zip(flat, loss_cols):
        y = train[col].astype(float)
        ax.plot(train["step"], y, color="0.75", lw=0.8, label="per step")
        ax.plot(train["step"], y.rolling(smooth, min_periods=1).mean(), color="C0", label=f"mean of {smooth}")
        if col in val and val[col].notna().any():
            ax.plot(val["step"], val[col], "o-", color="C3", ms=3, label="val")
        if (y > 0).all() and y.max() / max(y.min(), 1e-12) > 50:
            ax.set_yscale("log")
        ax.set_title(col)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    rest = flat[len(loss_cols):]
    for ax, col in zip(rest, extra):
        src = train if col == "lr" else val
        ax.plot(src["step"], src[col], "o-" if col != "lr" else "-", ms=3, color="C2")
        ax.set_title("effective rank (val patches)" if col == "effective_rank" else "learning rate")
        ax.set_xlabel("step")
    for ax in flat[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
