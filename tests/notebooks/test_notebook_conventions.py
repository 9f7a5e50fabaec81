"""Every committed notebook: python3 kernel, a literal-only `parameters` cell, no def/class, no stored outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_the_ordered_notebooks_are_all_there_and_numbered():
    names = [p.name for p in NOTEBOOKS]
    assert {"00_data.ipynb", "10_pretrain.ipynb", "20_latent_space.ipynb", "30_linear_probe.ipynb",
            "25_latent_viewer.ipynb", "40_report.ipynb"} <= set(names)
    assert all(n[:2].isdigit() and n[2] == "_" for n in names)  # ordered by their two-digit prefix


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_is_thin_parameterised_and_stripped(path, check_notebook_conventions):
    check_notebook_conventions(path.name)
    nb = nbformat.read(str(path), as_version=4)
    stored = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not stored, (f"{path.name}: cells {stored} carry outputs; "
                        "commit notebooks without outputs (runs/ has the executed ones)")
