"""Worker processes of a cache build die with their parent, even when the parent is killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import make_volume_file

REPO = Path(__file__).resolve().parents[2]
GRACE_S = 10.0  # a dead parent's workers must be gone well within this (the watchdog checks every 0.5 s)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the workers")


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d))
    return out


def _alive(pid: int) -> bool:
    """Running (not a zombie, not gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _wait_gone(pids: list[int]) -> list[int]:
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(map(_alive, pids)):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _kill_all(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


BUILDER = """
import sys

def main():
    import pandas as pd
    from medssl.data.cache import VolumeCache
    from medssl.data.preprocess import PreprocessConfig

    df = pd.read_csv(sys.argv[2], dtype=str, keep_default_na=False)
    VolumeCache(sys.argv[1], PreprocessConfig(target_spacing_mm=None)).build(df, progress=False, workers=2)

if __name__ == "__main__":  # spawned workers must not re-run the build
    main()
"""


def test_sigkill_of_a_cache_builder_takes_its_worker_processes_with_it(tmp_path):
    """Issue 23 item 5: two `spawn_main` workers were still alive 90 s after the builder was killed."""
    rows = []
    for i in range(12):
        v = make_volume_file(tmp_path / "raw", shape=(48, 48, 48), name=f"case{i}", seed=i, label=False)
        rows.append({"case_id": f"case{i}", "image": str(v.image_path), "label": "", "group": "", "split": ""})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    (tmp_path / "builder.py").write_text(BUILDER)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    builder = subprocess.Popen([sys.executable, str(tmp_path / "builder.py"), str(tmp_path / "cache"),
                                str(tmp_path / "m.csv")], env=env, stderr=subprocess.DEVNULL)  # fmt: skip
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120  # a hang guard: spawning imports medssl twice on a loaded machine
        while time.monotonic() < deadline and len(workers) < 2 and builder.poll() is None:
            workers = [p for p in _children(builder.pid) if "spawn_main" in _cmdline(p)]
            time.sleep(0.05)
        assert len(workers) == 2, f"the build never started its 2 workers (rc {builder.poll()})"
        time.sleep(1.0)  # let them import and take a case
        os.kill(builder.pid, signal.SIGKILL)
        builder.wait(timeout=30)
        assert _wait_gone(workers) == [], "workers outlived their SIGKILLed parent"
    finally:
        builder.kill()
        _kill_all(workers)


PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
print(child.pid, flush=True)
time.sleep(120)
"""
CHILD = """
import os, time
from medssl._processes import die_with_parent
print(die_with_parent(os.getppid(), use_prctl={use_prctl}), flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("use_prctl", [True, False], ids=["pdeathsig", "watchdog"])
def test_die_with_parent_ends_the_process_when_its_parent_is_killed(tmp_path, use_prctl):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child_code = textwrap.dedent(CHILD.format(use_prctl=use_prctl))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, child_code], env=env, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "die_with_parent" not in _cmdline(child):
            time.sleep(0.05)
        time.sleep(1.5)  # past the import and the set-up in the child
        assert _alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        assert _wait_gone([child]) == [], "the child outlived its SIGKILLed parent"
    finally:
        parent.kill()
        _kill_all([child])
