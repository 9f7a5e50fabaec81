"""notebooks/25_latent_viewer.ipynb opens the maps and dense embeddings 20_latent_space.ipynb wrote, headlessly."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.helpers import tiny_checkpoints

PARAMS = ("run", "methods", "source", "stride_vox", "case_a", "case_b", "projection", "max_scatter_points", "seed")

# 20_latent_space at tiny parameters, as its own smoke test runs it
TINY_20 = {
    "n_subjects": 12, "target_spacing_mm": 6.0, "n_patches_per_volume": 12, "stride_vox": 8, "n_corr_points": 30,
    "n_corr_partners": 1, "n_map_train_subjects": 1, "umap": False, "batch_size": 64,
}  # fmt: skip


def _files(folder) -> dict[str, tuple[int, int, int]]:
    """``{relative path: (inode, mtime_ns, size)}`` of every file under ``folder``."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def test_25_latent_viewer_notebook_follows_the_notebook_conventions(check_notebook_conventions):
    nb = check_notebook_conventions("25_latent_viewer.ipynb")
    params = next(c for c in nb.cells if c.cell_type == "code").source
    for name in PARAMS:
        assert f"{name} = " in params
    assert "methods = []" in params  # default: every trained method of the run


@pytest.mark.network
@pytest.mark.slow
def test_25_latent_viewer_reads_the_runs_maps_and_cached_embeddings_of_every_trained_method(run_notebook, monkeypatch):
    from medssl import paths

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # see test_20: 2-thread convolutions spin-wait beside other tests
    run_dir = paths.runs_dir() / "nb25"
    tiny_checkpoints(run_dir, ["isimed", "simclr"])
    run_notebook("20_latent_space.ipynb", {"methods": ["isimed", "simclr"], **TINY_20}, run="nb25")
    dense_cache = _files(run_dir / "eval" / "dense")
    assert any(name.endswith(".npy") for name in dense_cache)

    params = {"n_subjects": 12, "target_spacing_mm": 6.0, "stride_vox": 8, "max_scatter_points": 200,
              "n_neighbours": 10, "viewer_height": 300, "batch_size": 64}  # fmt: skip
    res = run_notebook("25_latent_viewer.ipynb", params, run="nb25")  # methods = []: every trained method
    out = res.run_dir / "25_latent_viewer"

    table = pd.read_csv(out / "point_query_centre.csv")
    assert list(table["method"]) == ["isimed", "simclr"]  # found in the run, random-init not asked for
    assert table["error_mm"].notna().all() and (table["error_mm"] >= 0).all()  # the demo cohort knows the truth
    assert (table["latent_distance"] >= 0).all()
    names = {p.name for p in out.iterdir()}
    assert {"point_query_isimed.png", "point_query_simclr.png"} <= names
    assert {"latent_scatter_z_mm.html", "latent_scatter_organ.html"} <= names
    # the embeddings came from 20's cache: nothing was recomputed, rewritten or replaced (same inodes, mtimes, sizes)
    assert _files(run_dir / "eval" / "dense") == dense_cache
    text = res.text_outputs()
    assert "SYNTHETIC" in text  # provenance stated
    assert text.count("VBox") >= 3  # 3D view, linked views and scatter explorer built without blocking
