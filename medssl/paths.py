"""Where medssl keeps data, caches and runs. One place, with environment overrides.

- ``MEDSSL_HOME``: root for everything below (default: the repository root when
  running from a checkout, else ``~/.medssl``).
- ``MEDSSL_DATA``: downloaded and generated data (default ``$MEDSSL_HOME/data``).
- ``MEDSSL_CACHE``: preprocessed-volume caches (default ``$MEDSSL_DATA/cache``).
- ``MEDSSL_RUNS``: run directories (default ``$MEDSSL_HOME/runs``).
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def home() -> Path:
    env = os.environ.get("MEDSSL_HOME")
    if env:
        return Path(env).expanduser()
    if (_REPO_ROOT / "pyproject.toml").exists():
        return _REPO_ROOT
    return Path.home() / ".medssl"


def data_dir() -> Path:
    env = os.environ.get("MEDSSL_DATA")
    return Path(env).expanduser() if env else home() / "data"


def cache_dir() -> Path:
    env = os.environ.get("MEDSSL_CACHE")
    return Path(env).expanduser() if env else data_dir() / "cache"


def runs_dir() -> Path:
    env = os.environ.get("MEDSSL_RUNS")
    return Path(env).expanduser() if env else home() / "runs"


def repo_root() -> Path:
    return _REPO_ROOT
