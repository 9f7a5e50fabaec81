"""notebooks/40_report.ipynb puts another run side by side when `compare_with` names one."""

from __future__ import annotations

import shutil

from tests.test_report import _two_runs


def test_40_report_with_compare_with_shows_both_runs_and_writes_the_comparison(run_notebook, tmp_path):
    made = tmp_path / "made"
    a, b = _two_runs(made)
    runs = tmp_path / "runs"  # the fixture's MEDSSL_RUNS
    runs.mkdir(exist_ok=True)
    for rd in (a, b):
        shutil.copytree(rd.path, runs / rd.name)
    res = run_notebook("40_report.ipynb", {"compare_with": "seed1"}, run="seed0")
    text = res.text_outputs() + "\n".join(  # the comparison's sentences are Markdown and HTML outputs
        "".join(out.get("data", {}).get(kind, "")) for cell in res.notebook.cells for out in cell.get("outputs", [])
        for kind in ("text/markdown", "text/html"))
    assert "Run A = seed0, run B = seed1" in text and "does NOT beat aligned-identity (scale+shift) (20)" in text
    assert "settings: isimed: train.seed: 0 vs 1" in text and "#f8d7d7" in text  # the styled table, red cell
    assert (res.run_dir / "40_report" / "compare_seed1.csv").is_file()
    report = (res.run_dir / "40_report" / "report.html").read_text(encoding="utf-8")
    assert "Compared with run seed1" in report and "#f8d7d7" in report
