"""The preprocessed-volume cache: no-op rebuilds, digests, atomic writes, memmapped loads."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medssl.data.cache import CacheEntryError, VolumeCache, _smallest_int_dtype
from medssl.data.errors import DatasetScanError, LabelGridMismatchError, NonFiniteVoxelsError, UnreadableFileError
from medssl.data.io import read_volume
from medssl.data.preprocess import PreprocessConfig, preprocess
from tests.helpers import make_volume_file, oblique_affine, write_nifti_file

# Anisotropic target spacing so a mix-up of axes would show.
CONFIG = PreprocessConfig(target_spacing_mm=(1.5, 2.0, 3.0))


def _cases(raw: Path, n: int = 2, groups: list[str] | None = None) -> pd.DataFrame:
    rows = []
    for i in range(n):
        v = make_volume_file(raw, name=f"case{i}", seed=i)
        rows.append({"case_id": f"case{i}", "image": str(v.image_path), "label": str(v.label_path),
                     "group": groups[i] if groups else "", "split": ""})
    return pd.DataFrame(rows)


def _snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """``{relative path: (mtime_ns, sha256)}`` of every file below ``folder``."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def _leftovers(cache: VolumeCache) -> list[str]:
    """Temporary folders (``.tmp-*``, ``.old-*``) in the cache."""
    return [p.name for p in cache.dir.iterdir() if ".tmp" in p.name] if cache.dir.exists() else []


def _row(df: pd.DataFrame, case_id: str) -> dict:
    return df[df["case_id"] == case_id].iloc[0].to_dict()


def test_building_the_same_cases_twice_rewrites_nothing(tmp_path):
    df = _cases(tmp_path / "raw")
    cache = VolumeCache(tmp_path / "cache", CONFIG)
    first = cache.build(df, progress=False)
    assert first.built_case_ids == ["case0", "case1"] and first.reused_case_ids == []
    before = _snapshot(cache.root)
    second = VolumeCache(tmp_path / "cache", CONFIG).build(df, progress=False)
    assert second.built_case_ids == [] and second.reused_case_ids == ["case0", "case1"]
    assert _snapshot(cache.root) == before  # same files, same bytes, same mtimes


def test_a_changed_setting_builds_a_new_entry_next_to_the_old_one(tmp_path):
    df = _cases(tmp_path / "raw", n=1)
    old = VolumeCache(tmp_path / "cache", CONFIG)
    old.build(df, progress=False)
    old_files = _snapshot(old.dir)
    new = VolumeCache(tmp_path / "cache", dataclasses.replace(CONFIG, target_spacing_mm=(2.0, 2.0, 2.0)))
    assert new.dir != old.dir and not new.is_cached("case0")
    assert new.build(df, progress=False).built_case_ids == ["case0"]
    np.testing.assert_allclose(new.load("case0").spacing_mm, (2.0, 2.0, 2.0), atol=1e-9)
    assert _snapshot(old.dir) == old_files
    meta = json.loads((new.entry_dir("case0") / "meta.json").read_text())
    assert meta["preprocess_digest"] == new.config.digest()
    assert meta["preprocess_config"]["target_spacing_mm"] == [2.0, 2.0, 2.0]


def test_a_changed_source_file_rebuilds_only_that_case(tmp_path):
    df = _cases(tmp_path / "raw")
    cache = VolumeCache(tmp_path / "cache", CONFIG)
    cache.build(df, progress=False)
    make_volume_file(tmp_path / "raw", name="case1", seed=99)  # new content, same path
    report = cache.build(df, progress=False)
    assert report.built_case_ids == ["case1"] and report.reused_case_ids == ["case0"]
    expected = preprocess(read_volume(df.loc[1, "image"], df.loc[1, "label"], case_id="case1"), CONFIG)
    np.testing.assert_array_equal(cache.load("case1").data, expected.data)


def test_a_failed_write_leaves_no_partial_entry_and_old_entries_and_raw_files_untouched(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    df = _cases(raw, n=3)
    cache = VolumeCache(tmp_path / "cache", CONFIG)
    cache.build(df.iloc[:1], progress=False)  # case0 cached
    make_volume_file(raw, name="case1", seed=5)
    cache.build(df.iloc[1:2], progress=False)  # case1 cached ...
    make_volume_file(raw, name="case1", seed=6)  # ... then made stale: the failing build would replace it
    entries_before, raw_before = _snapshot(cache.dir), _snapshot(raw)

    real_save, calls = np.save, []

    def failing_save(file, arr, *args, **kwargs):
        calls.append(file)
        if len(calls) == 2:  # image.npy of the first case written, its label.npy fails
            raise OSError("simulated disk failure")
        return real_save(file, arr, *args, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="simulated disk failure"):
        cache.build(df, progress=False)
    monkeypatch.undo()

    assert len(calls) == 2
    assert _snapshot(cache.dir) == entries_before, "existing entries (fresh and stale) are untouched"
    assert _leftovers(cache) == [], "no temporary folder left behind"
    assert not cache.entry_dir(_row(df, "case2")).exists()
    assert _snapshot(raw) == raw_before, "raw files byte-identical"
    assert cache.build(df, progress=False).built_case_ids == ["case1", "case2"]  # and the cache recovers


def test_loaded_volume_equals_the_preprocessed_one_with_oblique_anisotropic_geometry(tmp_path):
    affine = oblique_affine((0.7, 1.3, 3.1), (20.0, -15.0, 30.0), (10.0, -5.0, 40.0), flip_axes=(0, 1))
    v = make_volume_file(tmp_path / "raw", name="obl", shape=(24, 20, 12), affine=affine)
    lesion = write_nifti_file(tmp_path / "raw" / "obl_lesion.nii.gz", (v.label == 1).astype(np.int16), affine)
    df = pd.DataFrame([{"case_id": "obl", "image": str(v.image_path), "label": str(v.label_path),
                        "group": "patient7", "split": "train", "aux_lesion": str(lesion),
                        "label_names": json.dumps({"1": "blob", "2": "body"})}])
    cache = VolumeCache(tmp_path / "cache", CONFIG)
    cache.build(df, progress=False)
    expected = preprocess(
        read_volume(v.image_path, v.label_path, case_id="obl", aux_paths={"lesion": lesion}), CONFIG
    )
    got = cache.load("obl")
    np.testing.assert_array_equal(got.affine, expected.affine)
    np.testing.assert_array_equal(got.spacing_mm, expected.spacing_mm)
    np.testing.assert_allclose(got.spacing_mm, (1.5, 2.0, 3.0), atol=1e-9)
    np.testing.assert_array_equal(got.data, expected.data)
    np.testing.assert_array_equal(got.label, expected.label)
    np.testing.assert_array_equal(got.aux["lesion"], expected.aux["lesion"])
    assert got.data.dtype == np.float32 and got.data.shape == expected.data.shape
    assert got.label.dtype == np.uint8  # ids 0..2 fit in one byte
    assert (got.case_id, got.group, got.label_names) == ("obl", "patient7", {1: "blob", 2: "body"})
    assert got.source == str(v.image_path)
    assert got.meta["crop_box_vox"] == expected.meta["crop_box_vox"]


def test_load_returns_read_only_memmaps_and_mmap_false_reads_into_ram(tmp_path):
    df = _cases(tmp_path / "raw", n=1)
    cache = VolumeCache(tmp_path / "cache", CONFIG)
    cache.build(df, progress=False)
    vol = cache.load("case0")
    assert isinstance(vol.data, np.memmap) and isinstance(vol.label, np.memmap)
    with pytest.raises(ValueError, match="read-only"):
        vol.data[0, 0, 0, 0] = 1.0
    in_ram = cache.load("case0", mmap=False)
    assert not isinstance(in_ram.data, np.memmap)
    np.testing.assert_array_equal(in_ram.data, vol.data)


def test_load_all_follows_manifest_order_and_filters_by_split(tmp_path):
    df = _cases(tmp_path / "raw", n=3)
    df["split"] = ["val", "train", "train"]
    cache = VolumeCache(tmp_path / "cache", CONFIG)
    cache.build(df, progress=False)
    assert [v.case_id for v in cache.load_all(df, split="train")] == ["case1", "case2"]
    assert [v.case_id for v in cache.load_all(["case2", "case0"])] == ["case2", "case0"]
    with pytest.raises(CacheEntryError, match="nope"):
        cache.load_all(["case0", "nope"])


@pytest.mark.parametrize("damage", ["bad_json", "missing_image", "truncated_label"])
def test_a_corrupt_entry_is_reported_on_load_and_rebuilt_by_build(tmp_path, damage):
    df = _cases(tmp_path / "raw", n=1)
    cache = VolumeCache(tmp_path / "cache", CONFIG)
    cache.build(df, progress=False)
    entry = cache.entry_dir("case0")
    good = cache.load("case0", mmap=False)
    if damage == "bad_json":
        (entry / "meta.json").write_text('{"case_id": "case0", ')
    elif damage == "missing_image":
        (entry / "image.npy").unlink()
    else:
        data = (entry / "label.npy").read_bytes()
        (entry / "label.npy").write_bytes(data[: len(data) // 2])
    assert not cache.is_cached("case0")
    with pytest.raises(CacheEntryError) as exc:
        cache.load("case0")
    assert str(entry) in str(exc.value)
    assert cache.build(df, progress=False).built_case_ids == ["case0"]
    np.testing.assert_array_equal(cache.load("case0").label, good.label)


def _three_bad_files(tmp_path: Path) -> tuple[pd.DataFrame, set[type]]:
    df = _cases(tmp_path / "raw", n=2)
    raw = tmp_path / "raw"
    aff = oblique_affine((1.0, 1.0, 2.0), (0.0, 10.0, 0.0))
    nan = np.full((10, 10, 8), 5.0, np.float32)
    nan[1, 1, 1] = np.inf
    write_nifti_file(raw / "inf.nii.gz", nan, aff)
    write_nifti_file(raw / "grid.nii.gz", np.ones((10, 10, 8), np.float32), aff)
    write_nifti_file(raw / "grid_seg.nii.gz", np.ones((10, 10, 8), np.int16), oblique_affine((1.0, 1.0, 2.5)))
    (raw / "junk.nii.gz").write_bytes(b"this is not a NIfTI file")
    bad = pd.DataFrame([
        {"case_id": "inf", "image": str(raw / "inf.nii.gz"), "label": ""},
        {"case_id": "grid", "image": str(raw / "grid.nii.gz"), "label": str(raw / "grid_seg.nii.gz")},
        {"case_id": "junk", "image": str(raw / "junk.nii.gz"), "label": ""},
    ]).assign(group="", split="")
    return pd.concat([df, bad], ignore_index=True), {NonFiniteVoxelsError, LabelGridMismatchError, UnreadableFileError}


def test_build_reports_all_bad_files_and_caches_nothing_in_raise_mode(tmp_path):
    df, expected = _three_bad_files(tmp_path)
    cache = VolumeCache(tmp_path / "cache", CONFIG)
    with pytest.raises(DatasetScanError) as exc:
        cache.build(df, progress=False)
    assert {type(p) for p in exc.value.problems} == expected and len(exc.value.problems) == 3
    assert cache.case_ids() == [] and _leftovers(cache) == []
    assert not any(cache.entry_dir(row).exists() for row in df.to_dict(orient="records"))


def test_build_in_skip_mode_caches_the_good_cases_and_reports_the_bad_ones(tmp_path):
    df, expected = _three_bad_files(tmp_path)
    raw_before = _snapshot(tmp_path / "raw")
    cache = VolumeCache(tmp_path / "cache", CONFIG)
    report = cache.build(df, on_error="skip", progress=False)
    assert cache.case_ids() == ["case0", "case1"] == report.ok_case_ids
    assert sorted(report.problem_case_ids) == ["grid", "inf", "junk"]
    assert {type(p) for p in report.problems} == expected
    assert report.to_frame().query("status == 'bad'")["path"].map(lambda p: Path(p).name).tolist() == [
        "inf.nii.gz", "grid_seg.nii.gz", "junk.nii.gz"]
    assert _snapshot(tmp_path / "raw") == raw_before  # nothing written into the raw folder


def test_build_with_two_worker_processes_matches_a_serial_build(tmp_path):
    df = _cases(tmp_path / "raw", n=2)
    serial = VolumeCache(tmp_path / "c1", CONFIG)
    serial.build(df, progress=False)
    parallel = VolumeCache(tmp_path / "c2", CONFIG)
    assert parallel.build(df, progress=False, workers=2).built_case_ids == ["case0", "case1"]
    for c in ("case0", "case1"):
        np.testing.assert_array_equal(parallel.load(c).data, serial.load(c).data)
        np.testing.assert_array_equal(parallel.load(c).affine, serial.load(c).affine)


@pytest.mark.parametrize(
    "lo, hi, dtype",
    [(0, 1, np.uint8), (0, 255, np.uint8), (0, 256, np.uint16), (-1, 5, np.int8), (-200, 5, np.int16),
     (0, 70000, np.uint32)],
)
def test_labels_are_stored_in_the_smallest_integer_dtype_that_holds_them(lo, hi, dtype):
    assert _smallest_int_dtype(lo, hi) == np.dtype(dtype)


def test_entry_dir_rejects_case_ids_that_would_escape_the_cache(tmp_path):
    cache = VolumeCache(tmp_path, CONFIG)
    row = {"case_id": "abc", "image": "/data/abc.nii.gz", "label": ""}
    entry = cache.entry_dir(row)
    assert entry.parent == tmp_path / CONFIG.digest()[:16] and entry.name.startswith("abc-")
    for bad in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(ValueError):
            cache.entry_dir({**row, "case_id": bad})
        with pytest.raises(ValueError):
            cache.entry_dir(bad)


def test_default_root_comes_from_medssl_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path / "envcache"))
    assert VolumeCache(config=CONFIG).dir == tmp_path / "envcache" / CONFIG.digest()[:16]
    assert os.fspath(VolumeCache(config=CONFIG).root) == str(tmp_path / "envcache")


def _read_only_below(monkeypatch, root: Path) -> None:
    """Make every write below ``root`` fail as on a read-only mount (EROFS); reads still work.

    (Tests do not run where a real read-only mount can be made; the errno is what the kernel gives.)
    """
    import errno

    real_open, real_mkdir = os.open, os.mkdir
    root = str(root)

    def below(path) -> bool:
        return os.path.abspath(os.fspath(path)).startswith(root)

    def ro_open(path, flags, *args, **kwargs):
        if below(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def ro_mkdir(path, *args, **kwargs):
        if below(path):
            if os.path.exists(path):
                raise FileExistsError(errno.EEXIST, "File exists", os.fspath(path))
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(os, "mkdir", ro_mkdir)


def test_an_up_to_date_read_only_cache_is_read_without_locks(tmp_path, monkeypatch):
    """Issue 23 item 3: a shared read-only cache that is already built can be read (no EROFS on .locks)."""
    import shutil

    df = _cases(tmp_path / "raw", n=2)
    cache = VolumeCache(tmp_path / "cache", CONFIG)
    cache.build(df, progress=False)
    expected = [np.load(cache.entry_dir(_row(df, c)) / "image.npy") for c in ("case0", "case1")]
    shutil.rmtree(cache.dir / ".locks")  # copied to the cluster without them, or never read here before
    before = _snapshot(cache.root)
    _read_only_below(monkeypatch, tmp_path / "cache")
    ro = VolumeCache(tmp_path / "cache", CONFIG)
    report = ro.build(df, progress=False)
    assert report.reused_case_ids == ["case0", "case1"] and report.built_case_ids == []
    for lazy in (False, True):
        vols = ro.load_all(df, lazy=lazy)
        for v, e in zip(vols, expected):
            np.testing.assert_array_equal(np.asarray(v.data), e)
    assert _snapshot(cache.root) == before


def test_a_read_only_cache_missing_entries_names_the_folder_and_the_cases(tmp_path, monkeypatch):
    from medssl.data.cache import CacheWriteError

    df = _cases(tmp_path / "raw", n=3)
    cache = VolumeCache(tmp_path / "cache", CONFIG)
    cache.build(df.iloc[:2], progress=False)
    _read_only_below(monkeypatch, tmp_path / "cache")
    with pytest.raises(CacheWriteError) as err:
        VolumeCache(tmp_path / "cache", CONFIG).build(df, progress=False)
    assert err.value.path == str(cache.dir) and "case2" in err.value.problem and "1 case(s)" in err.value.problem
    assert "Read-only file system" in err.value.problem and "MEDSSL_CACHE" in err.value.problem
