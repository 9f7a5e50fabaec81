"""Assembling the synthetic demo cohort on disk, and :class:`DemoCohort`, the built cohort."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from medssl import paths
from medssl._files import make_temp_dir, remove_stale_temps, replace_dir
from medssl._processes import can_spawn_workers
from medssl.data.demo.config import CohortConfig, _config_from_json
from medssl.data.demo.deformation import SubjectDeformation
from medssl.data.demo.fetch import (
    _DICOM_LABEL_ON_GRID,
    CT_LABEL_FILE,
    TOTALSEG_LICENSE,
    TOTALSEG_SDIST_SHA256,
    TOTALSEG_VERSION,
    _examples_complete,
    fetch_totalseg_examples,
    load_example_label_names,
)
from medssl.data.demo.synthesis import SYNTHESIS_VERSION, _init_worker, _synthesize_subject
from medssl.data.errors import MedsslDataError
from medssl.provenance import DEMO_PROVENANCE

if TYPE_CHECKING:  # pragma: no cover
    from medssl.data.preprocess import PreprocessConfig
    from medssl.data.volume import Volume

# --------------------------------------------------------------------------- the cohort


def default_cohort_dir(n_subjects: int = 48, seed: int = 0, spacing_mm: float = 3.0,
                       variability: str | None = None) -> Path:
    """``paths.data_dir()/demo/cohort-seed<seed>-n<n>`` (plus ``-<spacing>mm`` if not 3 mm, ``-<variability>``)."""
    suffix = "" if float(spacing_mm) == 3.0 else f"-{float(spacing_mm):g}mm"
    suffix += f"-{variability}" if variability not in (None, "", "none") else ""
    return paths.data_dir() / "demo" / f"cohort-seed{seed}-n{n_subjects}{suffix}"


def build_demo_cohort(
    n_subjects: int = 48,
    split_counts: tuple[int, int, int] = (32, 8, 8),
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    spacing_mm: float = 3.0,
    lesions_per_subject: tuple[int, int] = (2, 4),
    *,
    examples_dir: str | os.PathLike | None = None,
    n_workers: int | None = None,
    variability: str | None = None,
) -> "DemoCohort":
    """Build (or reuse) the synthetic demo cohort; see the module docstring for the model.

    Args:
        n_subjects: number of synthetic subjects.
        split_counts: subjects in (train, val, test); scaled if they do not sum to ``n_subjects``.
        seed: the cohort seed; subject ``i`` uses ``np.random.SeedSequence(seed).spawn(n)[i]``,
            so the result does not depend on ``n_workers``.
        out_dir: the cohort folder (default :func:`default_cohort_dir`).
        progress: show progress bars.
        spacing_mm: isotropic voxel size of the subjects' grids (the template's field of view).
        lesions_per_subject: (min, max) lesions per subject.
        examples_dir: the fetched TotalSegmentator examples (fetched if None).
        n_workers: processes for synthesis (default: up to 4 cores for >= 8 subjects, else 1).
        variability: ``"study"`` for subjects that differ in organ sizes and shapes, stronger warps,
            intensities and noise (:mod:`medssl.data.demo.variability`); None: the plain demo cohort.

    A complete cohort with the same settings and source is returned untouched.
    Otherwise it is built in a temporary folder next to ``out_dir`` and moved
    into place at the end (an older cohort there is replaced only then).
    """
    from medssl.data.demo.variability import cohort_overrides, variability_settings

    varied = variability_settings(variability)
    cfg = CohortConfig(
        n_subjects=int(n_subjects),
        split_counts=tuple(int(c) for c in split_counts),
        seed=int(seed),
        spacing_mm=float(spacing_mm),
        lesions_per_subject=tuple(int(v) for v in lesions_per_subject),
        **({**cohort_overrides(varied), "variability": varied.to_json()} if varied is not None else {}),
    )
    examples = Path(examples_dir) if examples_dir is not None else fetch_totalseg_examples(progress=progress)
    root = Path(out_dir).expanduser() if out_dir is not None else default_cohort_dir(
        n_subjects, seed, spacing_mm, varied.name if varied is not None else None)
    if _cohort_complete(root, cfg):
        return DemoCohort(root)
    start = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(root.parent, f".{root.name}.")  # builds that were killed (their writer is gone)
    tmp = make_temp_dir(root.parent, f".{root.name}")
    try:
        subjects = _synthesize_all(cfg, examples, tmp, n_workers, progress)
        _write_cohort_files(cfg, examples, tmp, root, subjects, time.perf_counter() - start)
        replace_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DemoCohort(root)


def _synthesize_all(cfg: CohortConfig, examples: Path, tmp: Path, n_workers: int | None, progress: bool) -> list[dict]:
    seeds = np.random.SeedSequence(cfg.seed).spawn(cfg.n_subjects)
    splits = cfg.subject_splits()
    jobs = [
        {"case_id": f"demo-s{i:03d}", "split": splits[i], "entropy": s.entropy, "spawn_key": list(s.spawn_key),
         "config": cfg.to_json(), "dir": str(tmp / "subjects" / f"demo-s{i:03d}")}
        for i, s in enumerate(seeds)
    ]  # fmt: skip
    if n_workers is None:  # workers only where they cannot re-run the caller's script (medssl._processes)
        n_workers = min(os.cpu_count() or 1, 4) if cfg.n_subjects >= 8 and can_spawn_workers() else 1
    bar = tqdm(total=len(jobs), desc="synthesising demo subjects", unit="subject", disable=not progress)
    try:
        if n_workers <= 1:
            _init_worker(str(examples))
            results = []
            for job in jobs:
                results.append(_synthesize_subject(job))
                bar.update()
            return results
        # spawn, not fork: the caller (a notebook kernel) may hold torch/OpenMP threads
        ctx = multiprocessing.get_context("spawn")
        init = {"initializer": _init_worker, "initargs": (str(examples),)}
        with ProcessPoolExecutor(n_workers, mp_context=ctx, **init) as pool:
            futures = [pool.submit(_synthesize_subject, job) for job in jobs]
            results = []
            for fut in futures:  # in subject order
                results.append(fut.result())
                bar.update()
            return results
    finally:
        bar.close()


def _external_rows(examples: Path, root: Path) -> tuple[list[dict], list[dict]]:
    """Manifest rows for the real example volumes (split ``external``) and notes about them."""
    from medssl.data.io import read_volume

    ref = examples.resolve()
    ct_names = load_example_label_names(ref, CT_LABEL_FILE)
    mr_names = load_example_label_names(ref, "example_seg_mr.nii.gz")
    rows = [
        {"case_id": "totalseg-ct", "image": ref / "example_ct.nii.gz", "label": ref / CT_LABEL_FILE, "names": ct_names,
         "note": "the real CT every demo subject is warped from (the template)"},
        {"case_id": "totalseg-mr", "image": ref / "example_mr_sm.nii.gz", "label": ref / "example_seg_mr.nii.gz",
         "names": mr_names, "note": "real abdominal MR (another subject), labels from TotalSegmentator total_mr"},
    ]  # fmt: skip
    dicom_label = ref / _DICOM_LABEL_ON_GRID
    dicom = {"case_id": "totalseg-dicom", "image": ref / "example_ct_dicom", "label": "", "names": None,
             "note": "real abdominal CT as a 20-file DICOM series (another subject); "}  # fmt: skip
    if dicom_label.is_file():
        try:
            read_volume(dicom["image"], dicom_label)
            dicom.update(label=dicom_label, names=load_example_label_names(ref, _DICOM_LABEL_ON_GRID))
            dicom["note"] += ("label example_seg_dicom.nii.gz re-indexed onto the DICOM grid (its y axis was "
                              "stored reversed; same voxel centres, no interpolation)")  # fmt: skip
        except MedsslDataError as e:
            dicom["note"] += f"registered WITHOUT label: {e.problem}"
    else:
        dicom["note"] += "registered WITHOUT label: example_seg_dicom.nii.gz does not lie on the DICOM image grid"
    rows.append(dicom)
    manifest_rows, notes = [], []
    for r in rows:
        manifest_rows.append({
            "case_id": r["case_id"], "image": str(r["image"]), "label": str(r["label"]), "group": r["case_id"],
            "split": "external", "aux_lesion": "", "dataset": f"totalsegmentator-{TOTALSEG_VERSION}-example",
            "label_names": json.dumps({str(k): v for k, v in r["names"].items()}) if r["names"] else "",
        })  # fmt: skip
        notes.append({"case_id": r["case_id"], "note": r["note"]})
    return manifest_rows, notes


def _write_cohort_files(cfg: CohortConfig, examples: Path, tmp: Path, root: Path, subjects: list[dict], seconds: float):
    from medssl.data.datasets import write_manifest

    names = load_example_label_names(examples, CT_LABEL_FILE) or {}
    names_json = json.dumps({str(k): v for k, v in names.items()})
    rows = []
    for s in subjects:
        rel = f"subjects/{s['case_id']}"
        rows.append({"case_id": s["case_id"], "image": f"{rel}/image.nii.gz", "label": f"{rel}/label.nii.gz",
                     "group": s["case_id"], "split": s["split"], "aux_lesion": f"{rel}/lesion.nii.gz",
                     "dataset": "medssl-demo-synthetic", "label_names": names_json})  # fmt: skip
    external, notes = _external_rows(examples, root)
    write_manifest(pd.DataFrame(rows + external), tmp / "manifest.csv")
    (tmp / "label_names.json").write_text(json.dumps({str(k): v for k, v in names.items()}, indent=1), "utf-8")
    source = json.loads((examples / "SOURCE.json").read_text(encoding="utf-8"))
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    info = {
        "format_version": 1,
        "synthesis_version": SYNTHESIS_VERSION,
        "config": cfg.to_json(),
        "seed": cfg.seed,
        "source": {"package": f"TotalSegmentator {TOTALSEG_VERSION}", "archive_sha256": source["archive_sha256"],
                   "license": TOTALSEG_LICENSE, "template_image": "example_ct.nii.gz",
                   "template_label": CT_LABEL_FILE, "examples_dir": str(examples.resolve())},
        "deformation": "T_s(x) = c + A_s (x - c) + t_s + u_s(x): subject world mm -> template world mm; "
                       "parameters in subjects/<case>/deformation.npz (see medssl.data.demo.SubjectDeformation)",
        "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(seconds, 2),
        "provenance": DEMO_PROVENANCE,
        "subjects": subjects,
        "external": notes,
        "files": files,
    }  # fmt: skip
    (tmp / "cohort.json").write_text(json.dumps(info, indent=1), encoding="utf-8")  # last: marks completeness


def _cohort_complete(root: Path, cfg: CohortConfig) -> bool:
    try:
        info = json.loads((root / "cohort.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if info.get("synthesis_version", 1) != SYNTHESIS_VERSION or info.get("config") != cfg.to_json():
        return False
    if info.get("source", {}).get("archive_sha256") != TOTALSEG_SDIST_SHA256:
        return False
    for rel, size in info.get("files", {}).items():
        p = root / rel
        if not p.is_file() or p.stat().st_size != size:
            return False
    # the external cases point into the examples folder: a moved data folder means a rebuild
    return _examples_complete(Path(info.get("source", {}).get("examples_dir", "")))


class DemoCohort:
    """A built demo cohort on disk: manifest, label names, deformations, provenance.

    Attributes:
        root: the cohort folder.
        manifest: the manifest (absolute paths), splits train/val/test/external.
        label_names: ``{id: name}`` of the subjects' (and the template's) organ labels.
        provenance: the statement every report must carry.
        info: the parsed ``cohort.json``.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        from medssl.data.datasets import read_manifest

        self.root = Path(root)
        self.info: dict = json.loads((self.root / "cohort.json").read_text(encoding="utf-8"))
        version = self.info.get("synthesis_version", 1)
        if version != SYNTHESIS_VERSION:
            raise ValueError(f"{self.root / 'cohort.json'}: the cohort was synthesised by version {version} of the "
                             f"demo synthesis, this medssl makes version {SYNTHESIS_VERSION} (other lesions); "
                             "build_demo_cohort(...) with the same settings rebuilds it")
        self.manifest: pd.DataFrame = read_manifest(self.root / "manifest.csv")
        raw = json.loads((self.root / "label_names.json").read_text(encoding="utf-8"))
        self.label_names: dict[int, str] = {int(k): v for k, v in raw.items()}
        self.provenance: str = self.info.get("provenance", DEMO_PROVENANCE)
        self.config = _config_from_json(self.info["config"])
        self._deformations: dict[str, SubjectDeformation] = {}

    def __repr__(self) -> str:
        return f"DemoCohort(root={str(self.root)!r}, n_subjects={self.config.n_subjects}, seed={self.config.seed})"

    def case_ids(self, split: str | None = None) -> list[str]:
        m = self.manifest
        return list(m["case_id"] if split is None else m.loc[m["split"] == split, "case_id"])

    def subject(self, case_id: str) -> dict:
        """The ``cohort.json`` record of a synthetic subject (lesions, intensity settings, ...)."""
        for s in self.info["subjects"]:
            if s["case_id"] == case_id:
                return s
        raise KeyError(f"{case_id!r} is not a synthetic subject of {self.root}")

    def lesion_table(self) -> pd.DataFrame:
        """One row per synthetic lesion: ``case_id, split, id, organ, kind, diameters_mm, delta_hu, cyst_hu,
        contrast_hu, voxels, volume_ml`` (as recorded when the cohort was built)."""
        rows = [{"case_id": s["case_id"], "split": s["split"], **r} for s in self.info["subjects"] for r in s["lesions"]]
        cols = ["case_id", "split", "id", "organ", "kind", "diameters_mm", "delta_hu", "cyst_hu", "surround_hu",
                "contrast_hu", "voxels", "volume_ml"]
        return pd.DataFrame(rows).reindex(columns=cols)

    def deformation(self, case_id: str) -> SubjectDeformation:
        """The subject's ``T``; the template case ``totalseg-ct`` has the identity."""
        if case_id not in self._deformations:
            if case_id == "totalseg-ct":
                self._deformations[case_id] = SubjectDeformation.identity()
            else:
                path = self.root / "subjects" / case_id / "deformation.npz"
                if not path.is_file():
                    raise KeyError(f"{case_id!r} has no deformation in {self.root} (external cases other than "
                                   "'totalseg-ct' are other patients; their correspondence is unknown)")  # fmt: skip
                from medssl.data.demo.variability import load_deformation  # with the organ warp where there is one

                self._deformations[case_id] = load_deformation(path)
        return self._deformations[case_id]

    def to_template_mm(self, case_id: str, points_mm: np.ndarray) -> np.ndarray:
        """Subject world mm (N, 3) -> template (``totalseg-ct``) world mm (N, 3). Exact (it is ``T``)."""
        return self.deformation(case_id)(points_mm)

    def from_template_mm(self, case_id: str, points_mm: np.ndarray) -> np.ndarray:
        """Template world mm (N, 3) -> subject world mm (N, 3), to 1e-4 mm (see ``SubjectDeformation.inverse``)."""
        return self.deformation(case_id).inverse(points_mm)

    def correspondence(self, case_a: str, case_b: str, points_mm_a: np.ndarray) -> np.ndarray:
        """The points of ``case_b`` (world mm, (N, 3)) that show the same anatomy as ``points_mm_a`` in ``case_a``.

        ``T_b^-1(T_a(p))``; the round trip a -> b -> a returns within 1e-3 mm.
        """
        return self.from_template_mm(case_b, self.to_template_mm(case_a, points_mm_a))

    def volumes(
        self, split: str | None = None, preprocess_config: "PreprocessConfig | None" = None, progress: bool = True
    ) -> list["Volume"]:
        """Cached, preprocessed Volumes of a split (all cases if None), through :class:`VolumeCache`.

        The default preprocessing (:meth:`default_preprocess_config`) keeps the
        cohort's spacing and crops to the body (medssl.data.body).
        """
        from medssl.data.cache import VolumeCache

        config = preprocess_config if preprocess_config is not None else self.default_preprocess_config()
        cache = VolumeCache(config=config)
        parallel = len(self.manifest) > 8 and can_spawn_workers()
        cache.build(self.manifest, progress=progress, workers=2 if parallel else 1)
        return cache.load_all(self.manifest, split=split)

    def default_preprocess_config(self) -> "PreprocessConfig":
        from medssl.data.preprocess import PreprocessConfig

        s = float(self.config.spacing_mm)
        # The body mask's modality rule crops the air: -500 HU for the CT subjects, Otsu for the MR case.
        # Intensities: ISImed's percentile scaling for every case (the paper's preprocessing).
        return PreprocessConfig(target_spacing_mm=(s, s, s), intensity="percentile")
