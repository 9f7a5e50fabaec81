"""Run notebooks headlessly with papermill in a throw-away environment.

Usage in a test::

    def test_my_notebook_runs(run_notebook):
        res = run_notebook("10_pretrain.ipynb", {"data_overrides": {"n_subjects": 4}}, run="t")
        assert (res.run_dir / "isimed" / "config.json").is_file()

A notebook that several tests read is executed once per session by a session fixture
(``latent_space_run``: 20_latent_space, read by the tests of 20 and 25), so ``make test``
runs each notebook once besides the pipeline test (issue 18).

The kernel sees ``MEDSSL_RUNS=<tmp_path>/runs`` and a per-session ``MEDSSL_DATA``
(so the demo cohort and volume cache are built once per test session and worker,
never in the user's folders). The TotalSegmentator example volumes are fetched
once into the default data folder and linked into it, so they are downloaded at
most once per CI run. Tests using this fixture need the network the first time:
mark them ``@pytest.mark.network``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"


@dataclass
class NotebookRun:
    """An executed notebook: where it was written, the run folder, the parsed result."""

    output: Path
    run_dir: Path
    notebook: nbformat.NotebookNode

    def text_outputs(self) -> str:
        """All stream and text/plain outputs of the executed notebook, joined."""
        parts = []
        for cell in self.notebook.cells:
            for out in cell.get("outputs", []):
                if out.get("output_type") == "stream":
                    parts.append(out.get("text", ""))
                elif "data" in out and "text/plain" in out["data"]:
                    parts.append(out["data"]["text/plain"])
        return "\n".join(parts)


def _executor(runs: Path, data: Path, work: Path, env: dict[str, str] | None = None):
    """``run(notebook, parameters=None, *, run="test", timeout=900) -> NotebookRun`` writing under ``runs``."""
    import papermill as pm

    def _run(notebook: str, parameters: dict[str, Any] | None = None, *, run: str = "test",
             timeout: int = 900) -> NotebookRun:  # fmt: skip
        src = NOTEBOOKS / notebook
        assert src.is_file(), f"no notebook {src}"
        params = {"run": run, **(parameters or {})}
        out = work / "executed" / run / notebook
        out.parent.mkdir(parents=True, exist_ok=True)
        with pytest.MonkeyPatch.context() as mp:  # the kernel inherits this environment; restored afterwards
            mp.setenv("MEDSSL_RUNS", str(runs))
            mp.setenv("MEDSSL_DATA", str(data))
            mp.delenv("MEDSSL_CACHE", raising=False)  # -> $MEDSSL_DATA/cache, shared by the session
            mp.delenv("MEDSSL_HOME", raising=False)
            mp.setenv("MPLBACKEND", "agg")
            mp.setenv("PYTHONUNBUFFERED", "1")
            for key, value in (env or {}).items():
                mp.setenv(key, value)
            pm.execute_notebook(
                str(src), str(out), parameters=params, kernel_name="python3", cwd=str(work),
                progress_bar=False, execution_timeout=timeout,
            )  # fmt: skip
        return NotebookRun(output=out, run_dir=runs / run, notebook=nbformat.read(str(out), as_version=4))

    return _run


@pytest.fixture
def run_notebook(tmp_path, notebook_data_dir, monkeypatch):
    """``run(notebook, parameters=None, *, run="test", timeout=900) -> NotebookRun``."""
    runs = tmp_path / "runs"
    monkeypatch.setenv("MEDSSL_RUNS", str(runs))  # the test's own code sees the kernel's folders too
    monkeypatch.setenv("MEDSSL_DATA", str(notebook_data_dir))
    monkeypatch.delenv("MEDSSL_CACHE", raising=False)
    monkeypatch.delenv("MEDSSL_HOME", raising=False)
    return _executor(runs, notebook_data_dir, tmp_path)


# 20_latent_space at tiny parameters, executed ONCE per test session (issue 18: each notebook once): its own test
# reads the tables, 25_latent_viewer's test opens the same run. Tests using it share the xdist group "latent_space"
# (`make test` distributes with --dist loadgroup), so one worker runs it.
LATENT_SPACE_METHODS = ["isimed", "simclr", "simsiam", "reg2d"]  # SimSiam and a 2.5D context method (own cut_inputs)
LATENT_SPACE_PARAMS = {
    "methods": [*LATENT_SPACE_METHODS, "barlowtwins"],  # barlowtwins has no checkpoint: reported, skipped
    "data_overrides": {"n_subjects": 12, "target_spacing_mm": 6.0}, "n_patches_per_volume": 12, "stride_vox": 8,
    "n_corr_points": 30, "n_corr_partners": 1, "n_map_train_subjects": 1, "umap": False, "batch_size": 64,
}  # fmt: skip


@dataclass
class SharedRun:
    """A notebook executed once for several tests: its result, and a runner writing into the same runs folder."""

    result: NotebookRun
    run_notebook: Any
    methods: list[str]


@pytest.fixture(scope="session")
def latent_space_run(tmp_path_factory, notebook_data_dir) -> SharedRun:
    """``20_latent_space`` on tiny checkpoints of :data:`LATENT_SPACE_METHODS`, run ``nb20``."""
    from tests.helpers import tiny_checkpoints

    work = tmp_path_factory.mktemp("nb20")
    runs = work / "runs"
    tiny_checkpoints(runs / "nb20", LATENT_SPACE_METHODS)
    # One intra-op thread in the kernel: with other tests sharing the 2 cores, torch's
    # 2-thread convolutions spin-wait and run ~10x slower (measured 600 vs 5800 patches/s).
    run = _executor(runs, notebook_data_dir, work, env={"OMP_NUM_THREADS": "1"})
    return SharedRun(result=run("20_latent_space.ipynb", LATENT_SPACE_PARAMS, run="nb20"), run_notebook=run,
                     methods=list(LATENT_SPACE_METHODS))


def _check_conventions(notebook: str) -> nbformat.NotebookNode:
    """Assert the team's notebook conventions on the committed notebook; return it.

    Kernelspec ``python3``; the first code cell is tagged ``parameters`` and holds
    only ``name = <literal>`` lines, each with a comment; no ``def``/``class`` anywhere.
    """
    nb = nbformat.read(str(NOTEBOOKS / notebook), as_version=4)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{notebook}: kernelspec must be python3"
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    first = code_cells[0]
    assert "parameters" in first.get("metadata", {}).get("tags", []), f"{notebook}: first code cell not tagged"
    tree = ast.parse(first.source)
    for stmt in tree.body:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name), (
            f"{notebook}: parameters cell may only assign names: {ast.unparse(stmt)}"
        )
        ast.literal_eval(stmt.value)  # raises if not a literal
    for line in first.source.splitlines():
        if line.strip():
            assert "#" in line, f"{notebook}: parameter line without a comment: {line!r}"
    for cell in code_cells:
        for node in ast.walk(ast.parse(cell.source)):
            assert not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)), (
                f"{notebook}: notebooks stay thin, move `def`/`class`/`lambda` into the package"
            )
    return nb


@pytest.fixture
def check_notebook_conventions():
    """``check(notebook_name) -> NotebookNode``: asserts kernelspec, parameters cell and thinness."""
    return _check_conventions
