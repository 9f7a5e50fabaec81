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


def _leave_a_temp_file_and_die(target) -> str:
    """Start a writer that opens an atomic write of ``target``, writes half of it and is SIGKILLed."""
    import subprocess
    import sys

    code = (
        "import os, signal, sys\n"
        "from medssl._files import atomic_path\n"
        "cm = atomic_path(sys.argv[1]); tmp = cm.__enter__()\n"
        "tmp.write_bytes(b'x' * 1000); print(tmp, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate()
    assert proc.returncode == -9
    assert f".{proc.pid}." in os.path.basename(out.strip())  # the writer's pid is in the name
    return out.strip()


def test_temp_files_of_a_killed_writer_are_removed_by_the_next_write_and_live_ones_kept(tmp_path):
    target = tmp_path / "last.pt"
    dead = _leave_a_temp_file_and_die(target)
    assert os.path.exists(dead)
    from medssl._files import temp_path

    mine = temp_path(tmp_path, ".last.pt")  # a write in progress in this (live) process
    mine.write_bytes(b"y")
    other_host = tmp_path / ".last.pt.otherhost.1.0123456789ab.tmp"
    other_host.write_bytes(b"z")
    old_other_host = tmp_path / ".last.pt.otherhost.2.0123456789ab.tmp"
    old_other_host.write_bytes(b"z")
    os.utime(old_other_host, (0, 0))  # 1970: long stale whoever wrote it

    atomic_write_text(target, "new")

    assert target.read_text() == "new"
    assert not os.path.exists(dead) and not old_other_host.exists()
    assert mine.exists() and other_host.exists()


def test_files_and_temp_folders_get_the_umask_permissions_not_0600(tmp_path):
    from medssl._files import make_temp_dir
    from medssl.train.checkpoint import save_checkpoint

    old = os.umask(0o027)
    try:
        text = atomic_write_text(tmp_path / "config.json", "{}")
        save_checkpoint({"format": "x"}, tmp_path / "last.pt")
        folder = make_temp_dir(tmp_path, ".stage")
    finally:
        os.umask(old)
    assert oct(text.stat().st_mode & 0o777) == oct(0o640)
    assert oct((tmp_path / "last.pt").stat().st_mode & 0o777) == oct(0o640)
    assert oct(folder.stat().st_mode & 0o777) == oct(0o750)


def test_a_write_sweeps_every_dead_writers_temp_in_the_folder_not_only_its_own_names(tmp_path):
    """Issue 23 item 9: an epoch checkpoint's temp from a killed writer used to stay for ever."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()  # made apart: each killed writer would sweep the other
    dead_epoch = _leave_a_temp_file_and_die(tmp_path / "a" / "epoch-0003.pt")
    dead_npy = _leave_a_temp_file_and_die(tmp_path / "b" / "x.npy")
    dead_epoch = tmp_path / os.path.basename(dead_epoch)
    dead_npy = tmp_path / (os.path.basename(dead_npy) + ".npy")  # temp names may end in a format suffix
    os.rename(tmp_path / "a" / dead_epoch.name, dead_epoch), os.rmdir(tmp_path / "a")
    os.rename(tmp_path / "b" / dead_npy.name[: -len(".npy")], dead_npy), os.rmdir(tmp_path / "b")
    users_own = tmp_path / ".notes.tmp"  # not a name medssl makes: never medssl's to delete, however old
    users_own.write_text("mine")
    os.utime(users_own, (0, 0))

    atomic_write_text(tmp_path / "last.pt", "new")  # another name in the same folder

    assert not dead_epoch.exists() and not dead_npy.exists()
    assert users_own.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", "last.pt"]
