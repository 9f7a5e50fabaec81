"""Several processes on one cache: an interrupted builder hurts no one, loads never see a half-swapped entry.

The builders are real processes (``tests/data/_cache_builder.py``) that pause after
staging their first case until the test lets them go, so the overlap is certain
rather than left to timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medssl.data.cache import CacheEntryError, CacheWriteError, VolumeCache
from medssl.data.preprocess import PreprocessConfig
from tests.helpers import make_volume_file, oblique_affine

REPO = Path(__file__).resolve().parents[2]
BUILDER = Path(__file__).with_name("_cache_builder.py")
CONFIG = PreprocessConfig(target_spacing_mm=(2.0, 2.0, 2.0))


def _manifest(raw: Path, n: int = 3) -> Path:
    rows = []
    for i in range(n):
        v = make_volume_file(raw, name=f"case{i}", seed=i)
        rows.append({"case_id": f"case{i}", "image": str(v.image_path), "label": str(v.label_path), "group": "",
                     "split": ""})  # fmt: skip
    path = raw / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _start(tmp: Path, name: str, cache_root: Path, manifest: Path, workers: int = 1) -> subprocess.Popen:
    """A builder process (its own process group) that stops after staging its first case until ``<name>.go`` exists."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "CACHE_BUILDER_WORKERS": str(workers)}
    args = [sys.executable, str(BUILDER), str(cache_root), str(manifest), str(tmp / name), "hold"]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Until ``path`` exists (the builder reached its pause); fails if the builder died first."""
    deadline = time.monotonic() + timeout_s  # a hang guard, not a speed assertion
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"builder exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"builder never reached {path.name}")
        time.sleep(0.05)


def _entries(cache: VolumeCache) -> dict[str, dict]:
    """Every entry's arrays and meta.json (minus its creation time), by folder name."""
    out = {}
    for entry in sorted(p for p in cache.dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        meta = json.loads((entry / "meta.json").read_text())
        meta.pop("created")
        arrays = {p.name: np.load(p) for p in sorted(entry.glob("*.npy"))}
        out[entry.name] = {"meta": meta, "arrays": arrays}
    return out


def _assert_same_cache(a: VolumeCache, b: VolumeCache) -> None:
    ea, eb = _entries(a), _entries(b)
    assert sorted(ea) == sorted(eb)
    for name in ea:
        assert ea[name]["meta"] == eb[name]["meta"], name
        assert sorted(ea[name]["arrays"]) == sorted(eb[name]["arrays"])
        for key, arr in ea[name]["arrays"].items():
            np.testing.assert_array_equal(arr, eb[name]["arrays"][key])
            assert arr.dtype == eb[name]["arrays"][key].dtype


def _temp_folders(cache: VolumeCache) -> list[str]:
    return sorted(p.name for p in cache.dir.iterdir() if ".tmp" in p.name)


@pytest.mark.parametrize("interrupt", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_an_interrupted_builder_leaves_a_concurrent_one_its_work_and_the_cache_equals_a_one_process_build(
    tmp_path, interrupt
):
    manifest = _manifest(tmp_path / "raw")
    reference = VolumeCache(tmp_path / "reference", CONFIG)
    reference.build(pd.read_csv(manifest, dtype=str, keep_default_na=False), progress=False)
    root = tmp_path / "shared"

    b = _start(tmp_path, "B", root, manifest)  # the healthy builder
    _wait_for(tmp_path / "B.staged", b)
    a = _start(tmp_path, "A", root, manifest, workers=2)  # the one that gets interrupted, with its workers
    _wait_for(tmp_path / "A.staged", a)
    cache = VolumeCache(root, CONFIG)
    staged_before = _temp_folders(cache)
    assert any(f".{a.pid}." in n for n in staged_before) and any(f".{b.pid}." in n for n in staged_before)

    os.killpg(a.pid, interrupt)  # Ctrl-C (or kill -9) reaches the builder and its worker processes
    try:
        a.wait(timeout=120)  # a hang guard, not a speed assertion
    except subprocess.TimeoutExpired:
        a.send_signal(signal.SIGUSR1)  # faulthandler: where is it stuck?
        time.sleep(2)
        os.killpg(a.pid, signal.SIGKILL)
        raise AssertionError(f"interrupted builder did not exit:\n{a.communicate()[1][-6000:]}") from None
    assert a.returncode != 0
    b_own = [n for n in staged_before if f".{b.pid}." in n]
    assert b_own and all((cache.dir / n).is_dir() for n in b_own), "the interrupted builder deleted B's work"

    (tmp_path / "B.go").touch()
    out, err = b.communicate(timeout=300)
    assert b.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["built"] == ["case0", "case1", "case2"]
    _assert_same_cache(cache, reference)

    # A SIGKILLed builder could not clean up; the next build removes its folders (its pid is dead), nothing else.
    left = _temp_folders(cache)
    assert left == [] if interrupt == signal.SIGINT else (left and all(f".{a.pid}." in n for n in left))
    report = cache.build(pd.read_csv(manifest, dtype=str, keep_default_na=False), progress=False)
    assert report.built_case_ids == [] and _temp_folders(cache) == []
    _assert_same_cache(cache, reference)


def test_two_builders_racing_for_the_same_entries_commit_each_once(tmp_path):
    manifest = _manifest(tmp_path / "raw", n=2)
    root = tmp_path / "shared"
    a = _start(tmp_path, "A", root, manifest)
    b = _start(tmp_path, "B", root, manifest, workers=2)
    _wait_for(tmp_path / "A.staged", a)
    _wait_for(tmp_path / "B.staged", b)
    (tmp_path / "A.go").touch()
    out_a, err_a = a.communicate(timeout=300)
    (tmp_path / "B.go").touch()
    out_b, err_b = b.communicate(timeout=300)
    assert a.returncode == 0 and b.returncode == 0, err_a[-2000:] + err_b[-2000:]
    got_a, got_b = (json.loads(o.strip().splitlines()[-1]) for o in (out_a, out_b))
    assert got_a["built"] == ["case0", "case1"]
    assert got_b["built"] == [] and got_b["reused"] == ["case0", "case1"]  # B found A's entries and dropped its own
    assert _temp_folders(VolumeCache(root, CONFIG)) == []


_REPLACER = """
import os, shutil, sys
from medssl.data.cache import VolumeCache
from medssl.data.preprocess import PreprocessConfig
root, image, label, n = sys.argv[1:5]
cache = VolumeCache(root, PreprocessConfig(target_spacing_mm=(2.0, 2.0, 2.0)))
# the same files under another group: the entry never matches this row, so every commit replaces it
row = {"case_id": "case0", "image": image, "label": label, "group": "another-group", "split": ""}
entry = cache.entry_dir(row)
for i in range(int(n)):
    stage = entry.parent / f".tmp-stage.{os.getpid()}.{i}.tmp"
    shutil.copytree(entry, stage)  # a staged entry with the same arrays
    assert cache._commit(row, stage), "the commit kept the entry"  # the cache's own commit: lock + swap
print("done")
"""


@pytest.mark.parametrize("mode", ["ram", "mmap", "lazy"])
def test_loads_never_see_an_entry_half_replaced(tmp_path, mode):
    """Loads by case id (the entry is read as it records itself) while another process commits over it.

    ``ram`` and ``mmap`` (the default) read or map every array under the entry's shared lock, so
    each load must give the expected arrays. ``lazy`` arrays are mapped later, outside the lock: a
    read after a swap is refused with the documented CacheEntryError ("rebuilt while in use"),
    never other data and never a raw error.
    """
    raw = tmp_path / "raw"
    v = make_volume_file(raw, name="case0", shape=(16, 14, 12), affine=oblique_affine((2.0, 2.0, 2.0)))
    row = {"case_id": "case0", "image": str(v.image_path), "label": str(v.label_path), "group": "", "split": ""}
    cache = VolumeCache(tmp_path / "cache", CONFIG)
    cache.build(pd.DataFrame([row]), progress=False)
    expected = cache.load(row, mmap=False)
    replacer = subprocess.Popen(
        [sys.executable, "-c", _REPLACER, str(tmp_path / "cache"), row["image"], row["label"], "300"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    errors, refused, loads = [], 0, 0
    while replacer.poll() is None:
        try:
            got = cache.load("case0", mmap=mode != "ram", lazy=mode == "lazy")
            np.testing.assert_array_equal(np.asarray(got.data), expected.data)
            np.testing.assert_array_equal(np.asarray(got.label), expected.label)
            loads += 1
        except CacheEntryError as e:
            if mode == "lazy" and "rebuilt while in use" in str(e):
                refused += 1
            else:
                errors.append(repr(e))
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(repr(e))
    out, err = replacer.communicate()
    assert replacer.returncode == 0 and out.strip() == "done", err[-2000:]
    assert errors == [], (len(errors), loads, errors[:5])
    assert loads > 0
    print(f"{mode}: {loads} loads, {refused} refused as rebuilt while in use")


_PARKING_COMMITTER = """
import os, shutil, sys, time
from pathlib import Path
from medssl.data.cache import VolumeCache
from medssl.data.preprocess import PreprocessConfig
root, image, label, marker = sys.argv[1:5]
real_replace = os.replace


def replace_then_pause_once_parked(src, dst):  # the commit's own steps, slowed down where the entry is missing
    real_replace(src, dst)
    if Path(dst).name.startswith(".old-"):
        Path(marker).touch()
        time.sleep(2.0)


os.replace = replace_then_pause_once_parked
cache = VolumeCache(root, PreprocessConfig(target_spacing_mm=(2.0, 2.0, 2.0)))
row = {"case_id": "case0", "image": image, "label": label, "group": "another-group", "split": ""}
entry = cache.entry_dir(row)
stage = entry.parent / f".tmp-stage.{os.getpid()}.tmp"
shutil.copytree(entry, stage)
assert cache._commit(row, stage)
print("done")
"""


def test_a_load_by_case_id_in_the_moment_a_commit_has_parked_the_old_entry_waits_for_the_new_one(tmp_path):
    """The lookup by case id lists the folder before it knows which lock to take; mid-swap it finds no entry."""
    raw = tmp_path / "raw"
    v = make_volume_file(raw, name="case0", shape=(16, 14, 12), affine=oblique_affine((2.0, 2.0, 2.0)))
    row = {"case_id": "case0", "image": str(v.image_path), "label": str(v.label_path), "group": "", "split": ""}
    cache = VolumeCache(tmp_path / "cache", CONFIG)
    cache.build(pd.DataFrame([row]), progress=False)
    expected = cache.load(row, mmap=False).data
    marker = tmp_path / "parked"
    committer = subprocess.Popen(
        [sys.executable, "-c", _PARKING_COMMITTER, str(tmp_path / "cache"), row["image"], row["label"], str(marker)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_for(marker, committer)
    assert not cache.entry_dir(row).exists() and [p for p in cache.dir.iterdir() if p.name.startswith(".old-case0-")]
    got = cache.load("case0", mmap=False)  # waits for the commit instead of answering "not cached"
    out, err = committer.communicate(timeout=120)
    assert committer.returncode == 0 and out.strip() == "done", err[-2000:]
    np.testing.assert_array_equal(got.data, expected)


def test_disk_full_during_a_cache_write_names_the_file_and_commits_nothing(tmp_path):
    """A real write failure: the builder runs with a 100 kB file-size limit (EFBIG, like a full disk)."""
    big = oblique_affine((1.0, 1.0, 1.0))
    v = make_volume_file(tmp_path / "raw", name="big", shape=(48, 48, 40), affine=big, label=False)
    manifest = tmp_path / "raw" / "manifest.csv"
    pd.DataFrame([{"case_id": "big", "image": str(v.image_path), "label": "", "group": "", "split": ""}]).to_csv(
        manifest, index=False
    )
    before = {p.name: p.read_bytes() for p in (tmp_path / "raw").iterdir()}
    env = {**os.environ, "PYTHONPATH": str(REPO), "CACHE_BUILDER_FSIZE": str(100_000), "CACHE_BUILDER_NATIVE": "1"}
    proc = subprocess.run([sys.executable, str(BUILDER), str(tmp_path / "cache"), str(manifest), str(tmp_path / "X"),
                           "run"], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-3000:]
    problem = json.loads(proc.stdout.strip().splitlines()[-1])
    assert problem["type"] == CacheWriteError.__name__
    assert problem["path"].endswith("image.npy") and "is the disk full" in problem["problem"]
    assert "case 'big'" in problem["problem"]
    cache = VolumeCache(tmp_path / "cache", PreprocessConfig(target_spacing_mm=None))
    assert [p.name for p in cache.dir.iterdir() if not p.name.startswith(".")] == ["config.json"]  # no entry
    assert _temp_folders(cache) == []
    assert {p.name: p.read_bytes() for p in (tmp_path / "raw").iterdir()} == before
