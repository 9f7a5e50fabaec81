"""Viewers and figures: niivue widget with overlays, point query widget, plotly 3D, itk refusal."""

from __future__ import annotations

import importlib.util

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import plotly.io as pio
import pytest

from medssl.data.io import write_nifti
from medssl.evaluate.dense import dense_embeddings
from medssl.evaluate.maps import fit_latent_rgb, latent_map, save_latent_map
from medssl.geometry import vox_to_world
from medssl.viz import viewers
from medssl.viz.map_figures import (
    correspondence_figure,
    latent_map_scatter3d,
    plot_correspondence_errors,
    plot_latent_map_slices,
    plot_point_query,
)
from tests.helpers import centre_channels, coordinate_volume, oblique_affine

AFFINE = oblique_affine((2.0, 3.0, 2.5), (15.0, -10.0, 20.0), (-10.0, 5.0, -20.0))


CentreChannels = centre_channels  # embedding = the channels of a 1-voxel patch


def _volume(case_id="s", shape=(12, 10, 8)):
    return coordinate_volume(case_id, shape, AFFINE)


@pytest.fixture
def maps_on_disk(tmp_path):
    vol = _volume()
    dense = dense_embeddings(CentreChannels(), vol, stride_vox=2, progress=False)
    frame = fit_latent_rgb([dense])
    image = write_nifti(tmp_path / "image.nii.gz", vol.data[0], vol.affine)
    lmap = latent_map(dense, frame)
    a = save_latent_map(tmp_path / "isimed.nii.gz", lmap, vol)
    b = save_latent_map(tmp_path / "simclr.nii.gz", 1.0 - lmap.rgb, vol)
    return vol, dense, frame, lmap, image, {"isimed": a, "simclr": b}


def test_niivue_viewer_builds_a_widget_with_the_overlay_and_live_opacity_and_method_controls(maps_on_disk):
    from ipyniivue import NiiVue

    *_, image, overlays = maps_on_disk
    box = viewers.niivue_viewer(image, overlays, opacity=0.3)
    nv = box.children[-1]
    dropdown, slider = box.children[0].children
    assert isinstance(nv, NiiVue)
    assert [v.name for v in nv.volumes] == ["image.nii.gz", "isimed.nii.gz"]
    assert nv.volumes[1].opacity == pytest.approx(0.3)
    assert nv.volumes[0].colormap == "gray"
    slider.value = 0.8
    assert nv.volumes[1].opacity == pytest.approx(0.8)
    dropdown.value = "simclr"
    assert [v.name for v in nv.volumes] == ["image.nii.gz", "simclr.nii.gz"]
    assert nv.volumes[1].opacity == pytest.approx(0.8)  # the chosen opacity survives the switch


def test_niivue_viewer_names_a_missing_overlay_file(maps_on_disk, tmp_path):
    *_, image, _ = maps_on_disk
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        viewers.niivue_viewer(image, tmp_path / "nope.nii.gz")


def test_itk_viewer_refuses_when_medssl_headless_is_set(monkeypatch, maps_on_disk):
    *_, image, overlays = maps_on_disk
    monkeypatch.setenv("MEDSSL_HEADLESS", "1")
    with pytest.raises(viewers.ViewerUnavailableError, match="MEDSSL_HEADLESS"):
        viewers.itk_viewer(image, overlays["isimed"])


def _fake_process_tree(monkeypatch, cmdlines):
    """Pretend this process is pid 100, its parent 101, ... with the given command lines."""
    monkeypatch.delenv("MEDSSL_HEADLESS", raising=False)
    monkeypatch.setattr(viewers.os, "getpid", lambda: 100)
    monkeypatch.setattr(viewers, "_cmdline", lambda pid: cmdlines[pid - 100] if pid - 100 < len(cmdlines) else "")
    monkeypatch.setattr(viewers, "_parent_pid", lambda pid: pid + 1 if pid + 1 - 100 < len(cmdlines) else None)
    monkeypatch.setattr(
        viewers.sys, "argv", ["/venv/lib/python3.11/site-packages/ipykernel_launcher.py", "-f", "k.json"]
    )


def test_itk_viewer_refuses_in_a_kernel_started_by_papermill(monkeypatch, maps_on_disk):
    *_, image, _ = maps_on_disk
    _fake_process_tree(
        monkeypatch,
        ["python -m ipykernel_launcher -f k.json", "/venv/bin/python /venv/bin/papermill in.ipynb out.ipynb"],
    )
    assert viewers.is_headless()
    with pytest.raises(viewers.ViewerUnavailableError, match="papermill"):
        viewers.itk_viewer(image)


def test_a_kernel_under_jupyterlab_is_not_headless_even_if_lab_was_started_by_pytest(monkeypatch):
    _fake_process_tree(
        monkeypatch,
        ["python -m ipykernel_launcher -f k.json", "/venv/bin/python /venv/bin/jupyter-lab", "python -m pytest"],
    )
    assert not viewers.is_headless()


@pytest.mark.skipif(importlib.util.find_spec("itkwidgets") is not None, reason="itkwidgets is installed here")
def test_itk_viewer_says_itkwidgets_is_missing_in_an_interactive_session(monkeypatch, maps_on_disk):
    *_, image, _ = maps_on_disk
    _fake_process_tree(
        monkeypatch, ["python -m ipykernel_launcher -f k.json", "/venv/bin/python /venv/bin/jupyter-lab"]
    )
    with pytest.raises(viewers.ViewerUnavailableError, match="not installed"):
        viewers.itk_viewer(image)


def test_latent_map_viewer_falls_back_from_itk_to_niivue_headless(monkeypatch, maps_on_disk, capsys):
    *_, image, overlays = maps_on_disk
    monkeypatch.setenv("MEDSSL_HEADLESS", "1")
    box = viewers.latent_map_viewer("itk", image, overlays)
    assert type(box.children[-1]).__name__ == "NiiVue"
    assert "Falling back to niivue" in capsys.readouterr().out
    with pytest.raises(ValueError, match="backend"):
        viewers.latent_map_viewer("k3d", image, overlays)


def test_point_query_widget_shows_the_matched_point_for_the_slider_voxel(maps_on_disk):
    from medssl.evaluate.maps import point_query

    vol, dense, *_ = maps_on_disk
    calls = []

    def query(p):
        calls.append(p)
        return point_query(dense, dense, p)

    box = viewers.point_query_widget(vol, vol, query, true_map_fn=lambda p: p)
    sliders = box.children[0].children
    sliders[0].value = 3
    expected_a = vox_to_world(AFFINE, [3, sliders[1].value, sliders[2].value])[0]
    np.testing.assert_allclose(calls[-1], expected_a)
    assert f"A ({expected_a[0]:.1f}, {expected_a[1]:.1f}, {expected_a[2]:.1f}) mm" in box.children[1].value
    assert "true point error" in box.children[1].value
    assert box.children[2].value[:8] == b"\x89PNG\r\n\x1a\n"  # the slice figure was drawn


def test_plotly_views_carry_every_foreground_point_in_its_map_colour_and_export_to_html(maps_on_disk):
    _vol, dense, frame, *_ = maps_on_disk
    fig = latent_map_scatter3d(dense, frame)
    tr = fig.data[0]
    assert len(tr.x) == int(dense.flat_foreground.sum())
    first = np.flatnonzero(dense.flat_foreground)[0]
    r, g, b = np.round(frame.to_rgb(dense.flat_embeddings[first]) * 255).astype(int)
    assert tr.marker.color[0] == f"rgb({r},{g},{b})"
    assert tr.x[0] == pytest.approx(dense.flat_centres_mm[first, 0])
    assert "scatter3d" in pio.to_html(fig, include_plotlyjs=False)


def test_correspondence_figure_draws_truth_and_one_trace_per_method():
    rng = np.random.default_rng(0)
    rows = []
    for m in ["isimed", "chance"]:
        for p in range(5):
            rows.append(
                {
                    "method": m,
                    "case_a": "a",
                    "case_b": "b",
                    "point": p,
                    "error_mm": float(p),
                    **{f"{w}_{ax}_mm": rng.normal() for w in ("query", "true", "pred") for ax in "xyz"},
                }
            )
    df = pd.DataFrame(rows)
    fig = correspondence_figure(df)
    assert len(fig.data) == 3
    assert fig.data[1].name.startswith("isimed (median 2.0 mm)")
    assert len(fig.data[1].x) == 15  # pred, true, gap per point
    assert plot_correspondence_errors(df).axes[0].get_ylabel() == "correspondence error (mm)"
    with pytest.raises(ValueError, match="no correspondence points"):
        correspondence_figure(df, "a", "zzz")


def test_static_slice_figures_render_with_the_map_overlaid(maps_on_disk):
    import matplotlib.pyplot as plt

    vol, _, _, lmap, *_ = maps_on_disk
    fig = plot_latent_map_slices(vol, lmap, point_mm=vox_to_world(AFFINE, [4, 5, 3])[0])
    assert len(fig.axes) == 3 and all(len(ax.images) == 2 for ax in fig.axes)
    assert "= 4" in fig.axes[0].get_title()
    fig2 = plot_point_query(
        vol, vol, vox_to_world(AFFINE, [1, 1, 1])[0], vox_to_world(AFFINE, [2, 2, 2])[0], lmap, lmap
    )
    assert len(fig2.axes) == 6
    plt.close("all")
