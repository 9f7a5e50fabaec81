"""Figures of the evaluation tables: fidelity histograms, PCA/UMAP scatters, decoding bars, probe results.

Every figure has an interactive plotly form (``backend="plotly"``, survives HTML export)
and a static matplotlib form (``backend="matplotlib"``, for PNGs and the report).
Inputs are the tables and dataclasses of :mod:`medssl.evaluate`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from medssl.evaluate.fidelity import DEFAULT_BINS_MM, FidelityResult

__all__ = [
    "fidelity_histograms",
    "latent_scatter",
    "decoding_bars",
    "probe_positions",
    "probe_boxplot",
    "pvalue_heatmap",
    "save_figure",
]

_AXIS_COLUMNS = ("x_mm", "y_mm", "z_mm")


def _check_backend(backend: str) -> None:
    if backend not in ("plotly", "matplotlib"):
        raise ValueError(f'backend must be "plotly" or "matplotlib", got {backend!r}')


def fidelity_histograms(
    results: Mapping[str, FidelityResult], bins_mm: np.ndarray = DEFAULT_BINS_MM, backend: str = "matplotlib"
):
    """Per method, the histogram of |D_latent - D_physical| in mm (metric latents) or of the residual
    after the best affine fit (other methods), with the median and p90 in the legend (ISImed Fig. 1)."""
    _check_backend(backend)
    rows = []
    for name, r in results.items():
        counts, edges = r.histogram(bins_mm)
        kind = "|D_lat - D_phys|" if r.scale_mm is not None else "affine-fit residual"
        med = r.summary["abs_err_median_mm"] if r.scale_mm is not None else r.summary["affine_resid_median_mm"]
        p90 = r.summary["abs_err_p90_mm"] if r.scale_mm is not None else r.summary["affine_resid_p90_mm"]
        label = f"{name} ({kind}; median {med:.1f}, p90 {p90:.1f} mm; Spearman {r.summary['spearman']:.2f})"
        rows.append((label, counts / max(counts.sum(), 1), edges))
    if backend == "plotly":
        import plotly.graph_objects as go

        fig = go.Figure()
        for label, frac, edges in rows:
            fig.add_trace(go.Bar(x=0.5 * (edges[:-1] + edges[1:]), y=frac, name=label, opacity=0.6))
        fig.update_layout(barmode="overlay", xaxis_title="error (mm)", yaxis_title="fraction of pairs",
                          title="Distance fidelity", legend=dict(font=dict(size=9)))
        return fig
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for label, frac, edges in rows:
        ax.stairs(frac, edges, label=label, fill=False, lw=1.6)
    ax.set_xlabel("error (mm); last bin holds everything beyond")
    ax.set_ylabel("fraction of pairs")
    ax.set_title("Distance fidelity (pairs within a volume)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def latent_scatter(
    frame: pd.DataFrame,
    columns: Sequence[str] | None = None,
    colour_by: Sequence[str] = _AXIS_COLUMNS,
    title: str = "",
    backend: str = "plotly",
    max_points: int = 5000,
):
    """Scatter of a PCA/UMAP frame (:func:`medssl.evaluate.latent.pca_frame`), one panel per colouring.

    ``columns``: the 2 or 3 coordinate columns (default: the frame's ``PC*`` or ``UMAP*``
    columns, up to 3). ``colour_by``: frame columns, by default x, y and z in mm.
    """
    _check_backend(backend)
    if columns is None:
        columns = [c for c in frame.columns if c.startswith(("PC", "UMAP"))][:3]
    columns = list(columns)
    if len(columns) not in (2, 3):
        raise ValueError(f"latent_scatter needs 2 or 3 coordinate columns, got {columns}")
    missing = [c for c in [*columns, *colour_by] if c not in frame]
    if missing:
        raise ValueError(
            f"frame lacks columns {missing}; pass centres_mm to pca_frame/umap_frame to colour by position"
        )
    f = frame.sample(max_points, random_state=0) if len(frame) > max_points else frame
    if backend == "plotly":
        return _scatter_plotly(f, columns, list(colour_by), title)
    return _scatter_matplotlib(f, columns, list(colour_by), title)


def _scatter_plotly(f: pd.DataFrame, columns: list[str], colour_by: list[str], title: str):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    three_d = len(columns) == 3
    spec = {"type": "scene"} if three_d else {"type": "xy"}
    fig = make_subplots(rows=1, cols=len(colour_by), specs=[[spec] * len(colour_by)], subplot_titles=colour_by)
    for k, col in enumerate(colour_by):
        marker = dict(size=2.5 if three_d else 4, color=f[col], colorscale="Viridis", showscale=k == len(colour_by) - 1,
                      colorbar=dict(title="mm"))
        hover = f["case_id"] if "case_id" in f else None
        if three_d:
            trace = go.Scatter3d(x=f[columns[0]], y=f[columns[1]], z=f[columns[2]], mode="markers", marker=marker,
                                 text=hover, name=col)
        else:
            trace = go.Scattergl(x=f[columns[0]], y=f[columns[1]], mode="markers", marker=marker, text=hover, name=col)
        fig.add_trace(trace, row=1, col=k + 1)
    fig.update_layout(
        title=title, showlegend=False, height=420, width=380 * len(colour_by), margin=dict(l=10, r=10, t=60, b=10)
    )
    return fig


def _scatter_matplotlib(f: pd.DataFrame, columns: list[str], colour_by: list[str], title: str):
    import matplotlib.pyplot as plt

    three_d = len(columns) == 3
    fig = plt.figure(figsize=((4.8 if three_d else 4.2) * len(colour_by), 3.8))
    for k, col in enumerate(colour_by):
        if three_d:
            ax = fig.add_subplot(1, len(colour_by), k + 1, projection="3d")
            sc = ax.scatter(f[columns[0]], f[columns[1]], f[columns[2]], c=f[col], s=3, cmap="viridis")
            ax.set_zlabel(columns[2])
        else:
            ax = fig.add_subplot(1, len(colour_by), k + 1)
            sc = ax.scatter(f[columns[0]], f[columns[1]], c=f[col], s=4, cmap="viridis")
        ax.set_xlabel(columns[0])
        ax.set_ylabel(columns[1])
        ax.set_title(f"colour: {col}")
        fig.colorbar(sc, ax=ax, shrink=0.7, label="mm", pad=0.15 if three_d else 0.03)  # clear of the z label
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def decoding_bars(tables: Mapping[str, pd.DataFrame], backend: str = "matplotlib"):
    """R^2 per axis (x, y, z) and mean Euclidean error per method, from :func:`decode_coordinates` tables."""
    _check_backend(backend)
    long = pd.concat([t.assign(method=m) for m, t in tables.items()], ignore_index=True)
    axes_only = long[long["axis"] != "xyz"]
    err = long[long["axis"] == "xyz"].set_index("method")
    if backend == "plotly":
        import plotly.express as px

        fig = px.bar(axes_only, x="method", y="r2", color="axis", barmode="group", error_y="r2_std",
                     title="Coordinate decoding on held-out subjects (ridge, grouped CV)",
                     hover_data={"error_mm": ":.1f"})
        fig.update_yaxes(title="R²")
        return fig
    import matplotlib.pyplot as plt

    methods = list(tables)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw={"width_ratios": [2, 1]})
    w = 0.8 / 3
    for k, ax_name in enumerate(("x", "y", "z")):
        sub = axes_only[axes_only["axis"] == ax_name].set_index("method").loc[methods]
        x = np.arange(len(methods)) + (k - 1) * w
        a1.bar(x, sub["r2"], w, yerr=sub["r2_std"].fillna(0), label=ax_name, capsize=2)
    a1.set_xticks(np.arange(len(methods)), methods, rotation=30, ha="right")
    a1.set_ylabel("R² (held-out subjects)")
    a1.axhline(0, color="0.5", lw=0.8)
    a1.legend(title="axis", fontsize=8)
    e = err.loc[methods]
    a2.bar(methods, e["error_mm"], yerr=e["error_mm_std"].fillna(0), color="C4", capsize=2)
    a2.set_ylabel("mean Euclidean error (mm)")
    a2.tick_params(axis="x", rotation=30)
    fig.suptitle("Coordinate decoding (ridge, grouped by subject)")
    fig.tight_layout()
    return fig


def probe_boxplot(per_fold: pd.DataFrame, metric: str = "auc", backend: str = "matplotlib"):
    """Per-unit ``metric`` per method (``ProbeComparison.per_unit``: test subjects or folds), one box per method."""
    _check_backend(backend)
    methods = list(dict.fromkeys(per_fold["method"]))
    if backend == "plotly":
        import plotly.express as px

        fig = px.box(per_fold, x="method", y=metric, points="all",
                     title=f"Linear probe: {metric.upper()} per test subject / fold",
                     category_orders={"method": methods}, hover_data=["unit"])
        return fig
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.3 * len(methods) + 2, 3.6))
    data = [per_fold.loc[per_fold["method"] == m, metric].dropna().to_numpy() for m in methods]
    ax.boxplot(data, showmeans=True, showfliers=False)  # every fold is drawn as a point below
    ax.set_xticks(np.arange(1, len(methods) + 1), methods)
    for k, d in enumerate(data):
        ax.scatter(np.full(len(d), k + 1) + np.linspace(-0.08, 0.08, len(d)), d, s=10, color="k", alpha=0.6, zorder=3)
    if metric == "auc":
        ax.axhline(0.5, color="0.6", ls="--", lw=0.8)
    unit = "test subjects" if "unit" in per_fold and per_fold["unit"].dtype == object else "subject-grouped folds"
    ax.set_ylabel(f"{metric} per unit")
    ax.set_title(f"Linear probe on frozen features ({len(data[0]) if data else 0} {unit})")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def probe_positions(centres_mm: np.ndarray, labels: np.ndarray, title: str = ""):
    """Where the positives (1) and negatives (0) of a labelled patch set lie: three orthogonal projections in mm.

    With position-matched negatives the two clouds overlap; if they separate, position alone can solve the task.
    """
    import matplotlib.pyplot as plt

    c = np.asarray(centres_mm, dtype=float)
    y = np.asarray(labels).astype(int)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, (i, j) in zip(axes, [(0, 1), (0, 2), (1, 2)]):
        for lab, colour, name in ((0, "C0", "negative (0)"), (1, "C3", "positive (1)")):
            sel = y == lab
            ax.scatter(c[sel, i], c[sel, j], s=6, alpha=0.5, color=colour, label=name)
        ax.set_xlabel(f"{'xyz'[i]} (mm)")
        ax.set_ylabel(f"{'xyz'[j]} (mm)")
        ax.set_aspect("equal", adjustable="datalim")
    axes[0].legend(fontsize=8, markerscale=2)
    fig.suptitle(title or "patch centres of the labelled set (world mm)")
    fig.tight_layout()
    return fig


def pvalue_heatmap(matrix: pd.DataFrame, title: str = "paired t-test p-value (AUC)", backend: str = "matplotlib"):
    """Method x method p-values (:func:`medssl.evaluate.stats.pvalue_matrix`), log colour scale."""
    _check_backend(backend)
    values = matrix.to_numpy(dtype=float)
    logp = -np.log10(np.clip(values, 1e-10, 1.0))
    if backend == "plotly":
        import plotly.graph_objects as go

        text = np.vectorize(lambda v: "" if np.isnan(v) else f"{v:.3g}")(values)
        fig = go.Figure(go.Heatmap(z=logp, x=list(matrix.columns), y=list(matrix.index), text=text,
                                   texttemplate="%{text}", colorscale="Blues", colorbar=dict(title="-log10 p")))
        fig.update_layout(title=title, yaxis_autorange="reversed")
        return fig
    import matplotlib.pyplot as plt

    n = len(matrix)
    fig, ax = plt.subplots(figsize=(1.0 * n + 2.5, 0.8 * n + 1.5))
    vmax = max(3.0, float(np.nanmax(logp))) if np.isfinite(logp).any() else 3.0
    im = ax.imshow(np.ma.masked_invalid(logp), cmap="Blues", vmin=0, vmax=vmax)
    for i in range(n):
        for j in range(n):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.3g}", ha="center", va="center", fontsize=8,
                        color="white" if logp[i, j] > 2 else "black")
    ax.set_xticks(range(n), matrix.columns, rotation=30, ha="right")
    ax.set_yticks(range(n), matrix.index)
    fig.colorbar(im, ax=ax, label="-log10 p")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def save_figure(fig, path) -> None:
    """Save a matplotlib figure (PNG, 120 dpi) or a plotly figure (standalone HTML) to ``path``."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(fig, "savefig"):
        fig.savefig(path, dpi=120, bbox_inches="tight")
    else:
        fig.write_html(str(path), include_plotlyjs=True)  # embedded: the HTML works offline
