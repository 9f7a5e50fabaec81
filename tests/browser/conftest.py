"""Fixtures and the run/skip/fail rule of the browser tests (helpers in ``helpers.py``; no playwright/medssl here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser.helpers import SCREENSHOT_DIR, browser_verdict


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: needs JupyterLab + headless Chromium (make browser-test)")


def pytest_runtest_setup(item):
    """Before any fixture of a ``browser`` test is set up: skip it, or under CI fail it, when it cannot run.

    Runs ahead of the fixtures (a conftest hook precedes pytest's own setup), so neither a module
    fixture's tiny pipeline run nor JupyterLab starts for a test that will not run.
    """
    if item.get_closest_marker("browser") is None:
        return
    verdict, reason = browser_verdict()
    if verdict == "fail":
        pytest.fail(reason, pytrace=False)
    if verdict == "skip":
        pytest.skip(reason)


@pytest.fixture
def screenshot_dir() -> Path:
    """Where screenshots go: ``$MEDSSL_BROWSER_SCREENSHOTS`` (``make browser-test``: ``runs/browser/``)."""
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    return SCREENSHOT_DIR
