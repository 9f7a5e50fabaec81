"""The install files agree with each other, and the CI entry runs the README's test command."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _req_names(lines):
    names = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.append(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_environment_yml_delegates_to_requirements_txt_and_installs_the_package():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_entries = [d for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_entries) == 1, "environment.yml must have exactly one pip section"
    pip = pip_entries[0]["pip"]
    assert "-r requirements.txt" in pip and "-e ." in pip
    # conda-level packages are only the interpreter and pip: every library comes from requirements.txt
    conda_pkgs = [d for d in env["dependencies"] if isinstance(d, str)]
    assert sorted(p.split("=")[0] for p in conda_pkgs) == ["pip", "python"]
    py = [p for p in conda_pkgs if p.startswith("python")][0]
    assert py.endswith("3.11")


def test_requirements_pin_the_cpu_torch_and_cover_the_project_dependencies():
    req_lines = (ROOT / "requirements.txt").read_text().splitlines()
    assert "torch==2.13.0" in [l.strip() for l in req_lines]
    reqs = set(_req_names(req_lines))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = _req_names(project["dependencies"]) + _req_names(
        project["optional-dependencies"]["notebooks"] + project["optional-dependencies"]["test"])
    missing = sorted(set(deps) - reqs)
    assert not missing, f"pyproject dependencies missing from requirements.txt: {missing}"
    # the project card's stack (itkwidgets is an optional extra: it needs network access and a browser)
    for pkg in ["jupyterlab", "torch", "monai", "ipywidgets", "plotly", "umap-learn", "nibabel", "papermill"]:
        assert pkg in reqs, pkg


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci
    assert "make test" in readme and "make demo" in readme
