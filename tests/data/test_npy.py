"""LazyNpy: cached arrays that hold no file handle until read, with a bounded number of open maps."""

from __future__ import annotations

import os

import numpy as np
import pytest

from medssl.data import npy
from medssl.data.cache import CacheEntryError
from medssl.data.npy import LazyNpy
from medssl.data.volume import Volume
from medssl.sampling.uniform import UniformPatchSampler


def _arrays(folder, n: int) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        arr = rng.normal(size=(1, 12, 11, 10)).astype(np.float32)
        np.save(folder / f"a{i}.npy", arr)
        out.append((str(folder / f"a{i}.npy"), arr))
    return out


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_reading_many_lazy_arrays_keeps_at_most_the_bounded_number_open(tmp_path):
    arrays = _arrays(tmp_path, 3 * npy.MAX_OPEN_ARRAYS)
    lazy = [LazyNpy(p, a.shape, a.dtype) for p, a in arrays]
    before = _open_fds()
    for (_, arr), lz in zip(arrays, lazy):
        np.testing.assert_array_equal(lz[:, 2:5, 3:7, 1:9], arr[:, 2:5, 3:7, 1:9])
    assert npy.open_array_count() <= npy.MAX_OPEN_ARRAYS
    assert _open_fds() - before <= npy.MAX_OPEN_ARRAYS  # not one per array read
    np.testing.assert_array_equal(np.asarray(lazy[0]), arrays[0][1])
    assert np.asarray(lazy[1], dtype=np.float64).dtype == np.float64


def test_the_sampler_draws_the_same_batch_from_lazy_and_memory_mapped_volumes(tmp_path):
    arrays = _arrays(tmp_path, 5)
    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    mapped = [Volume(np.load(p, mmap_mode="r"), affine, f"c{i}") for i, (p, _) in enumerate(arrays)]
    lazy = [Volume(LazyNpy(p, a.shape, a.dtype), affine, f"c{i}") for i, (p, a) in enumerate(arrays)]
    for fg in (False, True):
        sampler = UniformPatchSampler(6, volumes_per_batch=3, patches_per_volume=4, foreground_only=fg)
        a = sampler(mapped, np.random.default_rng(1))
        b = sampler(lazy, np.random.default_rng(1))
        assert np.array_equal(a.patches.numpy(), b.patches.numpy()) and np.array_equal(a.centres_mm, b.centres_mm)


def test_an_array_rebuilt_with_another_shape_is_an_error_not_wrong_data(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 3), np.float32))
    lz = LazyNpy(tmp_path / "x.npy", (2, 3), np.float32, owner="entry-x")
    npy._maps.pop(str(tmp_path / "x.npy"), None)
    np.save(tmp_path / "x.npy", np.zeros((4, 3), np.float32))
    with pytest.raises(CacheEntryError, match="entry-x.*rebuilt while in use"):
        lz[0]


def test_a_volume_opened_after_its_entry_was_rebuilt_reads_the_new_arrays(tmp_path, monkeypatch):
    """Issue 23 item 1: the process-wide map cache must not hand a rebuilt entry's old map to a new reader."""
    from medssl.data.source import open_data
    from tests.helpers import make_volume_file

    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path / "cache"))
    raw = tmp_path / "raw"
    for i in range(3):
        make_volume_file(raw, shape=(20, 18, 16), name=f"c{i}", seed=i, label=False)
    first = open_data(raw, progress=False).volumes(None)[0]
    old = np.asarray(first.data)  # maps the entry's image.npy (kept in the process-wide cache)
    make_volume_file(raw, shape=(26, 22, 20), name=first.case_id, seed=9, label=False)  # another shape and voxels
    second = next(v for v in open_data(raw, progress=False).volumes(None) if v.case_id == first.case_id)
    new = np.asarray(second.data)
    assert second.shape_vox != first.shape_vox
    assert new.shape == (1, *second.shape_vox)
    on_disk = np.load(os.path.join(second.meta["cache_entry"], "image.npy"))
    np.testing.assert_array_equal(new, on_disk)
    np.testing.assert_array_equal(np.asarray(first.data), old)  # the earlier reader still sees its own build
    for key in list(npy._maps):  # once its map is dropped, the earlier reader gets an error, not the new voxels
        if key[0] == first.data.path and key[1] == first.data.identity:
            npy._maps.pop(key)
    with pytest.raises(CacheEntryError, match="rebuilt while in use"):
        first.data[0]


def test_readable_maps_a_lazy_array_without_copying_it_and_context_samplers_cut_the_same_patches(tmp_path):
    from medssl.sampling.context import ContextPairSampler
    from medssl.sampling.patches import padding_values

    arrays = _arrays(tmp_path, 4)
    lz = LazyNpy(arrays[0][0], arrays[0][1].shape, arrays[0][1].dtype)
    view = npy.readable(lz)
    assert isinstance(view, np.memmap) and not view.flags.writeable  # the map, not a writable copy
    np.testing.assert_array_equal(view, arrays[0][1])
    plain = np.arange(6.0).reshape(1, 1, 2, 3)
    assert npy.readable(plain) is plain
    # the padding value is remembered per file build: a rebuilt file (another identity) is read again
    assert padding_values(lz) == pytest.approx(arrays[0][1].min())
    np.save(arrays[0][0], arrays[0][1] - 5.0)
    rebuilt = LazyNpy(arrays[0][0], arrays[0][1].shape, arrays[0][1].dtype)
    assert padding_values(rebuilt) == pytest.approx(arrays[0][1].min() - 5.0)
    # the 2.5D sampler (fancy indexing through readable) cuts the same batch from lazy and in-memory volumes
    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    mem = [Volume(a, affine, f"c{i}") for i, (_, a) in enumerate(arrays[1:])]
    lazy = [Volume(LazyNpy(p, a.shape, a.dtype), affine, f"c{i}") for i, (p, a) in enumerate(arrays[1:])]
    sampler = ContextPairSampler(size_vox=6, n_slices=1, volumes_per_batch=2, patches_per_volume=3, foreground_only=False)
    a, b = sampler(mem, np.random.default_rng(3)), sampler(lazy, np.random.default_rng(3))
    assert np.array_equal(a.patches.numpy(), b.patches.numpy())
    assert np.array_equal(a.extras["partners"].numpy(), b.extras["partners"].numpy())
