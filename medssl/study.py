"""The reference study: every (method, seed) its own resumable unit (``medssl pipeline --plan study``).

A study replicates the demo's comparison over several seeds on a cohort with inter-subject
variability (``source="demo:study"``, :mod:`medssl.data.demo.variability`), with every method
trained until its validation pretext measure stops improving (early stopping,
:class:`medssl.train.config.EarlyStopping`) or until a stated cap. It is a list of **units**,
each run once and recorded in ``runs/<run>/study.json``::

    runs/<run>/
      study.json                      the resolved plan and every unit's status, seconds and stop reason
      00_data/                        the cohort (00_data.ipynb), once
      seed<k>/                        one ordinary run per seed (RunDir(...).seed_run(k)):
        <method>/                     unit "seed<k>/<method>": config.json, metrics.jsonl, checkpoints/{last,best}.pt,
                                      early_stopping.json, summary.csv
        20_latent_space/ ...          unit "seed<k>/<step>": the evaluation notebooks, executed with papermill
      60_study/                       unit "60_study": tables over seeds with intervals, figures, report.html

Pretraining units run in this process (:func:`medssl.pretraining.pretrain` with the plan's settings, the
function ``10_pretrain.ipynb`` calls); evaluation units are the demo's notebooks run by the pipeline
on ``seed<k>`` (``MEDSSL_RUNS`` pointing at the study folder); the last unit aggregates
(:mod:`medssl.evaluate.study`, ``60_study.ipynb``).

**Resuming.** A killed study is started again with the same command: units marked done are
skipped (their checkpoints are not touched), the unit that was running resumes from its
``last.pt`` (weights, optimiser, rngs and the early-stopping count), and the rest follows. A
done pretraining unit whose settings differ from the plan's is an error (the study would mix
settings); evaluation units re-run when their seed's pretraining changed. Two studies on one
run are refused.

Settings (``STUDY_PLANS["study"]``; ``-p NAME VALUE`` overrides a top-level setting or one entry
of a mapping, ``-p caps_steps.isimed 800``; other ``-p`` names go to the notebooks as in any plan):

- ``seeds``: the replicates; seed k seeds initialisation, sampling, the evaluation patch sets and
  the random-init twins of replicate k.
- ``methods``: ``"study"`` (every trained method and variant, IoU-interval variants included,
  plus the untrained baselines) or a list.
- ``preset`` and ``method_overrides``/``train_overrides`` (``"*"`` for every method): the base
  settings; ``steps_per_validation``, ``patience``, ``min_delta`` (per validation measure) and
  ``caps_steps`` (per method, ``"default"`` for the rest) set early stopping and the cap;
  ``lr_at_cap``: the per-epoch learning-rate decay is chosen so that the rate has fallen to this
  share of its start at the cap (the demo's schedule, stretched).
- ``evaluations``: pipeline steps run on every seed; ``later_seed_parameters``: replaces those of their
  parameters that do not depend on the seed, for every seed after the first (the registration controls
  are computed once); ``data_notebook``/``report``: the first and
  last units; ``publish_dir``: where the report, tables and executed study notebook are copied
  (relative to the repository; kept small, no checkpoints).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from medssl import paths
from medssl._files import atomic_write_text
from medssl.rundir import RunDir

__all__ = ["STUDY_PLANS", "StudyError", "StudyUnit", "is_study_plan", "load_study", "plan_units", "run_study",
           "study_methods", "train_settings", "publish", "write_study_report"]

STUDY_FILE = "study.json"
REPORT_STEP = "60_study"

# Early stopping is checked every `steps_per_validation` steps on the fixed validation patches; an improvement must
# beat the best by more than min_delta, in the measure's unit (Method.val_measure): 0.5 mm of ISImed's distance
# error, 0.01 half-widths of the context offset error, one more correct pair in 200 for Doersch, 0.001 of a loss.
_MIN_DELTA = {"abs_err_mm": 0.5, "offset_err_hw": 0.01, "accuracy": 0.005, "loss": 0.001}

STUDY_PLANS: dict[str, dict[str, Any]] = {
    "study": {
        "seeds": [0, 1, 2],
        "methods": "study",
        "data": {"source": "demo:study", "n_subjects": 48, "cohort_seed": 0, "target_spacing_mm": 3.0},
        "preset": "demo",
        "method_overrides": {},
        "train_overrides": {"*": {"keep_last": 0, "log_every": 10}},
        "steps_per_validation": 20,
        "patience": 5,
        "min_delta": dict(_MIN_DELTA),
        # caps in steps (the demo ran 210). ISImed early-stopped at step 520 of 600 on seed 0 (best 420); the
        # two-view and SimSiam methods cost about 2x an ISImed step, the context methods under half, so they get
        # 400 / 600; the three IoU intervals outside the thesis's comparison ([0.3, 0.6] vs [0, 1]) get 200 (the
        # demo's budget). Its duration: README, "Reference study" (dated), and benchmarks/study_budget.py.
        "caps_steps": {"default": 400, "isimed": 600, "reg2d": 600, "heatmap": 600, "doersch": 600,
                       "simsiam-iou-0-0": 200, "simsiam-iou-0.0001-0.3": 200, "simsiam-iou-0.6-1": 200},
        "lr_at_cap": 0.05,
        # no early stop before these steps, by method or method class (besides the context methods' curriculum):
        # SimSiam's validation loss sits near 0, or rises, for the first 60-160 steps before it falls (seed 0 of the
        # study run); with patience 5 x 20 steps, seed 1's SimSiam [0, 1] stopped at step 100 and kept its
        # initial weights as the best state
        "min_steps": {"simsiam": 200},
        "data_notebook": True,
        "evaluations": [
            # every test subject a query subject (the paired-test unit), n_corr_partners other subjects each
            {"notebook": "20_latent_space.ipynb",
             "parameters": {"umap": False, "umap_3d": False, "stride_vox": 6, "n_corr_partners": 3,
                            "registration": "affine", "body_alignment": True}},
            {"notebook": "30_linear_probe.ipynb", "parameters": {"task": "lesion"}},
            {"notebook": "30_linear_probe.ipynb", "name": "30_linear_probe_organ",
             "parameters": {"task": "organ", "organ": "liver"}},
            {"notebook": "50_segmentation.ipynb",
             "parameters": {"stride_vox": 6, "atlas_pool": 9, "n_atlases": [1, 3, 9], "n_draws": 3, "n_queries": 0,
                            "registration": "affine", "body_alignment": True,
                            "finetune_methods": ["isimed", "simclr", "barlowtwins", "simsiam", "simsiam-iou-0-1"],
                            "finetune_n": [4], "finetune_steps": 100, "finetune_test_subjects": 0,
                            "finetune_val_subjects": 0}},
        ],
        # what does not depend on the seed is computed on the first seed only: the registration controls and the
        # body-affine shortcut (same images, same pairs); the study tables average each row over the seeds that have it
        "later_seed_parameters": {"registration": "", "body_alignment": False},
        "report": True,
        "publish_dir": "docs/study",
    },
}

_SETTINGS = ("seeds", "methods", "data", "preset", "method_overrides", "train_overrides", "steps_per_validation",
             "patience", "min_delta", "caps_steps", "lr_at_cap", "min_steps", "data_notebook", "evaluations",
             "later_seed_parameters", "report", "publish_dir")
_DATA_PARAMS = ("source", "n_subjects", "cohort_seed", "target_spacing_mm")


class StudyError(RuntimeError):
    """A study cannot go on as asked (settings changed under done units, another study running, ...)."""


@dataclass
class StudyUnit:
    """One unit of a study: ``kind`` is ``data``, ``pretrain``, ``evaluate`` or ``report``."""

    id: str
    kind: str
    output: str
    seed: int | None = None
    method: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    status: str = "pending"  # pending | running | done | failed
    seconds: float = 0.0
    message: str = ""

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- the plan


def is_study_plan(plan: Any) -> bool:
    """True for a study plan's name, a dict with ``"study": true`` or a YAML/JSON file holding one."""
    if isinstance(plan, dict):
        return bool(plan.get("study"))
    if isinstance(plan, str) and plan in STUDY_PLANS:
        return True
    path = Path(str(plan))
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        try:
            return bool(_read_plan_file(path).get("study"))
        except (OSError, ValueError):
            return False
    return False


def _read_plan_file(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a study plan must be a mapping")
    return data


def load_study(plan: str | os.PathLike | dict[str, Any], overrides: dict[str, Any] | None = None
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(study settings, notebook overrides)``: a study plan (name, file or dict) with ``-p`` overrides applied.

    An override whose name (before a dot) is a study setting changes that setting (``caps_steps.isimed``
    sets one entry); any other goes to the evaluation notebooks, as ``medssl pipeline -p`` does.
    """
    if isinstance(plan, dict):
        given = copy.deepcopy(plan)
    elif isinstance(plan, str) and plan in STUDY_PLANS:
        given = copy.deepcopy(STUDY_PLANS[plan])
    else:
        given = _read_plan_file(Path(plan))
    given.pop("study", None)
    unknown = sorted(set(given) - set(_SETTINGS))
    if unknown:
        raise ValueError(f"study plan: unknown settings {unknown}; known: {', '.join(_SETTINGS)}")
    settings = {**copy.deepcopy(STUDY_PLANS["study"]), **given}
    notebook_overrides: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        head, _, rest = key.partition(".")
        if head not in _SETTINGS:
            notebook_overrides[key] = value
        elif rest:
            if not isinstance(settings[head], dict):
                raise ValueError(f"-p {key}: study setting {head!r} is not a mapping")
            settings[head] = {**settings[head], rest: value}
        else:
            settings[head] = value
    _validate(settings)
    return settings, notebook_overrides


def _validate(s: dict[str, Any]) -> None:
    seeds = s["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0
                                                             for k in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"study seeds must be a non-empty list of distinct non-negative ints, got {seeds!r}")
    for name in ("steps_per_validation", "patience"):
        v = s[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"study setting {name} must be an int >= 1, got {v!r}")
    floors = s["min_steps"]
    if not isinstance(floors, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in floors.values()):
        raise ValueError(f"study min_steps must map method (or method class) names to ints >= 0, got {floors!r}")
    if not 0 < float(s["lr_at_cap"]) <= 1:
        raise ValueError(f"study setting lr_at_cap must be in (0, 1], got {s['lr_at_cap']!r}")
    caps = s["caps_steps"]
    if not isinstance(caps, dict) or "default" not in caps:
        raise ValueError(f"study caps_steps must be a mapping with a 'default' entry, got {caps!r}")
    for name, cap in caps.items():
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < s["steps_per_validation"]:
            raise ValueError(f"study caps_steps.{name} must be an int >= steps_per_validation "
                             f"({s['steps_per_validation']}), got {cap!r}")
    data = s["data"]
    missing = [k for k in _DATA_PARAMS if k not in data]
    if missing:
        raise ValueError(f"study data settings lack {missing}")
    from medssl.data.spec import DataSpec

    DataSpec().with_overrides(data)  # unknown names and wrong types raise, naming the field
    for step in s["evaluations"]:
        if not isinstance(step, dict) or "notebook" not in step or set(step) - {"notebook", "name", "parameters"}:
            raise ValueError(f"study evaluation steps are {{notebook, name, parameters}} mappings, got {step!r}")
    study_methods(s["methods"])  # raises on unknown names


def study_methods(spec: Any) -> list[str]:
    """``"study"``: every trained method and variant (IoU intervals included), then the untrained baselines."""
    from medssl.methods import list_methods

    if spec == "study":
        return list_methods(trains=True) + list_methods(trains=False)
    if spec in ("demo", "all"):
        return list_methods(demo=True) if spec == "demo" else list_methods()
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ValueError(f"study methods must be 'study', 'demo', 'all' or a list of names, got {spec!r}")
    known = list_methods()
    bad = [m for m in spec if m not in known]
    if bad:
        raise ValueError(f"study methods: unknown {bad}; registered: {', '.join(known)}")
    return [str(m) for m in spec]


def train_settings(settings: dict[str, Any], method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(method overrides, TrainConfig overrides)`` of one method in a study (on top of ``settings["preset"]``).

    Epochs of ``steps_per_validation`` steps, one validation per epoch, early stopping with the plan's
    patience and the method's measure's min_delta (never before a method's curriculum is complete, the
    context methods' ``curriculum_steps``, nor before the plan's ``min_steps`` for the method or its
    class), the cap in steps rounded up to whole epochs, and a per-epoch
    learning-rate decay that reaches ``lr_at_cap`` at the cap.
    """
    from medssl.methods import get_method_class, make_config
    from medssl.presets import preset

    cls = get_method_class(method)
    n = int(settings["steps_per_validation"])
    cap = int(settings["caps_steps"].get(method, settings["caps_steps"]["default"]))
    epochs = math.ceil(cap / n)
    measure = cls.val_measure[0]
    train: dict[str, Any] = {
        "epochs": epochs, "steps_per_epoch": n, "eval_every_epochs": 1, "checkpoint_every_epochs": epochs,
        "lr_decay_per_epoch": round(float(settings["lr_at_cap"]) ** (1.0 / epochs), 6),
        "early_stopping": {"patience": int(settings["patience"]),
                           "min_delta": float(settings["min_delta"].get(measure, 0.0))},
    }
    overrides = settings["train_overrides"]
    train.update(copy.deepcopy(overrides.get("*", {})))
    train.update(copy.deepcopy(overrides.get(method, {})))
    m_over = {**settings["method_overrides"].get("*", {}), **settings["method_overrides"].get(method, {})}
    if not cls.trains:
        train.pop("early_stopping", None)  # nothing is optimised: the initial state is the result
    elif "early_stopping" in train:
        # a curriculum (the context methods' offset range) must be complete before the measure can judge the run
        config = make_config(method, **{**preset(method, settings["preset"])[0], **m_over})
        curriculum = getattr(config, "curriculum_steps", None)  # a preset names only what differs from the class
        floors = settings.get("min_steps", {})
        floor = max(int(curriculum or 0), int(floors.get(method, floors.get(cls.name, 0))))
        if floor:
            train["early_stopping"] = {**train["early_stopping"], "min_steps": min(floor, cap)}
    return m_over, train


def plan_units(settings: dict[str, Any], run: str, *, runs_root: Path | None = None,
               methods: Sequence[str] | None = None, notebook_overrides: dict[str, Any] | None = None
               ) -> list[StudyUnit]:
    """Every unit of the study, in run order: the data notebook, then per seed its pretraining and evaluations,
    then the report."""
    root = RunDir(run, runs_root).path
    names = list(methods) if methods else study_methods(settings["methods"])
    study_methods(names)
    data = dict(settings["data"])
    units: list[StudyUnit] = []
    if settings["data_notebook"]:
        units.append(StudyUnit("00_data", "data", str(root / "00_data" / "00_data.ipynb"),
                               settings={"notebook": "00_data.ipynb", "parameters": {**data}}))
    for seed in settings["seeds"]:
        seed_dir = root / _seed_name(seed)
        for m in names:
            m_over, t_over = train_settings(settings, m)
            units.append(StudyUnit(f"{_seed_name(seed)}/{m}", "pretrain", str(seed_dir / m), seed=seed, method=m,
                                   settings={"method": m, "seed": seed, "preset": settings["preset"], "data": data,
                                             "method_overrides": m_over, "train_overrides": t_over}))
        for step in settings["evaluations"]:
            name = step.get("name", Path(step["notebook"]).stem)
            params = {"data_overrides": dict(data), **step.get("parameters", {}), "seed": seed}
            if seed != settings["seeds"][0]:
                params.update({k: v for k, v in settings["later_seed_parameters"].items() if k in params})
            for key, value in (notebook_overrides or {}).items():
                target, _, param = key.rpartition(".")
                if not target or target in (name, Path(step["notebook"]).stem):
                    params[param] = value
            units.append(StudyUnit(f"{_seed_name(seed)}/{name}", "evaluate",
                                   str(seed_dir / Path(step["notebook"]).stem / f"{name}.ipynb"), seed=seed,
                                   settings={"notebook": step["notebook"], "name": name, "parameters": params,
                                             "methods": names}))
    if settings["report"]:
        units.append(StudyUnit(REPORT_STEP, "report", str(root / REPORT_STEP / f"{REPORT_STEP}.ipynb"),
                               settings={"notebook": f"{REPORT_STEP}.ipynb", "seeds": settings["seeds"],
                                         "methods": names, "publish_dir": settings["publish_dir"]}))
    return units


def _seed_name(seed: int) -> str:
    return f"seed{int(seed)}"


# ---------------------------------------------------------------------------- running


@dataclass
class StudyResult:
    run_dir: Path
    units: list[StudyUnit]
    interrupted: list[str] = field(default_factory=list)  # units a killed earlier study left running

    @property
    def ok(self) -> bool:
        return all(u.status == "done" for u in self.units)


def run_study(
    plan: str | os.PathLike | dict[str, Any] = "study",
    run: str = "study",
    *,
    methods: Sequence[str] | None = None,
    only: Iterable[str] | None = None,
    overrides: dict[str, Any] | None = None,
    runs_root: str | os.PathLike | None = None,
    notebooks_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> StudyResult:
    """Run (or resume) a study; see the module docstring.

    Args:
        plan: a name in :data:`STUDY_PLANS`, a YAML/JSON file with ``study: true``, or a dict.
        run: the study's run name (``runs/<run>/``).
        methods: replaces the plan's methods.
        only: run only units whose id starts with one of these (``seed0``, ``seed1/isimed``, ``00_data``).
        overrides: ``-p`` overrides (:func:`load_study`).

    Raises:
        StudyError: another study is running on this run, or a done pretraining unit was made with
            other settings than the plan's now.
        medssl.pipeline.PipelineError: an evaluation notebook failed (the study stops there; rerun to go on).
    """
    runs_root = Path(runs_root) if runs_root is not None else paths.runs_dir()
    notebooks_dir = Path(notebooks_dir) if notebooks_dir is not None else paths.repo_root() / "notebooks"
    settings, nb_overrides = load_study(plan, overrides)
    units = plan_units(settings, run, runs_root=runs_root, methods=methods, notebook_overrides=nb_overrides)
    selected = _select(units, only)
    root = RunDir(run, runs_root).path
    if RunDir(root).trained_methods():
        raise StudyError(f"{root} holds an ordinary run (trained methods {RunDir(root).trained_methods()}); a study "
                         "keeps its replicates in seed<k>/ folders: choose another --run")
    root.mkdir(parents=True, exist_ok=True)
    state = _StudyState(root / STUDY_FILE, settings)
    result = StudyResult(run_dir=root, units=units, interrupted=state.take_over())
    state.apply(units)
    if result.interrupted:
        print(f"note: an earlier study on this run was killed while running {', '.join(result.interrupted)}; "
              "it resumes from its last checkpoint", flush=True)
    for u in units:
        if u.kind == "pretrain" and u.status == "done" and state.fingerprint(u.id) != u.fingerprint():
            kept = _same_run_under_new_stopping(state.settings_of(u.id), u)
            if kept:
                print(f"note: {u.id}: {kept}; kept", flush=True)
                u.message = f"{state.units[u.id].get('message', '')}; {kept}".lstrip("; ")
                state.record(u)
                continue
            raise StudyError(f"{root / STUDY_FILE}: unit {u.id} was trained with other settings "
                             f"({state.settings_of(u.id)}) than the plan's now ({u.settings}); use another --run, "
                             f"or delete {u.output} to train it again")
    data_cache: dict[str, Any] = {}
    todo = [u for u in units if u in selected and (u.status != "done" or u.kind == "report")]
    print(f"study {run}: {len(units)} units, {sum(u.status == 'done' for u in units)} done, {len(todo)} to run "
          f"({root})", flush=True)
    for i, u in enumerate(todo):
        label = f"[{i + 1}/{len(todo)}] {u.id}"
        print(f"{label} ({u.kind}) ...", flush=True)
        u.status, u.message = "running", ""
        state.record(u)
        t0 = time.perf_counter()
        try:
            if u.kind == "pretrain":
                u.message = _run_pretrain(u, RunDir(root).seed_run(u.seed), data_cache, progress)
                for other in units:  # this seed's evaluations must see the new weights
                    if other.kind == "evaluate" and other.seed == u.seed and other.status == "done":
                        other.status = "pending"
                        state.record(other)
                        if other in selected and other not in todo:
                            todo.append(other)
            elif u.kind == "report":
                _run_notebook_unit(u, root.parent, root.name, notebooks_dir, progress,
                                   extra={"run": root.name, "seeds": settings["seeds"], "methods": u.settings["methods"],
                                          "publish_dir": ""})
                if settings["publish_dir"]:  # after the notebook is written in full
                    u.message = f"published {len(publish(root, settings['publish_dir']))} files to {settings['publish_dir']}"
            else:
                run_name = root.name if u.kind == "data" else _seed_name(u.seed)
                runs_dir = root.parent if u.kind == "data" else root
                _run_notebook_unit(u, runs_dir, run_name, notebooks_dir, progress,
                                   methods=u.settings.get("methods"))
        except BaseException:
            u.status, u.seconds = "failed", u.seconds + time.perf_counter() - t0
            state.record(u)
            raise
        u.status, u.seconds = "done", u.seconds + time.perf_counter() - t0
        state.record(u)
        print(f"{label}: done in {time.perf_counter() - t0:.0f} s{' (' + u.message + ')' if u.message else ''}",
              flush=True)
    return result


def _same_run_under_new_stopping(old: Any, u: StudyUnit) -> str:
    """Why a done unit whose settings differ from the plan's only in ``early_stopping.min_steps`` is the run the
    plan would make now (``""`` where it is not, or where anything else differs).

    Early stopping only watches: the weights, the validation history and the best step are the same under any
    ``min_steps`` up to the step where training ended. So the unit stands when its recorded validation history
    (``early_stopping.json``), replayed under the new settings, ends training at the same step.
    """
    from medssl.train.config import EarlyStopping
    from medssl.train.loop import EARLY_STOPPING_FILE, _EarlyStopper

    def without_floor(settings: Any) -> Any:
        s = copy.deepcopy(settings)
        es = (s or {}).get("train_overrides", {}).get("early_stopping")
        if isinstance(es, dict):
            es.pop("min_steps", None)
        return s

    if not isinstance(old, dict) or without_floor(old) != without_floor(u.settings):
        return ""
    path = Path(u.output) / EARLY_STOPPING_FILE
    try:
        rec = json.loads(path.read_text())
        history = [(int(step), float(v)) for step, v in rec["history"]]
        measure, mode, was_stopped = rec["measure"], rec["mode"], bool(rec["stopped"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    es_old = old["train_overrides"].get("early_stopping", {})
    es_new = u.settings["train_overrides"].get("early_stopping", {})
    if not history or "patience" not in es_new:
        return ""

    def stop_step(es: dict[str, Any]) -> int | None:
        stopper = _EarlyStopper(EarlyStopping(patience=int(es["patience"]), min_delta=float(es.get("min_delta", 0.0)),
                                              min_steps=int(es.get("min_steps", 0)), measure=measure, mode=mode), None)
        return next((step for step, v in history if stopper.update({measure: v}, step)), None)

    ended = history[-1][0] if was_stopped else None
    if stop_step(es_old) != ended or stop_step(es_new) != ended:
        return ""
    return (f"its validation history ends training at the same step under early_stopping.min_steps "
            f"{es_new.get('min_steps', 0)} as under {es_old.get('min_steps', 0)}, so it is the run the plan makes now")


def _select(units: list[StudyUnit], only: Iterable[str] | None) -> list[StudyUnit]:
    if not only:
        return list(units)
    prefixes = [str(o) for o in only]
    chosen = [u for u in units if any(u.id.startswith(p) for p in prefixes)]
    unmatched = [p for p in prefixes if not any(u.id.startswith(p) for u in units)]
    if unmatched:
        raise ValueError(f"--only {' '.join(unmatched)}: no study unit starts with that (units look like "
                         f"{', '.join(u.id for u in units[:4])}, ...)")
    return chosen


def _open(data: dict[str, Any], cache: dict[str, Any]) -> Any:
    """The study's data source, opened once per process (the cohort and the volume cache are built on first use)."""
    from medssl.data.spec import DataSpec

    key = json.dumps(data, sort_keys=True)
    if key not in cache:
        cache[key] = DataSpec().with_overrides(data).open(progress=False)
    return cache[key]


def _run_pretrain(u: StudyUnit, seed_run: RunDir, data_cache: dict[str, Any], progress: bool) -> str:
    """Train one (method, seed) unit (resuming from its last.pt) with :func:`medssl.pretraining.pretrain`, which
    also summarises it on the validation subjects (the best state where early stopping kept one)."""
    from medssl.pretraining import pretrain

    s = u.settings
    result = pretrain(seed_run, s["method"], s["preset"], _open(s["data"], data_cache), seed=s["seed"],
                      method_overrides=s["method_overrides"], train_overrides=s["train_overrides"], progress=progress,
                      tensorboard=False)
    return result.fit.stop_reason


def _run_notebook_unit(u: StudyUnit, runs_root: Path, run_name: str, notebooks_dir: Path, progress: bool, *,
                       methods: Sequence[str] | None = None, extra: dict[str, Any] | None = None) -> None:
    """One notebook through the pipeline (its checks, status file and error messages), as run ``run_name``."""
    from medssl.pipeline import run_pipeline

    params = {**u.settings.get("parameters", {}), **(extra or {})}
    step = {"notebook": u.settings["notebook"], "parameters": params}
    if u.settings.get("name"):
        step["name"] = u.settings["name"]
    plan = {"methods": list(methods or []), "steps": [step]}
    run_pipeline(plan, run_name, runs_root=runs_root, notebooks_dir=notebooks_dir, progress=progress)


class _StudyState:
    """``study.json``: the plan, the owner's pid and every unit's status (rewritten atomically after each change)."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path, self.settings = path, settings
        try:
            self.old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.old = {}
        self.units: dict[str, dict[str, Any]] = dict(self.old.get("units", {}))

    def take_over(self) -> list[str]:
        """Refuse a live owner; return the units a dead one left running."""
        pid = self.old.get("pid")
        if pid not in (None, os.getpid()) and _pid_alive(pid):
            running = [k for k, v in self.units.items() if v.get("status") == "running"]
            if running:
                raise StudyError(f"{self.path}: another study (pid {pid}) is running on this run ({', '.join(running)});"
                                 " wait for it or choose another --run")
        return [k for k, v in self.units.items() if v.get("status") == "running"]

    def apply(self, units: list[StudyUnit]) -> None:
        """Copy the recorded status into ``units`` (an interrupted unit is pending again; its checkpoints stay)."""
        for u in units:
            rec = self.units.get(u.id)
            if rec is None:
                continue
            u.seconds = float(rec.get("seconds", 0.0))
            u.message = str(rec.get("message", ""))
            if rec.get("status") == "done":
                if u.kind == "evaluate" and rec.get("fingerprint") != u.fingerprint():
                    continue  # an evaluation with other settings runs again
                if u.kind == "pretrain" and not Path(u.output).is_dir():
                    continue  # its folder was deleted (as the settings-changed error suggests): train it again
                u.status = "done"
        self.write()

    def fingerprint(self, unit_id: str) -> str | None:
        return self.units.get(unit_id, {}).get("fingerprint")

    def settings_of(self, unit_id: str) -> Any:
        return self.units.get(unit_id, {}).get("settings")

    def record(self, u: StudyUnit) -> None:
        self.units[u.id] = {"kind": u.kind, "status": u.status, "seconds": round(u.seconds, 2), "message": u.message,
                            "seed": u.seed, "method": u.method, "output": u.output, "fingerprint": u.fingerprint(),
                            "settings": u.settings, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.write()

    def write(self) -> None:
        doc = {"pid": os.getpid(), "settings": self.settings, "units": self.units}
        atomic_write_text(self.path, json.dumps(doc, indent=1, default=str))


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


# ---------------------------------------------------------------------------- publishing


def write_study_report(run: "str | os.PathLike | RunDir", out_dir: str | os.PathLike, *,
                       sections: Sequence[tuple[str, Sequence[Any]]], provenance: str | None = None) -> Path:
    """The study's self-contained HTML report (``out_dir/report.html``; the tables and figures come from
    :mod:`medssl.evaluate.study`, the writer from :mod:`medssl.viz.html`)."""
    from medssl.viz.html import write_html_report

    return write_html_report(Path(out_dir) / "report.html", f"medssl reference study: {RunDir(run).name}", sections,
                             provenance=provenance)


def publish(run: "str | os.PathLike | RunDir", dest: str | os.PathLike, *, max_file_mb: float = 20.0) -> list[Path]:
    """Copy the study's small results (``60_study/``: report, tables, figures, the executed notebook; ``study.json``)
    to ``dest`` (e.g. ``docs/study/``), and the executed data and evaluation notebooks, slimmed
    (:func:`slim_notebook`), to ``dest/notebooks/``. Checkpoints and embedding caches are never copied;
    files over ``max_file_mb`` are skipped with a note."""
    rd = RunDir(run)
    dest = Path(dest)
    if not dest.is_absolute():
        dest = paths.repo_root() / dest
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    sources = [rd.path / STUDY_FILE, *sorted((rd.path / REPORT_STEP).glob("*"))]
    for src in sources:
        if not src.is_file() or src.suffix in (".pt", ".npz", ".npy"):
            continue
        if src.stat().st_size > max_file_mb * 1e6:
            print(f"publish: {src.name} is {src.stat().st_size / 1e6:.0f} MB; not copied", flush=True)
            continue
        target = dest / src.name
        shutil.copyfile(src, target)
        copied.append(target)
    # the executed data and evaluation notebooks, without what makes them tens of MB (saved widget state,
    # interactive 3D figures, full-resolution latent maps): their tables, text and small figures stay
    for src in [*sorted(rd.path.glob("00_data/*.ipynb")), *sorted(rd.path.glob("seed*/*/*.ipynb"))]:
        target = dest / "notebooks" / src.relative_to(rd.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            slim_notebook(src, target)
        except ValueError as err:  # e.g. a notebook left half-written by a killed unit: publish the rest
            print(f"publish: {err}; not copied", flush=True)
            continue
        copied.append(target)
    return copied


SLIM_NOTE = "(output of {kb} kB removed for the published copy; the run folder's notebook has it)"


def slim_notebook(src: str | os.PathLike, dest: str | os.PathLike, *, max_output_kb: float = 100.0) -> int:
    """Write ``src`` to ``dest`` without outputs over ``max_output_kb`` (each replaced by a note) and without
    the saved widget state; returns the number of outputs removed. ``src`` is not changed.

    Raises:
        ValueError: ``src`` is not a readable notebook (the message names the file).
    """
    import nbformat

    try:
        nb = nbformat.read(str(src), as_version=4)
    except (ValueError, nbformat.reader.NotJSONError) as err:  # NotJSONError is a ValueError; named for clarity
        raise ValueError(f"{src}: not a readable notebook ({str(err).splitlines()[0][:200]})") from err
    nb.metadata.pop("widgets", None)
    removed = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data")
            if not data:
                continue
            sizes = {k: len(json.dumps(v)) for k, v in data.items()}
            big = {k: n for k, n in sizes.items() if n > max_output_kb * 1e3}
            if big:
                for k in big:
                    del data[k]
                data["text/plain"] = SLIM_NOTE.format(kb=round(sum(big.values()) / 1e3))
                removed += 1
    atomic_write_text(Path(dest), nbformat.writes(nb))
    return removed


# ---------------------------------------------------------------------------- command line


def cli_main(args: Any) -> int:
    """``medssl pipeline --plan study [--dry-run] [--only ...] [--methods ...] [-p NAME VALUE]``."""
    import yaml

    from medssl.pipeline import PipelineError

    overrides = {k: yaml.safe_load(v) for k, v in args.param}
    if args.dry_run:
        settings, nb_overrides = load_study(args.plan, overrides)
        units = _select(plan_units(settings, args.run, methods=args.methods, notebook_overrides=nb_overrides),
                        args.only)
        recorded = _StudyState(RunDir(args.run).path / STUDY_FILE, settings).units
        for u in units:
            status = recorded.get(u.id, {}).get("status", "pending")
            print(f"{u.id:34s} {u.kind:9s} {status:8s} -> {u.output}  {_describe(u)}")
        print(f"\n{len(units)} units ({sum(u.kind == 'pretrain' for u in units)} (method, seed) pretraining units, "
              f"seeds {settings['seeds']})")
        return 0
    try:
        res = run_study(args.plan, args.run, methods=args.methods, only=args.only, overrides=overrides)
    except (PipelineError, StudyError) as e:
        print(f"\n{e}", flush=True)
        return 1
    total = sum(u.seconds for u in res.units)
    print(f"\nstudy {'finished' if res.ok else 'ran the selected units'}: {total / 60:.1f} min of recorded unit time; "
          f"outputs in {res.run_dir}")
    return 0


def _describe(u: StudyUnit) -> str:
    if u.kind == "pretrain":
        t = u.settings["train_overrides"]
        es = t.get("early_stopping")
        cap = t["epochs"] * t["steps_per_epoch"]
        stop = (f"early stopping every {t['steps_per_epoch']} steps, patience {es['patience']}, min_delta "
                f"{es['min_delta']:g}" + (f", not before step {es['min_steps']}" if es.get("min_steps") else "")
                if es else "untrained: initial state only")
        return f"cap {cap} steps; {stop}"
    return json.dumps(u.settings.get("parameters", {}), default=str)


def describe_units(units: Sequence[StudyUnit]) -> list[dict[str, Any]]:
    """Plain dicts of units (for tables)."""
    return [asdict(u) for u in units]
