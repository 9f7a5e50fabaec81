"""Atomic writes leave the old content in place when the writer fails."""

import os

import numpy as np
import pytest

from medssl._files import atomic_path, atomic_save_npy, atomic_write_text, replace_dir


def test_a_failing_writer_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = atomic_write_text(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_npy_is_saved_without_pickles_under_the_exact_name(tmp_path):
    path = atomic_save_npy(tmp_path / "x.npy", np.arange(5))
    assert np.array_equal(np.load(path, allow_pickle=False), np.arange(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]
    with pytest.raises(ValueError):
        atomic_save_npy(tmp_path / "y.npy", np.array([object()], dtype=object))
    assert not (tmp_path / "y.npy").exists() and len(list(tmp_path.iterdir())) == 1


def test_replace_dir_swaps_folders_and_restores_the_old_one_when_the_swap_fails(tmp_path, monkeypatch):
    dest, stage = tmp_path / "entry", tmp_path / "stage"
    dest.mkdir(), stage.mkdir()
    (dest / "v").write_text("1")
    (stage / "v").write_text("2")
    replace_dir(stage, dest)
    assert (dest / "v").read_text() == "2" and not stage.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]

    stage.mkdir()
    (stage / "v").write_text("3")
    real_replace = os.replace

    def fail_on_stage(src, dst):
        if os.fspath(src) == os.fspath(stage):
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_stage)
    with pytest.raises(OSError, match="disk gone"):
        replace_dir(stage, dest)
    assert (dest / "v").read_text() == "2"  # the old entry is back in place
