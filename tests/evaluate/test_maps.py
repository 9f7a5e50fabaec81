"""Latent coordinate maps: right affine, right colour at the right voxel, point queries."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medssl.data.io import write_nifti
from medssl.evaluate.dense import dense_embeddings
from medssl.evaluate.maps import (
    fit_latent_rgb,
    latent_map,
    load_latent_map,
    point_query,
    save_latent_map,
    upsample_to_image,
)
from medssl.geometry import vox_to_world, world_to_vox
from tests.helpers import centre_channels, coordinate_volume, oblique_affine

CentreChannels = centre_channels  # embedding = the channels of a 1-voxel patch


def world_volume(case_id, shape, affine, channels=("x", "y", "z")):
    """Channels = world mm of each voxel (chosen axes; ``0`` for a zero channel)."""
    return coordinate_volume(case_id, shape, affine, "".join(channels))


def centred(affine, shape, centre_mm):
    """``affine`` shifted so the grid's middle voxel sits at ``centre_mm``."""
    out = affine.copy()
    out[:3, 3] += np.asarray(centre_mm) - vox_to_world(affine, (np.asarray(shape) - 1) / 2.0)[0]
    return out


TRAIN_AFFINE = centred(oblique_affine((2.0, 2.5, 3.0), (10.0, -20.0, 30.0)), (20, 18, 16), (3.0, -2.0, 1.0))
TEST_AFFINE = centred(oblique_affine((1.5, 3.5, 2.0), (-15.0, 25.0, 5.0)), (21, 13, 17), (-2.0, 1.0, 2.0))


def test_a_latent_map_has_its_image_affine_and_the_colour_of_pc1_equal_to_x_mm_at_a_world_point(tmp_path):
    # Embedding (x_mm, 0, 0): PC1 is x mm, PCs 2-3 carry nothing.
    train = world_volume("train", (20, 18, 16), TRAIN_AFFINE, ("x", "0", "0"))
    test = world_volume("test", (21, 13, 17), TEST_AFFINE, ("x", "0", "0"))
    m = CentreChannels()
    d_train = dense_embeddings(m, train, stride_vox=3, progress=False)
    d_test = dense_embeddings(m, test, stride_vox=(4, 3, 5), progress=False)
    frame = fit_latent_rgb([d_train], percentiles=(5.0, 95.0))
    # the robust scaling comes from the TRAINING subject's foreground grid x mm
    x_train = d_train.flat_centres_mm[d_train.flat_foreground, 0]
    lo, hi = np.percentile(x_train, [5.0, 95.0])

    lmap = latent_map(d_test, frame, method="probe")
    path = save_latent_map(tmp_path / "maps" / "test_probe.nii.gz", lmap, test)
    img = nib.load(path)
    assert img.shape == test.shape_vox
    # NIfTI-1 stores the affine in float32: equal to the image's own NIfTI affine, bit for bit.
    image_file = write_nifti(tmp_path / "test_image.nii.gz", test.data[0], test.affine)
    np.testing.assert_array_equal(img.affine, nib.load(image_file).affine)
    np.testing.assert_allclose(img.affine, test.affine, rtol=1e-6, atol=1e-5)
    assert sorted(p.name for p in path.parent.iterdir()) == ["test_probe.nii.gz"]  # no temp file left

    loaded = load_latent_map(path)
    # A voxel between grid points (trilinear upsampling of a linear field is exact inside the grid).
    v = np.array([9, 5, 8])
    point_mm = TEST_AFFINE[:3, :3] @ v + TEST_AFFINE[:3, 3]
    assert not np.any(np.all(np.isclose(d_test.centres_vox, v), axis=-1))  # really off-grid
    found = np.rint(world_to_vox(loaded.affine, point_mm)[0]).astype(int)
    np.testing.assert_array_equal(found, v)
    expected_r = np.clip((point_mm[0] - lo) / (hi - lo), 0, 1)
    assert 0.05 < expected_r < 0.95
    assert loaded.rgb[tuple(found)][0] == pytest.approx(expected_r, abs=1.0 / 255 + 1e-6)
    assert np.all(loaded.rgb[..., 1:] == loaded.rgb[0, 0, 0, 1:])  # PCs 2-3 constant


def test_pc_signs_follow_the_axes_so_colours_point_the_same_way_for_every_method():
    train = world_volume("train", (20, 18, 16), TRAIN_AFFINE)
    d = dense_embeddings(CentreChannels(), train, stride_vox=2, progress=False)
    flipped = d.embeddings * -1.0  # the same latent space, mirrored
    f1 = fit_latent_rgb([d])
    f2 = fit_latent_rgb(flipped.reshape(-1, 3), centres_mm=d.flat_centres_mm)
    np.testing.assert_allclose(f1.to_rgb(d.flat_embeddings), f2.to_rgb(flipped.reshape(-1, 3)), atol=1e-5)
    s = f1.scores(d.flat_embeddings)
    for k in range(3):
        corr = [np.corrcoef(s[:, k], d.flat_centres_mm[:, a])[0, 1] for a in range(3)]
        assert corr[int(np.argmax(np.abs(corr)))] > 0


def test_upsampling_puts_each_grid_value_on_its_patch_centre_voxel():
    vol = world_volume("v", (13, 11, 9), TEST_AFFINE)
    d = dense_embeddings(CentreChannels(), vol, stride_vox=(3, 2, 4), progress=False)
    values = np.random.default_rng(0).uniform(size=(*d.grid_shape, 2))
    up = upsample_to_image(values, d)
    assert up.shape == (13, 11, 9, 2)
    idx = np.rint(d.centres_vox).astype(int).reshape(-1, 3)
    np.testing.assert_allclose(up[idx[:, 0], idx[:, 1], idx[:, 2]], values.reshape(-1, 2), atol=1e-6)


def test_save_latent_map_refuses_a_map_on_another_grid_and_names_the_file(tmp_path):
    vol = world_volume("v", (6, 5, 4), TEST_AFFINE)
    with pytest.raises(ValueError, match="bad.nii.gz.*expected"):
        save_latent_map(tmp_path / "bad.nii.gz", np.zeros((6, 5, 3, 3)), vol)
    assert list(tmp_path.iterdir()) == []


def test_point_query_returns_the_b_grid_point_whose_embedding_matches_the_a_point():
    # Both subjects embed world mm, in one world frame: the match is the B grid
    # point nearest (in mm) to A's grid point nearest the query.
    a = world_volume("a", (20, 18, 16), TRAIN_AFFINE)
    b = world_volume("b", (21, 13, 17), TEST_AFFINE)
    m = CentreChannels()
    da = dense_embeddings(m, a, stride_vox=2, progress=False)
    db = dense_embeddings(m, b, stride_vox=3, progress=False)
    queries = np.array([[-5.0, 0.0, 3.0], [2.0, -4.0, 6.0]])
    got = point_query(da, db, queries)
    for q, g in zip(queries, got):
        a_pt = da.flat_centres_mm[np.argmin(np.linalg.norm(da.flat_centres_mm - q, axis=1))]
        b_pt = db.flat_centres_mm[np.argmin(np.linalg.norm(db.flat_centres_mm - a_pt, axis=1))]
        np.testing.assert_allclose(g, b_pt)
    assert point_query(da, db, queries[0]).shape == (3,)


def test_point_query_on_rgb_maps_lands_where_the_colour_matches():
    a = world_volume("a", (20, 18, 16), TRAIN_AFFINE)
    b = world_volume("b", (21, 13, 17), TEST_AFFINE)
    m = CentreChannels()
    da, db = (dense_embeddings(m, v, stride_vox=2, progress=False) for v in (a, b))
    frame = fit_latent_rgb([da], percentiles=(0.0, 100.0))
    ma, mb = latent_map(da, frame), latent_map(db, frame)
    q = np.array([1.0, 0.0, 1.5])  # inside both subjects
    got = point_query(ma, mb, q)
    assert np.all(np.abs(world_to_vox(TRAIN_AFFINE, q) - 9) < 6) and np.all(
        np.abs(world_to_vox(TEST_AFFINE, q) - 8) < 5
    )
    # colours are world positions (8-bit), so the match is within about a voxel of the same point
    assert np.linalg.norm(got - q) < 4.0
    with pytest.raises(TypeError):
        point_query(da, mb, q)


def test_latent_maps_of_even_sized_patches_put_a_known_point_in_the_right_voxel():
    """An even patch's centre is half a voxel off its anchor; the map must still land on the right voxel."""
    import torch
    from torch import nn

    class MeanCoordinates(nn.Module):  # embedding = world mm of the patch's geometric centre
        patch_size_vox = (4, 4, 4)

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def embed(self, x):
            return x.mean(dim=(2, 3, 4)) * self.w

    affine = oblique_affine((1.2, 2.0, 2.7), (15.0, -10.0, 25.0), (4.0, -7.0, 3.0))
    vol = world_volume("even", (22, 18, 16), affine)
    d = dense_embeddings(MeanCoordinates(), vol, stride_vox=2, progress=False)
    up = upsample_to_image(d.embeddings, d)  # (X, Y, Z, 3) world mm the map claims for every voxel
    inner = (slice(4, -4),) * 3  # away from the padded border
    truth = np.moveaxis(vol.data, 0, -1)
    np.testing.assert_allclose(up[inner], truth[inner], atol=1e-3)  # off by 1/2 voxel would be ~0.6-1.4 mm
