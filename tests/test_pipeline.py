"""The papermill pipeline runner: plan expansion, execution order, failure reporting."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from medssl import pipeline


def _write_notebook(path, sources, params="x = 1"):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell] + [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


def test_plan_runs_pretraining_once_per_method_and_passes_run_and_method(tmp_path):
    plan = {
        "methods": ["isimed", "simclr"],
        "steps": [
            {"notebook": "00_data.ipynb", "parameters": {"n_subjects": 4}},
            {"notebook": "10_pretrain.ipynb", "per_method": True, "parameters": {"preset": "tiny"}},
            {"notebook": "20_latent_space.ipynb"},
        ],
    }
    steps = pipeline.expand_plan(pipeline.load_plan(plan), "r1", runs_root=tmp_path,
                                 overrides={"seed": 3, "10_pretrain.epochs": 2})
    assert [(s.step, s.method) for s in steps] == [
        ("00_data", None), ("10_pretrain", "isimed"), ("10_pretrain", "simclr"), ("20_latent_space", None)]
    assert steps[1].output == str(tmp_path / "r1" / "isimed" / "10_pretrain.ipynb")
    assert steps[1].parameters == {"run": "r1", "preset": "tiny", "seed": 3, "epochs": 2, "method": "isimed"}
    assert steps[0].parameters == {"run": "r1", "n_subjects": 4, "seed": 3}  # per-notebook override not leaked
    assert steps[3].parameters["methods"] == ["isimed", "simclr"]


def test_plan_validation_rejects_unknown_step_keys():
    with pytest.raises(ValueError, match="unknown keys"):
        pipeline.load_plan({"steps": [{"notebook": "a.ipynb", "paramters": {}}]})
    with pytest.raises(FileNotFoundError, match="neither a known plan"):
        pipeline.load_plan("no-such-plan")


def test_pipeline_executes_in_order_and_writes_status(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    # each notebook appends to a log file, so the execution order is observable
    log = tmp_path / "order.txt"
    for name in ["00_a.ipynb", "10_b.ipynb"]:
        _write_notebook(nbs / name, [f"open({str(log)!r}, 'a').write({name!r} + ':' + str(run) + ';')"], params="run = 'x'")
    plan = {"steps": [{"notebook": "00_a.ipynb"}, {"notebook": "10_b.ipynb"}]}
    res = pipeline.run_pipeline(plan, "r", notebooks_dir=nbs, runs_root=tmp_path / "runs", progress=False)
    assert log.read_text() == "00_a.ipynb:r;10_b.ipynb:r;"
    assert [s.status for s in res.steps] == ["ok", "ok"]
    status = json.loads((tmp_path / "runs" / "r" / "pipeline.json").read_text())
    assert [s["status"] for s in status["steps"]] == ["ok", "ok"]
    assert (tmp_path / "runs" / "r" / "00_a" / "00_a.ipynb").exists()


def test_a_plan_naming_a_missing_notebook_is_an_error_before_anything_runs(tmp_path):
    """Issue 20 item 8: a missing notebook used to count as "skipped", and the pipeline as ok."""
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    ran = tmp_path / "ran.txt"
    _write_notebook(nbs / "00_a.ipynb", [f"open({str(ran)!r}, 'w')"], params="run = 'x'")
    plan = {"steps": [{"notebook": "00_a.ipynb"}, {"notebook": "20_missing.ipynb"}]}
    with pytest.raises(FileNotFoundError, match="20_missing.ipynb.*nothing was run"):
        pipeline.run_pipeline(plan, "r", notebooks_dir=nbs, runs_root=tmp_path / "runs", progress=False)
    assert not ran.exists() and not (tmp_path / "runs" / "r" / "pipeline.json").exists()
    assert pipeline.missing_notebooks(pipeline.load_plan(plan), nbs) == ["20_missing.ipynb"]


def test_every_built_in_plan_names_only_notebooks_that_exist():
    for name in pipeline.PLANS:
        assert pipeline.missing_notebooks(pipeline.load_plan(name)) == [], name


def test_pipeline_stops_on_first_failure_naming_notebook_and_cell_and_keeps_output(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _write_notebook(nbs / "00_ok.ipynb", ["y = 2"])
    _write_notebook(nbs / "10_bad.ipynb", ["y = 2", "raise ValueError('boom in cell')", "z = 3"])
    _write_notebook(nbs / "20_never.ipynb", [f"open({str(tmp_path / 'ran')!r}, 'w')"])
    plan = {"steps": [{"notebook": n} for n in ["00_ok.ipynb", "10_bad.ipynb", "20_never.ipynb"]]}
    with pytest.raises(pipeline.PipelineError) as err:
        pipeline.run_pipeline(plan, "r", notebooks_dir=nbs, runs_root=tmp_path / "runs", progress=False)
    msg = str(err.value)
    assert "10_bad.ipynb" in msg and "boom in cell" in msg and "ValueError" in msg
    # papermill injects a parameters cell after the tagged one (its index 3); the user counts code cells
    # without it: parameters (1), y = 2 (2), raise (3)
    assert err.value.cell == 3 and "code cell 3" in msg and "raise ValueError" in msg
    assert err.value.output.exists()
    kept = nbformat.read(str(err.value.output), as_version=4)
    assert any(o.get("ename") == "ValueError" for c in kept.cells for o in c.get("outputs", []))
    assert not (tmp_path / "ran").exists()
    status = json.loads((tmp_path / "runs" / "r" / "pipeline.json").read_text())
    assert [s["status"] for s in status["steps"]] == ["ok", "failed", "pending"]


def test_pipeline_marks_kernels_headless_and_restores_the_environment(tmp_path, monkeypatch):
    import os

    monkeypatch.delenv("MEDSSL_HEADLESS", raising=False)
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    seen = tmp_path / "seen.txt"
    _write_notebook(nbs / "00_env.ipynb", [f"import os; open({str(seen)!r}, 'w').write(os.environ.get('MEDSSL_HEADLESS', ''))"])
    pipeline.run_pipeline({"steps": [{"notebook": "00_env.ipynb"}]}, "r", notebooks_dir=nbs,
                          runs_root=tmp_path / "runs", progress=False)
    assert seen.read_text() == "1"  # itkwidgets & co. refuse to start in these kernels
    assert "MEDSSL_HEADLESS" not in os.environ


def test_a_mistyped_parameter_warns_with_the_close_matches(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _write_notebook(nbs / "00_a.ipynb", ["pass"], params="run = 'x'\nn_subjects = 4")
    plan = {"steps": [{"notebook": "00_a.ipynb"}]}
    declared = pipeline.declared_parameters(pipeline.load_plan(plan), nbs)
    with pytest.warns(UserWarning, match="n_subjcts.*did you mean n_subjects"):
        pipeline.expand_plan(pipeline.load_plan(plan), "r", overrides={"n_subjcts": 3}, declared=declared,
                             runs_root=tmp_path)
    with pytest.warns(UserWarning, match="no notebook '00_b'"):
        pipeline.expand_plan(pipeline.load_plan(plan), "r", overrides={"00_b.n_subjects": 3}, declared=declared,
                             runs_root=tmp_path)


def test_a_failure_names_the_cell_as_the_user_counts_it_not_papermills_injected_one(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _write_notebook(nbs / "00_a.ipynb", ["y = 2", "raise ValueError('boom here')"], params="run = 'x'")
    with pytest.raises(pipeline.PipelineError) as err:
        pipeline.run_pipeline({"steps": [{"notebook": "00_a.ipynb"}]}, "r", notebooks_dir=nbs,
                              runs_root=tmp_path / "runs", progress=False)
    msg = str(err.value)
    assert "code cell 3" in msg and "raise ValueError" in msg and "boom here" in msg  # params=1, y=2, raise=3


def test_a_killed_pipeline_leaves_its_step_marked_interrupted_on_the_next_run(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _write_notebook(nbs / "00_a.ipynb", ["pass"], params="run = 'x'")
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    dead_pid = 2**22 + 12345  # beyond pid_max defaults: no such process
    (run_dir / "pipeline.json").write_text(json.dumps({"pid": dead_pid, "steps": [
        {"notebook": "00_a.ipynb", "step": "00_a", "method": None, "output": "", "parameters": {},
         "status": "running", "seconds": 0.0, "message": ""}]}))
    res = pipeline.run_pipeline({"steps": [{"notebook": "00_a.ipynb"}]}, "r", notebooks_dir=nbs,
                                runs_root=tmp_path / "runs", progress=False)
    status = json.loads((run_dir / "pipeline.json").read_text())
    assert [s["status"] for s in status["steps"]] == ["ok"]
    assert [s["status"] for s in status["interrupted_earlier"]] == ["interrupted"] and res.interrupted


def test_a_notebook_that_is_not_applicable_to_the_data_is_recorded_and_the_pipeline_goes_on(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _write_notebook(nbs / "00_a.ipynb", ["from medssl.evaluate.protocol import StepNotApplicable",
                                         "raise StepNotApplicable('no held-out subject has a liver')"], params="run = 'x'")
    _write_notebook(nbs / "10_b.ipynb", [f"open({str(tmp_path / 'ran')!r}, 'w')"], params="run = 'x'")
    res = pipeline.run_pipeline({"steps": [{"notebook": "00_a.ipynb"}, {"notebook": "10_b.ipynb"}]}, "r",
                                notebooks_dir=nbs, runs_root=tmp_path / "runs", progress=False)
    assert [s.status for s in res.steps] == ["not applicable", "ok"] and res.ok
    assert "no held-out subject has a liver" in res.steps[0].message and (tmp_path / "ran").exists()


def _per_method_plan(nbs, log, fail="", methods=("isimed", "simclr", "barlowtwins")):
    """00_a, then 10_b once per method (each records its torch threads and start/end times), then 20_c."""
    body = ("import os, time, torch\n"
            f"assert method != {fail!r}, 'boom in ' + method\n"  # at once: the others are still sleeping
            "t0 = time.time(); time.sleep(2.5)\n"
            f"open({str(log)!r} + '.' + method, 'w').write(f\"{{os.environ.get('OMP_NUM_THREADS')}} "
            "{torch.get_num_threads()} {t0} {time.time()}\")")
    _write_notebook(nbs / "00_a.ipynb", [f"open({str(log)!r} + '.00', 'w').write(str(os.environ.get('OMP_NUM_THREADS')))"],
                    params="import os\nrun = 'x'")
    _write_notebook(nbs / "10_b.ipynb", [body], params="run = 'x'\nmethod = ''")
    _write_notebook(nbs / "20_c.ipynb", [f"open({str(log)!r} + '.20', 'w')"], params="run = 'x'")
    return {"methods": list(methods),
            "steps": [{"notebook": "00_a.ipynb"}, {"notebook": "10_b.ipynb", "per_method": True},
                      {"notebook": "20_c.ipynb"}]}


def test_per_method_notebooks_run_concurrently_with_one_torch_thread_each_on_a_cpu(tmp_path, monkeypatch):
    """Issue 18 item 1: pretraining notebooks share the 2 cores as single-threaded kernels (1.3x the
    throughput of one two-threaded kernel, and weights that do not depend on the thread count)."""
    monkeypatch.setattr(pipeline, "_gpu_present", lambda: False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    nbs, log = tmp_path / "nbs", tmp_path / "log"
    nbs.mkdir()
    plan = _per_method_plan(nbs, log, methods=("isimed", "simclr"))
    res = pipeline.run_pipeline(plan, "r", notebooks_dir=nbs, runs_root=tmp_path / "runs", progress=False, jobs=2)
    assert [s.status for s in res.steps] == ["ok"] * 4
    seen = {m: (tmp_path / f"log.{m}").read_text().split() for m in plan["methods"]}
    assert all(v[:2] == ["1", "1"] for v in seen.values()), seen  # OMP_NUM_THREADS=1 and torch uses one thread
    (s1, e1), (s2, e2) = [(float(seen[m][2]), float(seen[m][3])) for m in ("isimed", "simclr")]
    assert s2 < e1 and s1 < e2, "the first two per-method notebooks did not overlap"
    assert (tmp_path / "log.00").read_text() == "7" and (tmp_path / "log.20").exists()  # other steps: untouched
    import os

    assert os.environ["OMP_NUM_THREADS"] == "7"  # restored
    status = json.loads((tmp_path / "runs" / "r" / "pipeline.json").read_text())
    assert [s["method"] for s in status["steps"]] == [None, "isimed", "simclr", None]


def test_a_failing_per_method_notebook_stops_the_pipeline_and_names_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "_gpu_present", lambda: False)
    nbs, log = tmp_path / "nbs", tmp_path / "log"
    nbs.mkdir()
    plan = _per_method_plan(nbs, log, fail="isimed")
    with pytest.raises(pipeline.PipelineError, match=r"10_b.ipynb \(isimed\).*boom in isimed") as err:
        pipeline.run_pipeline(plan, "r", notebooks_dir=nbs, runs_root=tmp_path / "runs", progress=False, jobs=2)
    assert err.value.output == tmp_path / "runs" / "r" / "isimed" / "10_b.ipynb"
    status = [s["status"] for s in json.loads((tmp_path / "runs" / "r" / "pipeline.json").read_text())["steps"]]
    # simclr ran beside isimed and finished; barlowtwins was never started; 20_c never ran
    assert status == ["ok", "failed", "ok", "pending", "pending"], status
    assert not (tmp_path / "log.barlowtwins").exists() and not (tmp_path / "log.20").exists()


def test_jobs_default_to_the_cores_and_memory_on_a_cpu_and_to_one_with_a_gpu(monkeypatch):
    import psutil

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("M", (), {"available": 7 * 2**30})())
    monkeypatch.setattr(pipeline, "_gpu_present", lambda: False)
    assert pipeline.resolve_jobs("auto", 11) == 2  # 7 GB / 3 GB per kernel, though 4 cores
    assert pipeline.resolve_jobs("auto", 1) == 1
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("M", (), {"available": 64 * 2**30})())
    assert pipeline.resolve_jobs("auto", 11) == 4
    assert pipeline.resolve_jobs(3, 11) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the caller asked for one core (e.g. a test beside another)
    assert pipeline.resolve_jobs("auto", 11) == 1
    monkeypatch.setattr(pipeline, "_gpu_present", lambda: True)
    assert pipeline.resolve_jobs("auto", 11) == 1
    for bad in (0, -1, "two", 1.5, True):
        with pytest.raises(ValueError, match="jobs must be"):
            pipeline.resolve_jobs(bad, 11)


def test_cli_refuses_a_bad_jobs_value_before_anything_runs(capsys):
    from medssl import cli

    with pytest.raises(SystemExit):
        cli.main(["pipeline", "--jobs", "0", "--dry-run"])
    assert "--jobs must be 'auto' or an integer >= 1, got '0'" in capsys.readouterr().err


NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_papermill_parses_every_parameter_of_every_notebook(notebook, caplog):
    """Issue 23 item 6: papermill drops a parameter line holding a second '=' (e.g. `methods = []  # [] = all`),
    so `--methods` and `-p` never reached the notebook, and every run logged "Unable to parse line"."""
    import ast
    import logging

    import papermill as pm

    cell = next(c for c in nbformat.read(str(notebook), as_version=4).cells
                if "parameters" in c.metadata.get("tags", []))  # fmt: skip
    assigned = {t.id for node in ast.parse(cell.source).body if isinstance(node, (ast.Assign, ast.AnnAssign))
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
    assert "run" in assigned
    with caplog.at_level(logging.WARNING, logger="papermill"):
        parsed = pm.inspect_notebook(str(notebook))
    assert set(parsed) == assigned
    assert not [r for r in caplog.records if "Unable to parse" in r.getMessage()]


def test_methods_and_per_notebook_parameters_reach_the_evaluation_notebooks_of_the_demo_plan(tmp_path):
    plan = pipeline.load_plan("demo")
    declared = pipeline.declared_parameters(plan)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # `-p 25_latent_viewer.case_a` was warned as ignored, yet applied
        steps = pipeline.expand_plan(plan, "r", methods=["isimed"], only=["20", "25", "30", "40", "50"],
                                     overrides={"25_latent_viewer.case_a": "subject_003"}, declared=declared,
                                     runs_root=tmp_path)  # fmt: skip
    assert {s.step for s in steps} == {"20_latent_space", "25_latent_viewer", "30_linear_probe",
                                       "30_linear_probe_organ", "40_report", "50_segmentation"}  # fmt: skip
    assert all(s.parameters["methods"] == ["isimed"] for s in steps), [(s.step, s.parameters) for s in steps]
    assert [s.parameters.get("case_a") for s in steps if s.step == "25_latent_viewer"] == ["subject_003"]


@pytest.mark.parametrize(("args", "message"), [
    (["--only", "99"], "--only 99: no notebook of this plan starts with that (its notebooks: 00_data, 10_pretrain"),
    (["--only", "00", "9"], "--only 9: no notebook"),
    (["--methods", "isimd"], "unknown method(s) 'isimd' (did you mean isimed"),
    (["--plan", "folder"], "this plan needs `-p source /path/to/your/scans`"),
    (["--plan", "folder", "-p", "sorce", "."], "(you gave -p sorce: a typo?)"),
    (["--plan", "folder", "-p", "00_data.source", "."], "given only for one notebook: 00_data.source"),
    (["--plan", "folder", "-p", "source", "demo"], "use --plan demo for the demo cohort"),
    (["--plan", "folder", "-p", "source", "/no/such/folder"], "must be 'demo' or an existing folder"),
])  # fmt: skip
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_options_that_would_quietly_do_nothing_are_errors_before_anything_runs(tmp_path, monkeypatch, capsys,
                                                                                 args, message, dry_run):
    """Issue 23 items 4 and 10: `--only 99` ran nothing with rc 0, `--methods isimd` failed only inside a
    started kernel, and `--plan folder -p sorce DIR` warned once and then built the demo cohort (152 s)."""
    from medssl.cli import main

    monkeypatch.setenv("MEDSSL_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(pipeline, "_run_steps", lambda *a, **k: pytest.fail("a notebook was started"))
    rc = main(["pipeline", "--run", "r", *args, *(["--dry-run"] if dry_run else [])])
    out = capsys.readouterr()
    assert rc == 1 and message in out.err, out.err
    assert "->" not in out.out and not (tmp_path / "runs" / "r").exists()
