"""Dense grid embeddings: geometry on oblique anisotropic grids, padding, frozen mode, cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medssl.data.volume import Volume
from medssl.evaluate.dense import dense_embeddings, dense_grid
from tests.helpers import oblique_affine

AFFINE = oblique_affine(spacing_mm=(0.8, 1.5, 3.5), angles_deg=(20.0, -30.0, 45.0), origin_mm=(-40.0, 12.0, 7.5))


class PatchMean(nn.Module):
    """A 'method' whose embedding is the per-channel mean of its patch: ``(B, C, *P) -> (B, C)``."""

    def __init__(self, patch_size_vox=(5, 6, 4)) -> None:
        super().__init__()
        self.patch_size_vox = tuple(patch_size_vox)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.calls = 0

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.mean(dim=(2, 3, 4)) + 0.0 * self.dummy


def index_volume(shape=(23, 17, 13)) -> Volume:
    """Three channels holding each voxel's own index i, j, k (+1, so the minimum is 1, not 0)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(np.float32) + 1.0
    return Volume(data=ijk, affine=AFFINE, case_id="idx")


def test_dense_grid_has_one_centred_anchor_every_stride_and_box_centres_half_a_voxel_back_for_even_patches():
    anchors, centres = dense_grid((23, 17, 13), (4, 3, 2), (5, 6, 4))
    assert [len(a) for a in anchors] == [(23 - 1) // 4 + 1, (17 - 1) // 3 + 1, (13 - 1) // 2 + 1]
    for a, s, n in zip(anchors, (4, 3, 2), (23, 17, 13)):
        assert np.all(np.diff(a) == s)
        assert a[0] >= 0 and a[-1] <= n - 1
        assert abs(a[0] - (n - 1 - a[-1])) <= 1  # centred
    np.testing.assert_array_equal(centres[0], anchors[0])  # odd patch: the anchor itself
    np.testing.assert_array_equal(centres[1], anchors[1] - 0.5)  # even patch: (x0 + x1 - 1) / 2


def test_dense_grid_centres_mm_equal_affine_at_the_patch_box_centre_on_an_oblique_anisotropic_volume():
    vol = index_volume()
    d = dense_embeddings(PatchMean(), vol, stride_vox=(4, 3, 2), batch_size=7, progress=False)
    assert d.embeddings.shape == (*d.grid_shape, 3)
    # Independent world positions: affine @ [i, j, k, 1] for every grid centre.
    homog = np.concatenate([d.centres_vox, np.ones((*d.grid_shape, 1))], axis=-1)
    np.testing.assert_allclose(d.centres_mm, (homog @ AFFINE.T)[..., :3], atol=1e-9)
    # The grid affine maps grid index -> the same world points.
    g = np.stack(np.meshgrid(*[np.arange(n) for n in d.grid_shape], indexing="ij"), axis=-1)
    g_h = np.concatenate([g, np.ones((*d.grid_shape, 1))], axis=-1)
    np.testing.assert_allclose((g_h @ d.grid_affine.T)[..., :3], d.centres_mm, atol=1e-9)
    # Interior patches (no padding): the mean index over the box is the box centre, so
    # each embedding says which patch was really cut there (index channels are +1).
    half = np.array([5, 6, 4]) / 2.0
    inside = np.all(
        (d.centres_vox - half + 0.5 >= 0) & (d.centres_vox + half - 0.5 <= np.array(vol.shape_vox) - 1), axis=-1
    )
    assert inside.sum() > 10
    np.testing.assert_allclose(d.embeddings[inside], d.centres_vox[inside] + 1.0, atol=1e-4)


def test_border_patches_are_padded_with_the_per_channel_minimum():
    rng = np.random.default_rng(3)
    data = rng.uniform(2.0, 3.0, size=(1, 11, 9, 7)).astype(np.float32)
    vol = Volume(data=data, affine=AFFINE, case_id="pad")
    p = (6, 5, 4)
    d = dense_embeddings(PatchMean(p), vol, stride_vox=3, progress=False)
    padded = np.pad(data[0], [(q, q) for q in p], mode="constant", constant_values=data.min())
    for gi in [(0, 0, 0), tuple(n - 1 for n in d.grid_shape), (1, 0, d.grid_shape[2] - 1)]:
        c = np.rint(d.centres_vox[gi] + np.array([(q - 1) / 2 - q // 2 for q in p]) * -1).astype(int)  # the anchor
        x0 = c - np.array(p) // 2 + np.array(p)
        expected = padded[x0[0] : x0[0] + p[0], x0[1] : x0[1] + p[1], x0[2] : x0[2] + p[2]].mean()
        assert d.embeddings[gi][0] == pytest.approx(expected, rel=1e-5)
    assert d.embeddings[0, 0, 0, 0] < data.mean()  # the corner patch really saw padding


class WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch_size_vox = (4, 4, 4)
        self.backbone = nn.Sequential(nn.Conv3d(1, 4, 3), nn.BatchNorm3d(4), nn.AdaptiveAvgPool3d(1), nn.Flatten())

    def embed(self, x):
        assert not torch.is_grad_enabled()
        return self.backbone(x)


def test_dense_embeddings_run_frozen_and_restore_train_mode_without_touching_batchnorm_statistics():
    m = WithBatchNorm().train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    vol = Volume(np.random.default_rng(0).normal(size=(1, 12, 10, 9)).astype(np.float32), AFFINE, "bn")
    d = dense_embeddings(m, vol, stride_vox=3, progress=False)
    assert m.training and m.backbone[1].training
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert np.all(np.isfinite(d.embeddings))


def test_dense_embeddings_are_cached_atomically_by_weights_and_settings(tmp_path):
    vol = index_volume((12, 10, 8))
    m = PatchMean((4, 4, 4))
    first = dense_embeddings(m, vol, stride_vox=2, cache_dir=tmp_path, progress=False)
    calls = m.calls
    again = dense_embeddings(m, vol, stride_vox=2, cache_dir=tmp_path, progress=False)
    assert m.calls == calls  # served from the cache
    np.testing.assert_array_equal(first.embeddings, again.embeddings)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
    dense_embeddings(m, vol, stride_vox=3, cache_dir=tmp_path, progress=False)
    assert m.calls > calls  # other settings, other key
    with torch.no_grad():
        m.dummy += 1.0
    calls = m.calls
    dense_embeddings(m, vol, stride_vox=2, cache_dir=tmp_path, progress=False)
    assert m.calls > calls  # other weights, other key
    assert len(list(tmp_path.glob("*.npy"))) == 3


def test_dense_embeddings_of_an_untrained_registered_method_have_its_embedding_width():
    from medssl.methods import create_method

    m = create_method("isimed", backbone="smallcnn", patch_size_vox=16)
    vol = Volume(np.random.default_rng(1).normal(size=(1, 20, 18, 12)).astype(np.float32), AFFINE, "net")
    d = dense_embeddings(m, vol, stride_vox=6, progress=False)
    assert d.embeddings.shape == (4, 3, 2, m.embed_dim)
    assert d.patch_size_vox == (16, 16, 16)


def test_a_method_that_cuts_its_own_inputs_gets_them_cut_at_every_grid_centre_voxel():
    """E.g. 2.5D methods cut planar patches; here the input is just the centre voxel's channels."""
    import torch
    from torch import nn

    from medssl.evaluate.embed import embed_patches
    from medssl.evaluate.patchsets import draw_uniform_patch_set
    from tests.helpers import coordinate_volume, oblique_affine

    class CentreVoxel(nn.Module):
        input_size_vox = (5, 5, 5)
        patch_size_vox = (5, 5, 5)

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def cut_inputs(self, data, centres_vox):
            c = np.asarray(centres_vox)
            return np.asarray(data)[:, c[:, 0], c[:, 1], c[:, 2]].T[:, :, None]  # (N, C, 1)

        def embed(self, x):
            return x[:, :, 0] * self.w

    vol = coordinate_volume("c", (17, 15, 13), oblique_affine((1.0, 2.0, 3.0), (20.0, 0.0, 10.0)))
    d = dense_embeddings(CentreVoxel(), vol, stride_vox=3, progress=False)
    anchors, _ = dense_grid(vol.shape_vox, 3, 5)
    expected = vol.data[:, anchors[0]][:, :, anchors[1]][:, :, :, anchors[2]]  # (3, Gx, Gy, Gz)
    np.testing.assert_allclose(d.embeddings, np.moveaxis(expected, 0, -1), rtol=1e-6)
    ps = draw_uniform_patch_set([vol], 7, 3, seed=0)  # stored 3^3 cubes; the model cuts its own input
    emb = embed_patches(CentreVoxel(), ps, volumes=[vol], progress=False)
    c = ps.centres_vox
    np.testing.assert_allclose(emb, vol.data[:, c[:, 0], c[:, 1], c[:, 2]].T, rtol=1e-6)
    with pytest.raises(ValueError, match="pass the volumes"):
        embed_patches(CentreVoxel(), ps, progress=False)


def test_foreground_only_embeds_the_body_points_alone_with_the_same_values_as_the_full_grid():
    vol = index_volume((14, 12, 10))
    body = np.zeros(vol.shape_vox, np.uint8)
    body[3:11, 2:9, 1:8] = 1
    vol = vol.with_(aux={"body": body})
    m = PatchMean((3, 3, 3))
    full = dense_embeddings(m, vol, stride_vox=2, batch_size=5, progress=False)
    part = dense_embeddings(m, vol, stride_vox=2, batch_size=5, foreground_only=True, progress=False)
    np.testing.assert_array_equal(part.computed, part.foreground)
    assert part.foreground.any() and not part.foreground.all()
    np.testing.assert_array_equal(part.embeddings[part.foreground], full.embeddings[full.foreground])
    assert np.isnan(part.embeddings[~part.foreground]).all()


def test_dense_grids_run_the_network_under_the_precision_asked_for():
    from medssl.methods import create_method

    torch.manual_seed(0)
    m = create_method("isimed", backbone="smallcnn", patch_size_vox=16)
    vol = Volume(np.random.default_rng(2).normal(size=(1, 20, 18, 16)).astype(np.float32), AFFINE, "prec")
    fp32 = dense_embeddings(m, vol, stride_vox=5, precision="fp32", progress=False)
    bf16 = dense_embeddings(m, vol, stride_vox=5, precision="bf16", progress=False)
    from medssl.evaluate.embed import embed_patches
    from medssl.sampling.patches import extract_patches

    anchors = np.stack(np.meshgrid(*fp32.anchors_vox, indexing="ij"), -1).reshape(-1, 3)
    ref = embed_patches(m, extract_patches(vol.data, anchors, (16, 16, 16)), progress=False)  # fp32 reference
    np.testing.assert_allclose(fp32.flat_embeddings, ref, rtol=1e-4, atol=1e-5)
    assert not np.array_equal(bf16.embeddings, fp32.embeddings)  # bf16 really ran
    np.testing.assert_allclose(bf16.flat_embeddings, ref, atol=0.05 * np.abs(ref).max())
    with pytest.raises(ValueError, match="precision"):
        dense_embeddings(m, vol, precision="fp8", progress=False)
