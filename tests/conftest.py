"""Shared fixtures: tiny synthetic volumes on disk (see ``tests/helpers.py`` for the writers)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest

# Make ``tests.helpers`` importable however pytest is launched (``pytest`` or ``python -m pytest``).
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.helpers import SyntheticVolume  # noqa: E402
from tests.helpers import make_volume_file as _make_volume_file  # noqa: E402


@pytest.fixture
def make_volume_file(tmp_path: Path) -> Callable[..., SyntheticVolume]:
    """Factory writing synthetic phantoms into ``tmp_path``.

    ``make_volume_file(shape=(20, 18, 16), affine=None, label=True, name="case",
    suffix=".nii.gz", landmark_mm=None, seed=0) -> SyntheticVolume`` (image and label
    paths, arrays, affine and the landmark's world mm). The default affine is oblique
    and anisotropic (0.8 x 1.5 x 3.5 mm).
    """

    def _make(**kwargs) -> SyntheticVolume:
        return _make_volume_file(kwargs.pop("directory", tmp_path), **kwargs)

    return _make


@pytest.fixture
def volume_file(make_volume_file) -> SyntheticVolume:
    """One default synthetic phantom (oblique, anisotropic NIfTI with a label map)."""
    return make_volume_file()



@pytest.fixture(scope="session")
def notebook_data_dir(tmp_path_factory) -> Path:
    """A session ``MEDSSL_DATA`` whose ``demo/totalseg-2.18.0`` links to the shared fetched examples."""
    from medssl.data.demo import fetch_totalseg_examples

    shared = fetch_totalseg_examples(progress=False)  # default data folder: once per CI run
    data = tmp_path_factory.mktemp("medssl-data")
    (data / "demo").mkdir()
    (data / "demo" / shared.name).symlink_to(shared.resolve(), target_is_directory=True)
    return data


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` first, otherwise in collection order (a stable sort, the same on every xdist worker).

    ``make test`` runs on two workers, which take the next test (or xdist group) as they finish one: with the
    long ones first, both workers start on them at once and the short ones fill in around them, instead of a
    two-minute test being handed out near the end and running alone while the other worker idles.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
