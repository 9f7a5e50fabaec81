"""Browser test (CI: ``make browser-test``): 25_latent_viewer.ipynb on a real run, in JupyterLab 4 and Chromium.

A real run at tiny parameters is made first with the project's own pipeline
(``medssl pipeline --only 00 10 20``: demo cohort of 12 subjects at 6 mm, ISImed with
the ``tiny`` preset, 20_latent_space writing the latent maps and the dense cache), or
taken from ``MEDSSL_BROWSER_RUN`` (a run directory, e.g. ``runs/demo``). The viewer
gets the data parameters 20_latent_space ran with (from the run's ``pipeline.json``).
``25_latent_viewer.ipynb`` gets its parameters injected by papermill (``--prepare-only``,
nothing executed) and is opened and run in JupyterLab from headless Chromium. The test checks that

- the 3D view renders (canvas not blank, with the map's colours) in "slices + 3D" and,
  after clicking the toggle, in "3D render";
- both linked views render, and a click in view A moves view B's crosshair to the match:
  B's crosshair position as NiiVue itself reports it (a location report asked for from the
  kernel, in B's voxels) equals the match's voxel within NiiVue's half-voxel snap, away from
  where it started; the status reports the match, the latent distance and the error in mm;
- a click in the scatter explorer's image rings latent neighbours in the plotly scatter;

and saves screenshots to ``$MEDSSL_BROWSER_SCREENSHOTS`` (``runs/browser/`` via make).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.browser.helpers import (
    PROJECT_PYTHON,
    REPO,
    changed_fraction,
    chromium_page,
    error_outputs,
    image_stats,
    jupyterlab_server,
    kernel_exec,
    open_notebook_and_run_all,
)

pytestmark = pytest.mark.browser  # run, skip or (under CI) fail: conftest.py, helpers.browser_verdict

NOTEBOOK = "25_latent_viewer.ipynb"
# A real pipeline run at tiny parameters (plan-wide -p goes to the notebooks that declare the name).
TINY_PIPELINE = [
    "--plan", "demo", "--only", "00", "10", "20", "--methods", "isimed",
    "-p", "n_subjects", "12", "-p", "target_spacing_mm", "6.0", "-p", "10_pretrain.preset", "tiny",
    "-p", "20_latent_space.n_patches_per_volume", "12", "-p", "20_latent_space.stride_vox", "8",
    "-p", "20_latent_space.n_corr_points", "30", "-p", "20_latent_space.n_corr_partners", "1",
    "-p", "20_latent_space.n_map_train_subjects", "1", "-p", "20_latent_space.umap", "false",
    "-p", "20_latent_space.batch_size", "64",
]  # fmt: skip
TINY_VIEWER = {"max_scatter_points": 600, "n_neighbours": 20, "viewer_height": 360}
# 25's parameters that must equal what 20_latent_space ran with (same cohort, same dense cache)
SHARED_WITH_20 = ("source", "n_subjects", "target_spacing_mm", "seed", "stride_vox", "batch_size")


# the scatter's second trace: latent neighbours of the last click in the image
RINGED = ".medssl-scatter .scatterlayer .trace:nth-child(2) path.point"


def _parameters_of_20(run_dir: Path) -> dict:
    """The shared parameters 20_latent_space ran with, from the run's ``pipeline.json`` (empty if none)."""
    record = run_dir / "pipeline.json"
    if not record.is_file():
        return {}
    steps = json.loads(record.read_text())["steps"]
    ran = next((s["parameters"] for s in steps if s["step"] == "20_latent_space" and s["status"] == "ok"), {})
    return {k: ran[k] for k in SHARED_WITH_20 if k in ran}


@pytest.fixture(scope="module")
def viewer_notebook(tmp_path_factory):
    """``(root_dir, env)``: a run with real maps and the viewer notebook with its parameters injected."""
    root = tmp_path_factory.mktemp("latent-viewer")
    env = {**os.environ, "MEDSSL_RUNS": str(root / "runs"), "PYTHONUNBUFFERED": "1"}
    existing = os.environ.get("MEDSSL_BROWSER_RUN")
    if existing:
        run_dir, params = Path(existing).resolve(), {}
    else:
        run_dir, params = root / "runs" / "browser", dict(TINY_VIEWER)
        started = time.time()
        log = root / "pipeline.log"
        with open(log, "w") as f:
            proc = subprocess.run([str(PROJECT_PYTHON), "-m", "medssl.cli", "pipeline", "--run", "browser",
                                   *TINY_PIPELINE], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)  # fmt: skip
        assert proc.returncode == 0, f"the tiny pipeline run failed; see {log}:\n{log.read_text()[-3000:]}"
        print(f"tiny run made in {time.time() - started:.0f} s: {run_dir}")
    assert (run_dir / "20_latent_space" / "maps").is_dir(), f"{run_dir} has no latent maps"
    # run names are plain names inside MEDSSL_RUNS (RunDir refuses paths): point the kernels' MEDSSL_RUNS at the run
    env["MEDSSL_RUNS"] = str(run_dir.parent)
    params.update(_parameters_of_20(run_dir), run=run_dir.name)
    subprocess.run([str(PROJECT_PYTHON), "-m", "papermill", str(REPO / "notebooks" / NOTEBOOK), str(root / NOTEBOOK),
                    "--prepare-only", "-y", json.dumps(params)], check=True, env=env, capture_output=True)  # fmt: skip
    return root, env


def _wait_until_all_cells_ran(page, timeout_ms: int = 300_000) -> None:
    page.wait_for_function(
        "(() => { const w = window.jupyterapp.shell.currentWidget;"
        " const cells = w.content.widgets.filter(c => c.model.type === 'code');"
        " const k = w.sessionContext.session && w.sessionContext.session.kernel;"
        " return k && k.status === 'idle' && cells.every(c => c.model.executionCount !== null); })()",
        timeout=timeout_ms,
    )


def _canvas(page, selector: str):
    """The (first) NiiVue canvas inside ``selector``, scrolled into view and given time to draw."""
    canvas = page.locator(f"{selector} canvas").first
    canvas.wait_for(state="attached", timeout=60_000)
    canvas.scroll_into_view_if_needed()
    page.wait_for_timeout(3000)  # let NiiVue load and draw before the first screenshot
    return canvas


def _rendered(stats: dict, colours: bool) -> bool:
    big = stats["shape"][0] > 100 and stats["shape"][1] > 100
    drawn = stats["std"] > 10 and stats["colours"] > 50
    return big and drawn and (not colours or stats["chromatic_fraction"] > 0.01)


def _screenshot_rendered(page, canvas, png: Path, what: str, colours: bool = True, timeout_s: float = 90.0) -> dict:
    """Screenshot ``canvas`` until it shows an image (and the map's colours). Fails with the last statistics.

    NiiVue loads volumes asynchronously and shows "loading ..." meanwhile. Under headless
    Chromium it sometimes misses the redraw after loading when a screenshot is taken
    while it loads; a 1-pixel viewport resize makes it redraw what it has (volumes that
    never loaded still show "loading ...", so this cannot hide a failure).
    """
    deadline = time.time() + timeout_s
    viewport = page.viewport_size
    while True:
        canvas.screenshot(path=str(png))
        stats = image_stats(png)
        if _rendered(stats, colours) or time.time() > deadline:
            break
        page.set_viewport_size({"width": viewport["width"] + 1, "height": viewport["height"]})
        page.wait_for_timeout(1000)
        page.set_viewport_size(viewport)
        page.wait_for_timeout(2000)
    print(f"{what}: {png} {stats}")
    assert stats["shape"][0] > 100 and stats["shape"][1] > 100, (what, stats)
    assert stats["std"] > 10 and stats["colours"] > 50, f"{what} looks blank: {stats}"
    if colours:
        assert stats["chromatic_fraction"] > 0.01, f"{what}: no latent map colours on the canvas: {stats}"
    return stats


SHOWN = ".medssl-scatter .scatterlayer .trace:nth-child(1) path.point"


def _rerun_cell_until(page, source_marker: str, drawn, what: str, tries: int = 3) -> None:
    """Re-run the cell whose source contains ``source_marker`` while ``drawn()`` is false.

    Under heavy load, JupyterLab here sometimes drops the first state update of a freshly
    opened anywidget (plotly 7.1's FigureWidget: its figure; ipyniivue: its volumes), and
    the view stays empty or at "loading ..." (seen in about one run in three on a busy
    2-core machine). Re-running the cell makes new widgets. The number of re-runs is
    printed, so the rate shows in the log; the test fails if it never draws.
    """
    locate = ("window.jupyterapp.shell.currentWidget.content.widgets.findIndex("
              f"c => c.model.sharedModel.getSource().includes('{source_marker}'))")  # fmt: skip
    for attempt in range(tries + 1):
        if drawn():
            print(f"{what} drawn after {attempt} re-run(s) of its cell")
            return
        if attempt < tries:
            page.evaluate(f"(() => {{ const nb = window.jupyterapp.shell.currentWidget.content;"
                          f" nb.activeCellIndex = {locate};"
                          " window.jupyterapp.commands.execute('notebook:run-cell'); })()")
            page.wait_for_timeout(2000)
            _wait_until_all_cells_ran(page, 120_000)
    raise AssertionError(f"{what} stayed empty after {tries} re-runs of its cell")


def _canvas_drawn(page, selector: str, png: Path, timeout_s: float = 30.0) -> bool:
    try:
        _screenshot_rendered(page, _canvas(page, selector), png, selector, timeout_s=timeout_s)
        return True
    except AssertionError:
        return False


def _scatter_drawn(page) -> bool:
    page.locator(".medssl-scatter-explorer").last.scroll_into_view_if_needed()
    page.wait_for_timeout(3000)
    return page.locator(SHOWN).count() > 0


def _click_until(page, canvas, done_js: str, fractions=((0.34, 0.4), (0.5, 0.5), (0.17, 0.5), (0.8, 0.5))) -> tuple:
    """Click inside ``canvas`` at relative positions until ``done_js`` holds; returns the position that worked."""
    box = canvas.bounding_box()
    for fx, fy in fractions:
        page.mouse.click(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
        try:
            page.wait_for_function(done_js, timeout=15_000)
            return fx, fy
        except Exception:  # noqa: BLE001 (playwright's TimeoutError: try the next position)
            continue
    raise AssertionError(f"no click in the canvas made this true: {done_js}")


# Kernel code run beside the notebook (the LinkedQueryViews object is the notebook's ``linked_views``):
# record every location report of B's NiiVue view, and ask NiiVue to report its crosshair.
# ``move_crosshair_in_vox(0, 0, 0)`` runs NiiVue's moveCrosshairInVox in the browser, which snaps the
# crosshair to its voxel and sends a location_change with NiiVue's own frac, vox and mm of it.
WATCH_B = """
import json as _json
import numpy as _np
from medssl.viz.query import NiiVueGrid as _Grid
_b_reports = []
linked_views.nv_b.on_location_change(lambda e: _b_reports.append(dict(e)))
_b_grid = _Grid.from_nifti(linked_views.images[1])
print(len(_b_reports))
"""
ASK_B = "linked_views.nv_b.move_crosshair_in_vox(0, 0, 0); print(len(_b_reports))"
LAST_B = """
_e = _b_reports[-1]
print(_json.dumps({"n": len(_b_reports), "frac": list(_e["frac"]), "mm": list(_e["mm"][:3]),
                   "vox": _b_grid.mm_to_vox(_np.asarray(_e["mm"][:3], dtype=float)).tolist()}))
"""
LAST_MATCH = """
_m = linked_views.last_match
_keys = ("query_mm_a", "matched_mm_b", "matched_vox_b", "frac_b")
print(_json.dumps(None if _m is None else {k: _m.as_dict()[k] for k in _keys}))
"""
CLICKS_IN_A = ((0.34, 0.4), (0.5, 0.5), (0.17, 0.5), (0.8, 0.5), (0.25, 0.3))


def _at(canvas, fx: float, fy: float) -> tuple[float, float]:
    box = canvas.bounding_box()
    return box["x"] + fx * box["width"], box["y"] + fy * box["height"]


def _niivue_crosshair_of_b(page, timeout_s: float = 30.0) -> dict:
    """B's crosshair as NiiVue reports it: ``{"frac", "mm", "vox"}`` (vox: B's NIfTI array indices, from NiiVue's mm)."""
    n_before = int(kernel_exec(page, ASK_B))
    deadline = time.time() + timeout_s
    while time.time() < deadline:  # the report arrives as a comm message, handled between kernel requests
        page.wait_for_timeout(500)
        if int(kernel_exec(page, "print(len(_b_reports))")) > n_before:
            return json.loads(kernel_exec(page, LAST_B))
    raise AssertionError(f"NiiVue did not report B's crosshair within {timeout_s} s")


def _new_match(page, before: str, timeout_s: float = 20.0) -> dict | None:
    """The kernel's ``linked_views.last_match`` once it differs from ``before`` (None: the click gave no match)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        page.wait_for_timeout(500)
        now = kernel_exec(page, LAST_MATCH)
        if now != before:
            return json.loads(now)
    return None


def test_latent_viewer_renders_3d_and_linked_views_and_a_click_in_a_moves_bs_crosshair(viewer_notebook, screenshot_dir):
    root, env = viewer_notebook
    shots = screenshot_dir
    with jupyterlab_server(root, env) as (base, token), chromium_page(1500, 1100) as page:
        open_notebook_and_run_all(page, base, token, NOTEBOOK)
        _wait_until_all_cells_ran(page)
        errors = error_outputs(page)
        assert not any("Traceback" in e or "Error" in e for e in errors), errors

        # 1. the 3D view, in "slices + 3D" and then "3D render"
        _rerun_cell_until(page, "latent_map_3d_viewer(", lambda: _canvas_drawn(page, ".medssl-3d-viewer",
                          shots / "latent_3d_slices_and_render.png"), "3D view")
        view3d = _canvas(page, ".medssl-3d-viewer")
        _screenshot_rendered(page, view3d, shots / "latent_3d_slices_and_render.png", "3D view (slices + 3D)")
        page.locator(".medssl-3d-viewer button", has_text="3D render").click()
        page.wait_for_timeout(3000)
        _screenshot_rendered(page, view3d, shots / "latent_3d_render.png", "3D view (3D render)")
        assert changed_fraction(shots / "latent_3d_slices_and_render.png", shots / "latent_3d_render.png") > 0.05

        # 2. linked views: both render; a click in A moves B's crosshair and reports the match
        _rerun_cell_until(page, "LinkedQueryViews(", lambda: _canvas_drawn(page, ".medssl-view-a", shots / "linked_a.png")
                          and _canvas_drawn(page, ".medssl-view-b", shots / "linked_b_before.png"), "linked views")
        canvas_a, canvas_b = _canvas(page, ".medssl-view-a"), _canvas(page, ".medssl-view-b")
        _screenshot_rendered(page, canvas_a, shots / "linked_a.png", "linked view A")
        _screenshot_rendered(page, canvas_b, shots / "linked_b_before.png", "linked view B")
        kernel_exec(page, WATCH_B)
        start = _niivue_crosshair_of_b(page)  # NiiVue's own report of B's crosshair before any click
        for fx, fy in CLICKS_IN_A:  # a click whose match lies elsewhere than B's starting crosshair
            before = kernel_exec(page, LAST_MATCH)
            page.mouse.click(*_at(canvas_a, fx, fy))
            match = _new_match(page, before)
            if match is not None and max(abs(a - b) for a, b in zip(match["matched_vox_b"], start["vox"])) > 1:
                break
        else:
            raise AssertionError(f"no click in A gave a match away from B's starting crosshair {start}")
        page.wait_for_timeout(2500)  # B redraws at its new crosshair
        canvas_b.screenshot(path=str(shots / "linked_b_after.png"))
        page.locator(".medssl-linked-views").screenshot(path=str(shots / "linked_views.png"))
        # B's crosshair as NiiVue itself has it (its location report, in B's voxels) is the match, within
        # the half voxel NiiVue's snap to a voxel centre may move it (a patch centre can be a half-integer)
        after = _niivue_crosshair_of_b(page)
        print(f"B's crosshair (NiiVue): before {start}, after {after}; expected match {match}")
        assert max(abs(a - b) for a, b in zip(after["vox"], match["matched_vox_b"])) <= 0.5 + 1e-3, (after, match)
        assert max(abs(a - b) for a, b in zip(after["vox"], start["vox"])) > 1, "B's crosshair did not move"
        status = page.locator(".medssl-linked-views .medssl-query-status").inner_text()
        print(f"status: {status}")
        assert re.search(r"latent distance \d", status) and re.search(r"error \d+(\.\d+)? mm", status), status
        # the point we query is where NiiVue says it put A's crosshair (non-oblique demo grids: same mm)
        ours = [float(v) for v in re.search(r"\(([-\d.]+), ([-\d.]+), ([-\d.]+)\) mm", status).groups()]
        niivue = [float(v) for v in re.search(r"NiiVue reported \(([-\d.]+), ([-\d.]+), ([-\d.]+)\) mm", status).groups()]
        assert max(abs(a - b) for a, b in zip(ours, niivue)) <= 0.11, (ours, niivue)

        # 3. scatter explorer: a click in its image rings latent neighbours in the scatter
        _rerun_cell_until(page, "LatentScatterExplorer(", lambda: _scatter_drawn(page), "latent scatter")
        scatter_image = _canvas(page, ".medssl-scatter-image")
        _screenshot_rendered(page, scatter_image, shots / "latent_scatter_image.png", "scatter explorer's image")
        shown = page.locator(SHOWN).count()
        assert shown > 20, f"the scatter shows only {shown} grid points"
        assert page.locator(RINGED).count() == 0
        _click_until(page, scatter_image, "!!document.querySelector('.medssl-scatter-status')")
        page.wait_for_timeout(1500)
        ringed = page.locator(RINGED).count()
        page.locator(".medssl-scatter-explorer").screenshot(path=str(shots / "latent_scatter_linked.png"))
        page.screenshot(path=str(shots / "latent_viewer_page.png"), full_page=True)
    assert ringed > 1, f"no latent neighbours ringed in the scatter after a click in the image ({ringed} points)"
