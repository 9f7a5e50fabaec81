"""Linked viewers, wired headlessly: the handlers NiiVue calls on a click do the right thing."""

from __future__ import annotations

import numpy as np
import pytest

from medssl.data.io import write_nifti
from medssl.data.volume import Volume
from medssl.evaluate.dense import dense_embeddings
from medssl.evaluate.maps import save_latent_map
from medssl.geometry import vox_to_world, world_to_vox
from medssl.viz.linked import (
    LatentScatterExplorer,
    LinkedQueryViews,
    latent_map_3d_viewer,
    latent_scatter_figure,
    run_latent_maps,
    set_view,
)
from medssl.viz.query import LatentPointQuery, NiiVueGrid, grid_point_table
from tests.helpers import centre_channels, coordinate_volume, oblique_affine

AFFINE_A = oblique_affine((2.0, 2.5, 3.0), (10.0, -15.0, 20.0), (-20.0, 10.0, 30.0))
AFFINE_B = oblique_affine((2.5, 2.0, 3.5), (-10.0, 5.0, -20.0), (15.0, -5.0, -10.0), flip_axes=(0, 1))


def _subject(tmp_path, name, volume):
    image = write_nifti(tmp_path / f"{name}_image.nii.gz", volume.data[0], volume.affine)
    rgb = (volume.data[:3].transpose(1, 2, 3, 0) - volume.data[:3].min()) / np.ptp(volume.data[:3])
    return image, save_latent_map(tmp_path / f"{name}_m.nii.gz", rgb, volume)


@pytest.fixture
def pair(tmp_path):
    shift = np.array([2, -1, 1])
    a = coordinate_volume("a", (14, 12, 10), AFFINE_A)
    data_b = np.full_like(a.data, -1e4)
    data_b[:, 2:, :-1, 1:] = a.data[:, :-2, 1:, :-1]  # B's voxel v + shift holds A's voxel v
    b = Volume(data_b, AFFINE_B, "b")
    m = centre_channels()
    da, db = (dense_embeddings(m, v, stride_vox=1, progress=False) for v in (a, b))
    truth = lambda p: vox_to_world(AFFINE_B, world_to_vox(AFFINE_A, p) + shift)  # noqa: E731
    image_a, map_a = _subject(tmp_path, "a", a)
    image_b, map_b = _subject(tmp_path, "b", b)
    query = LatentPointQuery(da, db, NiiVueGrid.from_nifti(image_a), NiiVueGrid.from_nifti(image_b), truth)
    return dict(a=a, b=b, da=da, db=db, shift=shift, image_a=image_a, image_b=image_b, map_a=map_a, map_b=map_b,
                query=query)  # fmt: skip


def test_a_click_event_in_view_a_moves_view_bs_crosshair_to_the_matched_voxel(pair):
    views = LinkedQueryViews(pair["image_a"], pair["image_b"], {"m": pair["map_a"]}, {"m": pair["map_b"]},
                             {"m": pair["query"]}, case_a="a", case_b="b")  # fmt: skip
    assert [len(views.nv_a.volumes), len(views.nv_b.volumes)] == [2, 2]  # image + map in each
    grid_a, grid_b = NiiVueGrid.from_nifti(pair["image_a"]), NiiVueGrid.from_nifti(pair["image_b"])
    vox_a = np.array([6.0, 5.0, 4.0])
    event = {"frac": grid_a.vox_to_frac(vox_a).tolist(), "mm": vox_to_world(AFFINE_A, vox_a)[0].tolist(), "vox": [6, 5, 4]}
    views.nv_a._event_handlers["location_change"](event)  # exactly what ipyniivue does on a click
    expected = grid_b.vox_to_frac(vox_a + pair["shift"])
    np.testing.assert_allclose(views.nv_b.scene.crosshair_pos, expected, atol=1e-6)
    assert views.last_match.error_mm == pytest.approx(0.0, abs=1e-3)
    assert "error <b>0.0 mm</b>" in views.status.value and "latent distance" in views.status.value


def test_linked_views_need_a_method_with_maps_of_both_subjects(pair):
    with pytest.raises(ValueError, match="no method has a query and maps of both subjects"):
        LinkedQueryViews(pair["image_a"], pair["image_b"], {"m": pair["map_a"]}, {"other": pair["map_b"]},
                         {"m": pair["query"]})  # fmt: skip


def test_3d_viewer_toggles_between_slices_render_and_both(pair):
    from ipyniivue import ShowRender, SliceType

    box = latent_map_3d_viewer(pair["image_a"], {"m": pair["map_a"]}, view="slices")
    nv = box.children[-1]
    assert nv.opts.slice_type == SliceType.MULTIPLANAR and nv.opts.multiplanar_show_render == ShowRender.NEVER
    toggle = box.children[0].children[0]
    toggle.value = "3D render"
    assert nv.opts.slice_type == SliceType.RENDER
    toggle.value = "slices + 3D"
    assert nv.opts.slice_type == SliceType.MULTIPLANAR and nv.opts.multiplanar_show_render == ShowRender.ALWAYS
    with pytest.raises(ValueError, match="view must be one of"):
        set_view(nv, "4D")
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        latent_map_3d_viewer(pair["image_a"], {"m": pair["image_a"].parent / "missing.nii.gz"})


def test_scatter_selection_paints_the_selected_patches_and_an_image_click_rings_latent_neighbours(pair):
    da = pair["da"]
    table = grid_point_table(da, foreground_only=False)
    ex = LatentScatterExplorer(da, table, pair["image_a"], pair["map_a"], max_points=500, n_neighbours=7, seed=1)
    assert len(ex.table) == 500 and ex.coords.shape == (500, 2)
    chosen = ex.table["index"].to_numpy()[:5]
    mask = ex.select(chosen)
    assert len(ex.nv.volumes) == 3 and ex.nv.volumes[2].name == "selection.nii"
    assert mask.sum() == 5  # stride 1: one voxel per grid point
    centroid = da.flat_centres_mm[chosen].mean(0)
    np.testing.assert_allclose(ex.nv.scene.crosshair_pos, ex.grid.mm_to_frac(centroid), atol=1e-9)
    ex.select([])
    assert len(ex.nv.volumes) == 2

    click_vox = np.array([7.0, 6.0, 5.0])
    neighbours = ex.on_location({"frac": ex.grid.vox_to_frac(click_vox).tolist()})
    assert len(neighbours) == 7 and len(ex.fig.data[1].x) == 7
    # embeddings are world mm: the ringed neighbours are the shown points nearest in space
    clicked_mm = vox_to_world(AFFINE_A, click_vox)[0]
    shown = ex.table["index"].to_numpy()
    d_all = np.sort(np.linalg.norm(da.flat_centres_mm[shown] - clicked_mm, axis=1))
    d_nb = np.linalg.norm(da.flat_centres_mm[neighbours] - clicked_mm, axis=1)
    np.testing.assert_allclose(np.sort(d_nb), d_all[d_all > 1e-6][:7], rtol=1e-6)
    ex.colour.value = "organ"
    assert ex.fig.data[0].marker.showscale is False


def test_static_scatter_figure_carries_grid_indices_for_export(pair):
    table = grid_point_table(pair["da"], foreground_only=False).head(50)
    fig = latent_scatter_figure(table, np.zeros((50, 2)), colour_by="x_mm")
    assert list(fig.data[0].customdata) == table["index"].tolist()
    with pytest.raises(ValueError, match="colour_by"):
        latent_scatter_figure(table, np.zeros((50, 2)), colour_by="w_mm")


def test_run_latent_maps_lists_trained_methods_with_maps(tmp_path):
    run = tmp_path / "r"
    maps = run / "20_latent_space" / "maps"
    maps.mkdir(parents=True)
    for case in ("c1", "c2"):
        (maps / f"{case}_image.nii.gz").write_bytes(b"")
        for m in ("isimed", "simclr", "random-init"):
            (maps / f"{case}_{m}.nii.gz").write_bytes(b"")
    for m in ("isimed", "barlowtwins"):  # barlowtwins is trained but has no maps
        (run / m / "checkpoints").mkdir(parents=True)
        (run / m / "checkpoints" / "last.pt").write_bytes(b"")
    found = run_latent_maps(run)
    assert sorted(set(found["method"])) == ["isimed"] and sorted(found["case_id"]) == ["c1", "c2"]
    chosen = run_latent_maps(run, ["simclr", "random-init"])
    assert list(dict.fromkeys(chosen["method"])) == ["simclr", "random-init"]
    with pytest.raises(FileNotFoundError, match="run 20_latent_space.ipynb"):
        run_latent_maps(run, ["barlowtwins"])
    with pytest.raises(FileNotFoundError, match="run 20_latent_space.ipynb first"):
        run_latent_maps(tmp_path / "empty")
