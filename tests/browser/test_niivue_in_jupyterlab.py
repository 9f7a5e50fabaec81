"""Browser test (opt-in): the ipyniivue latent-map viewer renders in a real JupyterLab 4.

Skipped unless ``MEDSSL_BROWSER_TESTS=1``; with it, it runs where the ``playwright`` Python
package is importable and ``/usr/bin/chromium`` exists, and is skipped otherwise, except under
``CI=true``, where a test that cannot run fails (``helpers.browser_verdict``). It needs (not in
requirements.txt):

- Debian: ``apt-get install -y chromium``
- PyPI: ``pip install playwright`` (no ``playwright install``: the system Chromium is used)

Playwright may live in another venv than the project (this file imports nothing
from medssl; the notebook's kernel runs in the project venv, found via
``MEDSSL_PROJECT_PYTHON`` or ``<repo>/.venv/bin/python``):

    MEDSSL_BROWSER_TESTS=1 /tmp/pwvenv/bin/python -m pytest -p no:cacheprovider \\
        --confcutdir tests/browser tests/browser/test_niivue_in_jupyterlab.py

The test starts JupyterLab on 127.0.0.1 with a random token, opens a notebook that
builds a tiny synthetic volume and latent map and shows ``niivue_viewer``, runs
it from headless Chromium (WebGL2 through SwiftShader), screenshots the viewer
canvas to ``$MEDSSL_BROWSER_SCREENSHOTS/niivue.png`` (default ``/tmp/medssl-browser``)
and checks the canvas shows an image with the RGB overlay's colours. Shared pieces
(skip rule, JupyterLab server, Chromium) are in ``helpers.py``.
"""

from __future__ import annotations

import json

import pytest

from tests.browser.helpers import (
    chromium_page,
    error_outputs,
    image_stats,
    jupyterlab_server,
    open_notebook_and_run_all,
)

pytestmark = pytest.mark.browser  # run, skip or (under CI) fail: conftest.py, helpers.browser_verdict

# The notebook the browser runs: data made in the kernel (project venv), then the viewer.
SETUP_CELL = """\
import numpy as np
from medssl.data.io import write_nifti
from medssl.data.volume import Volume
from medssl.evaluate.maps import save_latent_map
x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (48, 40, 36)], indexing="ij")
body = ((x / 0.9) ** 2 + (y / 0.8) ** 2 + (z / 0.9) ** 2 < 1).astype(np.float32)
image = body * (0.5 + 0.4 * np.sin(6 * x) * np.cos(5 * y))
affine = np.array([[2.5, 0.3, 0, -60], [-0.2, 3.0, 0.2, -55], [0, -0.3, 3.5, -60], [0, 0, 0, 1.0]])
vol = Volume(image[None], affine, "browser")
write_nifti("image.nii.gz", image, affine)
rgb = np.stack([(x + 1) / 2, (y + 1) / 2, (z + 1) / 2], axis=-1) * body[..., None]
save_latent_map("map.nii.gz", rgb, vol)
"""
VIEWER_CELL = """\
from medssl.viz.viewers import niivue_viewer
viewer = niivue_viewer("image.nii.gz", {"demo": "map.nii.gz"}, opacity=0.6, height=400)
viewer
"""


def _notebook() -> dict:
    cell = lambda src: {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": src}
    return {
        "cells": [cell(SETUP_CELL), cell(VIEWER_CELL)],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


@pytest.fixture
def jupyterlab(tmp_path):
    (tmp_path / "viewer.ipynb").write_text(json.dumps(_notebook()))
    with jupyterlab_server(tmp_path) as server:
        yield server


def test_niivue_viewer_renders_the_image_with_the_rgb_overlay_in_jupyterlab(jupyterlab, screenshot_dir):
    base, token = jupyterlab
    shot = screenshot_dir / "niivue.png"
    with chromium_page(1280, 1000) as page:
        open_notebook_and_run_all(page, base, token, "viewer.ipynb")
        canvas = page.wait_for_selector(".jp-OutputArea-output canvas", state="visible", timeout=120_000)
        page.wait_for_timeout(6000)  # NiiVue loads both volumes asynchronously, then draws
        canvas.screenshot(path=str(shot))
        page.screenshot(path=str(shot.with_name("niivue_page.png")))
        errors = error_outputs(page)
    stats = image_stats(shot)
    print(f"NiiVue canvas screenshot {shot}: {stats}")
    assert not any("Traceback" in e or "Error" in e for e in errors), errors
    assert stats["shape"][0] > 100 and stats["shape"][1] > 100, stats
    assert stats["std"] > 10 and stats["colours"] > 50, f"the NiiVue canvas looks blank: {stats}"
    assert stats["chromatic_fraction"] > 0.01, f"no RGB overlay colours on the canvas: {stats}"
