"""Figures for latent coordinate maps and cross-subject correspondence.

plotly figures survive a static HTML export (with ``plotly_mimetype+notebook``);
matplotlib figures are the static copy every key result also gets.
Slices are array (voxel) slices labelled by array axis: for an oblique affine
they are not exactly sagittal/coronal/axial, and we don't pretend otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from medssl.data.volume import Volume
from medssl.evaluate.dense import DenseEmbedding
from medssl.evaluate.maps import LatentMap, LatentRGBFrame
from medssl.geometry import world_to_vox

__all__ = [
    "correspondence_figure",
    "latent_map_scatter3d",
    "plot_correspondence_errors",
    "plot_latent_map_slices",
    "plot_point_query",
]

_AXIS_NAMES = ("i (array axis 0)", "j (array axis 1)", "k (array axis 2)")


def _rgb_strings(rgb: np.ndarray) -> list[str]:
    u8 = np.round(np.clip(rgb, 0, 1) * 255).astype(int)
    return [f"rgb({r},{g},{b})" for r, g, b in u8]


def latent_map_scatter3d(
    dense: DenseEmbedding,
    frame: LatentRGBFrame,
    foreground_only: bool = True,
    max_points: int = 20000,
    seed: int = 0,
    title: str = "",
) -> go.Figure:
    """Scatter3d of the dense grid centres (world mm) coloured by the RGB latent map."""
    mm = dense.flat_centres_mm
    rgb = frame.to_rgb(dense.flat_embeddings)
    keep = dense.flat_foreground if foreground_only and dense.flat_foreground.any() else np.ones(len(mm), bool)
    idx = np.flatnonzero(keep)
    if idx.size > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_points, replace=False))
    fig = go.Figure(
        go.Scatter3d(
            x=mm[idx, 0],
            y=mm[idx, 1],
            z=mm[idx, 2],
            mode="markers",
            marker={"size": 2.5, "color": _rgb_strings(rgb[idx])},
            hovertemplate="x %{x:.0f} mm<br>y %{y:.0f} mm<br>z %{z:.0f} mm<extra></extra>",
        )
    )
    fig.update_layout(
        title=title or f"latent coordinate map (PC1-3 as RGB), {dense.case_id}",
        scene={
            "xaxis_title": "x (mm, R)",
            "yaxis_title": "y (mm, A)",
            "zaxis_title": "z (mm, S)",
            "aspectmode": "data",
        },
        margin={"l": 0, "r": 0, "t": 40, "b": 0},
    )
    return fig


def correspondence_figure(points: pd.DataFrame, case_a: str | None = None, case_b: str | None = None) -> go.Figure:
    """3D view of one subject pair: true points in B and each method's predictions.

    ``points`` is the per-point table of :func:`medssl.evaluate.correspondence.evaluate_correspondence`.
    Each method is one legend entry (click to toggle), with thin lines from the
    predicted to the true point; the line length is the error.
    """
    if case_a is None or case_b is None:
        case_a, case_b = points.iloc[0][["case_a", "case_b"]]
    pair = points[(points["case_a"] == case_a) & (points["case_b"] == case_b)]
    if pair.empty:
        raise ValueError(f"no correspondence points for the pair ({case_a}, {case_b})")
    truth = pair.drop_duplicates("point")
    fig = go.Figure(
        go.Scatter3d(
            x=truth["true_x_mm"],
            y=truth["true_y_mm"],
            z=truth["true_z_mm"],
            mode="markers",
            marker={"size": 3, "color": "black"},
            name=f"true point in {case_b}",
        )
    )
    for i, (name, d) in enumerate(pair.groupby("method", sort=False)):
        xs, ys, zs = (
            np.column_stack([d[f"pred_{a}_mm"], d[f"true_{a}_mm"], np.full(len(d), np.nan)]).ravel() for a in "xyz"
        )
        fig.add_trace(
            go.Scatter3d(
                x=xs,
                y=ys,
                z=zs,
                mode="lines+markers",
                name=f"{name} (median {d['error_mm'].median():.1f} mm)",
                marker={"size": 2},
                line={"width": 2},
                visible=True if i < 2 else "legendonly",
            )
        )
    fig.update_layout(
        title=f"correspondence {case_a} -> {case_b}: predicted (lines) vs true (black) points",
        scene={"xaxis_title": "x (mm)", "yaxis_title": "y (mm)", "zaxis_title": "z (mm)", "aspectmode": "data"},
        margin={"l": 0, "r": 0, "t": 40, "b": 0},
    )
    return fig


def plot_correspondence_errors(points: pd.DataFrame, ax=None):
    """Static box plot of per-point correspondence errors (mm) per method. Returns the figure."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(1.2 * points["method"].nunique() + 2, 3.5))
    else:
        fig = ax.figure
    names = list(pd.unique(points["method"]))
    ax.boxplot([points.loc[points["method"] == n, "error_mm"] for n in names], showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
    ax.set_ylabel("correspondence error (mm)")
    ax.set_title("cross-subject correspondence error")
    fig.tight_layout()
    return fig


def _slice_index(volume_shape: Sequence[int], affine: np.ndarray, point_mm: np.ndarray | None) -> np.ndarray:
    if point_mm is None:
        return np.asarray(volume_shape) // 2
    ijk = np.rint(world_to_vox(affine, point_mm)[0]).astype(int)
    return np.clip(ijk, 0, np.asarray(volume_shape) - 1)


def _orthogonal_slices(
    axes_row, image: np.ndarray, rgb: np.ndarray | None, ijk: np.ndarray, alpha: float, marker: bool
):
    lo, hi = np.percentile(image, [1, 99])
    for ax_i, normal in enumerate(range(3)):
        ax = axes_row[ax_i]
        sl = [slice(None)] * 3
        sl[normal] = int(ijk[normal])
        ax.imshow(image[tuple(sl)].T, cmap="gray", origin="lower", vmin=lo, vmax=hi)
        if rgb is not None:
            ax.imshow(np.transpose(rgb[tuple(sl)], (1, 0, 2)), origin="lower", alpha=alpha)
        inplane = [a for a in range(3) if a != normal]
        if marker:
            ax.plot(ijk[inplane[0]], ijk[inplane[1]], "+", color="yellow", ms=14, mew=2)
        ax.set_xlabel(_AXIS_NAMES[inplane[0]], fontsize=7)
        ax.set_ylabel(_AXIS_NAMES[inplane[1]], fontsize=7)
        ax.set_title(f"slice {_AXIS_NAMES[normal].split()[0]} = {int(ijk[normal])}", fontsize=8)
        ax.tick_params(labelsize=6)


def plot_latent_map_slices(
    volume: Volume, latent: LatentMap | None, point_mm=None, alpha: float = 0.5, title: str = ""
):
    """Static orthogonal (array-axis) slices of the image with the RGB map overlaid. Returns the figure."""
    import matplotlib.pyplot as plt

    if latent is not None and latent.rgb.shape[:3] != volume.shape_vox:
        raise ValueError(f"map shape {latent.rgb.shape[:3]} differs from the image grid {volume.shape_vox}")
    ijk = _slice_index(volume.shape_vox, volume.affine, point_mm)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    _orthogonal_slices(
        axes, np.asarray(volume.data[0]), None if latent is None else latent.rgb, ijk, alpha, point_mm is not None
    )
    fig.suptitle(title or f"{volume.case_id}: latent map {getattr(latent, 'method', '')}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return fig


def plot_point_query(
    volume_a: Volume,
    volume_b: Volume,
    point_mm_a,
    point_mm_b,
    map_a: LatentMap | None = None,
    map_b: LatentMap | None = None,
    true_point_mm_b=None,
    alpha: float = 0.4,
):
    """Orthogonal slices through a point in A (top row) and its matched point in B (bottom row).

    The matched point is the yellow cross; the true point (if given) a cyan circle
    on the slices through the matched point. Returns the figure.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(10, 6.6))
    ijk_a = _slice_index(volume_a.shape_vox, volume_a.affine, np.asarray(point_mm_a, float).reshape(1, 3))
    ijk_b = _slice_index(volume_b.shape_vox, volume_b.affine, np.asarray(point_mm_b, float).reshape(1, 3))
    _orthogonal_slices(axes[0], np.asarray(volume_a.data[0]), None if map_a is None else map_a.rgb, ijk_a, alpha, True)
    _orthogonal_slices(axes[1], np.asarray(volume_b.data[0]), None if map_b is None else map_b.rgb, ijk_b, alpha, True)
    if true_point_mm_b is not None:
        t = world_to_vox(volume_b.affine, np.asarray(true_point_mm_b, float).reshape(1, 3))[0]
        for normal in range(3):
            inplane = [a for a in range(3) if a != normal]
            axes[1][normal].plot(t[inplane[0]], t[inplane[1]], "o", mfc="none", color="cyan", ms=10, mew=1.5)
    pa = np.asarray(point_mm_a, float).ravel()
    pb = np.asarray(point_mm_b, float).ravel()
    axes[0][0].set_title(f"{volume_a.case_id}: query ({pa[0]:.0f}, {pa[1]:.0f}, {pa[2]:.0f}) mm", fontsize=8)
    axes[1][0].set_title(f"{volume_b.case_id}: match ({pb[0]:.0f}, {pb[1]:.0f}, {pb[2]:.0f}) mm", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))  # room for a suptitle
    return fig
