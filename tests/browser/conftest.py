"""Fixtures of the browser tests (helpers in ``helpers.py``; nothing here imports playwright or medssl)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser.helpers import SCREENSHOT_DIR


@pytest.fixture
def screenshot_dir() -> Path:
    """Where screenshots go: ``$MEDSSL_BROWSER_SCREENSHOTS`` (``make browser-test``: ``runs/browser/``)."""
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    return SCREENSHOT_DIR
