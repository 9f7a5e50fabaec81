"""Figures of a training run, read from its ``metrics.jsonl``."""

from __future__ import annotations

import math

import pandas as pd

__all__ = ["loss_curves", "pretraining_figures", "collapse_curves", "effective_rank_curve", "iou_histogram_figure"]


def _loss_columns(train: pd.DataFrame) -> list[str]:
    # the total loss first, then each method-specific loss term it logs
    cols = [c for c in train.columns if c == "loss" or (c.startswith("loss_") or c.endswith("_loss"))]
    return sorted(set(cols), key=lambda c: (c != "loss", c))


def loss_curves(metrics: pd.DataFrame, title: str = "", smooth: int = 10):
    """Static matplotlib figure: training loss terms (raw + running mean), val loss, lr and effective rank.

    Args:
        metrics: the frame from ``medssl.train.read_metrics(method_dir)``; rows with
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


def _split(metrics: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    split = metrics["split"] if "split" in metrics else pd.Series(["train"] * len(metrics), index=metrics.index)
    return metrics[split.fillna("train") == "train"], metrics[split == "val"]


def _has(frame: pd.DataFrame, col: str) -> bool:
    return col in frame and frame[col].notna().any()


def collapse_curves(metrics: pd.DataFrame, title: str = "", smooth: int = 10):
    """Collapse coefficient ``max(0, 1 - sqrt(d) s)`` of z and p per training record (and val), 0 = spread, 1 = collapsed."""
    import matplotlib.pyplot as plt

    train, val = _split(metrics)
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for col, colour, label in (("collapse_z", "C0", "z (projector, before its last BatchNorm; SimSiam paper)"),
                               ("collapse_p", "C1", "p (predictor, thesis)"),
                               ("collapse_h", "C2", "h (encoder output)")):
        if _has(train, col):
            y = train[col].astype(float)
            ax.plot(train["step"], y, color=colour, alpha=0.3, lw=0.8)
            ax.plot(train["step"], y.rolling(smooth, min_periods=1).mean(), color=colour, label=label)
        if _has(val, col):
            ax.plot(val["step"], val[col], "o", color=colour, ms=4, label=f"{col.split('_')[1]} on val")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("collapse coefficient")
    ax.set_title(title or "collapse coefficient (0 = spread, 1 = collapsed)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def effective_rank_curve(metrics: pd.DataFrame, title: str = ""):
    """Effective rank (RankMe) of the fixed validation patches' embeddings at each evaluation."""
    import matplotlib.pyplot as plt

    _, val = _split(metrics)
    fig, ax = plt.subplots(figsize=(5.0, 3.0))
    ax.plot(val["step"], val["effective_rank"], "o-", color="C2", ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("effective rank")
    ax.set_title(title or "effective rank of the embedding (val patches)")
    fig.tight_layout()
    return fig


def iou_histogram_figure(metrics: pd.DataFrame, title: str = ""):
    """Realised IoU of the training pairs (mean share per fixed bin over all training records) and the fallback rate."""
    import matplotlib.pyplot as plt

    train, _ = _split(metrics)
    cols = [c for c in train.columns if c.startswith("iou_hist_")]
    labels = ["0" if c == "iou_hist_0" else c[len("iou_hist_"):].replace("_", "-") for c in cols]
    shares = train[cols].astype(float).mean()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.2), gridspec_kw={"width_ratios": [3, 2]})
    ax.bar(range(len(cols)), shares.to_numpy(), color="C0")
    ax.set_xticks(range(len(cols)), labels, rotation=45, fontsize=7)
    ax.set_xlabel("realised IoU of the pair")
    ax.set_ylabel("share of pairs")
    ax.set_title("realised IoU (all training steps)")
    if _has(train, "fallback_rate"):
        ax2.plot(train["step"], train["fallback_rate"].astype(float), color="C3")
        ax2.set_ylim(-0.02, max(0.1, float(train["fallback_rate"].max()) * 1.1))
        ax2.set_title(f"fallback rate (mean {float(train['fallback_rate'].mean()):.3f})")
    ax2.set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def pretraining_figures(metrics: pd.DataFrame, title: str = "") -> list[tuple[str, object]]:
    """The figures ``10_pretrain`` shows for any method, as ``[(title, matplotlib figure), ...]``.

    Always the loss curves (:func:`loss_curves`); then, when ``metrics`` has the columns: the
    collapse coefficient of z, p and h (``collapse_z``/``collapse_p``/``collapse_h``, train or val), the effective rank on the
    validation patches (``effective_rank``), and the realised IoU histogram with the fallback rate
    (``iou_hist_*``, ``fallback_rate``: IoU-pair methods).
    """
    train, val = _split(metrics)
    prefix = f"{title}: " if title else ""
    figures: list[tuple[str, object]] = [("Loss curves", loss_curves(metrics, title=title))]
    if any(_has(part, c) for part in (train, val) for c in ("collapse_z", "collapse_p", "collapse_h")):
        figures.append(("Collapse coefficient", collapse_curves(metrics, title=f"{prefix}collapse coefficient")))
    if _has(val, "effective_rank"):
        figures.append(("Effective rank (val)", effective_rank_curve(metrics, title=f"{prefix}effective rank (val)")))
    if any(c.startswith("iou_hist_") for c in train.columns):
        figures.append(("Realised IoU and fallback rate", iou_histogram_figure(metrics, title=title)))
    return figures
