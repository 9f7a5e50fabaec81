"""open_data on users' folders: datasets kept apart, plain scripts, DICOM series folders, patch sizes at scan time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from medssl.data.cache import CacheEntryError
from medssl.data.errors import DatasetScanError, TooSmallError
from medssl.data.io import read_volume
from medssl.data.npy import LazyNpy
from medssl.data.preprocess import preprocess
from medssl.data.source import open_data
from tests.helpers import make_volume_file, oblique_affine, write_dicom_series

REPO = Path(__file__).resolve().parents[2]
TWO_MM = oblique_affine((2.0, 2.0, 2.0), (10.0, 5.0, 0.0))


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _folder(root: Path, shapes: dict[str, tuple[int, int, int]], seed: int = 0, affine=None) -> Path:
    for i, (name, shape) in enumerate(shapes.items()):
        make_volume_file(root, name=name, shape=shape, seed=seed + i, label=False, affine=affine)
    return root


# ------------------------------------------------------------ item 1: one dataset never gets another's volumes


def test_two_folders_with_the_same_case_id_keep_their_own_volumes(tmp_path, cache_env):
    a = _folder(tmp_path / "A", {"brain1": (20, 18, 16), "brain2": (20, 18, 16)}, seed=0)
    b = _folder(tmp_path / "B", {"brain1": (30, 26, 12)}, seed=7)
    data_a = open_data(a, progress=False, target_spacing_mm=2.0)
    data_b = open_data(b, progress=False, target_spacing_mm=2.0)  # same cache, same settings, same case id
    (vol_a,) = [v for v in data_a.volumes() if v.case_id == "brain1"]
    (vol_b,) = data_b.volumes()
    assert vol_a.source == str(a / "brain1.nii.gz") and vol_b.source == str(b / "brain1.nii.gz")
    assert vol_a.shape_vox != vol_b.shape_vox
    reread = open_data(a, progress=False, target_spacing_mm=2.0)  # reuses A's entries, untouched by B
    (again,) = [v for v in reread.volumes() if v.case_id == "brain1"]
    np.testing.assert_array_equal(np.asarray(again.data), np.asarray(vol_a.data))
    assert reread.scan_report.built_case_ids == []


def test_a_load_refuses_an_entry_whose_source_changed_since_it_was_cached(tmp_path, cache_env):
    folder = _folder(tmp_path / "A", {"c0": (20, 18, 16)})
    data = open_data(folder, progress=False, target_spacing_mm=2.0)
    old_shape = data.volumes()[0].shape_vox
    make_volume_file(folder, name="c0", shape=(30, 18, 16), seed=3, label=False)  # same path, new content
    os.utime(folder / "c0.nii.gz", ns=(1, 1))  # and an mtime that cannot match the recorded one
    with pytest.raises(CacheEntryError, match=r"c0\.nii\.gz changed since it was cached"):
        data.volumes()
    expected = preprocess(read_volume(folder / "c0.nii.gz"), data.preprocess_config)
    rebuilt = open_data(folder, progress=False, target_spacing_mm=2.0).volumes()[0]
    assert rebuilt.shape_vox == expected.shape_vox != old_shape


def test_a_bare_case_id_shared_by_two_datasets_is_ambiguous_not_guessed(tmp_path, cache_env):
    a = _folder(tmp_path / "A", {"brain1": (20, 18, 16)})
    b = _folder(tmp_path / "B", {"brain1": (30, 26, 12)}, seed=5)
    data = open_data(a, progress=False, target_spacing_mm=2.0)
    open_data(b, progress=False, target_spacing_mm=2.0)
    with pytest.raises(CacheEntryError, match="2 cached cases share this id"):
        data.cache.load("brain1")


# --------------------------------------------------------------------------- lazy volumes


def test_volumes_are_lazy_by_default_and_equal_the_memory_mapped_ones(tmp_path, cache_env):
    data = open_data(_folder(tmp_path / "A", {"c0": (20, 18, 16)}), progress=False, target_spacing_mm=2.0)
    (lazy,), (mapped,) = data.volumes(), data.volumes(lazy=False)
    assert isinstance(lazy.data, LazyNpy) and isinstance(mapped.data, np.memmap)
    assert lazy.shape_vox == mapped.shape_vox and lazy.data.dtype == mapped.data.dtype
    np.testing.assert_array_equal(np.asarray(lazy.data), mapped.data)
    np.testing.assert_array_equal(lazy.data[:, 2:5, 1:4, 3:7], mapped.data[:, 2:5, 1:4, 3:7])


# --------------------------------------------------------------------------- item 2: plain scripts


def _readme_python_snippet() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"From Python or a notebook[^\n]*\n\n```python\n(.*?)```", text, flags=re.S)
    assert match, "README lost its 'From Python' snippet"
    return match.group(1)


def test_the_readme_python_snippet_runs_as_a_plain_script_without_a_main_guard(tmp_path):
    snippet = _readme_python_snippet()
    assert 'open_data("demo")' in snippet and "__main__" not in snippet
    # 30^3 voxels of 2 mm: 20^3 at 3 mm (the tiny preset's patch is 16^3); more than 8 cases: workers wanted
    folder = _folder(tmp_path / "scans", {f"case{i:02d}": (30, 30, 30) for i in range(10)}, affine=TWO_MM)
    # the user's own folder and a seconds-long run instead of the demo preset (the structure is the README's)
    script = snippet.replace('open_data("demo")', f"open_data({str(folder)!r}, progress=False)")
    script = script.replace('build_run("isimed", "demo", train_overrides={"epochs": 10})',
                            'build_run("isimed", "tiny", train_overrides={"epochs": 1, "steps_per_epoch": 2})')
    script = script.replace('medssl.pretrain("mine", "isimed", "demo", train_overrides={"epochs": 10})',
                            f'medssl.pretrain("mine", "isimed", "tiny", medssl.open_data({str(folder)!r}, progress=False), '
                            'train_overrides={"epochs": 1, "steps_per_epoch": 2}, progress=False)')
    assert script.count(str(folder)) == 2 and script.count('"tiny"') == 2
    (tmp_path / "snippet.py").write_text(script + "\nprint('OK', type(model).__name__)\n", encoding="utf-8")
    env = {**os.environ, "MEDSSL_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO),
           "MEDSSL_RUNS": str(tmp_path / "runs")}
    proc = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=600)  # progress bars: not the locale's codec
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout and "BrokenProcessPool" not in proc.stderr
    for run in ("mine", "blocks"):  # the runs folder, whatever the current one (here $MEDSSL_RUNS)
        assert (tmp_path / "runs" / run / "isimed" / "checkpoints" / "last.pt").is_file(), run


_PROBE = "from medssl._processes import can_spawn_workers\n"


@pytest.mark.parametrize(
    "body, expected",
    [
        ("print(can_spawn_workers())\n", "False"),
        ("def main():\n    print(can_spawn_workers())\n\nmain()\n", "False"),
        ("def main():\n    print(can_spawn_workers())\n\nif __name__ == '__main__':\n    main()\n", "True"),
        ("if '__main__' == __name__:\n    print(can_spawn_workers())\n", "True"),
    ],
)
def test_workers_are_used_only_where_spawn_would_not_rerun_the_script(tmp_path, body, expected):
    (tmp_path / "s.py").write_text(_PROBE + body, encoding="utf-8")
    proc = subprocess.run([sys.executable, "s.py"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert proc.stdout.strip() == expected, proc.stderr
    code = subprocess.run([sys.executable, "-c", _PROBE + "print(can_spawn_workers())"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert code.stdout.strip() == "True"  # python -c (like a notebook) has no main file to re-run


# --------------------------------------------------------------------------- item 5: DICOM series folders


def _series(folder: Path, seed: int) -> Path:
    image = np.random.default_rng(seed).integers(0, 200, (12, 10, 8)).astype(np.int16)
    return write_dicom_series(folder, image, oblique_affine((1.2, 1.2, 2.5), (10.0, 0.0, 5.0), flip_axes=(0, 1)),
                              series_uid=f"1.2.826.0.1.3680043.2.1125.{seed + 10}")  # fmt: skip


def test_a_folder_of_dicom_series_is_a_plain_folder_of_cases(tmp_path, cache_env):
    for i in range(3):
        _series(tmp_path / "study" / f"series{i}", seed=i)
    data = open_data(tmp_path / "study", progress=False, target_spacing_mm=3.0)
    assert sorted(data.manifest["case_id"]) == ["series0", "series1", "series2"]
    vols = data.volumes()
    assert len(vols) == 3 and all(v.meta["format"] == "dicom" for v in vols)


def test_a_folder_that_is_one_dicom_series_is_one_case(tmp_path, cache_env):
    folder = _series(tmp_path / "ct_0042", seed=4)
    data = open_data(folder, progress=False, target_spacing_mm=3.0)
    assert list(data.manifest["case_id"]) == ["ct_0042"] and data.volumes()[0].source == str(folder)


def test_skipping_every_case_warns_instead_of_returning_silently_empty(tmp_path, cache_env):
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(2):
        (folder / f"c{i}.nii.gz").write_bytes(b"not a nifti")
    with pytest.warns(UserWarning, match=r"no usable case: all 2 case\(s\) were skipped"):
        data = open_data(folder, progress=False, on_error="skip")
    assert len(data.manifest) == 0


# ------------------------------------------------------------ item 6: the patch size is checked at scan time


def test_a_case_smaller_than_the_patch_fails_the_scan_naming_the_file(tmp_path, cache_env):
    folder = _folder(tmp_path / "A", {"big": (20, 20, 20), "thin": (20, 20, 4)}, affine=TWO_MM)
    with pytest.raises(DatasetScanError) as info:
        open_data(folder, progress=False, target_spacing_mm=2.0, patch_size_vox=8)
    (err,) = info.value.problems
    assert isinstance(err, TooSmallError) and err.path == str(folder / "thin.nii.gz") and "(8, 8, 8)" in err.problem
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one good case left: no "no usable case" warning
        data = open_data(folder, progress=False, target_spacing_mm=2.0, patch_size_vox=(8, 8, 8), on_error="skip")
    assert list(data.manifest["case_id"]) == ["big"] and data.scan_report.problem_case_ids == ["thin"]


def test_a_case_cached_before_is_still_checked_against_a_new_patch_size(tmp_path, cache_env):
    folder = _folder(tmp_path / "A", {"big": (20, 20, 20), "thin": (20, 20, 4)}, affine=TWO_MM)
    open_data(folder, progress=False, target_spacing_mm=2.0)  # both cached, no patch given
    with pytest.raises(DatasetScanError, match=r"thin\.nii\.gz.*smaller than the patch size \(8, 8, 8\)"):
        open_data(folder, progress=False, target_spacing_mm=2.0, patch_size_vox=8)


def test_a_folder_opened_without_a_patch_size_is_cached_by_worker_processes(tmp_path, cache_env, monkeypatch):
    """Issue 23 item 12: `open_data(folder)` without `patch_size_vox` used to build in one process only."""
    from medssl.data import cache as cache_module

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    started = []
    real_pool = cache_module.ProcessPoolExecutor

    def counting_pool(*args, **kwargs):
        started.append(kwargs.get("max_workers"))
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(cache_module, "ProcessPoolExecutor", counting_pool)
    folder = _folder(tmp_path / "raw", {f"c{i}": (12, 11, 10) for i in range(10)}, affine=TWO_MM)
    data = open_data(folder, progress=False)
    assert started == [2]  # the 10 cases were read and preprocessed by 2 worker processes
    assert sorted(data.scan_report.built_case_ids) == sorted(f"c{i}" for i in range(10))
    assert len(data.volumes(None)) == 10


def _mixed_channel_folder(root: Path) -> Path:
    from tests.helpers import write_nifti_file

    for i in range(3):
        v = make_volume_file(root, name=f"c{i}", shape=(30, 28, 26), affine=TWO_MM, label=False, seed=i)
    write_nifti_file(root / "rgb.nii.gz", np.stack([v.data, 0.5 * v.data, 0.2 * v.data], axis=-1), v.affine)
    return root


def test_mixed_one_and_three_channel_scans_are_refused_at_scan_time(tmp_path, cache_env, monkeypatch, capsys):
    """Issue 23 item 7: the scan passed them; `fit` refused, but only after writing runs/<run>/<method>/config.json."""
    from medssl.cli import main
    from medssl.data.datasets import scan_dataset
    from medssl.data.errors import ChannelCountError

    folder = _mixed_channel_folder(tmp_path / "raw")
    with pytest.raises(DatasetScanError) as err:
        open_data(folder, progress=False)
    (problem,) = err.value.problems
    assert isinstance(problem, ChannelCountError) and problem.path == str(folder / "rgb.nii.gz")
    assert "has 3 image channel(s) but 3 other case(s) have 1 (e.g. c0, c1, c2)" in problem.problem
    skipped = open_data(folder, on_error="skip", progress=False)
    assert sorted(skipped.manifest["case_id"]) == ["c0", "c1", "c2"] and skipped.scan_report.problem_case_ids == ["rgb"]
    assert {v.n_channels for v in skipped.volumes(None)} == {1}

    from medssl.data.adapters import manifest_from_folder

    report = scan_dataset(manifest_from_folder(folder), on_error="skip", progress=False)
    assert report.problem_case_ids == ["rgb"] and isinstance(report.problems[0], ChannelCountError)

    monkeypatch.setenv("MEDSSL_RUNS", str(tmp_path / "runs"))
    assert main(["train", "--method", "isimed", "--preset", "tiny", "--run", "mixed", "--source", str(folder),
                 "--target-spacing-mm", "3"]) == 1  # fmt: skip
    assert "has 3 image channel(s)" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "mixed" / "isimed" / "config.json").exists()
