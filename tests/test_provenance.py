"""Every run and every headline table says which code and configuration made it; the README's results are
the numbers of the run they cite (issue 22)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch

import medssl
from medssl import pipeline, provenance
from medssl.data.volume import Volume
from medssl.methods import create_method
from medssl.readme_results import (
    check_readme_results,
    export_headlines,
    read_headlines_csv,
    results_markdown,
    update_readme_results,
)
from medssl.report import collect_results, write_report
from medssl.rundir import HEADLINE_COLUMNS, RunDir
from medssl.train import TrainConfig, fit
from tests.helpers import oblique_affine

REPO = Path(__file__).resolve().parents[1]


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git checkout with a medssl/ file, a notebook and a README, committed."""
    root = tmp_path / "repo"
    (root / "medssl").mkdir(parents=True)
    (root / "notebooks").mkdir()
    (root / "medssl" / "a.py").write_text("x = 1\n")
    (root / "README.md").write_text("readme\n")
    _git(root, "init", "-q")
    _git(root, "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    _git(root, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "first")
    return root


def test_code_version_names_the_head_commit_and_calls_the_tree_dirty_only_for_code_changes(repo, tmp_path):
    v = provenance.code_version(repo)
    assert v["commit"] == _git(repo, "rev-parse", "HEAD") and len(v["commit"]) == 40 and v["dirty"] is False
    (repo / "README.md").write_text("edited\n")  # documentation does not change a number
    assert provenance.code_version(repo)["dirty"] is False
    (repo / "notebooks" / "new.ipynb").write_text("{}")  # an untracked notebook does
    v = provenance.code_version(repo)
    assert v["dirty"] is True and v["changed"] == ["notebooks/new.ipynb"]
    (repo / "notebooks" / "new.ipynb").unlink()
    (repo / "medssl" / "a.py").write_text("x = 2\n")  # so does an edited module
    assert provenance.code_version(repo)["changed"] == ["medssl/a.py"]
    outside = tmp_path / "not-a-checkout"
    outside.mkdir()
    assert provenance.code_version(outside) == {"commit": None, "dirty": None, "changed": [], "repo": str(outside)}
    inside = repo / "site-packages"  # e.g. an installed copy in a virtualenv within some checkout: not its code
    inside.mkdir()
    assert provenance.code_version(inside)["commit"] is None


def test_package_versions_are_the_installed_ones():
    v = provenance.package_versions()
    assert set(v) == set(provenance.PACKAGES)
    assert v["torch"] == torch.__version__ and v["numpy"] == np.__version__ and v["medssl"] == medssl.__version__
    assert provenance.package_versions(["no-such-package-xyz"]) == {"no-such-package-xyz": None}


def _config(run: Path, method: str, lr: float) -> None:
    (run / method).mkdir(parents=True, exist_ok=True)
    (run / method / "config.json").write_text(json.dumps({"method": method, "train": {"lr": lr}}))


def test_the_config_hash_covers_every_config_and_the_plan_but_not_the_runs_name(tmp_path):
    plan_a = [{"notebook": "20.ipynb", "step": "20", "method": None, "parameters": {"run": "a", "stride_vox": 6}}]
    plan_b = [{**plan_a[0], "parameters": {"run": "b", "stride_vox": 6}}]
    for name, plan in (("a", plan_a), ("b", plan_b)):
        _config(tmp_path / name, "isimed", 1e-3)
        provenance.record_run_provenance(tmp_path / name, plan)
    h = provenance.config_hash(tmp_path / "a")
    assert len(h) == 16 and h == provenance.config_hash(tmp_path / "b")  # same configs and plan, other run name
    _config(tmp_path / "b", "isimed", 2e-3)
    assert provenance.config_hash(tmp_path / "b") != h  # a training setting changed
    _config(tmp_path / "b", "isimed", 1e-3)
    assert provenance.config_hash(tmp_path / "b") == h
    provenance.record_run_provenance(tmp_path / "b", [{**plan_a[0], "parameters": {"run": "b", "stride_vox": 4}}])
    assert provenance.config_hash(tmp_path / "b") != h  # a notebook parameter changed
    _config(tmp_path / "a", "simclr", 1e-3)
    assert provenance.config_hash(tmp_path / "a") != h  # another method's config joined the run
    run = json.loads((tmp_path / "b" / "provenance.json").read_text())
    assert run["commit"] == _git(REPO, "rev-parse", "HEAD") and len(run["history"]) == 1  # the earlier start is kept
    assert run["packages"]["torch"] == torch.__version__ and run["machine"]["torch_threads"] == torch.get_num_threads()


def _volumes(n: int = 3) -> list[Volume]:
    rng = np.random.default_rng(0)
    return [Volume(rng.normal(size=(1, 20, 19, 18)).astype(np.float32),
                   oblique_affine((1.2, 0.9, 2.5), (15.0, 5.0, -10.0), (0.0, 3.0 * k, 0.0)), f"c{k}") for k in range(n)]


def test_fit_records_the_commit_and_the_config_of_every_start_and_resume(tmp_path):
    torch.manual_seed(0)
    method = create_method("isimed", backbone="smallcnn", patch_size_vox=16, volumes_per_batch=2, patches_per_volume=2)
    config = TrainConfig(epochs=2, steps_per_epoch=1, device="cpu", precision="fp32")
    fit(method, _volumes(), config, tmp_path, progress=False, callbacks=[lambda r: r.get("step") == 1])
    fit(method, _volumes(), config, tmp_path, progress=False)  # resumed at step 1
    rec = json.loads((tmp_path / "provenance.json").read_text())
    assert rec["config_sha256"] == hashlib.sha256((tmp_path / "config.json").read_bytes()).hexdigest()
    assert [s["start_step"] for s in rec["sessions"]] == [0, 1]
    assert {s["commit"] for s in rec["sessions"]} == {_git(REPO, "rev-parse", "HEAD")}
    assert rec["packages"]["torch"] == torch.__version__


def _write_notebook(path: Path, sources: list[str], params: str) -> None:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell] + [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


def test_the_pipeline_records_provenance_and_every_headline_table_carries_commit_and_config_hash(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _write_notebook(nbs / "20_eval.ipynb", [
        "import pandas as pd\nfrom medssl.rundir import RunDir\nrd = RunDir(run)\n"
        "rd.write_headline(rd.step_dir('20_eval'), pd.DataFrame({'method': ['isimed', 'random-init'], "
        "'kind': ['method', 'baseline'], 'metric': ['distance_spearman'] * 2, 'value': [0.8, 0.3], 'split': ['test'] * 2, "
        "'n': [8, 8]}))"], "run = 'x'\nstride_vox = 4")
    runs = tmp_path / "runs"
    _config(runs / "r", "isimed", 1e-3)  # a method trained earlier in this run
    res = pipeline.run_pipeline({"steps": [{"notebook": "20_eval.ipynb", "parameters": {"stride_vox": 6}}]}, "r",
                                notebooks_dir=nbs, runs_root=runs, progress=False)
    assert res.ok
    run = json.loads((runs / "r" / "provenance.json").read_text())
    head_sha = _git(REPO, "rev-parse", "HEAD")
    assert run["commit"] == head_sha and run["plan"][0]["parameters"]["stride_vox"] == 6
    table = pd.read_csv(runs / "r" / "20_eval" / "headline.csv", dtype=str)
    assert list(table.columns) == HEADLINE_COLUMNS
    dirty = provenance.code_version()["dirty"]
    assert set(table["commit"]) == {head_sha[:12] + ("+dirty" if dirty else "")}
    assert set(table["config_hash"]) == {provenance.config_hash(runs / "r")}

    # the report shows them
    results = collect_results(RunDir(runs / "r"))
    assert results.provenance["tables"] == {(head_sha[:12] + ("+dirty" if dirty else ""),
                                             provenance.config_hash(runs / "r")): ["20_eval"]}
    html = write_report(RunDir(runs / "r")).read_text()
    assert f"commit {head_sha[:12]}" in html and provenance.config_hash(runs / "r") in html
    assert f"torch {torch.__version__}" in html


def test_tables_from_other_commits_are_flagged_in_the_report_and_old_tables_still_read(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.write_headline(rd.step_dir("20_a"), pd.DataFrame({"method": ["isimed"], "metric": ["m"], "value": [1.0],
                                                         "split": ["test"]}))
    rd.write_headline(rd.step_dir("30_b"), pd.DataFrame({"method": ["isimed"], "metric": ["m"], "value": [2.0],
                                                         "split": ["test"], "commit": ["0123456789ab"],
                                                         "config_hash": ["ffff"]}))
    old = rd.step_dir("40_old") / "headline.csv"  # a table written before the provenance columns existed
    old.write_text("step,method,kind,metric,value,std,n,split,higher_is_better,note\n40_old,isimed,method,m,3,,,test,True,\n")
    h = rd.headlines()
    assert list(h.columns) == HEADLINE_COLUMNS
    assert h.set_index("step").loc["30_b", "commit"] == "0123456789ab"  # digits stay text
    assert h.set_index("step").loc["40_old", "commit"] == ""
    html = write_report(rd).read_text()
    assert "WARNING: the headline tables come from 3 different code/config states" in html


# ----------------------------------------------------------------------------- the README's results


def _headlines(commit: str = "0123456789ab", chash: str = "89abcdef01234567") -> pd.DataFrame:
    rows = [
        ("20_latent_space", "isimed", "method", "distance_spearman", 0.887, np.nan, 1000),
        ("20_latent_space", "random-init", "baseline", "distance_spearman", 0.296, np.nan, 1000),
        ("20_latent_space", "isimed", "method", "correspondence_median_mm", 25.04, np.nan, 800),
        ("20_latent_space", "identity", "baseline", "correspondence_median_mm", 32.1, np.nan, 800),
        ("30_linear_probe/lesion", "isimed", "method", "auc", 0.483, 0.144, 8),
        ("30_linear_probe/lesion", "position-cubic", "baseline", "auc", 0.536, 0.126, 8),
        ("50_segmentation", "isimed", "method", "knn_dice_n5", 0.391, 0.05, 3),
        ("50_segmentation", "chance", "reference", "knn_dice_n5", 0.01, np.nan, 2),
    ]
    t = pd.DataFrame(rows, columns=["step", "method", "kind", "metric", "value", "std", "n"])
    return t.assign(split="test", higher_is_better=True, note="", commit=commit, config_hash=chash)[HEADLINE_COLUMNS]


def test_results_markdown_states_run_commit_split_n_and_sd():
    md = results_markdown(_headlines(), run="demo", csv_name="docs/results/x.csv")
    lines = md.splitlines()
    assert lines[0].startswith("Run `demo`, commit `0123456789ab`, config hash `89abcdef01234567`")
    assert lines[2] == ("| row | kind | 20_latent_space: distance_spearman (test, n=1000) | 20_latent_space: "
                        "correspondence_median_mm (test, n=800) | 30_linear_probe/lesion: auc (test, n=8) | "
                        "50_segmentation: knn_dice_n5 (test) |")
    rows = {line.split(" | ")[0][2:]: line for line in lines[4:]}
    assert list(rows) == ["isimed", "random-init", "identity", "position-cubic", "chance"]  # methods, baselines, refs
    assert rows["isimed"] == "| isimed | method | 0.887 | 25.04 | 0.483 ± 0.14 | 0.391 ± 0.05 (n=3) |"
    assert rows["chance"].endswith("| 0.01 (n=2) |")
    with pytest.raises(ValueError, match="2 code/config states"):
        results_markdown(pd.concat([_headlines(), _headlines(commit="fedcba987654").iloc[:1]]))


def test_the_readme_check_passes_on_the_generated_block_and_names_any_difference(tmp_path):
    csv = tmp_path / "docs" / "results" / "demo-headlines.csv"
    csv.parent.mkdir(parents=True)
    _headlines().to_csv(csv, index=False)
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Results\n\n<!-- medssl-results run=? commit=? config_hash=? csv=? -->\nold\n"
                      "<!-- /medssl-results -->\n\nWords.\n")
    update_readme_results(readme, csv, "demo")
    text = readme.read_text()
    assert text.startswith("# x\n\n## Results\n\n<!-- medssl-results run=demo commit=0123456789ab "
                           "config_hash=89abcdef01234567 csv=docs/results/demo-headlines.csv -->\nRun `demo`")
    assert text.endswith("<!-- /medssl-results -->\n\nWords.\n")
    assert check_readme_results(readme) == []
    readme.write_text(text.replace("| 0.887 |", "| 0.888 |"))  # a number quoted by hand
    assert any("differs from the one docs/results/demo-headlines.csv generates" in p for p in check_readme_results(readme))
    readme.write_text(text.replace("commit=0123456789ab", "commit=fedcba987654"))  # cites another run
    assert any("cites commit fedcba987654" in p for p in check_readme_results(readme))


def test_export_headlines_round_trips_a_runs_tables(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.write_headline(rd.step_dir("20_latent_space"), _headlines().iloc[:4])
    out = export_headlines(rd, tmp_path / "h.csv")
    back = read_headlines_csv(out)
    pd.testing.assert_frame_equal(back, rd.headlines())


def test_the_readme_results_table_equals_the_committed_run_it_cites():
    """README.md's results block is generated from docs/results/<run>-headlines.csv and names its commit."""
    assert check_readme_results(REPO / "README.md") == []


def test_medssl_report_exports_a_runs_tables_rewrites_the_readme_and_checks_it(tmp_path, monkeypatch, capsys):
    from medssl.cli import main

    monkeypatch.setenv("MEDSSL_RUNS", str(tmp_path / "runs"))
    rd = RunDir("demo")
    rd.write_headline(rd.step_dir("20_latent_space"), _headlines().iloc[:4].drop(columns=["commit", "config_hash"]))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- medssl-results run=x commit=x config_hash=x csv=x -->\n<!-- /medssl-results -->\n")
    csv = tmp_path / "docs" / "demo-headlines.csv"
    assert main(["report", "demo", "--export-csv", str(csv), "--update-readme", str(readme)]) == 0
    assert main(["report", "--check-readme", str(readme)]) == 0
    assert "the results table equals its CSV" in capsys.readouterr().out
    stamp = provenance.table_stamp(rd.path)
    assert f"commit={stamp['commit']} config_hash={stamp['config_hash']} csv=docs/demo-headlines.csv" in readme.read_text()
    readme.write_text(readme.read_text().replace("| 0.887 |", "| 0.9 |"))
    assert main(["report", "--check-readme", str(readme)]) == 1
