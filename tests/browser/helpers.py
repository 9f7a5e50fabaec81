"""Shared pieces of the browser tests: run/skip/fail rule, JupyterLab server, headless Chromium, kernel calls.

This file imports nothing from medssl or playwright at module level: the browser tests run
from a side venv with playwright (``make browser-test``), and ``make test`` collects them
in the project venv, where they are skipped (they are opt-in).

The rule (:func:`browser_verdict`, applied to every test marked ``browser`` by ``conftest.py``):
not asked for (``MEDSSL_BROWSER_TESTS`` unset): skip; asked for and able to run: run; asked for
but unable to (no playwright, no chromium, no project venv): skip with the reason, except under
CI (``CI=true``, which CI systems set), where it **fails**: there a skip would read as a pass.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import socket
import subprocess
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

CHROMIUM = Path(os.environ.get("MEDSSL_CHROMIUM", "/usr/bin/chromium"))
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
SCREENSHOT_DIR = Path(os.environ.get("MEDSSL_BROWSER_SCREENSHOTS", "/tmp/medssl-browser"))


OPT_IN = "browser tests are opt-in: set MEDSSL_BROWSER_TESTS=1 (make browser-test does)"


def in_ci(env: Mapping[str, str] | None = None) -> bool:
    """True under CI: ``CI`` set to true/1/yes (GitHub Actions, GitLab CI and most others set ``CI=true``)."""
    return (os.environ if env is None else env).get("CI", "").strip().lower() in ("true", "1", "yes")


def missing_piece(env: Mapping[str, str] | None = None, has_playwright: bool | None = None) -> str | None:
    """What the browser tests need and this machine lacks (None when nothing is missing)."""
    env = os.environ if env is None else env
    if has_playwright is None:
        has_playwright = importlib.util.find_spec("playwright") is not None
    chromium = Path(env.get("MEDSSL_CHROMIUM", "/usr/bin/chromium"))
    project_python = Path(env.get("MEDSSL_PROJECT_PYTHON", REPO / ".venv" / "bin" / "python"))
    if not has_playwright:
        return "needs the PyPI package `playwright` (pip install playwright; the system chromium is used)"
    if not chromium.exists():
        return f"needs Debian's chromium at {chromium} (apt-get install -y chromium; it could not be installed here)"
    if not project_python.exists():
        return f"needs the project venv's python at {project_python} (or set MEDSSL_PROJECT_PYTHON)"
    return None


def browser_verdict(env: Mapping[str, str] | None = None, has_playwright: bool | None = None) -> tuple[str, str]:
    """``("run" | "skip" | "fail", reason)`` for a browser test in this environment (module docstring)."""
    env = os.environ if env is None else env
    if env.get("MEDSSL_BROWSER_TESTS") != "1":
        return "skip", OPT_IN
    missing = missing_piece(env, has_playwright)
    if missing is None:
        return "run", ""
    if in_ci(env):
        return "fail", f"CI=true and the browser test cannot run: {missing}"
    return "skip", missing


def skip_reason() -> str | None:
    """Why the browser tests do not run here (None when they do); under CI a missing piece fails instead."""
    verdict, reason = browser_verdict()
    return None if verdict == "run" else reason


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


@contextlib.contextmanager
def jupyterlab_server(root_dir: Path, env: dict[str, str] | None = None):
    """JupyterLab (project venv) on 127.0.0.1 with a random token; yields ``(base_url, token)``."""
    port, token = _free_port(), secrets.token_hex(16)
    config_dir = root_dir / ".jupyter-config"
    # No news pop-up over the viewer (and no network call for it).
    (config_dir / "labconfig").mkdir(parents=True, exist_ok=True)
    (config_dir / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}})
    )
    full_env = {**os.environ, "MEDSSL_HEADLESS": "0", "JUPYTER_CONFIG_DIR": str(config_dir), **(env or {})}
    cmd = [
        str(PROJECT_PYTHON), "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root_dir}", "--expose-app-in-browser",
        "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
    ]  # fmt: skip
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers often run as root; the server still only listens on 127.0.0.1
    with open(root_dir / "jupyterlab.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=root_dir, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", proc)
            yield f"http://127.0.0.1:{port}", token
        finally:
            proc.terminate()  # only the server this fixture started
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.contextmanager
def chromium_page(width: int = 1400, height: int = 1000):
    """A page of headless Debian Chromium (WebGL2 through SwiftShader)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def open_notebook_and_run_all(page, base: str, token: str, notebook: str, timeout_ms: int = 120_000) -> None:
    """Open a notebook in JupyterLab, wait for its kernel, run every cell through JupyterLab's own command."""
    page.goto(f"{base}/lab/tree/{notebook}?token={token}", timeout=timeout_ms)
    page.wait_for_function("window.jupyterapp && document.querySelector('.jp-Notebook')", timeout=timeout_ms)
    page.wait_for_function(
        "(() => { const w = window.jupyterapp.shell.currentWidget;"
        " const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;"
        " return k && k.status === 'idle'; })()",
        timeout=timeout_ms,
    )
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")


def error_outputs(page) -> list[str]:
    """Texts of stderr/error outputs in the open notebook."""
    return page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()


def image_stats(png: Path) -> dict:
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


def changed_fraction(png_a: Path, png_b: Path) -> float:
    """Fraction of pixels that differ between two screenshots of the same size (project venv numpy)."""
    code = (
        "import sys, numpy as np; from PIL import Image\n"
        "a, b = (np.asarray(Image.open(p).convert('RGB')).astype(int) for p in sys.argv[1:3])\n"
        "print(float((np.abs(a - b).sum(-1) > 30).mean()) if a.shape == b.shape else 1.0)\n"
    )
    out = subprocess.run([str(PROJECT_PYTHON), "-c", code, str(png_a), str(png_b)], capture_output=True, text=True,
                         check=True)  # fmt: skip
    return float(out.stdout)


def kernel_exec(page, code: str, timeout_ms: int = 60_000) -> str:
    """Run ``code`` in the open notebook's kernel (JupyterLab's own kernel connection); return its stdout.

    The outputs go to this call only, not into the notebook's cells. Raises ``AssertionError``
    with the traceback when the code raises.
    """
    result = page.evaluate(
        """async ([code, timeoutMs]) => {
            const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
            const future = kernel.requestExecute({code: code, silent: false, store_history: false});
            let out = "", err = null;
            future.onIOPub = (msg) => {
                const t = msg.header.msg_type;
                if (t === "stream") out += msg.content.text;
                else if (t === "error") err = msg.content.ename + ": " + msg.content.evalue + "\\n"
                                               + msg.content.traceback.join("\\n");
            };
            const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error("timed out")), timeoutMs));
            try { await Promise.race([future.done, timeout]); } catch (e) { if (err === null) err = String(e); }
            return {out: out, err: err};
        }""",
        [code, timeout_ms],
    )
    assert result["err"] is None, f"kernel code failed:\n{code}\n{result['err']}"
    return result["out"]
