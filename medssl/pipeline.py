"""Run the ordered notebooks headlessly with papermill, from a plan.

A plan is a list of steps. Each step names a notebook in ``notebooks/`` and its
parameters; a step with ``per_method: true`` runs once per method (the
pretraining notebook). A plan's ``methods`` is a list of names, or ``"demo"`` /
``"all"`` for the registry's demo methods / every registered method
(:func:`medssl.methods.list_methods`): a new method file joins the demo with no
edit here. Every executed notebook lands in the run directory::

    runs/<run>/00_data/00_data.ipynb
    runs/<run>/<method>/10_pretrain.ipynb        (one per method)
    runs/<run>/20_latent_space/20_latent_space.ipynb
    runs/<run>/30_linear_probe/30_linear_probe_organ.ipynb   (a step with "name": the same notebook again)
    ...

**Concurrent pretraining.** On a CPU, the per-method notebooks (pretraining) run ``jobs`` at a
time (default: one per usable core, as many as memory allows, one where a GPU is present), each
kernel with ONE torch thread (``OMP_NUM_THREADS=1``). On 2 cores two single-threaded trainings do
~1.3x the work of one two-threaded training (a small 3D CNN does not scale to two threads), and the
sampling and set-up of one overlap the other's convolutions. One thread per notebook also fixes the
float sums: the trained weights, and every number after them, are the same for any ``jobs`` and any
core count (a thread count changes the order of the weight-gradient sums, so ``medssl train`` on
four threads gives other bits). Where a GPU is present they run one at a time with the default threads.

The runner stops at the first failure and says which notebook and which cell
failed; the partially executed notebook is kept so the traceback can be read in
JupyterLab. ``runs/<run>/pipeline.json`` records the status and duration of
every step.

Plans are plain Python values (``PLANS``) or a YAML/JSON file with the same
shape::

    methods: [isimed, simclr]
    steps:
      - notebook: 00_data.ipynb
        parameters: {n_subjects: 48}
      - notebook: 10_pretrain.ipynb
        per_method: true
        parameters: {preset: demo}
      - notebook: 30_linear_probe.ipynb
        name: 30_linear_probe_organ      # optional; needed when a notebook runs twice
        parameters: {task: organ, organ: liver}
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from medssl import paths
from medssl._alloc import MALLOC_ENV
from medssl._files import atomic_write_text
from medssl.provenance import record_run_provenance
from medssl.rundir import RunDir

# 50_segmentation in the demo: kNN on a coarser grid (stride 6 at 3 mm), 5 atlases, 3 draws, every test
# subject (8: the paired-test unit; fewer than 5 cannot be tested), with the affine multi-atlas registration
# control and the body-affine shortcut (cached; seconds per pair in the dated README); a short fine-tuning (40 steps,
# no validation curve, 2 test subjects: "not testable") of ISImed and the positive-pair-selection demo methods
# with their untrained twins on 1 and 4 subjects: too short to separate methods, it shows the protocol runs;
# the `full` plan fine-tunes for real.
SEGMENTATION_DEMO: dict[str, Any] = {
    "stride_vox": 6, "atlas_pool": 5, "n_atlases": [1, 3, 5], "n_draws": 3, "n_queries": 0,
    "registration": "affine",
    "finetune_methods": "demo", "finetune_n": [1, 4], "finetune_steps": 40, "finetune_test_subjects": 2,
    "finetune_val_subjects": 0,
}
# The `full` plan: the paper's protocol (stride 4, n = 1..9, 5 draws, every test subject), the registration
# control with a B-spline on top of the affine (several times slower than the affine), and fine-tuning of every method on
# 1, 2, 4 and 8 subjects.
SEGMENTATION_FULL: dict[str, Any] = {
    "stride_vox": 4, "atlas_pool": 9, "n_atlases": list(range(1, 10)), "n_draws": 5, "n_queries": 0,
    "registration": "bspline",
    "finetune_methods": "all", "finetune_n": [1, 2, 4, 8], "finetune_steps": 300, "finetune_test_subjects": 0,
}

# The ordered notebooks and what each step runs. A plan naming a notebook that does not exist is an
# error before anything runs (a typo or a missing file would otherwise pass as "ok").
PLANS: dict[str, dict[str, Any]] = {
    "demo": {
        "methods": "demo",
        "steps": [
            {"notebook": "00_data.ipynb", "parameters": {"source": "demo"}},
            {"notebook": "10_pretrain.ipynb", "per_method": True, "parameters": {"preset": "demo"}},
            # 2D UMAP only, and the dense grid of 50_segmentation's demo (every 6th voxel, 18 mm), whose cached
            # descriptors 25 and 50 then reuse (stride 4 would make the 12 methods' correspondence grids the demo's longest step)
            # (the maps' colour frame is fitted on one training subject: a second one cost ~30 s of dense grids)
            {"notebook": "20_latent_space.ipynb", "parameters": {"umap_3d": False, "stride_vox": 6,
                                                                  "n_map_train_subjects": 1}},
            {"notebook": "25_latent_viewer.ipynb", "parameters": {"stride_vox": 6}},
            {"notebook": "30_linear_probe.ipynb", "parameters": {"task": "lesion"}},
            {"notebook": "30_linear_probe.ipynb", "name": "30_linear_probe_organ",
             "parameters": {"task": "organ", "organ": "liver"}},
            # before the report, which collects every step's headline table
            {"notebook": "50_segmentation.ipynb", "parameters": SEGMENTATION_DEMO},
            {"notebook": "40_report.ipynb", "parameters": {}},
        ],
    },
    "data": {
        "methods": [],
        "steps": [{"notebook": "00_data.ipynb", "parameters": {"source": "demo"}}],
    },
}
# "full": the demo's steps for every registered method (not only those marked for the demo),
# with the full segmentation protocol.
PLANS["full"] = {**copy.deepcopy(PLANS["demo"]), "methods": "all"}
for _step in PLANS["full"]["steps"]:
    if _step["notebook"] == "50_segmentation.ipynb":
        _step["parameters"] = copy.deepcopy(SEGMENTATION_FULL)
# "folder": your own scans (`-p source /path/to/folder`): one probe whose target follows the data (lesion maps if
# any, else the organ named by `-p 30_linear_probe.organ ...`); every notebook says what it had to skip.
PLANS["folder"] = {
    "methods": "demo",
    "steps": [s for s in copy.deepcopy(PLANS["demo"]["steps"]) if s.get("name") != "30_linear_probe_organ"],
}
PLANS["folder"]["needs"] = ["source"]  # without `-p source DIR` it would run on the demo cohort
for _step in PLANS["folder"]["steps"]:
    if _step["notebook"] == "00_data.ipynb":
        _step["parameters"] = {}
    if _step["notebook"] == "30_linear_probe.ipynb":
        _step["parameters"] = {"task": "auto"}
# The thesis's IoU-interval study (medssl/methods/simsiam.py, IOU_STUDY): SimSiam pretrained with the same seed
# for each interval, the pairs' shared-organ fraction and collapse per interval (15), then the evaluations,
# all on identical patch sets.
_DEMO_STEPS = copy.deepcopy(PLANS["demo"]["steps"])
_TRAINING = [s for s in _DEMO_STEPS if s["notebook"] in ("00_data.ipynb", "10_pretrain.ipynb")]
PLANS["iou_study"] = {
    "methods": "iou_study",  # IOU_STUDY's names, read when the plan runs (importing them here costs `--help` torch)
    "steps": [*_TRAINING, {"notebook": "15_iou_intervals.ipynb", "parameters": {}},
              *[s for s in _DEMO_STEPS if s not in _TRAINING]],
}


def plan_methods(spec: Any) -> list[str]:
    """A plan's ``methods``: a list of names, ``"demo"`` (the registry's demo methods), ``"iou_study"`` (the
    thesis's IoU intervals) or ``"all"``."""
    from medssl.methods import list_methods

    if spec in (None, "demo"):
        return list_methods(demo=True)
    if spec == "iou_study":  # the thesis's intervals, in its order (medssl/methods/simsiam.py)
        from medssl.methods.simsiam import IOU_STUDY

        return list(IOU_STUDY)
    if spec == "all":
        return list_methods()
    if isinstance(spec, str):
        raise ValueError(f"plan methods must be a list of names, 'demo', 'iou_study' or 'all', got {spec!r}")
    return [str(m) for m in spec]


class PipelineError(RuntimeError):
    """A notebook failed. ``output`` is the kept, partially executed notebook; ``cell`` counts as the user sees it."""

    def __init__(self, notebook: str, output: Path, cell: int | None, detail: str, cell_source: str = "") -> None:
        self.notebook, self.output, self.cell = notebook, output, cell
        first_line = cell_source.strip().splitlines()[0][:80] if cell_source.strip() else ""
        where = (f"code cell {cell} ({first_line!r})" if first_line else f"code cell {cell}") if cell is not None \
            else "an unknown cell"
        super().__init__(
            f"pipeline stopped: {notebook} failed in {where}: {detail}\n"
            f"The partially executed notebook is kept at {output} (open it in JupyterLab to see the traceback)."
        )


@dataclass
class StepResult:
    notebook: str
    step: str
    method: str | None
    output: str
    parameters: dict[str, Any]
    status: str = "pending"  # pending | running | ok | failed | skipped | not applicable | interrupted
    seconds: float = 0.0
    message: str = ""


@dataclass
class PipelineResult:
    run_dir: Path
    steps: list[StepResult] = field(default_factory=list)
    interrupted: list[dict[str, Any]] = field(default_factory=list)  # steps a killed earlier run left unfinished

    @property
    def ok(self) -> bool:
        return all(s.status in ("ok", "skipped", "not applicable") for s in self.steps)


def load_plan(plan: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A plan from its name in ``PLANS``, a YAML/JSON file, or a dict (validated)."""
    if isinstance(plan, dict):
        data = copy.deepcopy(plan)
    elif isinstance(plan, str) and plan in PLANS:
        data = copy.deepcopy(PLANS[plan])
    else:
        path = Path(plan)
        if not path.exists():
            raise FileNotFoundError(f"plan {plan!r} is neither a known plan ({', '.join(PLANS)}) nor an existing file")
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a plan must be a mapping with 'steps' (and optionally 'methods')")
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise ValueError("a plan needs a non-empty list 'steps'")
    for i, s in enumerate(steps):
        if not isinstance(s, dict) or "notebook" not in s:
            raise ValueError(f"plan step {i} must be a mapping with a 'notebook' key, got {s!r}")
        unknown = set(s) - {"notebook", "name", "parameters", "per_method", "methods"}
        if unknown:
            raise ValueError(f"plan step {i} ({s['notebook']}): unknown keys {sorted(unknown)}")
    unknown = set(data) - {"methods", "steps", "needs"}
    if unknown:
        raise ValueError(f"a plan has 'steps', 'methods' and 'needs'; unknown keys {sorted(unknown)}")
    needs = data.setdefault("needs", [])
    if not isinstance(needs, list) or not all(isinstance(n, str) for n in needs):
        raise ValueError(f"a plan's 'needs' must be a list of parameter names, got {needs!r}")
    data.setdefault("methods", [])
    check_method_names(plan_methods(data["methods"]), "the plan's methods")
    return data


def check_method_names(names: Iterable[str], where: str) -> None:
    """Every name must be a registered method (or ``random-init``); otherwise a ValueError with close matches.

    Checked before any notebook starts: a typo would otherwise fail only inside a started kernel.
    """
    import difflib

    from medssl.methods import list_methods

    known = [*list_methods(), "random-init"]
    bad = [str(n) for n in names if str(n) not in known]
    if bad:
        hints = []
        for b in bad:
            close = difflib.get_close_matches(b, known, n=3)
            hints.append(f"{b!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ValueError(f"{where}: unknown method(s) {', '.join(hints)}; registered: {', '.join(known)}")


def expand_plan(
    plan: dict[str, Any],
    run: str,
    *,
    methods: Iterable[str] | None = None,
    only: Iterable[str] | None = None,
    overrides: dict[str, Any] | None = None,
    runs_root: Path | None = None,
    declared: dict[str, set[str]] | None = None,
) -> list[StepResult]:
    """The concrete notebook executions of a plan, in order (nothing is run).

    Args:
        methods: replaces the plan's method list.
        only: keep only steps whose notebook name starts with one of these (e.g. ``["00", "10"]``).
        overrides: parameters applied to every notebook (e.g. ``{"seed": 1}``); a key
            ``"<notebook stem>.<param>"`` applies to one notebook only.
        declared: ``{notebook: parameter names}``; when given, plan-wide overrides (and the
            automatic ``methods``) go only to notebooks that declare that parameter.
    """
    runs_root = Path(runs_root) if runs_root is not None else paths.runs_dir()
    if methods is not None:
        methods = [str(m) for m in methods]
        check_method_names(methods, "--methods")
    else:
        methods = plan_methods(plan["methods"])
    overrides = dict(overrides or {})
    only = [str(o) for o in only] if only else None
    run_dir = RunDir(run, runs_root).path
    _check_needs_and_source(plan, overrides)
    if only:
        _check_only(plan, only)
    for s in plan["steps"]:
        if "methods" in s:
            check_method_names(s["methods"], f"plan step {s['notebook']}")
    if declared is not None:
        _warn_unknown_overrides(overrides, plan, declared)
    out: list[StepResult] = []
    for s in plan["steps"]:
        nb = s["notebook"]
        stem = Path(nb).stem
        name = s.get("name", stem)  # a notebook run twice needs distinct names: it writes <name>.ipynb
        if only and not _selected(s, only):
            continue
        params = {"run": run, **s.get("parameters", {})}
        known = None if declared is None or nb not in declared else declared[nb]
        for k, v in overrides.items():
            if "." in k:
                target, key = k.split(".", 1)
                if target == stem and (known is None or key in known):  # as the warning says: undeclared is ignored
                    params[key] = v
            elif known is None or k in known:
                params[k] = v
        if s.get("per_method"):
            for m in s.get("methods", methods):
                out.append(StepResult(nb, name, m, str(run_dir / m / f"{name}.ipynb"), {**params, "method": m}))
        else:
            if "methods" not in params and methods and (("methods" in known) if known is not None else stem != "00_data"):
                params["methods"] = methods
            out.append(StepResult(nb, name, None, str(run_dir / stem / f"{name}.ipynb"), params))
    return out


def _selected(step: dict[str, Any], only: list[str]) -> bool:
    nb = step["notebook"]
    return any(Path(nb).stem.startswith(o) or nb.startswith(o) or step.get("name", "").startswith(o) for o in only)


def _check_only(plan: dict[str, Any], only: list[str]) -> None:
    """Every ``--only`` prefix must select a step: ``--only 99`` would otherwise run nothing and succeed."""
    unmatched = [o for o in only if not any(_selected(s, [o]) for s in plan["steps"])]
    if unmatched:
        names = ", ".join(dict.fromkeys(s.get("name", Path(s["notebook"]).stem) for s in plan["steps"]))
        raise ValueError(f"--only {' '.join(unmatched)}: no notebook of this plan starts with "
                         f"{'that' if len(unmatched) == 1 else 'these'} (its notebooks: {names})")  # fmt: skip


def _check_needs_and_source(plan: dict[str, Any], overrides: dict[str, Any]) -> None:
    """A plan's required parameters must be given, and a data ``source`` must be "demo" or an existing folder."""
    import difflib

    for name in plan.get("needs", []):
        if name not in overrides:
            given = [k for k in overrides if k.rpartition(".")[2] == name]
            typos = difflib.get_close_matches(name, [k for k in overrides if "." not in k], n=2)
            hint = f" (given only for one notebook: {', '.join(given)})" if given else ""
            hint += f" (you gave -p {', -p '.join(typos)}: a typo?)" if typos else ""
            what = " /path/to/your/scans" if name == "source" else " VALUE"
            raise ValueError(f"this plan needs `-p {name}{what}` for every notebook{hint}; nothing was run")
    for key, value in overrides.items():
        if key.rpartition(".")[2] != "source":
            continue
        if "source" in plan.get("needs", []) and str(value) == "demo":
            raise ValueError(f"-p {key} demo: this plan runs on your own scans; use --plan demo for the demo cohort")
        if str(value) != "demo" and not Path(str(value)).expanduser().is_dir():
            raise FileNotFoundError(f"-p {key} {value}: the data source must be 'demo' or an existing folder")


def missing_notebooks(plan: dict[str, Any], notebooks_dir: Path | None = None) -> list[str]:
    """The plan's notebooks that do not exist in ``notebooks_dir``."""
    notebooks_dir = Path(notebooks_dir) if notebooks_dir is not None else paths.repo_root() / "notebooks"
    return list(dict.fromkeys(s["notebook"] for s in plan["steps"] if not (notebooks_dir / s["notebook"]).is_file()))


def _check_notebooks_exist(plan: dict[str, Any], notebooks_dir: Path) -> None:
    missing = missing_notebooks(plan, notebooks_dir)
    if missing:
        raise FileNotFoundError(f"the plan names notebook(s) that do not exist in {notebooks_dir}: "
                                f"{', '.join(missing)}; nothing was run")  # fmt: skip


def _warn_unknown_overrides(overrides: dict[str, Any], plan: dict[str, Any], declared: dict[str, set[str]]) -> None:
    """A parameter no notebook of the plan declares would be silently dropped: say so, with close matches."""
    import difflib
    import warnings

    stems = {Path(s["notebook"]).stem: s["notebook"] for s in plan["steps"]}
    every = set().union(*declared.values()) if declared else set()
    for key in overrides:
        target, _, name = key.rpartition(".") if "." in key else ("", "", key)
        if target and target not in stems:
            close = difflib.get_close_matches(target, stems, n=3)
            warnings.warn(f"-p {key}: no notebook {target!r} in this plan (did you mean {close or list(stems)}?); ignored",
                          stacklevel=3)
            continue
        names = declared.get(stems[target], set()) if target else every
        if names and name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(sorted(names))}"
            warnings.warn(f"-p {key}: no notebook{' ' + target if target else ''} of this plan declares {name!r} "
                          f"({hint}); ignored", stacklevel=3)


def run_pipeline(
    plan: str | Path | dict[str, Any] = "demo",
    run: str = "demo",
    *,
    methods: Iterable[str] | None = None,
    only: Iterable[str] | None = None,
    overrides: dict[str, Any] | None = None,
    notebooks_dir: Path | None = None,
    runs_root: Path | None = None,
    kernel_name: str = "python3",
    progress: bool = True,
    jobs: int | str = "auto",
) -> PipelineResult:
    """Execute a plan's notebooks in order with papermill; stop at the first failure.

    ``jobs``: per-method notebooks run at once (:func:`resolve_jobs`; module doc, "Concurrent pretraining").

    Raises:
        PipelineError: naming the notebook and cell that failed; the partly
            executed notebook is kept at ``error.output``.
    """
    import papermill as pm

    if jobs != "auto":
        resolve_jobs(jobs, 1)  # a bad value is an error before anything runs
    notebooks_dir = Path(notebooks_dir) if notebooks_dir is not None else paths.repo_root() / "notebooks"
    runs_root = Path(runs_root) if runs_root is not None else paths.runs_dir()
    plan_name = str(plan) if isinstance(plan, (str, Path)) else None
    methods = list(methods) if methods is not None else None  # expanded twice (the steps, the provenance)
    plan = load_plan(plan)
    _check_notebooks_exist(plan, notebooks_dir)
    declared = declared_parameters(plan, notebooks_dir)
    steps = expand_plan(plan, run, methods=methods, only=only, overrides=overrides, runs_root=runs_root,
                        declared=declared)
    result = PipelineResult(run_dir=RunDir(run, runs_root).path, steps=steps)
    result.run_dir.mkdir(parents=True, exist_ok=True)
    result.interrupted = _previous_interrupted(result.run_dir)
    _record_provenance(plan, plan_name, run, methods, overrides, runs_root, declared, result.run_dir)
    # Kernels inherit the environment: viewers that need a browser refuse to start
    # headless, and the runs root is the one this pipeline writes to.
    saved_env = {k: os.environ.get(k) for k in ("MEDSSL_HEADLESS", "MEDSSL_RUNS", "CUBLAS_WORKSPACE_CONFIG", *MALLOC_ENV)}
    os.environ["MEDSSL_HEADLESS"] = "1"
    os.environ["MEDSSL_RUNS"] = str(runs_root)
    # deterministic cuBLAS (medssl.train.determinism.CUBLAS_WORKSPACE): read when a kernel first uses CUDA
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if os.environ.get("MEDSSL_NO_MALLOC_TUNING") != "1":
        for k, v in MALLOC_ENV.items():  # kernels are new processes: glibc reads these at start-up
            os.environ.setdefault(k, v)
    try:
        _run_steps(pm, steps, result, notebooks_dir, kernel_name, progress, jobs)
    finally:
        _restore_env(saved_env)
    return result


def _restore_env(saved: dict[str, str | None]) -> None:
    """Put back the environment variables ``saved`` (``None``: the variable was not set)."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _record_provenance(plan: dict[str, Any], plan_name: str | None, run: str, methods: Iterable[str] | None,
                       overrides: dict[str, Any] | None, runs_root: Path, declared: dict[str, set[str]],
                       run_dir: Path) -> None:
    """``runs/<run>/provenance.json``: commit, dirty tree, packages and the WHOLE plan's notebook parameters
    (also under ``--only``, so a partial rerun with the same settings keeps the run's config hash)."""
    import warnings

    with warnings.catch_warnings():  # expand_plan warned about unknown overrides already
        warnings.simplefilter("ignore")
        full = expand_plan(plan, run, methods=methods, overrides=overrides, runs_root=runs_root, declared=declared)
    record_run_provenance(run_dir, [{"notebook": s.notebook, "step": s.step, "method": s.method,
                                     "parameters": s.parameters} for s in full], plan_name=plan_name)


# The kernels of concurrent per-method notebooks: one torch (OpenMP, MKL) thread each (module doc).
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_GIB_PER_JOB = 3.0  # a demo pretraining kernel peaks at ~1.5 GB (measured); twice that as the memory cap's unit


def _gpu_present() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def resolve_jobs(jobs: int | str, n_steps: int) -> int:
    """How many per-method notebooks run at once: ``jobs``, or for ``"auto"`` one per usable core (at most
    ``OMP_NUM_THREADS`` when it is set: the caller asked for that many cores), at most ``n_steps``, at most one
    per ~3 GB of available memory, and 1 where a GPU is present."""
    if jobs != "auto":
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"jobs must be 'auto' or an integer >= 1, got {jobs!r}")
        return jobs
    if _gpu_present():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.strip().isdigit() and int(omp) >= 1:
        cores = min(cores, int(omp))
    try:
        import psutil  # a dependency of IPython, so always there with the notebook kernels

        by_memory = int(psutil.virtual_memory().available / (_GIB_PER_JOB * 2**30))
    except ImportError:  # pragma: no cover - psutil comes with IPython
        by_memory = cores
    return max(1, min(cores, max(n_steps, 1), by_memory))


def _groups(steps: list[StepResult]) -> list[list[int]]:
    """Indices of ``steps`` grouped: the runs of one per-method step (consecutive, same step name) form one
    group; every other step is a group of its own."""
    groups: list[list[int]] = []
    for i, s in enumerate(steps):
        prev = steps[i - 1] if i else None
        if s.method is not None and prev is not None and prev.method is not None and prev.step == s.step:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class _Failure(Exception):
    def __init__(self, error: PipelineError) -> None:
        self.error = error


def _run_steps(pm: Any, steps: list[StepResult], result: PipelineResult, notebooks_dir: Path,
               kernel_name: str, progress: bool, jobs: int | str = 1) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    lock = threading.Lock()  # steps' status and pipeline.json, written by several threads
    stop = threading.Event()  # a failure: notebooks not yet started are not started

    def status() -> None:
        with lock:
            _write_status(result)

    def run_one(i: int, bar: bool) -> None:
        if stop.is_set():
            return  # left "pending"
        try:
            _run_one(i, bar)
        except BaseException:
            stop.set()
            raise

    def _run_one(i: int, bar: bool) -> None:
        step = steps[i]
        src = notebooks_dir / step.notebook
        label = f"[{i + 1}/{len(steps)}] {step.notebook}" + (f" ({step.method})" if step.method else "")
        out = Path(step.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"{label} -> {out}", flush=True)
        step.status = "running"
        status()  # a killed pipeline leaves "running": the next run reports it as interrupted
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(
                str(src),
                str(out),
                parameters=step.parameters,
                kernel_name=kernel_name,
                progress_bar=bar,
                cwd=str(notebooks_dir),
            )
        except pm.PapermillExecutionError as e:
            step.seconds = time.perf_counter() - t0
            if e.ename == "StepNotApplicable":  # the notebook says it cannot run on this data: go on
                step.status, step.message = "not applicable", str(e.evalue)
                print(f"{label}: not applicable: {step.message}", flush=True)
                status()
                return
            step.status = "failed"
            step.message = f"{e.ename}: {e.evalue}"
            stop.set()
            status()
            cell, source = _user_cell(out, e.cell_index)
            raise _Failure(PipelineError(step.notebook + (f" ({step.method})" if step.method else ""), out,
                                         cell, step.message, source)) from None
        step.seconds = time.perf_counter() - t0
        step.status = "ok"
        print(f"{label}: ok in {step.seconds:.0f} s", flush=True)
        status()

    cpu_threads: bool | None = None  # decided at the first per-method group (imports torch once)
    for group in _groups(steps):
        if steps[group[0]].method is None:
            try:
                run_one(group[0], progress)
            except _Failure as f:
                raise f.error from None
            continue
        n = resolve_jobs(jobs, len(group))
        cpu_threads = (not _gpu_present()) if cpu_threads is None else cpu_threads
        saved = {k: os.environ.get(k) for k in ONE_THREAD_ENV}
        if cpu_threads:
            os.environ.update(ONE_THREAD_ENV)  # kernels start with these (module doc)
            print(f"{steps[group[0]].notebook}: {len(group)} notebooks, {n} at a time, one torch thread each",
                  flush=True)
        try:
            with ThreadPoolExecutor(max_workers=n) as pool:
                futures = [pool.submit(run_one, i, progress and n == 1) for i in group]
            failures = [f.exception() for f in futures if f.exception() is not None]
        finally:
            _restore_env(saved)
        if failures:
            first = failures[0]
            raise (first.error if isinstance(first, _Failure) else first) from None


def _user_cell(executed: Path, cell_index: int | None) -> tuple[int | None, str]:
    """The failing cell as the user sees it: 1-based among the notebook's own code cells (papermill's
    injected-parameters cell not counted), and its source."""
    if cell_index is None:
        return None, ""
    try:
        import nbformat

        cells = nbformat.read(str(executed), as_version=4).cells
    except Exception:  # noqa: BLE001 - an unreadable output notebook: fall back to papermill's index
        return cell_index, ""
    # papermill's index is into the executed notebook before it prepends its error banner cell
    cells = [c for c in cells if "papermill-error-cell-tag" not in c.metadata.get("tags", [])]
    k = 0
    for i, c in enumerate(cells):
        if c.cell_type != "code" or "injected-parameters" in c.metadata.get("tags", []):
            continue
        k += 1
        if i == cell_index:
            return k, c.source
    return cell_index, ""


def declared_parameters(plan: dict[str, Any], notebooks_dir: Path | None = None) -> dict[str, set[str]]:
    """``{notebook: names in its parameters cell}`` for the plan's notebooks that exist."""
    import papermill as pm

    notebooks_dir = Path(notebooks_dir) if notebooks_dir is not None else paths.repo_root() / "notebooks"
    return {
        s["notebook"]: set(pm.inspect_notebook(str(notebooks_dir / s["notebook"])))
        for s in plan["steps"] if (notebooks_dir / s["notebook"]).exists()
    }


def _write_status(result: PipelineResult) -> None:
    status = {"run_dir": str(result.run_dir), "pid": os.getpid(), "steps": [asdict(s) for s in result.steps]}
    if result.interrupted:
        status["interrupted_earlier"] = result.interrupted
    atomic_write_text(RunDir(result.run_dir).pipeline_json, json.dumps(status, indent=2))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


def _previous_interrupted(run_dir: Path) -> list[dict[str, Any]]:
    """Steps an earlier pipeline on this run left "running" when it died (e.g. SIGKILL): reported as interrupted.

    Raises if that pipeline is still alive (two pipelines must not write one run).
    """
    path = RunDir(run_dir).pipeline_json
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    running = [s for s in old.get("steps", []) if s.get("status") == "running"]
    if not running:
        return []
    if old.get("pid") not in (None, os.getpid()) and _pid_alive(old["pid"]):
        raise RuntimeError(f"{path}: another pipeline (pid {old['pid']}) is running on this run; wait for it or "
                           "choose another --run")
    stale = [dict(s, status="interrupted") for s in running]
    names = ", ".join(s["notebook"] + (f" ({s['method']})" if s.get("method") else "") for s in stale)
    print(f"note: an earlier pipeline on this run was killed while running {names}; marked interrupted", flush=True)
    return stale


def add_cli_parser(subparsers: Any) -> Any:
    """Add ``medssl pipeline`` to an argparse subparsers object; returns its parser (``func``: :func:`cli_main`;
    the ``medssl`` command sends ``--plan study`` to :mod:`medssl.study` instead)."""
    p = subparsers.add_parser(
        "pipeline", help="run the ordered notebooks headlessly with papermill",
        description="Run a plan's notebooks in order with papermill. Plans: " + ", ".join(
            f"{name} ({_plan_summary(name)})" for name in PLANS) + ".",
    )
    p.add_argument("--plan", default="demo", help=f"a plan name ({', '.join(PLANS)}), 'study' (the reference study: "
                   "resumable (method, seed) units, medssl/study.py) or a YAML/JSON plan file")
    p.add_argument("--run", default=None, help="run name: outputs go to runs/<run>/ (default: demo; study for --plan study)")
    p.add_argument("--methods", nargs="+", default=None, help="override the plan's methods")
    p.add_argument("--only", nargs="+", default=None, help="only notebooks starting with these, e.g. 00 10")
    p.add_argument(
        "-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
        help="parameter for every notebook (VALUE parsed as YAML); NAME may be '<notebook>.<param>'",
    )
    p.add_argument("--jobs", default="auto", type=_jobs_arg,
                   help="per-method notebooks (pretraining) run at once; default auto: one per core on a CPU (each "
                        "with one torch thread, so the numbers do not depend on it), one where a GPU is present")
    p.add_argument("--dry-run", action="store_true", help="print the notebook executions and exit")
    p.set_defaults(func=cli_main)
    return p


def _jobs_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return resolve_jobs(int(value), 1)
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"--jobs must be 'auto' or an integer >= 1, got {value!r}") from None


def _plan_summary(name: str) -> str:
    spec = PLANS[name]["methods"]
    return "no methods" if not spec else f"methods: {spec}" if isinstance(spec, str) else "methods: " + ", ".join(spec)


def cli_main(args: Any) -> int:
    """``medssl pipeline`` for a notebook plan."""
    import yaml

    args.run = args.run or "demo"
    overrides = {k: yaml.safe_load(v) for k, v in args.param}
    if args.dry_run:
        plan = load_plan(args.plan)
        _check_notebooks_exist(plan, paths.repo_root() / "notebooks")
        for s in expand_plan(plan, args.run, methods=args.methods, only=args.only, overrides=overrides,
                             declared=declared_parameters(plan)):
            print(f"{s.notebook:24s} {s.method or '':12s} -> {s.output}  {json.dumps(s.parameters)}")
        return 0
    t0 = time.perf_counter()
    try:
        res = run_pipeline(args.plan, args.run, methods=args.methods, only=args.only, overrides=overrides,
                           jobs=getattr(args, "jobs", "auto"))
    except PipelineError as e:
        print(f"\n{e}", flush=True)
        return 1
    print(f"\npipeline finished in {(time.perf_counter() - t0) / 60:.1f} min; outputs in {res.run_dir}")
    return 0
