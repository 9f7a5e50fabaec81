"""Slice views of a Volume: static orthogonal slices (survive HTML export) and one interactive viewer.

Both show the volume in the RAS frame nearest to its grid (nibabel's
``io_orientation``), in radiological convention: the patient's right on the
screen's left in axial and coronal views, anterior on the left in sagittal
views. Every panel is annotated with its direction letters, and pixels keep
their physical aspect ratio (from the affine's spacing).
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from medssl.data.volume import Volume

__all__ = ["orthogonal_slices", "slice_viewer", "label_colors", "PLANES"]

PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")
# plane -> (RAS axis held fixed, horizontal RAS axis, vertical RAS axis, flip horizontal, letters L/R/T/B)
_PLANE_AXES = {
    "axial": (2, 0, 1, True, ("R", "L", "A", "P")),
    "coronal": (1, 0, 2, True, ("R", "L", "S", "I")),
    "sagittal": (0, 1, 2, True, ("A", "P", "S", "I")),
}


def label_colors(n_ids: int = 256) -> np.ndarray:
    """A fixed categorical RGBA table, ``(n_ids, 4)``; id 0 is transparent. The same id always gets the same colour."""
    base = np.concatenate([plt.get_cmap(name)(np.arange(20 if name.startswith("tab20") else 8))
                           for name in ("tab20", "tab20b", "Set2")])  # fmt: skip
    colors = base[np.arange(n_ids) % len(base)].copy()
    colors[0] = (0, 0, 0, 0)
    return colors


def _to_ras(volume: Volume, arrays: Sequence[np.ndarray | None]):
    """Reorient ``arrays`` (X, Y, Z) to the nearest RAS frame. Returns (arrays, RAS affine, oblique?)."""
    affine = np.asarray(volume.affine, dtype=np.float64)
    ornt = nib.orientations.io_orientation(affine)
    out = [None if a is None else nib.orientations.apply_orientation(np.asarray(a), ornt) for a in arrays]
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, volume.shape_vox)
    direction = ras_affine[:3, :3] / np.linalg.norm(ras_affine[:3, :3], axis=0)
    oblique = not np.allclose(np.abs(direction), np.eye(3), atol=1e-3)
    return out, ras_affine, oblique


def _resolve_label(volume: Volume, label: Any) -> tuple[np.ndarray | None, str]:
    if isinstance(label, str) and label == "auto":
        return (None, "") if volume.label is None else (np.asarray(volume.label), "label")
    if isinstance(label, str):
        if label not in (volume.aux or {}):
            raise KeyError(f"volume {volume.case_id!r} has no aux label map {label!r} (has {sorted(volume.aux or {})})")
        return np.asarray(volume.aux[label]), label
    if label is None:
        return None, ""
    arr = np.asarray(label)
    if arr.shape != volume.shape_vox:
        raise ValueError(f"label shape {arr.shape} differs from the volume's {volume.shape_vox}")
    return arr, "label"


def _default_point_vox(shape: Sequence[int], label: np.ndarray | None, whole_foreground: bool = True) -> np.ndarray:
    """Centroid of the overlay's foreground (or of its largest id, e.g. one lesion), else the grid centre."""
    if label is not None and np.any(label):
        fg = label > 0
        if not whole_foreground:
            ids, counts = np.unique(label[fg], return_counts=True)
            fg = label == ids[np.argmax(counts)]
        return np.round(np.argwhere(fg).mean(0)).astype(int)
    return (np.asarray(shape) - 1) // 2


def _window(image: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(image[:: max(1, image.size // 200_000)], [1.0, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _plane(arr: np.ndarray, plane: str, index: int) -> np.ndarray:
    """(horizontal, vertical) slice of a RAS-ordered array, ready for ``imshow(x.T, origin="lower")``."""
    fixed, h, v, flip_h, _ = _PLANE_AXES[plane]
    sl = np.take(arr, index, axis=fixed)  # remaining axes in increasing order: (h, v)
    if (h, v) != tuple(a for a in range(3) if a != fixed):
        sl = sl.T
    return sl[::-1] if flip_h else sl


def _extent(shape: Sequence[int], spacing: np.ndarray, plane: str) -> list[float]:
    _, h, v, _, _ = _PLANE_AXES[plane]
    return [0.0, shape[h] * spacing[h], 0.0, shape[v] * spacing[v]]


def _crosshair_pos(ijk: np.ndarray, shape: Sequence[int], spacing: np.ndarray, plane: str) -> tuple[float, float]:
    _, h, v, flip_h, _ = _PLANE_AXES[plane]
    hi = (shape[h] - 1 - ijk[h]) if flip_h else ijk[h]
    return (hi + 0.5) * spacing[h], (ijk[v] + 0.5) * spacing[v]


def orthogonal_slices(
    volume: Volume,
    point_mm: Sequence[float] | None = None,
    label: Any = "auto",
    label_names: dict[int, str] | None = None,
    ax: Sequence[Any] | None = None,
    *,
    channel: int = 0,
    title: str | None = None,
    window: tuple[float, float] | None = None,
    alpha: float = 0.45,
    crosshair: bool = True,
    max_legend: int = 14,
) -> Figure:
    """Axial, coronal and sagittal slices through ``point_mm`` with a label overlay.

    Args:
        volume: the Volume (any orientation; shown in the nearest RAS frame).
        point_mm: world point (mm) the three planes pass through; default: the
            centroid of the overlay's foreground, else the volume's centre.
        label: ``"auto"`` (the volume's label map), the name of an aux map (e.g.
            ``"lesion"``), an array on the volume's grid, or None (no overlay).
        label_names: ``{id: name}`` for the legend (default ``volume.label_names``).
        ax: three matplotlib Axes to draw into (default: a new 1 x 3 figure).
        channel: image channel to show.
        title: figure title (default: the case id and the point).
        window: display intensity range (default: 1st-99.5th percentile).
        alpha: overlay opacity.
        crosshair: mark the point in every panel.
        max_legend: at most this many structures (largest in the slices) in the legend.

    Returns:
        The matplotlib Figure (static: it survives HTML export).
    """
    overlay, overlay_kind = _resolve_label(volume, label)
    (image, overlay), ras_affine, oblique = _to_ras(volume, [np.asarray(volume.data[channel]), overlay])
    shape = image.shape
    spacing = np.linalg.norm(ras_affine[:3, :3], axis=0)
    if point_mm is None:
        ijk = _default_point_vox(shape, overlay, whole_foreground=overlay_kind == "label")
    else:
        p = np.asarray(point_mm, dtype=np.float64).reshape(3)
        ijk = np.rint(np.linalg.solve(ras_affine[:3, :3], p - ras_affine[:3, 3])).astype(int)
        ijk = np.clip(ijk, 0, np.asarray(shape) - 1)
    centre_mm = ras_affine[:3, :3] @ ijk + ras_affine[:3, 3]
    names = label_names if label_names is not None else (volume.label_names if overlay_kind == "label" else None)
    vmin, vmax = window if window is not None else _window(image)

    if ax is None:
        # panels share one mm -> inch scale, so a thin slab stays thin instead of shrinking the other views
        widths_mm = [_extent(shape, spacing, p)[1] for p in PLANES]
        heights_mm = [_extent(shape, spacing, p)[3] for p in PLANES]
        inch_per_mm = 12.0 / sum(widths_mm)
        height_in = max(heights_mm) * inch_per_mm + (1.5 if overlay is not None else 0.8)
        fig, axes = plt.subplots(1, 3, figsize=(12.6, height_in), gridspec_kw={"width_ratios": widths_mm})
    else:
        axes = list(ax)
        if len(axes) != 3:
            raise ValueError(f"ax must be 3 Axes (axial, coronal, sagittal), got {len(axes)}")
        fig = axes[0].figure
    n_ids = int(overlay.max()) + 1 if overlay is not None and overlay.size else 1
    cmap = ListedColormap(label_colors(max(n_ids, 2)))
    shown_ids: dict[int, int] = {}
    for a, plane in zip(axes, PLANES):
        fixed = _PLANE_AXES[plane][0]
        extent = _extent(shape, spacing, plane)
        a.imshow(_plane(image, plane, ijk[fixed]).T, origin="lower", cmap="gray", vmin=vmin, vmax=vmax,
                 extent=extent, interpolation="nearest")  # fmt: skip
        if overlay is not None:
            sl = _plane(overlay, plane, ijk[fixed]).astype(np.int64)
            ids, counts = np.unique(sl[sl > 0], return_counts=True)
            for i, c in zip(ids.tolist(), counts.tolist()):
                shown_ids[i] = shown_ids.get(i, 0) + c
            masked = np.ma.masked_equal(sl, 0)
            a.imshow(masked.T, origin="lower", cmap=cmap, vmin=-0.5, vmax=cmap.N - 0.5, alpha=alpha,
                     extent=extent, interpolation="nearest")  # fmt: skip
        if crosshair:
            x, y = _crosshair_pos(ijk, shape, spacing, plane)
            a.axhline(y, color="yellow", lw=0.6, alpha=0.7)
            a.axvline(x, color="yellow", lw=0.6, alpha=0.7)
        _annotate(a, plane, centre_mm[fixed])
    if overlay is not None and shown_ids:
        top = sorted(shown_ids, key=shown_ids.get, reverse=True)[:max_legend]
        colors = label_colors(max(top) + 1)
        handles = [Patch(color=colors[i], label=(names or {}).get(i, f"{overlay_kind} {i}")) for i in sorted(top)]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=7, frameon=False)
    sp = "x".join(f"{s:g}" for s in np.round(spacing, 2))
    note = " (oblique grid: nearest RAS axes)" if oblique else ""
    fig.suptitle(title if title is not None else
                 f"{volume.case_id}: point ({', '.join(f'{v:.0f}' for v in centre_mm)}) mm RAS, {sp} mm voxels{note}",
                 fontsize=9)  # fmt: skip
    if ax is None:
        top = 1.0 - 0.55 / height_in
        bottom = (1.0 if overlay is not None else 0.2) / height_in
        fig.subplots_adjust(left=0.01, right=0.99, top=top, bottom=bottom, wspace=0.04)
    return fig


def _annotate(a, plane: str, position_mm: float) -> None:
    left, right, top, bottom = _PLANE_AXES[plane][4]
    style = dict(color="white", fontsize=8, fontweight="bold", transform=a.transAxes)
    a.text(0.02, 0.5, left, ha="left", va="center", **style)
    a.text(0.98, 0.5, right, ha="right", va="center", **style)
    a.text(0.5, 0.98, top, ha="center", va="top", **style)
    a.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    axis_name = {"axial": "z", "coronal": "y", "sagittal": "x"}[plane]
    a.set_title(f"{plane} ({axis_name} = {position_mm:.0f} mm)", fontsize=8)
    a.set_xticks([])
    a.set_yticks([])


# --------------------------------------------------------------------------- interactive viewer


def _render_png(image_2d: np.ndarray, overlay_2d: np.ndarray | None, window, alpha: float, pixel_mm, colors,
                target_px: int = 420) -> bytes:  # fmt: skip
    """One slice as PNG bytes (rows = vertical axis, top = high), resized to physical aspect."""
    from PIL import Image

    lo, hi = window
    grey = np.clip((image_2d - lo) / (hi - lo), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if overlay_2d is not None and alpha > 0:
        ids = overlay_2d.astype(np.int64) % len(colors)
        col = colors[ids][..., :3]
        a = (overlay_2d > 0)[..., None] * alpha
        rgb = rgb * (1 - a) + col * a
    rgb = np.flipud(rgb.transpose(1, 0, 2))  # (h, v) -> rows from top (high v) to bottom
    img = Image.fromarray((rgb * 255).astype(np.uint8))
    w_mm, h_mm = img.width * pixel_mm[0], img.height * pixel_mm[1]
    scale = target_px / max(w_mm, h_mm)
    img = img.resize((max(1, round(w_mm * scale)), max(1, round(h_mm * scale))), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="png")
    return buf.getvalue()


def slice_viewer(
    volume: Volume,
    label: Any = "auto",
    label_names: dict[int, str] | None = None,
    *,
    plane: str = "axial",
    channel: int = 0,
    window: tuple[float, float] | None = None,
    alpha: float = 0.4,
    size_px: int = 420,
):
    """An interactive slice viewer: slice slider, plane dropdown, overlay opacity, structure readout.

    Built from ipywidgets only (``IntSlider``, ``Dropdown``, ``FloatSlider``,
    ``Image``), so it works offline in JupyterLab 4 and needs no browser to be
    created: in a headless papermill run it is just returned (and shown as its
    text repr). Widgets do not survive HTML export; pair it with
    :func:`orthogonal_slices` for a static copy.

    Returns:
        An ``ipywidgets.VBox``; ``.children`` are (controls row, image, caption).
    """
    import ipywidgets as widgets

    if plane not in PLANES:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    overlay, kind = _resolve_label(volume, label)
    (image, overlay), ras_affine, oblique = _to_ras(volume, [np.asarray(volume.data[channel]), overlay])
    spacing = np.linalg.norm(ras_affine[:3, :3], axis=0)
    names = label_names if label_names is not None else (volume.label_names if kind == "label" else None)
    win = window if window is not None else _window(image)
    colors = label_colors(max(int(overlay.max()) + 1 if overlay is not None else 2, 2))
    centre = _default_point_vox(image.shape, overlay)

    plane_dd = widgets.Dropdown(options=list(PLANES), value=plane, description="plane")
    slider = widgets.IntSlider(min=0, max=image.shape[_PLANE_AXES[plane][0]] - 1,
                               value=int(centre[_PLANE_AXES[plane][0]]), description="slice",
                               continuous_update=True)  # fmt: skip
    opacity = widgets.FloatSlider(min=0.0, max=1.0, step=0.05, value=alpha, description="overlay",
                                  disabled=overlay is None)  # fmt: skip
    view = widgets.Image(format="png")
    caption = widgets.HTML()

    def _redraw(*_):
        p = plane_dd.value
        fixed, h, v, _, letters = _PLANE_AXES[p]
        k = int(np.clip(slider.value, 0, image.shape[fixed] - 1))
        ov = _plane(overlay, p, k) if overlay is not None else None
        view.value = _render_png(_plane(image, p, k), ov, win, opacity.value, (spacing[h], spacing[v]), colors, size_px)
        pos = (ras_affine[:3, :3] @ np.where(np.arange(3) == fixed, k, centre) + ras_affine[:3, 3])[fixed]
        present = []
        if ov is not None:
            ids, counts = np.unique(ov[ov > 0], return_counts=True)
            present = [(names or {}).get(int(i), f"{kind} {int(i)}") for i in ids[np.argsort(-counts)][:8]]
        caption.value = (f"<small>{volume.case_id} | {p} slice {k} ({'xyz'[fixed]} = {pos:.0f} mm) | "
                         f"screen left = {letters[0]}, top = {letters[2]}"
                         f"{' | oblique grid shown on nearest RAS axes' if oblique else ''}"
                         f"{' | ' + ', '.join(present) if present else ''}</small>")  # fmt: skip

    def _on_plane(change):
        fixed = _PLANE_AXES[change["new"]][0]
        slider.unobserve(_redraw, names="value")
        slider.max = image.shape[fixed] - 1
        slider.value = int(centre[fixed])
        slider.observe(_redraw, names="value")
        _redraw()

    plane_dd.observe(_on_plane, names="value")
    slider.observe(_redraw, names="value")
    opacity.observe(_redraw, names="value")
    _redraw()
    return widgets.VBox([widgets.HBox([plane_dd, slider, opacity]), view, caption])
