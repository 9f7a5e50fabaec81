"""``make test`` runs ``pytest -n 2 --dist loadgroup``: tests marked with one ``xdist_group`` must share a worker.

The notebook tests rely on it (``latent_space_run``: 20_latent_space executed once for the tests of 20 and
25; ``lesion_cohort`` built once). With pytest 9 and pytest-xdist 3.8 the groups were split silently and each
worker ran the 30-second notebook again; requirements.txt pins pytest below 9 for this.
"""

from __future__ import annotations

import os
import subprocess
import sys

FIXTURE = '''
import os
import pytest

@pytest.fixture(scope="session")
def shared():
    with open(os.environ["GROUP_LOG"], "a") as f:
        f.write(os.environ.get("PYTEST_XDIST_WORKER", "none") + "\\n")
'''

MODULE = '''
import time
import pytest

def test_{name}_before():
    time.sleep(0.3)

@pytest.mark.xdist_group("shared_group")
def test_{name}(shared):
    time.sleep(0.3)

def test_{name}_after():
    time.sleep(0.3)
'''


def test_tests_of_one_xdist_group_run_on_one_worker_so_a_session_fixture_is_built_once(tmp_path):
    (tmp_path / "conftest.py").write_text(FIXTURE)
    for name in ("a", "b", "c"):
        (tmp_path / f"test_{name}.py").write_text(MODULE.format(name=name))
    log = tmp_path / "workers.log"
    res = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-q", "-p", "no:cacheprovider",
                          str(tmp_path)], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "GROUP_LOG": str(log)})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "9 passed" in res.stdout
    workers = log.read_text().split()
    assert len(workers) == 1, f"the group's session fixture was built on {workers}: the group was split"
