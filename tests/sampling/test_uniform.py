"""UniformPatchSampler: geometry on anisotropic oblique grids, bounds, foreground, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medssl.data.errors import EmptyForegroundError
from medssl.data.volume import Volume
from medssl.sampling import PatchBatch, UniformPatchSampler


def _oblique_anisotropic_affine(spacing_mm=(0.8, 1.7, 3.1), origin_mm=(-40.0, 12.5, 77.0)) -> np.ndarray:
    """Rotation about a non-axis direction (so every world axis mixes all voxel axes) times spacing."""
    axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
    angle = 0.7
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    R = np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K
    A = np.eye(4)
    A[:3, :3] = R @ np.diag(spacing_mm)
    A[:3, 3] = origin_mm
    return A


def _world_coordinate_volume(shape=(23, 19, 17), case_id="coords", **affine_kw) -> Volume:
    """A 3-channel volume whose voxel values are their own world (x, y, z) mm from the affine."""
    A = _oblique_anisotropic_affine(**affine_kw)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(np.float64)
    xyz = ijk @ A[:3, :3].T + A[:3, 3]  # (X, Y, Z, 3)
    return Volume(data=np.ascontiguousarray(np.moveaxis(xyz, -1, 0)).astype(np.float32), affine=A, case_id=case_id)


def test_centres_mm_equal_the_world_position_of_the_patch_centre_voxel_on_an_oblique_anisotropic_grid():
    vols = [_world_coordinate_volume(), _world_coordinate_volume((20, 21, 18), "b", origin_mm=(5.0, -3.0, 1.0))]
    sampler = UniformPatchSampler(7, volumes_per_batch=2, patches_per_volume=20)  # odd size: one centre voxel
    batch = sampler(vols, np.random.default_rng(0))
    centre_voxel_values = batch.patches[:, :, 3, 3, 3]  # (N, 3) world mm stored in the voxel
    torch.testing.assert_close(batch.centres_mm, centre_voxel_values, rtol=0, atol=1e-3)


def test_centres_mm_of_even_sized_patches_are_the_mean_of_the_eight_middle_voxels():
    vol = _world_coordinate_volume()
    batch = UniformPatchSampler((6, 4, 8), volumes_per_batch=1, patches_per_volume=30)([vol], np.random.default_rng(1))
    middle = batch.patches[:, :, 2:4, 1:3, 3:5].mean(dim=(2, 3, 4))  # affine map => mean of voxels = centre
    torch.testing.assert_close(batch.centres_mm, middle, rtol=0, atol=1e-3)


def test_patches_are_the_exact_voxels_of_their_boxes_and_boxes_lie_inside_the_volume():
    rng = np.random.default_rng(3)
    vols = [
        Volume(data=rng.normal(size=(2, 12 + i, 10, 9)).astype(np.float32), affine=np.diag([1.0, 2.0, 3.0, 1.0]), case_id=f"c{i}")
        for i in range(5)
    ]
    batch = UniformPatchSampler(8, volumes_per_batch=3, patches_per_volume=50)(vols, np.random.default_rng(4))
    assert isinstance(batch, PatchBatch)
    assert batch.patches.shape == (150, 2, 8, 8, 8) and batch.patches.dtype == torch.float32
    assert batch.patches.is_contiguous()
    assert len(batch.case_ids) == 3 and len(set(batch.case_ids)) == 3  # without replacement
    by_id = {v.case_id: v for v in vols}
    for n in range(len(batch)):
        vol = by_id[batch.case_ids[int(batch.volume_index[n])]]
        x0, y0, z0, x1, y1, z1 = batch.boxes_vox[n].tolist()
        assert (x1 - x0, y1 - y0, z1 - z0) == (8, 8, 8)
        assert min(x0, y0, z0) >= 0 and (x1, y1, z1) <= vol.shape_vox and all(
            e <= s for e, s in zip((x1, y1, z1), vol.shape_vox)
        )
        np.testing.assert_array_equal(batch.patches[n].numpy(), vol.data[:, x0:x1, y0:y1, z0:z1])


def test_every_valid_start_is_reachable_including_the_last_one():
    vol = Volume(data=np.zeros((1, 10, 9, 8), np.float32), affine=np.eye(4), case_id="a")
    batch = UniformPatchSampler(7, volumes_per_batch=1, patches_per_volume=2000)([vol], np.random.default_rng(0))
    starts = batch.boxes_vox[:, :3].numpy()
    assert starts.min(axis=0).tolist() == [0, 0, 0]
    assert starts.max(axis=0).tolist() == [3, 2, 1]


def test_uses_all_volumes_when_the_pool_is_smaller_than_volumes_per_batch():
    vols = [Volume(data=np.zeros((1, 9, 9, 9), np.float32), affine=np.eye(4), case_id=f"v{i}") for i in range(3)]
    batch = UniformPatchSampler(4, volumes_per_batch=64, patches_per_volume=5)(vols, np.random.default_rng(0))
    assert sorted(batch.case_ids) == ["v0", "v1", "v2"]
    assert batch.volume_index.tolist() == [0] * 5 + [1] * 5 + [2] * 5


def test_same_seed_gives_an_identical_batch_and_another_seed_a_different_one():
    vols = [_world_coordinate_volume(case_id=f"v{i}") for i in range(4)]
    sampler = UniformPatchSampler(5, volumes_per_batch=2, patches_per_volume=6)
    a, b = sampler(vols, np.random.default_rng(42)), sampler(vols, np.random.default_rng(42))
    c = sampler(vols, np.random.default_rng(43))
    assert a.case_ids == b.case_ids
    torch.testing.assert_close(a.patches, b.patches, rtol=0, atol=0)
    torch.testing.assert_close(a.boxes_vox, b.boxes_vox, rtol=0, atol=0)
    assert not torch.equal(a.boxes_vox, c.boxes_vox)


def _label_volume(case_id="lab") -> Volume:
    """Air (-1000 HU + noise) around a CT-like body block; a small organ label and a one-voxel lesion."""
    rng = np.random.default_rng(0)
    data = (-1000.0 + 5.0 * rng.normal(size=(1, 30, 28, 26))).astype(np.float32)
    data[0, 4:27, 3:25, 2:24] = 40.0 + 10.0 * rng.normal(size=(23, 22, 22))  # the body
    label = np.zeros((30, 28, 26), np.int16)
    label[18:24, 5:9, 10:13] = 3  # a small off-centre organ
    lesion = np.zeros_like(label)
    lesion[8, 20, 15] = 1  # a single voxel
    return Volume(data=data, affine=_oblique_anisotropic_affine(), case_id=case_id, label=label, aux={"lesion": lesion})


def _centre_voxels(batch: PatchBatch, size) -> np.ndarray:
    return batch.boxes_vox.numpy()[:, :3] + np.asarray(size) // 2  # the centre-voxel rule


def test_foreground_only_puts_every_centre_voxel_on_the_body_not_on_the_label():
    vol = _label_volume()
    sampler = UniformPatchSampler((8, 6, 7), volumes_per_batch=1, patches_per_volume=300, foreground_only=True)
    batch = sampler([vol], np.random.default_rng(0))
    c = _centre_voxels(batch, (8, 6, 7))
    body = np.zeros(vol.shape_vox, bool)
    body[4:27, 3:25, 2:24] = True
    assert np.all(body[c[:, 0], c[:, 1], c[:, 2]])
    assert np.mean(vol.label[c[:, 0], c[:, 1], c[:, 2]] > 0) < 0.2  # the organ label does not attract centres
    assert len({tuple(x) for x in c}) > 200  # spread over the body
    b = batch.boxes_vox.numpy()
    assert b[:, :3].min() >= 0 and np.all(b[:, 3:] <= np.array(vol.shape_vox))


def test_foreground_only_can_use_a_named_aux_label_map():
    vol = _label_volume()
    sampler = UniformPatchSampler(8, 1, 10, foreground_only=True, region="lesion")
    c = _centre_voxels(sampler([vol], np.random.default_rng(0)), 8)
    assert np.all(c == np.array([8, 20, 15]))


def test_foreground_is_the_cached_body_mask_when_the_volume_carries_one():
    data = np.zeros((1, 20, 20, 20), np.float32)
    body = np.zeros((20, 20, 20), np.uint8)
    body[12:16, 3:7, 9:11] = 1
    vol = Volume(data=data, affine=np.diag([2.0, 1.0, 0.5, 1.0]), case_id="body", aux={"body": body})
    c = _centre_voxels(UniformPatchSampler(6, 1, 200, foreground_only=True)([vol], np.random.default_rng(1)), 6)
    assert np.all(body[c[:, 0], c[:, 1], c[:, 2]] == 1)


def test_foreground_candidates_are_computed_once_per_volume(monkeypatch):
    import medssl.sampling.uniform as uniform

    vol = _label_volume()
    sampler = UniformPatchSampler(8, 1, 4, foreground_only=True)
    calls = []
    original = uniform.foreground_mask
    monkeypatch.setattr(uniform, "foreground_mask", lambda v, r: calls.append(v.case_id) or original(v, r))
    rng = np.random.default_rng(0)
    for _ in range(5):
        sampler([vol], rng)
    assert calls == ["lab"]


def test_foreground_only_names_the_volume_when_no_foreground_voxel_can_be_a_centre():
    vol = _label_volume().with_(source="/data/ct_007.nii.gz")
    body = np.zeros(vol.shape_vox, np.uint8)
    body[0, 0, 0] = 1  # a corner voxel can never be the centre of an 8^3 box
    with pytest.raises(EmptyForegroundError, match="ct_007"):
        UniformPatchSampler(8, 1, 4, foreground_only=True)([vol.with_(aux={"body": body})], np.random.default_rng(0))


def test_patches_are_writable_copies_of_read_only_memmaps(tmp_path):
    arr = np.arange(2 * 11 * 12 * 13, dtype=np.float32).reshape(2, 11, 12, 13)
    np.save(tmp_path / "v.npy", arr)
    mm = np.load(tmp_path / "v.npy", mmap_mode="r")
    vol = Volume(data=mm, affine=np.eye(4), case_id="mm")
    batch = UniformPatchSampler(5, 1, 3)([vol], np.random.default_rng(0))
    batch.patches += 1.0  # must not touch the file
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), arr)


def test_rejects_a_volume_smaller_than_the_patch():
    vol = Volume(data=np.zeros((1, 10, 4, 10), np.float32), affine=np.eye(4), case_id="small", source="small.nii")
    with pytest.raises(ValueError, match="small.nii"):
        UniformPatchSampler(5, 1, 1)([vol], np.random.default_rng(0))


def test_the_centre_cache_is_bounded_and_drops_the_least_recently_used_volume(monkeypatch):
    import medssl.sampling.uniform as uniform

    vols = [_label_volume(f"v{k}") for k in range(4)]
    one = UniformPatchSampler(8, 1, 2, foreground_only=True)
    one([vols[0]], np.random.default_rng(0))
    per_volume = next(iter(one._centre_cache.values())).nbytes
    monkeypatch.setattr(uniform, "_CENTRE_CACHE_BYTES", int(2.5 * per_volume))  # room for two tables
    sampler = UniformPatchSampler(8, 1, 2, foreground_only=True)
    rng = np.random.default_rng(0)
    for v in (vols[0], vols[1], vols[0], vols[2]):  # v0 used again before v2 arrives: v1 is the oldest
        sampler([v], rng)
    assert [k[0] for k in sampler._centre_cache] == ["v0", "v2"]
