"""Click-to-query logic of the linked viewers: NiiVue's frac convention, the A -> B match, brushing."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medssl.data.volume import Volume
from medssl.evaluate.dense import dense_embeddings
from medssl.geometry import vox_to_world, world_to_vox
from medssl.viz.query import (
    LatentPointQuery,
    NiiVueGrid,
    body_masked_rgba,
    grid_point_table,
    latent_neighbours,
    nifti_bytes,
    selection_mask,
)
from tests.helpers import centre_channels, coordinate_volume, oblique_affine

AFFINE_A = oblique_affine((1.5, 2.5, 3.5), (15.0, -10.0, 20.0), (-30.0, 12.0, 40.0))
AFFINE_B = oblique_affine((2.0, 1.2, 3.0), (-5.0, 25.0, -15.0), (10.0, -20.0, -5.0), flip_axes=(0, 1))


# ----------------------------------------------------------------------------- NiiVue grid


def test_niivue_frac_of_voxel_centres_spans_the_ras_grid_with_half_voxel_margins():
    shape = (10, 8, 6)
    grid = NiiVueGrid(np.diag([2.0, 3.0, 4.0, 1.0]), shape)
    np.testing.assert_allclose(grid.vox_to_frac([0, 0, 0]), [0.05, 1 / 16, 1 / 12])
    np.testing.assert_allclose(grid.vox_to_frac([9, 7, 5]), [0.95, 15 / 16, 11 / 12])


def test_niivue_frac_runs_along_world_axes_for_flipped_and_permuted_arrays():
    # array axis 0 runs towards -y (posterior), axis 1 towards +x, axis 2 towards -z
    affine = np.array([[0.0, 2.0, 0.0, 0.0], [-3.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.5, 0.0], [0, 0, 0, 1.0]])
    shape = (10, 20, 30)
    grid = NiiVueGrid(affine, shape)
    f0 = grid.vox_to_frac([0, 0, 0])
    # voxel (0, 0, 0) is the most anterior (max y), leftmost (min x), most superior (max z) voxel
    np.testing.assert_allclose(f0, [0.5 / 20, 1 - 0.5 / 10, 1 - 0.5 / 30])
    # frac increases with world x, y, z
    step = grid.mm_to_frac(np.array([1.0, 1.0, 1.0])) - grid.mm_to_frac(np.zeros(3))
    assert np.all(step > 0)


@pytest.mark.parametrize("affine", [AFFINE_A, AFFINE_B], ids=["oblique", "oblique-lps"])
def test_niivue_frac_mm_and_voxel_round_trip_on_oblique_anisotropic_grids(affine):
    grid = NiiVueGrid(affine, (12, 9, 7))
    vox = np.array([[0.0, 0.0, 0.0], [11.0, 8.0, 6.0], [3.25, 4.5, 2.0]])
    frac = grid.vox_to_frac(vox)
    assert np.all((frac > 0) & (frac < 1))
    np.testing.assert_allclose(grid.frac_to_vox(frac), vox, atol=1e-9)
    np.testing.assert_allclose(grid.frac_to_mm(frac), vox_to_world(affine, vox), atol=1e-9)
    np.testing.assert_allclose(grid.mm_to_frac(vox_to_world(affine, vox)), frac, atol=1e-12)


def test_niivue_grid_from_nifti_uses_the_stored_affine(tmp_path):
    path = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), np.float32), AFFINE_A), str(path))
    grid = NiiVueGrid.from_nifti(path)
    assert grid.shape_vox == (5, 6, 7)
    np.testing.assert_allclose(grid.affine, AFFINE_A, atol=1e-5)


# ----------------------------------------------------------------------------- click -> match


def _shifted_pair(shift_vox, shape=(14, 12, 10)):
    """A has unique per-voxel embeddings (A's world mm); B holds A's voxel v at voxel v + shift, on another grid."""
    a = coordinate_volume("a", shape, AFFINE_A)
    data_b = np.full_like(a.data, -1e4)  # far from every A embedding outside the overlap
    s = np.asarray(shift_vox)
    src = tuple(slice(max(0, -k), n - max(0, k)) for k, n in zip(s, shape))
    dst = tuple(slice(max(0, k), n - max(0, -k)) for k, n in zip(s, shape))
    data_b[(slice(None), *dst)] = a.data[(slice(None), *src)]
    b = Volume(data_b, AFFINE_B, "b")
    return a, b


def test_a_click_on_a_known_voxel_of_a_moves_b_to_the_shifted_voxel_with_zero_error():
    shift = np.array([3, -2, 1])
    a, b = _shifted_pair(shift)
    m = centre_channels()
    dense_a = dense_embeddings(m, a, stride_vox=1, progress=False)
    dense_b = dense_embeddings(m, b, stride_vox=1, progress=False)

    def truth(points_mm_a):  # A's world point -> the same content's world point in B
        return vox_to_world(AFFINE_B, world_to_vox(AFFINE_A, points_mm_a) + shift)

    grid_a, grid_b = NiiVueGrid(AFFINE_A, a.shape_vox), NiiVueGrid(AFFINE_B, b.shape_vox)
    query = LatentPointQuery(dense_a, dense_b, grid_a, grid_b, true_map_fn=truth)
    for vox_a in ([5, 6, 4], [2, 9, 3], [8, 3, 6]):
        click = grid_a.vox_to_frac(np.array(vox_a, dtype=float))  # what NiiVue reports for that voxel
        match = query.from_frac(click)
        np.testing.assert_allclose(match.query_vox_a, vox_a, atol=1e-9)
        np.testing.assert_allclose(match.matched_vox_b, np.array(vox_a) + shift, atol=1e-6)
        np.testing.assert_allclose(match.frac_b, grid_b.vox_to_frac(np.array(vox_a) + shift), atol=1e-9)
        assert match.latent_distance == pytest.approx(0.0, abs=1e-3)
        assert match.error_mm == pytest.approx(0.0, abs=1e-4)
        assert "error 0.0 mm" in match.summary("a", "b")


def test_a_click_between_grid_points_queries_the_nearest_patch_and_reports_the_true_error():
    shift = np.array([2, 2, -2])
    a, b = _shifted_pair(shift, shape=(16, 14, 12))
    m = centre_channels()
    dense_a = dense_embeddings(m, a, stride_vox=2, progress=False)
    dense_b = dense_embeddings(m, b, stride_vox=2, progress=False)
    truth = lambda p: vox_to_world(AFFINE_B, world_to_vox(AFFINE_A, p) + shift)  # noqa: E731
    query = LatentPointQuery(dense_a, dense_b, NiiVueGrid(AFFINE_A, a.shape_vox), NiiVueGrid(AFFINE_B, b.shape_vox),
                             true_map_fn=truth)  # fmt: skip
    click_vox = np.array([7.4, 6.6, 5.2])
    match = query.from_vox(click_vox)
    patch_vox = world_to_vox(AFFINE_A, match.patch_mm_a)[0]
    assert np.all(np.abs(patch_vox - click_vox) <= 1.0 + 1e-9)  # the nearest grid centre (stride 2)
    np.testing.assert_allclose(match.matched_vox_b, patch_vox + shift, atol=1e-6)
    # the error is measured against the truth of the *clicked* point, not of the patch centre
    expected = np.linalg.norm(match.matched_mm_b - truth(vox_to_world(AFFINE_A, click_vox))[0])
    assert match.error_mm == pytest.approx(expected)
    assert match.error_mm > 0


def test_query_without_truth_leaves_the_error_unknown_and_rejects_mixed_methods():
    a, b = _shifted_pair(np.array([1, 0, 0]))
    m = centre_channels()
    da, db = dense_embeddings(m, a, stride_vox=2, progress=False), dense_embeddings(m, b, stride_vox=2, progress=False)
    g = NiiVueGrid(AFFINE_A, a.shape_vox)
    match = LatentPointQuery(da, db, g, NiiVueGrid(AFFINE_B, b.shape_vox)).from_vox([4, 4, 4])
    assert match.true_mm_b is None and match.error_mm is None and "true point" not in match.summary()
    assert set(match.as_dict()) >= {"query_mm_a", "matched_mm_b", "latent_distance", "error_mm"}
    wider = db.__class__(**{**db.__dict__, "embeddings": np.concatenate([db.embeddings, db.embeddings], -1)})
    with pytest.raises(ValueError, match="different methods"):
        LatentPointQuery(da, wider, g, g)


# ----------------------------------------------------------------------------- brushing


def test_latent_neighbours_of_a_clicked_point_are_its_nearest_embeddings_not_itself():
    vol = coordinate_volume("c", (10, 9, 8), AFFINE_A)
    dense = dense_embeddings(centre_channels(), vol, stride_vox=1, progress=False)
    click_mm = vox_to_world(AFFINE_A, [4.2, 4.0, 3.9])[0]
    index, neighbours = latent_neighbours(dense, click_mm, k=6)
    np.testing.assert_allclose(dense.flat_centres_mm[index], vox_to_world(AFFINE_A, [4, 4, 4])[0])
    assert index not in neighbours and len(neighbours) == 6
    # embeddings are world mm, so latent neighbours are the spatially nearest voxels: the two
    # neighbours along the finest axis (1.5 mm) come first
    d = np.linalg.norm(dense.flat_centres_mm[neighbours] - dense.flat_centres_mm[index], axis=1)
    assert np.all(np.diff(d) >= -1e-9) and d[0] == pytest.approx(1.5, rel=1e-5)
    _, only = latent_neighbours(dense, click_mm, k=3, candidates=np.array([0, 1, 2, index]))
    assert sorted(only.tolist()) == [0, 1, 2]


def test_selection_mask_marks_the_blocks_of_the_selected_grid_points_on_the_image_grid():
    vol = coordinate_volume("c", (12, 10, 9), AFFINE_A)
    dense = dense_embeddings(centre_channels(), vol, stride_vox=3, progress=False)
    g = np.ravel_multi_index((1, 2, 0), dense.grid_shape)
    mask = selection_mask(dense, [g])
    assert mask.shape == vol.shape_vox and mask.dtype == np.uint8
    centre = np.rint(dense.centres_vox[1, 2, 0]).astype(int)
    assert mask[tuple(centre)] == 1
    on = np.argwhere(mask)
    # every marked voxel is nearer to that grid point than to any other
    assert np.all(np.abs(on - dense.centres_vox[1, 2, 0]) <= 1.5 + 1e-9)
    assert 1 <= len(on) <= 27
    assert selection_mask(dense, []).sum() == 0
    with pytest.raises(IndexError):
        selection_mask(dense, [10_000])


def test_nifti_bytes_round_trip_keeps_the_affine_and_voxels():
    arr = (np.arange(60).reshape(3, 4, 5) % 2).astype(np.uint8)
    img = nib.Nifti1Image.from_bytes(nifti_bytes(arr, AFFINE_B))
    np.testing.assert_array_equal(np.asarray(img.dataobj), arr)
    np.testing.assert_allclose(img.affine, AFFINE_B, atol=1e-5)


def test_grid_point_table_names_the_organ_at_each_patch_centre():
    vol = coordinate_volume("c", (12, 10, 8), AFFINE_A)
    label = np.zeros(vol.shape_vox, np.int16)
    label[6:, :, :] = 5
    label[:3, :, :] = 9
    dense = dense_embeddings(centre_channels(), vol, stride_vox=2, progress=False)
    table = grid_point_table(dense, label, {5: "liver"}, foreground_only=False)
    assert len(table) == dense.flat_embeddings.shape[0]
    i_vox = np.rint(dense.centres_vox.reshape(-1, 3)[table["index"], 0])
    assert set(table.loc[i_vox >= 6, "organ"]) == {"liver"}
    assert set(table.loc[i_vox < 3, "organ"]) == {"label 9"}
    assert set(table.loc[(i_vox >= 3) & (i_vox < 6), "organ"]) == {"background"}
    np.testing.assert_allclose(table[["x_mm", "y_mm", "z_mm"]].to_numpy(), dense.flat_centres_mm[table["index"]])
    assert set(grid_point_table(dense)["organ"]) == {"unknown"}
    with pytest.raises(ValueError, match="differs from the image grid"):
        grid_point_table(dense, label[:-1])


def test_body_masked_rgba_is_opaque_inside_the_body_and_transparent_in_air():
    image = np.full((8, 7, 6), -1.0, np.float32)  # air
    image[2:6, 2:5, 1:5] = 0.5  # body
    rgb = np.random.default_rng(0).random((8, 7, 6, 3))
    rgba = body_masked_rgba(rgb, image)
    assert rgba.dtype.names == ("R", "G", "B", "A")
    assert np.all(rgba["A"][image > 0] == 255) and np.all(rgba["A"][image < 0] == 0)
    np.testing.assert_array_equal(rgba["G"], np.round(rgb[..., 1] * 255).astype(np.uint8))
    assert nib.Nifti1Image.from_bytes(nifti_bytes(rgba, AFFINE_A)).header["datatype"] == 2304  # NIfTI RGBA32
    assert np.all(body_masked_rgba(rgb, image, threshold=-2.0)["A"] == 255)
    with pytest.raises(ValueError, match="does not match the image grid"):
        body_masked_rgba(rgb[:-1], image)
