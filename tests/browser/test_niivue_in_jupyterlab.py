"""Browser test (opt-in): the ipyniivue latent-map viewer renders in a real JupyterLab 4.

Skipped unless ``MEDSSL_BROWSER_TESTS=1``, the ``playwright`` Python package is
importable and ``/usr/bin/chromium`` exists. It needs (not in requirements.txt):

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
canvas to ``MEDSSL_BROWSER_SCREENSHOT`` (default ``/tmp/niivue_screenshot.png``)
and checks the canvas shows an image with the RGB overlay's colours.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
]
REPO = Path(__file__).resolve().parents[2]
PROJECT_PYTHON = Path(os.environ.get("MEDSSL_PROJECT_PYTHON", REPO / ".venv" / "bin" / "python"))
SCREENSHOT = Path(os.environ.get("MEDSSL_BROWSER_SCREENSHOT", "/tmp/niivue_screenshot.png"))


def _skip_reason() -> str | None:
    if os.environ.get("MEDSSL_BROWSER_TESTS") != "1":
        return "browser tests are opt-in: set MEDSSL_BROWSER_TESTS=1"
    if importlib.util.find_spec("playwright") is None:
        return "needs the PyPI package `playwright` (pip install playwright; the system chromium is used)"
    if not CHROMIUM.exists():
        return "needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)"
    if not PROJECT_PYTHON.exists():
        return f"needs the project venv's python at {PROJECT_PYTHON} (or set MEDSSL_PROJECT_PYTHON)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_server(url: str, proc: subprocess.Popen, timeout_s: float = 90.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer at {url} within {timeout_s} s")


def _image_stats(png: Path) -> dict:
    """Pixel statistics computed with the project venv's numpy + pillow (playwright's venv may lack them)."""
    code = (
        "import json, sys, numpy as np; from PIL import Image\n"
        "a = np.asarray(Image.open(sys.argv[1]).convert('RGB')).astype(int)\n"
        "flat = a.reshape(-1, 3)\n"
        "chroma = (flat.max(1) - flat.min(1)) > 40\n"
        "print(json.dumps({'std': float(a.std()), 'colours': int(len(np.unique(flat, axis=0))),\n"
        "                  'chromatic_fraction': float(chroma.mean()), 'shape': list(a.shape)}))\n"
    )
    out = subprocess.run([str(PROJECT_PYTHON), "-c", code, str(png)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.fixture
def jupyterlab(tmp_path):
    (tmp_path / "viewer.ipynb").write_text(json.dumps(_notebook()))
    port, token = _free_port(), secrets.token_hex(16)
    config_dir = tmp_path / ".jupyter-config"
    # No news pop-up over the viewer (and no network call for it).
    (config_dir / "labconfig").mkdir(parents=True)
    (config_dir / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}})
    )
    env = {**os.environ, "MEDSSL_HEADLESS": "0", "JUPYTER_CONFIG_DIR": str(config_dir)}
    cmd = [
        str(PROJECT_PYTHON), "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", "--expose-app-in-browser",
        "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
    ]  # fmt: skip
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers often run as root; the server still only listens on 127.0.0.1
    with open(tmp_path / "jupyterlab.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", proc)
            yield f"http://127.0.0.1:{port}", token
        finally:
            proc.terminate()  # only the server this fixture started
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_niivue_viewer_renders_the_image_with_the_rgb_overlay_in_jupyterlab(jupyterlab):
    from playwright.sync_api import sync_playwright

    base, token = jupyterlab
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"{base}/lab/tree/viewer.ipynb?token={token}", timeout=120_000)
            page.wait_for_function("window.jupyterapp && document.querySelector('.jp-Notebook')", timeout=120_000)
            # Wait for the kernel, then run every cell through JupyterLab's own command.
            page.wait_for_function(
                "(() => { const w = window.jupyterapp.shell.currentWidget;"
                " const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;"
                " return k && k.status === 'idle'; })()",
                timeout=120_000,
            )
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            canvas = page.wait_for_selector(".jp-OutputArea-output canvas", state="visible", timeout=120_000)
            page.wait_for_timeout(6000)  # NiiVue loads both volumes asynchronously, then draws
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            canvas.screenshot(path=str(SCREENSHOT))
            page.screenshot(path=str(SCREENSHOT.with_name(SCREENSHOT.stem + "_page.png")))
            errors = page.locator(
                ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
            ).all_inner_texts()
        finally:
            browser.close()
    stats = _image_stats(SCREENSHOT)
    print(f"NiiVue canvas screenshot {SCREENSHOT}: {stats}")
    assert not any("Traceback" in e or "Error" in e for e in errors), errors
    assert stats["shape"][0] > 100 and stats["shape"][1] > 100, stats
    assert stats["std"] > 10 and stats["colours"] > 50, f"the NiiVue canvas looks blank: {stats}"
    assert stats["chromatic_fraction"] > 0.01, f"no RGB overlay colours on the canvas: {stats}"
