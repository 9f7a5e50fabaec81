"""Linked, interactive latent-map viewers for JupyterLab 4 (ipyniivue 2.4.4 + plotly FigureWidget, offline).

- :func:`latent_map_3d_viewer`: the image with its RGB latent map in NiiVue, with a
  toggle between slices, the 3D render and both, a method dropdown, the overlay
  opacity and a cut-away clip plane for looking inside the 3D render.
- :class:`LinkedQueryViews`: two NiiVue views, subject A and subject B. A click in A
  moves B's crosshair to the matched point (nearest latent neighbour) and shows the
  latent distance and, where known, the true point and the error in mm.
- :class:`LatentScatterExplorer`: a PCA/UMAP scatter of one subject's dense embeddings
  beside its NiiVue view. Selecting points in the scatter paints where they lie in the
  image; a click in the image rings its nearest latent neighbours in the scatter.

The logic behind the clicks lives in :mod:`medssl.viz.query` (pure, unit-tested); this
module only wires it to widgets. Widgets need a live kernel and do not survive an HTML
export: the notebooks also show :func:`latent_scatter_figure` (plotly) and the
matplotlib point-query figure of :mod:`medssl.viz.map_figures`. Nothing here blocks a headless
(papermill) kernel: the widgets are built, their callbacks just never fire.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from medssl.evaluate.dense import DenseEmbedding
from medssl.viz.query import (
    LatentPointQuery,
    NiiVueGrid,
    PointMatch,
    body_masked_rgba,
    latent_neighbours,
    nifti_bytes,
    selection_mask,
)

__all__ = [
    "VIEWS",
    "LatentScatterExplorer",
    "LinkedQueryViews",
    "latent_map_3d_viewer",
    "latent_scatter_figure",
    "run_latent_maps",
    "scatter_coordinates",
    "set_view",
]

# Slice type and "show the 3D render beside the slices" of each view mode.
VIEWS = {"slices": ("MULTIPLANAR", "NEVER"), "3D render": ("RENDER", "NEVER"), "slices + 3D": ("MULTIPLANAR", "ALWAYS")}
COLOUR_BY = ("x_mm", "y_mm", "z_mm", "organ")
_MAP_SUFFIX = ".nii.gz"


# --------------------------------------------------------------------------- a run's maps


def run_latent_maps(run: str | os.PathLike, methods: Sequence[str] = ()) -> pd.DataFrame:
    """The latent maps ``20_latent_space.ipynb`` wrote for a run, one row per (case, method).

    Args:
        run: run name or directory; maps are read from ``<run>/20_latent_space/maps/``
            (``<case>_image.nii.gz`` beside ``<case>_<method>.nii.gz``).
        methods: methods to keep, in this order; empty means every method trained in
            the run (a ``<method>/checkpoints/last.pt`` exists) that has maps.

    Returns:
        Columns ``case_id, method, image, map`` (paths).

    Raises:
        FileNotFoundError: no maps folder, or no map of the asked methods (the message
            says which notebook writes them).
    """
    from medssl.rundir import RunDir

    rd = RunDir(run)
    root = rd.path
    maps_dir = rd.step_dir("20_latent_space", "maps", create=False)
    if not maps_dir.is_dir():
        raise FileNotFoundError(f"{maps_dir}: no latent maps in run {root.name!r}; run 20_latent_space.ipynb first")
    images = {p.name[: -len("_image" + _MAP_SUFFIX)]: p for p in sorted(maps_dir.glob("*_image" + _MAP_SUFFIX))}
    if methods:
        wanted = list(methods)
    else:
        wanted = rd.trained_methods()
    rows = [
        {"case_id": case, "method": m, "image": image, "map": maps_dir / f"{case}_{m}{_MAP_SUFFIX}"}
        for m in wanted
        for case, image in images.items()
        if (maps_dir / f"{case}_{m}{_MAP_SUFFIX}").is_file()
    ]
    if not rows:
        raise FileNotFoundError(
            f"{maps_dir}: no latent maps of {wanted or 'any trained method'} for cases {sorted(images)}; "
            "run 20_latent_space.ipynb with these methods first"
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- NiiVue helpers


def _check_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such NIfTI file for the viewer")
    return p


def _new_niivue(height: int, view: str):
    from ipyniivue import NiiVue, ShowRender, SliceType

    if view not in VIEWS:
        raise ValueError(f"view must be one of {list(VIEWS)}, got {view!r}")
    slice_type, show_render = VIEWS[view]
    return NiiVue(
        height=height,
        slice_type=SliceType[slice_type],
        multiplanar_show_render=ShowRender[show_render],
        show_3d_crosshair=True,
        crosshair_color=(1.0, 1.0, 0.0, 1.0),  # yellow: stands out on grey and on the RGB map
        crosshair_width=1.0,
        is_colorbar=False,
        back_color=(0.0, 0.0, 0.0, 1.0),
    )


def set_view(nv, view: str) -> None:
    """Switch a NiiVue widget between ``"slices"``, ``"3D render"`` and ``"slices + 3D"``."""
    from ipyniivue import ShowRender, SliceType

    if view not in VIEWS:
        raise ValueError(f"view must be one of {list(VIEWS)}, got {view!r}")
    slice_type, show_render = VIEWS[view]
    nv.opts.multiplanar_show_render = ShowRender[show_render]
    nv.set_slice_type(SliceType[slice_type])


def _volumes(image_path, map_path, opacity: float) -> list[dict]:
    vols: list[dict[str, Any]] = [{"path": _check_file(image_path), "colormap": "gray"}]
    if map_path is not None:
        vols.append({"path": _check_file(map_path), "opacity": float(opacity)})
    return vols


def _opacity_slider(value: float, on_change):
    import ipywidgets as widgets

    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {value}")
    slider = widgets.FloatSlider(value=float(value), min=0.0, max=1.0, step=0.05, description="map opacity",
                                 style={"description_width": "initial"})  # fmt: skip
    slider.observe(lambda change: on_change(float(change["new"])), names="value")
    return slider


def _set_overlay_opacity(views, opacity: float) -> None:
    for nv in views:
        if len(nv.volumes) > 1:
            nv.volumes[1].opacity = opacity


# --------------------------------------------------------------------------- 3D view


def _body_masked_map_volume(image_path, map_path, opacity: float):
    """The map as an in-memory RGBA NIfTI, transparent outside the body (see ``body_masked_rgba``)."""
    import nibabel as nib
    from ipyniivue import Volume

    from medssl.evaluate.maps import load_latent_map

    image = nib.load(str(image_path))
    latent = load_latent_map(map_path)
    rgba = body_masked_rgba(latent.rgb, np.asanyarray(image.dataobj))
    name = Path(map_path).name.split(".nii")[0] + "_body.nii"
    return Volume(data=nifti_bytes(rgba, image.affine), name=name, opacity=float(opacity))


def latent_map_3d_viewer(
    image_path: str | os.PathLike,
    overlays: Mapping[str, str | os.PathLike],
    opacity: float = 0.6,
    view: str = "slices + 3D",
    height: int = 480,
    body_only: bool = True,
):
    """The image with its RGB latent map in NiiVue: slices, 3D render, or both side by side.

    Args:
        image_path: the grey-scale image (NIfTI).
        overlays: ``{method: RGB map path}`` on the image's grid (the dropdown switches).
        opacity: initial map opacity in ``[0, 1]``.
        view: initial view, one of :data:`VIEWS`.
        height: canvas height in pixels.
        body_only: show the map only inside the body (an intensity threshold,
            :func:`medssl.viz.query.body_masked_rgba`), so the 3D render shows the body's
            surface in the map's colours rather than a coloured box of air.

    Returns:
        ``ipywidgets.VBox([controls, niivue])``. In the 3D render, drag to rotate;
        "clip plane" cuts the render through its centre to show the map inside.
    """
    import ipywidgets as widgets

    if not overlays:
        raise ValueError("latent_map_3d_viewer needs at least one map ({method: path})")
    paths = {str(k): _check_file(v) for k, v in overlays.items()}
    nv = _new_niivue(height, view)
    slider = _opacity_slider(opacity, lambda v: _set_overlay_opacity([nv], v))

    def _load(map_path) -> None:
        if body_only:
            nv.load_volumes([*_volumes(image_path, None, opacity), _body_masked_map_volume(image_path, map_path, slider.value)])
        else:
            nv.load_volumes(_volumes(image_path, map_path, slider.value))

    _load(next(iter(paths.values())))
    views = widgets.ToggleButtons(options=list(VIEWS), value=view, description="view")
    views.observe(lambda change: set_view(nv, change["new"]), names="value")
    method = widgets.Dropdown(options=list(paths), description="method", disabled=len(paths) < 2)
    method.observe(lambda change: _load(paths[change["new"]]), names="value")
    cut = widgets.Checkbox(value=False, description="clip plane (3D)", indent=False)
    # depth 0: a plane through the centre clips the render to show the map inside; depth 2 puts it outside (off)
    cut.observe(lambda change: nv.set_clip_plane(0.0 if change["new"] else 2.0, 270.0, 0.0), names="value")
    box = widgets.VBox([widgets.HBox([views, cut]), widgets.HBox([method, slider]), nv])
    box.add_class("medssl-3d-viewer")  # CSS hook for the browser test and for styling
    return box


# --------------------------------------------------------------------------- linked A/B views


class LinkedQueryViews:
    """Subject A and subject B in two NiiVue views; a click in A queries B.

    Args:
        image_a, image_b: the two images (NIfTI); the maps share their grids.
        overlays_a, overlays_b: ``{method: map path}`` of each subject.
        queries: ``{method: LatentPointQuery}`` (A -> B), e.g. built with
            :class:`medssl.viz.query.LatentPointQuery` on the two subjects' dense embeddings.
        case_a, case_b: names shown in the status line.

    ``widget`` is the ``VBox`` to display (the object displays as it, too);
    :meth:`on_location` is the handler of A's ``location_change`` events and can be
    called with a NiiVue event dict (``{"frac": [...], ...}``) to query without a browser.
    """

    def __init__(
        self,
        image_a: str | os.PathLike,
        image_b: str | os.PathLike,
        overlays_a: Mapping[str, str | os.PathLike],
        overlays_b: Mapping[str, str | os.PathLike],
        queries: Mapping[str, LatentPointQuery],
        case_a: str = "A",
        case_b: str = "B",
        opacity: float = 0.5,
        view: str = "slices",
        height: int = 360,
    ) -> None:
        import ipywidgets as widgets

        methods = [m for m in queries if m in overlays_a and m in overlays_b]
        if not methods:
            raise ValueError(f"no method has a query and maps of both subjects: queries {list(queries)}, "
                             f"maps of A {list(overlays_a)}, of B {list(overlays_b)}")  # fmt: skip
        self.images = (_check_file(image_a), _check_file(image_b))
        self.overlays = ({m: _check_file(overlays_a[m]) for m in methods}, {m: _check_file(overlays_b[m]) for m in methods})
        self.queries = {m: queries[m] for m in methods}
        self.case_a, self.case_b = str(case_a), str(case_b)
        self.last_match: PointMatch | None = None
        self.nv_a, self.nv_b = _new_niivue(height, view), _new_niivue(height, view)
        self.method = widgets.Dropdown(options=methods, description="method", disabled=len(methods) < 2)
        self.slider = _opacity_slider(opacity, lambda v: _set_overlay_opacity([self.nv_a, self.nv_b], v))
        self.status = widgets.HTML(value=f"<i>click a point in {self.case_a} (left view)</i>")
        self._load(methods[0])
        self.method.observe(lambda change: self._load(change["new"]), names="value")
        self.nv_a.on_location_change(self.on_location)
        title = lambda text: widgets.HTML(f"<b>{text}</b>")  # noqa: E731
        self.widget = widgets.VBox([
            widgets.HBox([self.method, self.slider]),
            widgets.HBox([widgets.VBox([title(f"A: {self.case_a} (click here)"), self.nv_a],
                                       layout=widgets.Layout(width="50%")).add_class("medssl-view-a"),
                          widgets.VBox([title(f"B: {self.case_b} (matched point)"), self.nv_b],
                                       layout=widgets.Layout(width="50%")).add_class("medssl-view-b")]),
            self.status,
        ]).add_class("medssl-linked-views")  # fmt: skip

    def _load(self, method: str) -> None:
        self.nv_a.load_volumes(_volumes(self.images[0], self.overlays[0][method], self.slider.value))
        self.nv_b.load_volumes(_volumes(self.images[1], self.overlays[1][method], self.slider.value))

    def on_location(self, event: Mapping[str, Any]) -> PointMatch:
        """Handle a click in A (NiiVue ``location_change``): move B's crosshair, update the status."""
        match = self.queries[self.method.value].from_frac(event["frac"])
        self.nv_b.scene.crosshair_pos = [float(v) for v in np.clip(match.frac_b, 0.0, 1.0)]
        self.last_match = match
        self.status.value = self._status_html(match, event)
        return match

    def _status_html(self, match: PointMatch, event: Mapping[str, Any]) -> str:
        fmt = lambda p: "(" + ", ".join(f"{v:.1f}" for v in p) + ") mm"  # noqa: E731
        lines = [
            f"<b>{self.method.value}</b>: {self.case_a} {fmt(match.query_mm_a)} &rarr; "
            f"<b>{self.case_b} {fmt(match.matched_mm_b)}</b> (nearest latent neighbour; B's crosshair)",
            f"latent distance <b>{match.latent_distance:.3g}</b>",
        ]
        if match.true_mm_b is not None:
            lines.append(f"true point in {self.case_b} {fmt(match.true_mm_b)}, error <b>{match.error_mm:.1f} mm</b>")
        else:
            lines.append("true point unknown for this pair")
        if "mm" in event:  # what NiiVue itself reported, for comparison (equal on non-oblique grids)
            lines.append(f"<span style='color:gray'>NiiVue reported {fmt(event['mm'][:3])} in {self.case_a}</span>")
        return "<div class='medssl-query-status'>" + "<br>".join(lines) + "</div>"

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


# --------------------------------------------------------------------------- linked latent-space scatter


def scatter_coordinates(dense: DenseEmbedding, table: pd.DataFrame, projection: str = "pca", seed: int = 0) -> np.ndarray:
    """``(N, 2)`` PCA or UMAP coordinates of the grid points in ``table["index"]`` (their embeddings)."""
    from medssl.evaluate.latent import pca_frame, umap_frame

    emb = dense.flat_embeddings[np.asarray(table["index"], dtype=int)]
    if projection == "pca":
        return pca_frame(emb, 2)[["PC1", "PC2"]].to_numpy()
    if projection == "umap":
        return umap_frame(emb, 2, seed=seed)[["UMAP1", "UMAP2"]].to_numpy()
    raise ValueError(f"projection must be 'pca' or 'umap', got {projection!r}")


def _organ_colours(organs: pd.Series) -> dict[str, str]:
    from plotly.colors import qualitative

    palette = qualitative.Dark24 + qualitative.Light24
    names = organs.value_counts().index.tolist()  # most frequent first
    return {n: ("rgb(90,90,90)" if n == "background" else palette[i % len(palette)]) for i, n in enumerate(names)}


def _marker(table: pd.DataFrame, colour_by: str) -> dict:
    if colour_by not in COLOUR_BY:
        raise ValueError(f"colour_by must be one of {COLOUR_BY}, got {colour_by!r}")
    if colour_by == "organ":
        colours = _organ_colours(table["organ"])
        return {"size": 5, "color": [colours[o] for o in table["organ"]], "showscale": False}
    axis = colour_by[0]
    return {"size": 5, "color": table[colour_by].to_numpy(), "colorscale": "Viridis", "showscale": True,
            "colorbar": {"title": {"text": f"{axis} (mm)"}}}  # fmt: skip


def latent_scatter_figure(
    table: pd.DataFrame, coords: np.ndarray, colour_by: str = "z_mm", projection: str = "pca", title: str = ""
) -> go.Figure:
    """A plotly scatter of grid-point embeddings (survives HTML export).

    Trace 0 holds the points (``customdata`` = flat grid index), trace 1 the
    highlighted latent neighbours, trace 2 the clicked point (both empty here).
    """
    axes = ("PC1", "PC2") if projection == "pca" else ("UMAP1", "UMAP2")
    hover = [f"{o}<br>({x:.0f}, {y:.0f}, {z:.0f}) mm" for o, x, y, z in
             zip(table["organ"], table["x_mm"], table["y_mm"], table["z_mm"])]  # fmt: skip
    # SVG (go.Scatter), not WebGL: the page already holds one WebGL context per NiiVue view
    fig = go.Figure([
        go.Scatter(x=coords[:, 0], y=coords[:, 1], mode="markers", marker=_marker(table, colour_by),
                     customdata=table["index"].to_numpy(), text=hover, hoverinfo="text", name="grid points"),
        go.Scatter(x=[], y=[], mode="markers", name="latent neighbours of the click",
                   marker={"size": 9, "color": "rgba(0,0,0,0)", "line": {"width": 2, "color": "black"}}),
        go.Scatter(x=[], y=[], mode="markers", name="clicked point",
                   marker={"size": 16, "symbol": "star", "color": "yellow", "line": {"width": 1.5, "color": "black"}}),
    ])  # fmt: skip
    fig.update_layout(
        title=title or f"{projection.upper()} of dense embeddings, colour = {colour_by.replace('_', ' ')}",
        xaxis_title=axes[0], yaxis_title=axes[1], dragmode="lasso", height=420, width=540,
        margin={"l": 40, "r": 10, "t": 40, "b": 40}, legend={"orientation": "h", "y": -0.15},
    )  # fmt: skip
    return fig


class LatentScatterExplorer:
    """A subject's dense embeddings as a PCA/UMAP scatter, linked both ways to its NiiVue view.

    - Lasso/box-select points in the scatter: the voxels those patches cover turn red in
      the image and the crosshair moves to their centroid.
    - Click in the image: the clicked patch (star) and its ``n_neighbours`` nearest
      latent neighbours (rings) are marked in the scatter.

    Args:
        dense: the subject's dense embeddings.
        table: :func:`medssl.viz.query.grid_point_table` of ``dense`` (x/y/z mm, organ).
        image_path, map_path: the subject's image and RGB map (same grid as ``dense``).
        projection: ``"pca"`` or ``"umap"``.
        max_points: the scatter shows at most this many grid points (seeded subsample).
    """

    def __init__(
        self,
        dense: DenseEmbedding,
        table: pd.DataFrame,
        image_path: str | os.PathLike,
        map_path: str | os.PathLike | None = None,
        projection: str = "pca",
        colour_by: str = "z_mm",
        max_points: int = 4000,
        n_neighbours: int = 50,
        seed: int = 0,
        opacity: float = 0.5,
        height: int = 420,
    ) -> None:
        import ipywidgets as widgets

        self.dense = dense
        self.grid = NiiVueGrid.from_nifti(_check_file(image_path))
        if self.grid.shape_vox != tuple(dense.image_shape_vox):
            raise ValueError(f"{image_path}: image grid {self.grid.shape_vox} differs from the dense embeddings' "
                             f"image grid {dense.image_shape_vox} ({dense.case_id})")  # fmt: skip
        if len(table) > max_points:
            table = table.iloc[np.sort(np.random.default_rng(seed).choice(len(table), max_points, replace=False))]
        self.table = table.reset_index(drop=True)
        self.coords = scatter_coordinates(dense, self.table, projection, seed)
        self.n_neighbours = int(n_neighbours)
        self._row_of = {int(g): r for r, g in enumerate(self.table["index"])}
        self.selected: np.ndarray = np.zeros(0, dtype=int)
        # (plotly 7.1's FigureWidget sends its data right after opening its comm; in JupyterLab the
        # view sometimes renders before that and stays empty: re-run the cell. See the browser test.)
        title = f"{dense.case_id}: {projection.upper()} of dense embeddings"
        self.fig = go.FigureWidget(latent_scatter_figure(self.table, self.coords, colour_by, projection, title=title))
        self.nv = _new_niivue(height, "slices")
        self.nv.load_volumes(_volumes(image_path, map_path, opacity))
        self._base = list(self.nv.volumes)  # image and map, loaded once; selections come and go beside them
        self.colour = widgets.Dropdown(options=list(COLOUR_BY), value=colour_by, description="colour by")
        self.colour.observe(lambda change: self._recolour(change["new"]), names="value")
        self.status = widgets.HTML("<i>lasso points in the scatter, or click in the image</i>")
        self.fig.data[0].on_selection(self._on_selection)
        self.nv.on_location_change(self.on_location)
        self.widget = widgets.VBox([
            self.colour,
            # the scatter keeps its own width (a FigureWidget in a shrinking flex box draws empty axes);
            # NiiVue fills the rest
            widgets.HBox([widgets.Box([self.fig], layout=widgets.Layout(flex="0 0 540px")).add_class("medssl-scatter"),
                          widgets.VBox([self.nv], layout=widgets.Layout(flex="1 1 0", min_width="320px"))
                          .add_class("medssl-scatter-image")]),
            self.status,
        ]).add_class("medssl-scatter-explorer")  # fmt: skip

    def _recolour(self, colour_by: str) -> None:
        marker = _marker(self.table, colour_by)
        with self.fig.batch_update():
            self.fig.data[0].marker = marker
            self.fig.layout.title.text = f"{self.dense.case_id}: colour = {colour_by.replace('_', ' ')}"

    def _on_selection(self, trace, points, selector=None) -> None:
        self.select(np.asarray(self.table["index"].to_numpy()[list(points.point_inds)], dtype=int))

    def select(self, flat_indices: Sequence[int]) -> np.ndarray:
        """Paint the voxels of these grid points in the image and centre the crosshair on them.

        Returns the ``(X, Y, Z)`` mask that was sent to the viewer.
        """
        from ipyniivue import Volume

        self.selected = np.asarray(flat_indices, dtype=int)
        mask = selection_mask(self.dense, self.selected)
        vols = list(self._base)
        if self.selected.size:
            vols.append(Volume(data=nifti_bytes(mask, self.grid.affine), name="selection.nii", colormap="red",
                               cal_min=0.5, cal_max=1.0, opacity=0.9))  # fmt: skip
            centroid = self.dense.flat_centres_mm[self.selected].mean(axis=0)
            self.nv.scene.crosshair_pos = [float(v) for v in np.clip(self.grid.mm_to_frac(centroid), 0, 1)]
        self.nv.volumes = vols
        self.status.value = f"{self.selected.size} grid points selected ({int(mask.sum())} voxels painted red)"
        return mask

    def on_location(self, event: Mapping[str, Any]) -> np.ndarray:
        """Handle a click in the image: mark the clicked patch and its latent neighbours in the scatter."""
        point_mm = self.grid.frac_to_mm(np.asarray(event["frac"], dtype=np.float64).reshape(3))
        index, neighbours = latent_neighbours(self.dense, point_mm, k=self.n_neighbours,
                                              candidates=self.table["index"].to_numpy())  # fmt: skip
        rows = [self._row_of[int(g)] for g in neighbours]
        with self.fig.batch_update():
            self.fig.data[1].x, self.fig.data[1].y = self.coords[rows, 0], self.coords[rows, 1]
            if index in self._row_of:
                r = self._row_of[index]
                self.fig.data[2].x, self.fig.data[2].y = [self.coords[r, 0]], [self.coords[r, 1]]
            else:  # a background patch that the scatter does not show
                self.fig.data[2].x, self.fig.data[2].y = [], []
        mm = self.dense.flat_centres_mm[index]
        self.status.value = (f"<span class='medssl-scatter-status'>clicked patch at ({mm[0]:.0f}, {mm[1]:.0f}, "
                             f"{mm[2]:.0f}) mm: its {len(rows)} nearest latent neighbours are ringed in the scatter</span>")
        return neighbours

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
