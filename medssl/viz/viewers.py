"""Interactive viewers for latent coordinate maps (JupyterLab 4, offline).

- :func:`niivue_viewer`: ipyniivue 2.4.4 (bundled JS, works offline): the image with
  the RGB latent map as an overlay, an opacity slider and a method dropdown.
- :func:`point_query_widget`: pick a point in subject A with sliders, see the
  matched point in subject B on orthogonal slices.
- :func:`itk_viewer`: optional itkwidgets backend. It loads from a CDN and its
  cell watcher blocks later cells until a browser answers, so it refuses to run
  headless (papermill, nbclient, pytest, ``MEDSSL_HEADLESS=1``) or when not installed.

Every builder returns a widget and never blocks a headless kernel; widgets don't
survive a static HTML export, so notebooks also show the static figures of
:mod:`medssl.viz.map_figures`.
"""

from __future__ import annotations

import importlib.util
import io
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ViewerUnavailableError",
    "is_headless",
    "itk_viewer",
    "latent_map_viewer",
    "niivue_viewer",
    "point_query_widget",
]

# Process names whose kernels have no live browser attached.
_HEADLESS_RUNNERS = ("papermill", "nbclient", "nbconvert", "nbmake", "pytest")
# Stop looking further up the process tree at a notebook server: its kernels have a browser.
_NOTEBOOK_SERVERS = ("jupyter-lab", "jupyter-notebook", "jupyter-server", "jupyter_server", "jupyterlab", "voila")


class ViewerUnavailableError(RuntimeError):
    """The requested viewer cannot run here (headless run, or the package is missing)."""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _headless_reason() -> str | None:
    if os.environ.get("MEDSSL_HEADLESS", "").strip().lower() in ("1", "true", "yes"):
        return "MEDSSL_HEADLESS is set"
    # (not `"papermill" in sys.modules`: importing papermill in a live kernel does not make it headless;
    # papermill-run kernels are found through the process tree or MEDSSL_HEADLESS, which medssl's pipeline sets)
    if any("papermill" in a for a in sys.argv):
        return "running under papermill"
    pid: int | None = os.getpid()
    for _ in range(6):  # this process (the kernel), its runner, and a few levels above
        if not pid or pid <= 1:
            break
        cmd = _cmdline(pid).lower()
        if any(s in cmd for s in _NOTEBOOK_SERVERS):
            return None
        runner = next((r for r in _HEADLESS_RUNNERS if r in cmd), None)
        if runner:
            return f"this kernel runs under {runner} (no browser attached)"
        pid = _parent_pid(pid)
    return None


def is_headless() -> bool:
    """True under papermill/nbclient/nbmake/pytest or when ``MEDSSL_HEADLESS=1``."""
    return _headless_reason() is not None


def _nv_volume(path: str | os.PathLike, **options: Any) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such NIfTI file for the viewer")
    return {"path": p, **options}


def niivue_viewer(
    image_path: str | os.PathLike,
    overlay_path: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None,
    opacity: float = 0.5,
    height: int = 420,
):
    """The image with a latent map overlay in ipyniivue, plus opacity and method controls.

    Args:
        image_path: the grey-scale image (NIfTI).
        overlay_path: one RGB map, or ``{method name: map path}`` (the dropdown
            switches between them), or None for the image alone.
        opacity: initial overlay opacity in ``[0, 1]``.
        height: canvas height in pixels.

    Returns:
        ``ipywidgets.VBox([controls, niivue])``; the NiiVue widget is its last child.
    """
    import ipywidgets as widgets
    from ipyniivue import NiiVue

    overlays = (
        {}
        if overlay_path is None
        else (
            {str(k): v for k, v in overlay_path.items()}
            if isinstance(overlay_path, Mapping)
            else {Path(overlay_path).stem: overlay_path}
        )
    )
    if not 0.0 <= float(opacity) <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    base = _nv_volume(image_path, colormap="gray")
    for p in overlays.values():
        _nv_volume(p)  # fail early, naming the missing file
    nv = NiiVue(height=height)
    slider = widgets.FloatSlider(
        value=float(opacity),
        min=0.0,
        max=1.0,
        step=0.05,
        description="overlay opacity",
        continuous_update=True,
        style={"description_width": "initial"},
    )
    dropdown = widgets.Dropdown(options=list(overlays), description="method", disabled=len(overlays) < 2)

    def _load(name: str | None) -> None:
        vols = [base]
        if name is not None:
            vols.append(_nv_volume(overlays[name], opacity=float(slider.value), name=Path(overlays[name]).name))
        nv.load_volumes(vols)

    def _on_opacity(change: dict) -> None:
        if len(nv.volumes) > 1:
            nv.volumes[1].opacity = float(change["new"])

    _load(next(iter(overlays), None))
    slider.observe(_on_opacity, names="value")
    dropdown.observe(lambda change: _load(change["new"]), names="value")
    controls = widgets.HBox([dropdown, slider]) if overlays else widgets.HBox([])
    return widgets.VBox([controls, nv])


def point_query_widget(
    volume_a,
    volume_b,
    query: Callable[[np.ndarray], np.ndarray],
    map_a=None,
    map_b=None,
    true_map_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    start_mm: np.ndarray | None = None,
):
    """Sliders pick a voxel of subject A; orthogonal slices show the matched point in B.

    Args:
        volume_a, volume_b: the two subjects (:class:`medssl.data.volume.Volume`).
        query: ``point_mm_a (3,) -> point_mm_b (3,)``, e.g.
            ``functools.partial(medssl.evaluate.maps.point_query, dense_a, dense_b)``.
        map_a, map_b: optional :class:`~medssl.evaluate.maps.LatentMap` overlays.
        true_map_fn: optional true correspondence ``(N, 3) -> (N, 3)``; then the true
            point is drawn too and the error in mm is printed.
        start_mm: initial query point (default: the centre of A).

    Returns:
        ``ipywidgets.VBox``; sliders are ``continuous_update=False`` so each release
        redraws once.
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from medssl.geometry import vox_to_world, world_to_vox
    from medssl.viz.map_figures import plot_point_query

    shape = volume_a.shape_vox
    start = (
        np.asarray(shape) // 2
        if start_mm is None
        else np.clip(np.rint(world_to_vox(volume_a.affine, start_mm)[0]), 0, np.asarray(shape) - 1).astype(int)
    )
    sliders = [
        widgets.IntSlider(
            value=int(start[a]), min=0, max=shape[a] - 1, description=f"A voxel {'ijk'[a]}", continuous_update=False
        )
        for a in range(3)
    ]
    label = widgets.HTML()
    # A PNG in an Image widget rather than an Output capture: it updates the same way
    # in any kernel (and outside one), with no flicker from clear_output.
    picture = widgets.Image(format="png")

    def _render(_=None) -> None:
        ijk = np.array([s.value for s in sliders], dtype=float)
        point_a = vox_to_world(volume_a.affine, ijk)[0]
        point_b = np.asarray(query(point_a), dtype=float).reshape(3)
        truth = None if true_map_fn is None else np.asarray(true_map_fn(point_a[None]), float).reshape(3)
        a, b = (", ".join(f"{v:.1f}" for v in p[:3]) for p in (point_a, point_b))
        text = f"A ({a}) mm -> B ({b}) mm"
        if truth is not None:
            text += f"; true point error {np.linalg.norm(point_b - truth):.1f} mm"
        label.value = text
        fig = plot_point_query(volume_a, volume_b, point_a, point_b, map_a, map_b, truth)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        picture.value = buf.getvalue()

    for s in sliders:
        s.observe(_render, names="value")
    _render()
    return widgets.VBox([widgets.HBox(sliders), label, picture])


def itk_viewer(image_path: str | os.PathLike, overlay_path: str | os.PathLike | None = None):
    """Optional itkwidgets viewer of an image (and its latent map). Interactive sessions only.

    Raises:
        ViewerUnavailableError: when running headless (papermill, nbclient, nbmake,
            pytest, ``MEDSSL_HEADLESS=1``) -- itkwidgets' cell watcher would block
            every later cell until a browser answers -- or when itkwidgets is not
            installed (``pip install "itkwidgets[notebook]>=1.0a55" ngff-zarr==0.13.4``;
            it also needs network access to its CDN).
    """
    reason = _headless_reason()
    if reason:
        raise ViewerUnavailableError(
            f"itk viewer refused: {reason}; itkwidgets blocks headless kernels. Use niivue_viewer."
        )
    if importlib.util.find_spec("itkwidgets") is None:
        raise ViewerUnavailableError(
            'itk viewer unavailable: itkwidgets is not installed (optional: pip install "itkwidgets[notebook]>=1.0a55" '
            "ngff-zarr==0.13.4; it needs network access). Use niivue_viewer."
        )
    import itkwidgets  # lazily: heavy, optional, and never imported headless
    import nibabel as nib

    image = np.asanyarray(nib.load(str(image_path)).dataobj)
    kwargs: dict[str, Any] = {"image": image}
    if overlay_path is not None:
        from medssl.evaluate.maps import load_latent_map

        kwargs["image"] = (load_latent_map(overlay_path).rgb * 255).astype(np.uint8)
    return itkwidgets.view(**kwargs)


def latent_map_viewer(backend: str, image_path, overlay_path=None, opacity: float = 0.5):
    """``backend`` "niivue" or "itk"; "itk" falls back to niivue (saying why) when it can't run."""
    if backend == "itk":
        try:
            return itk_viewer(
                image_path, overlay_path if not isinstance(overlay_path, Mapping) else next(iter(overlay_path.values()))
            )
        except ViewerUnavailableError as err:
            print(f"{err} Falling back to niivue.")
    elif backend != "niivue":
        raise ValueError(f"viewer backend must be 'niivue' or 'itk', got {backend!r}")
    return niivue_viewer(image_path, overlay_path, opacity=opacity)
