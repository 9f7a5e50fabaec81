"""The browser tests' run/skip/fail rule, checked without chromium: under CI a test that cannot run fails.

Runs in ``make test`` (project venv) and in ``make browser-test`` (side venv); it starts neither
JupyterLab nor a browser. The real browser tests run pytest and ``make browser-test`` as CI
would, in subprocesses, with chromium pointed at a path that does not exist.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser.helpers import OPT_IN, browser_verdict

REPO = Path(__file__).resolve().parents[2]
NO_CHROMIUM = "/nonexistent/chromium"
ASKED = {"MEDSSL_BROWSER_TESTS": "1", "MEDSSL_PROJECT_PYTHON": sys.executable}


@pytest.mark.parametrize(("env", "playwright", "want"), [
    ({}, True, "skip"),  # not asked for: skipped, also under CI (make test collects them)
    ({"CI": "true"}, True, "skip"),
    ({**ASKED, "MEDSSL_CHROMIUM": sys.executable}, True, "run"),  # any existing file stands in for chromium
    ({**ASKED, "MEDSSL_CHROMIUM": NO_CHROMIUM}, True, "skip"),
    ({**ASKED, "MEDSSL_CHROMIUM": NO_CHROMIUM, "CI": "true"}, True, "fail"),
    ({**ASKED, "MEDSSL_CHROMIUM": sys.executable, "CI": "true"}, False, "fail"),
    ({**ASKED, "MEDSSL_CHROMIUM": sys.executable, "CI": "1"}, True, "run"),
    ({**ASKED, "MEDSSL_CHROMIUM": sys.executable, "CI": "true", "MEDSSL_PROJECT_PYTHON": "/nonexistent/python"},
     True, "fail"),
    ({**ASKED, "MEDSSL_CHROMIUM": NO_CHROMIUM, "CI": "false"}, True, "skip"),
])  # fmt: skip
def test_a_browser_test_runs_skips_or_under_ci_fails(env, playwright, want):
    verdict, reason = browser_verdict(env, has_playwright=playwright)
    assert verdict == want, (env, reason)
    if want == "fail":
        assert reason.startswith("CI=true and the browser test cannot run: needs ")
    if env.get("MEDSSL_BROWSER_TESTS") != "1":
        assert reason == OPT_IN


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    return {**env, **extra}


def _pytest_browser_file(name: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--confcutdir", "tests/browser", "-rs", "-q",
           f"tests/browser/{name}"]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ["test_niivue_in_jupyterlab.py", "test_latent_viewer_in_jupyterlab.py"])
def test_under_ci_a_browser_test_without_chromium_fails_and_outside_ci_it_is_skipped(name, tmp_path):
    # the project python is missing too: a fixture that ran (the viewer test's tiny pipeline) would raise
    # FileNotFoundError on it, so the outputs also show that the rule is applied before any fixture
    missing = {"MEDSSL_BROWSER_TESTS": "1", "MEDSSL_CHROMIUM": NO_CHROMIUM, "MEDSSL_PROJECT_PYTHON": "/nonexistent/py",
               "MEDSSL_BROWSER_SCREENSHOTS": str(tmp_path / "shots")}  # fmt: skip
    ci = _pytest_browser_file(name, _env(CI="true", **missing))
    out = ci.stdout + ci.stderr
    assert ci.returncode == 1, out[-3000:]
    assert "CI=true and the browser test cannot run: needs " in out and "1 error" in out, out[-3000:]
    assert "FileNotFoundError" not in out and "passed" not in out

    local = _pytest_browser_file(name, _env(**missing))
    out = local.stdout + local.stderr
    assert local.returncode == 0, out[-3000:]
    assert "1 skipped" in out and "SKIPPED" in out and "needs " in out, out[-3000:]
    assert not (tmp_path / "shots").exists()


def test_make_browser_test_under_ci_exits_non_zero_when_chromium_cannot_be_installed(tmp_path):
    make = shutil.which("make")
    assert make, "make is needed: `make test` and `make browser-test` are the project's entry points"
    venv, shots = tmp_path / "venv-browser", tmp_path / "shots"
    # APT_GET=false: the install fails at once, as apt-get does without root or network
    args = [make, "-o", ".venv/.medssl-installed", "browser-test", f"CHROMIUM={NO_CHROMIUM}", "APT_GET=false",
            f"BROWSER_VENV={venv}", f"BROWSER_SHOTS={shots}"]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, env=_env(CI="true"), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "CI=true and chromium could not be installed: failing" in proc.stderr, proc.stdout + proc.stderr
    assert not venv.exists() and not shots.exists()  # it stopped there: no venv, no pip, no pytest
