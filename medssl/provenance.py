"""Where a result came from: the data (the statement every report must show) and the code.

**Data.** The demo cohort is not a multi-subject dataset. It is one real CT warped many
times, with labels that a model (not a radiologist) produced and lesions we
painted in. Anyone reading a demo result must be told so, in the notebook, the
HTML report and the CLI output alike; :func:`provenance_statement` is the one
place that text lives.

**Code and configuration** (issue 22). Every run records what made it, so that a table can be
traced to a commit and repeated:

- ``runs/<run>/provenance.json`` (the pipeline, at the start of a run: :func:`record_run_provenance`)
  and ``runs/<run>/<method>/provenance.json`` (``fit``, at every start or resume:
  :func:`record_fit_provenance`): the git commit of the code and whether the tree was dirty
  (uncommitted changes under ``medssl/``, ``notebooks/``, ``pyproject.toml`` or
  ``requirements.txt``), the versions of the packages that make the numbers, the machine facts
  bitwise repeatability depends on (torch threads, CPU instruction set, oneDNN and CUDA versions),
  and a sha256 of every config;
- :func:`config_hash`: one hash of every method's ``config.json`` in the run and of the
  pipeline's notebook parameters (the run's name left out, so two runs of one plan share it);
- :func:`table_stamp`: the ``commit`` and ``config_hash`` columns every headline table carries
  (:meth:`medssl.rundir.RunDir.write_headline`), which the report shows.

All files are written atomically (:mod:`medssl._files`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["DEMO_PROVENANCE", "provenance_statement", "PACKAGES", "CODE_PATHS", "PROVENANCE_FILE", "code_version",
           "package_versions", "machine", "config_files", "config_hash", "table_stamp", "record_run_provenance",
           "record_fit_provenance", "read_provenance", "code_provenance_text"]

PROVENANCE_FILE = "provenance.json"
# the packages whose versions can change a number (distribution names)
PACKAGES = ("torch", "monai", "numpy", "scikit-learn", "SimpleITK", "nibabel", "umap-learn", "medssl")
# what makes results: uncommitted changes here mark the tree dirty (README, tests and docs do not)
CODE_PATHS = ("medssl", "notebooks", "pyproject.toml", "requirements.txt")
_REPO = Path(__file__).resolve().parents[1]

DEMO_PROVENANCE: str = (
    "Data provenance: the demo cohort is SYNTHETIC. Every subject is a random smooth deformation "
    "(affine + elastic) of ONE real abdomen-pelvis CT, the TotalSegmentator 2.18.0 example volume "
    "(tests/reference_files/example_ct.nii.gz of the PyPI source distribution, Apache-2.0 license), "
    "with intensity jitter and noise added. Its organ labels are TotalSegmentator model outputs "
    "(example_seg_fast_force_split.nii.gz), not manual masks. The lesions are synthetic ellipsoids "
    "inserted into liver, spleen and kidneys. The external cases (the original CT, an abdominal MR and "
    "a DICOM CT from the same package) are real images whose labels are also model outputs. Results on "
    "this cohort show that the code works; they are not evidence of clinical performance."
)


def provenance_statement(source: str | os.PathLike = "demo") -> str:
    """The provenance text for a data source: the demo statement, or a note naming the user's folder."""
    if str(source) == "demo":
        return DEMO_PROVENANCE
    return (
        f"Data provenance: user-provided data read from {os.fspath(source)}. Labels and splits are as "
        "given in that collection's files and the run's manifest; their origin (manual or model-made) "
        "is not known to medssl."
    )


# ----------------------------------------------------------------------------- code and configuration


def code_version(repo: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"commit", "dirty", "changed", "repo"}`` of the code medssl runs from.

    ``commit`` is the full sha of ``HEAD`` (None outside a git checkout, e.g. an installed wheel: then
    only the package versions identify the code); ``dirty`` says whether files under
    :data:`CODE_PATHS` differ from it (tracked or untracked, ignored files not counted; None when
    unknown); ``changed`` lists up to 20 of them.
    """
    root = Path(repo) if repo is not None else _REPO
    top = _git(root, "rev-parse", "--show-toplevel")
    # the checkout must be medssl's own (an installed copy inside some other repository is not it)
    head = _git(root, "rev-parse", "HEAD") if top and Path(top.strip()).resolve() == root.resolve() else None
    if head is None:
        return {"commit": None, "dirty": None, "changed": [], "repo": str(root)}
    status = _git(root, "status", "--porcelain", "--untracked-files=all", "--", *CODE_PATHS)
    changed = [line[3:] for line in (status or "").splitlines() if line.strip()]
    return {"commit": head.strip(), "dirty": None if status is None else bool(changed), "changed": changed[:20],
            "repo": str(root)}


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _short(version: Mapping[str, Any]) -> str:
    """``"0123456789ab"`` (12 hex digits), ``+dirty`` appended for a dirty tree; ``"unknown"`` without git."""
    if not version.get("commit"):
        return "unknown"
    return version["commit"][:12] + ("+dirty" if version.get("dirty") else "")


def package_versions(packages: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``packages`` (None where one is not installed)."""
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@lru_cache(maxsize=1)
def machine() -> dict[str, Any]:
    """The facts bitwise repeatability depends on: the same seed repeats exactly only where these agree."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "onednn": _onednn_version(torch),
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def _onednn_version(torch: Any) -> str | None:
    import re

    m = re.search(r"(?:MKL-DNN|oneDNN) v([\d.]+)", torch.__config__.show())
    return m.group(1) if m else None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_files(run_dir: str | os.PathLike) -> dict[str, str]:
    """``{"<method>/config.json": sha256}`` of every method config in the run (what ``fit`` wrote)."""
    root = Path(run_dir)
    return {str(p.relative_to(root)): _sha256(p.read_bytes()) for p in sorted(root.glob("*/config.json"))}


def _plan_for_hash(plan: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """The notebook executions without the run's name (two runs of one plan hash alike)."""
    out = []
    for s in plan or []:
        params = {k: v for k, v in dict(s.get("parameters", {})).items() if k != "run"}
        out.append({"notebook": s.get("notebook"), "step": s.get("step"), "method": s.get("method"),
                    "parameters": params})
    return out


def config_hash(run_dir: str | os.PathLike) -> str:
    """16 hex digits: a sha256 of every method's ``config.json`` in the run and of the pipeline's plan.

    The plan (notebooks and their parameters, without the run's name) comes from the run's
    ``provenance.json``; a run made without the pipeline hashes its configs alone.
    """
    root = Path(run_dir)
    run = _read_json(root / PROVENANCE_FILE) or {}
    spec = {"configs": config_files(root), "plan": _plan_for_hash(run.get("plan"))}
    return _sha256(json.dumps(spec, sort_keys=True, default=str).encode())[:16]


def table_stamp(run_dir: str | os.PathLike) -> dict[str, str]:
    """``{"commit", "config_hash"}``: the provenance columns of a headline table written now into ``run_dir``."""
    return {"commit": _short(code_version()), "config_hash": config_hash(run_dir)}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: Mapping[str, Any]) -> Path:
    from medssl._files import atomic_write_text

    return atomic_write_text(path, json.dumps(data, indent=2, default=str))


def record_run_provenance(run_dir: str | os.PathLike, plan: Sequence[Mapping[str, Any]] | None = None,
                          plan_name: str | None = None) -> Path:
    """Write ``runs/<run>/provenance.json`` at the start of a pipeline run (atomically; an earlier start is kept
    in ``history``).

    Args:
        plan: the notebook executions (``{"notebook", "step", "method", "parameters"}`` each).
        plan_name: the plan's name or file, for the reader.
    """
    path = Path(run_dir) / PROVENANCE_FILE
    old = _read_json(path) or {}
    version = code_version()
    entry = {"started_utc": _now(), "commit": version["commit"], "dirty": version["dirty"],
             "changed": version["changed"], "plan_name": plan_name}
    data = {
        "kind": "medssl run",
        **entry,
        "packages": package_versions(),
        "machine": machine(),
        "plan": [dict(s) for s in plan or []],
        "history": [*old.get("history", []), *([{k: old.get(k) for k in entry}] if old else [])],
    }
    return _write_json(path, data)


def record_fit_provenance(method_dir: str | os.PathLike, start_step: int, config_file: str | os.PathLike) -> Path:
    """Write ``<method>/provenance.json`` when ``fit`` starts or resumes (atomically).

    Every start is a ``session`` (commit, dirty, the step it started from), so a method trained on
    one commit and resumed on another says so.
    """
    d = Path(method_dir)
    path = d / PROVENANCE_FILE
    old = _read_json(path) or {}
    version = code_version()
    cfg = Path(config_file)  # the method's config.json (medssl.rundir.method_files; fit passes it)
    session = {"started_utc": _now(), "start_step": int(start_step), "commit": version["commit"],
               "dirty": version["dirty"], "changed": version["changed"]}
    sessions = [s for s in old.get("sessions", []) if int(s.get("start_step", 0)) < int(start_step)] + [session]
    data = {
        "kind": "medssl fit",
        "commit": version["commit"],
        "dirty": version["dirty"],
        "config_sha256": _sha256(cfg.read_bytes()) if cfg.is_file() else None,
        "packages": package_versions(),
        "machine": machine(),
        "sessions": sessions,
    }
    return _write_json(path, data)


def read_provenance(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's provenance: ``run`` (the pipeline's file or None), ``methods`` ({method: fit's file}),
    ``config_hash`` now, and ``tables``: ``{(commit, config_hash): [steps]}`` of its headline tables
    (filled by :func:`medssl.report.collect_results`)."""
    root = Path(run_dir)
    methods = {p.parent.name: data for p in sorted(root.glob(f"*/{PROVENANCE_FILE}"))
               if (data := _read_json(p)) is not None}
    return {"run": _read_json(root / PROVENANCE_FILE), "methods": methods, "config_hash": config_hash(root)}


def code_provenance_text(provenance: Mapping[str, Any], stamps: Mapping[tuple[str, str], Sequence[str]]) -> str:
    """One paragraph for the report: the commit and config hash of the tables, the packages, and any mismatch.

    Args:
        provenance: :func:`read_provenance`.
        stamps: ``{(commit, config_hash): [steps]}`` of the run's headline tables.
    """
    run = provenance.get("run") or {}
    first_method = next(iter(provenance.get("methods", {}).values()), {})
    packages = run.get("packages") or first_method.get("packages") or package_versions()
    pkgs = ", ".join(f"{k} {v}" for k, v in packages.items() if v)
    mach = run.get("machine") or first_method.get("machine") or {}
    if not stamps:
        tables = "No headline table of this run carries a commit yet."
    elif len(stamps) == 1:
        (commit, chash), = stamps
        tables = f"Every headline table was written by commit {commit} with config hash {chash}."
    else:
        parts = "; ".join(f"commit {c}, config hash {h}: {', '.join(steps)}" for (c, h), steps in stamps.items())
        tables = f"WARNING: the headline tables come from {len(stamps)} different code/config states ({parts})."
    trained = sorted({_short(m) for m in provenance.get("methods", {}).values()})
    fits = f" Methods were trained by commit {', '.join(trained)}." if trained else ""
    start = f" The pipeline started at commit {_short(run)}." if run else ""
    machine_text = (f" Machine: {mach.get('processor', '?')}, {mach.get('cpu_capability', '?')}, "
                    f"{mach.get('torch_threads', '?')} torch threads" + (f", GPU {mach['gpu']}" if mach.get("gpu") else "")
                    + " (a seed repeats bit for bit on the same software, CPU instruction set and thread count)."
                    if mach else "")
    return f"Code: {tables}{start}{fits} Packages: {pkgs}.{machine_text}"
