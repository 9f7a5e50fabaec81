"""One entry point to the data of a run: the demo cohort or a user's folder.

Notebooks, the CLI and the trainer all start here::

    data = open_data("demo")                 # or open_data("/path/to/collection")
    train = data.volumes("train")            # cached, preprocessed Volumes
    data.summary()                           # one row per case
    print(data.provenance)                   # every report must show it
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
import pandas as pd

from medssl._processes import can_spawn_workers
from medssl.geometry import as_size
from medssl.provenance import provenance_statement

if TYPE_CHECKING:  # pragma: no cover
    from medssl.data.cache import VolumeCache
    from medssl.data.demo import DemoCohort
    from medssl.data.preprocess import PreprocessConfig
    from medssl.data.volume import Volume

__all__ = ["DataSource", "open_data"]


@dataclass
class DataSource:
    """The cases of a run and how to get them as preprocessed Volumes.

    Attributes:
        manifest: one row per case (``case_id, image, label, group, split``, ``aux_*`` ...).
        preprocess_config: the preprocessing applied by :meth:`volumes`.
        label_names: ``{id: name}`` of the main label map (None if unknown).
        cohort: the :class:`~medssl.data.demo.DemoCohort` for the demo (known
            cross-subject correspondences), else None.
        provenance: where the data came from; every report must show it.
        source: ``"demo"`` or the folder path.
        scan_report: problems found when scanning a folder (None for the demo).
        patch_size_vox: if set, the scan reports cases smaller than this patch
            (after preprocessing) as :class:`~medssl.data.errors.TooSmallError`.
        registered: whether the subjects share one world frame (registered or warped copies
            of one template, like the demo). Real scans do not: a chest CT may sit at z = +683 mm
            and a lung CT at -658 mm. Every volume records its frame in ``meta["frame"]``
            (``"shared:<source>"`` or ``"own:<case>"``); methods and evaluations that compare world
            coordinates across subjects align the bodies first or refuse.
    """

    manifest: pd.DataFrame
    preprocess_config: "PreprocessConfig"
    label_names: dict[int, str] | None
    cohort: "DemoCohort | None"
    provenance: str
    source: str
    progress: bool = True
    scan_report: object | None = None
    patch_size_vox: tuple[int, int, int] | None = None
    registered: bool = False
    _cache: "VolumeCache | None" = field(default=None, repr=False)
    _built: bool = field(default=False, repr=False)

    def __repr__(self) -> str:
        counts = self.manifest["split"].value_counts()
        splits = ", ".join(f"{s} {int(counts[s])}" for s in self.splits)
        spacing = self.preprocess_config.target_spacing_mm
        return (f"DataSource(source={self.source!r}, {len(self.manifest)} cases ({splits}), "
                f"target_spacing_mm={spacing}, cohort={'yes' if self.cohort is not None else 'no'})")  # fmt: skip

    @property
    def cache(self) -> "VolumeCache":
        if self._cache is None:
            from medssl.data.cache import VolumeCache

            self._cache = VolumeCache(config=self.preprocess_config)
        return self._cache

    @property
    def splits(self) -> list[str]:
        return [s for s in ("train", "val", "test", "external") if (self.manifest["split"] == s).any()]

    def build_cache(self, on_error: Literal["raise", "skip"] = "raise") -> None:
        """Read, check, preprocess and cache every case once (later calls are no-ops).

        This is also the dataset scan: every bad file is collected. ``"raise"``
        caches nothing new and raises :class:`~medssl.data.errors.DatasetScanError`
        listing all of them; ``"skip"`` drops them from :attr:`manifest` and keeps
        the report in :attr:`scan_report`.
        """
        if self._built:
            return
        # Worker processes only where they cannot re-run the caller's script (see medssl._processes).
        parallel = len(self.manifest) > 8 and (os.cpu_count() or 1) > 1 and can_spawn_workers()
        # External cases are never trained or evaluated on: they are checked as files but not against the patch size.
        external = self.manifest["split"] == "external"
        parts = [(self.manifest[~external], self.patch_size_vox), (self.manifest[external], None)]
        report = None
        for rows, patch in parts:
            if rows.empty:
                continue
            part = self.cache.build(rows, on_error=on_error, progress=self.progress,
                                    workers=2 if parallel and len(rows) > 8 else 1, patch_size_vox=patch)
            report = part if report is None else _merge_reports(report, part)
        if report is None:  # an empty manifest: the cache says what it thinks of that
            report = self.cache.build(self.manifest, on_error=on_error, progress=self.progress)
        from medssl.data.datasets import check_channel_counts
        from medssl.data.errors import DatasetScanError

        mixed = check_channel_counts(report, self.manifest)  # across all parts: one model reads them all
        if mixed and on_error == "raise":
            raise DatasetScanError(mixed)
        if report.problems:
            self.manifest = report.keep_ok(self.manifest)
        self.scan_report = report
        self._built = True
        if report.problems and not report.ok_case_ids:
            warnings.warn(
                f"{self.source}: no usable case: all {len(report.problems)} case(s) were skipped as bad files "
                f"(see scan_report):\n{report.summary()}",
                stacklevel=3,
            )
        elif report.warnings:
            lines = "\n".join(f"  ! [{w.case_id}] {w}" for w in report.warnings)
            warnings.warn(f"{self.source}: {len(report.warnings)} file(s) were read with a repair or an assumption "
                          f"(also in scan_report.warnings):\n{lines}", stacklevel=3)  # fmt: skip

    def volumes(self, split: str | None = None, *, lazy: bool = True) -> list["Volume"]:
        """Cached, preprocessed Volumes of ``split`` (``train``/``val``/``test``/``external``; None: all).

        With ``lazy=True`` (the default) the arrays are :class:`~medssl.data.npy.LazyNpy`:
        nothing is open until a patch is read, so handles and mapped memory stay bounded
        for any cohort size; ``lazy=False`` gives read-only ``np.memmap``s.
        """
        if split is not None and split not in ("train", "val", "test", "external"):
            raise ValueError(f"split must be train, val, test, external or None, got {split!r}")
        self.build_cache()
        volumes = self.cache.load_all(self.manifest, split=split, lazy=lazy)
        for v in volumes:
            v.meta["frame"] = f"shared:{self.source}" if self.registered else f"own:{v.case_id}"
        return volumes

    def summary(self) -> pd.DataFrame:
        """The cohort table: one row per case with its preprocessed shape, spacing and label counts.

        Columns: ``case_id, split, group, dataset, modality, intensity, shape_vox, spacing_mm,
        body_fraction, cropped_away, n_labels, lesion_voxels, n_lesions``. ``modality`` is the
        one given or detected from the intensities and ``intensity`` the scaling it chose;
        ``body_fraction`` is the share of the resampled grid inside the body mask and
        ``cropped_away`` the share removed by the crop to the body; lesion columns are 0 where
        a case has no lesion map.
        """
        rows = []
        splits = dict(zip(self.manifest["case_id"], self.manifest["split"]))
        datasets = dict(zip(self.manifest["case_id"], self.manifest.get("dataset", [""] * len(self.manifest))))
        for vol in self.volumes(None):
            label = np.asarray(vol.label) if vol.label is not None else None
            lesion = np.asarray(vol.aux["lesion"]) if "lesion" in (vol.aux or {}) else None
            rows.append({
                "case_id": vol.case_id,
                "split": splits.get(vol.case_id, ""),
                "group": vol.group,
                "dataset": datasets.get(vol.case_id, ""),
                "modality": vol.meta.get("modality", ""),
                "intensity": vol.meta.get("intensity_mode", ""),
                "shape_vox": "x".join(str(s) for s in vol.shape_vox),
                "spacing_mm": "x".join(f"{s:g}" for s in np.round(vol.spacing_mm, 2)),
                "body_fraction": vol.meta.get("body_fraction", np.nan),
                "cropped_away": _cropped_away(vol.meta),
                "n_labels": int(np.count_nonzero(np.unique(label))) if label is not None else 0,
                "lesion_voxels": int(np.count_nonzero(lesion)) if lesion is not None else 0,
                "n_lesions": int(np.count_nonzero(np.unique(lesion))) if lesion is not None else 0,
            })  # fmt: skip
        return pd.DataFrame(rows)

    def save_manifest(self, path: str | os.PathLike) -> Path:
        """Write the manifest (CSV or JSON by suffix), atomically."""
        from medssl.data.datasets import write_manifest

        return write_manifest(self.manifest, path)


def _cropped_away(meta: dict) -> float:
    """Share of the resampled grid removed by the crop to the body (NaN when unknown)."""
    box, shape = meta.get("crop_box_vox"), meta.get("resampled_shape_vox")
    if not box or not shape:
        return float("nan") if not shape else 0.0
    kept = np.prod(np.asarray(box[3:]) - np.asarray(box[:3]))
    return float(1.0 - kept / np.prod(shape))


def _merge_reports(a: Any, b: Any) -> Any:
    a.problems += b.problems
    a.problem_case_ids += b.problem_case_ids
    a.ok_case_ids += b.ok_case_ids
    a.built_case_ids += b.built_case_ids
    a.reused_case_ids += b.reused_case_ids
    a.shapes_vox.update(b.shapes_vox)
    a.spacings_mm.update(b.spacings_mm)
    a.n_channels.update(b.n_channels)
    a.warnings += b.warnings
    return a


def open_data(
    source: str | os.PathLike = "demo",
    *,
    layout: str = "auto",
    manifest: str | os.PathLike | pd.DataFrame | None = None,
    preprocess: "PreprocessConfig | None" = None,
    n_subjects: int = 48,
    cohort_seed: int = 0,
    split_seed: int = 0,
    on_error: Literal["raise", "skip"] = "raise",
    progress: bool = True,
    target_spacing_mm: float | None = None,
    patch_size_vox: int | Sequence[int] | None = None,
    registered: bool = False,
    variability: str | None = None,
) -> DataSource:
    """Open the demo cohort or a folder of images as a :class:`DataSource`.

    Args:
        source: ``"demo"`` (fetch + build the synthetic cohort), ``"demo:<variability>"`` (the same
            as ``variability=...``, for notebook parameters: ``"demo:study"``) or a folder.
        layout: folder layout for :func:`medssl.data.adapters.manifest_from_folder`
            (``"auto"`` detects it).
        manifest: an existing manifest (file or DataFrame) to use instead of
            scanning the folder; its splits are kept, empty ones assigned.
        preprocess: preprocessing config. Default: for the demo, the cohort's own
            (:meth:`DemoCohort.default_preprocess_config`), else ``PreprocessConfig()``;
            either with ``target_spacing_mm`` if that is given.
        n_subjects, cohort_seed: demo cohort size and seed (which synthetic subjects exist; it
            is not a training seed: a seed sweep of training keeps the same data).
        split_seed: seed of the patient-grouped split of a folder.
        on_error: folder scan (done while caching): ``"raise"`` lists every bad
            file and stops; ``"skip"`` drops them (see ``DataSource.scan_report``).
        progress: show progress bars.
        target_spacing_mm: isotropic voxel size (mm) when ``preprocess`` is None.
            The demo subjects are synthesised at this spacing (default 3 mm, the
            template CT's own; finer values only interpolate it).
        patch_size_vox: the training patch (int or 3 ints); the scan then reports
            every case smaller than it after preprocessing (:class:`TooSmallError`)
            instead of training failing at its first step.
        registered: a folder's subjects share one world frame (you registered them).
            Default False: real scans do not. The demo cohort is always registered (every
            subject is a warp of one template CT on its grid).
        variability: demo only: ``"study"`` builds the cohort with inter-subject variability
            (organ sizes and shapes, stronger warps, intensities and noise;
            :mod:`medssl.data.demo.variability`), in its own folder.

    Works from a plain script too: worker processes are used only where they
    cannot re-run the script's top-level code (see :mod:`medssl._processes`).
    """
    from dataclasses import replace

    from medssl.data.preprocess import PreprocessConfig

    iso = None if target_spacing_mm is None else (float(target_spacing_mm),) * 3
    patch = _patch_tuple(patch_size_vox)
    if str(source) == "demo" or str(source).startswith("demo:"):
        from medssl.data.demo import build_demo_cohort

        variability = str(source).partition(":")[2] or variability

        if target_spacing_mm is not None:
            spacing = float(target_spacing_mm)
        elif preprocess is not None and preprocess.target_spacing_mm is not None:
            spacing = float(min(preprocess.target_spacing_mm))
        else:
            spacing = 3.0
        cohort = build_demo_cohort(n_subjects=n_subjects, seed=cohort_seed, spacing_mm=spacing, progress=progress,
                                   variability=variability)
        config = preprocess if preprocess is not None else cohort.default_preprocess_config()
        return DataSource(
            manifest=cohort.manifest,
            preprocess_config=config,
            label_names=dict(cohort.label_names),
            cohort=cohort,
            provenance=cohort.provenance,
            source="demo" if variability in (None, "", "none") else f"demo:{variability}",
            progress=progress,
            patch_size_vox=patch,
            registered=True,
        )
    if preprocess is None:
        preprocess = PreprocessConfig() if iso is None else replace(PreprocessConfig(), target_spacing_mm=iso)
    return _open_folder(source, layout, manifest, preprocess, split_seed, on_error, progress, patch, registered)


def _patch_tuple(patch_size_vox: int | Sequence[int] | None) -> tuple[int, int, int] | None:
    if patch_size_vox is None:
        return None
    return as_size(patch_size_vox)  # type: ignore[return-value]


def _open_folder(source, layout, manifest, config, split_seed, on_error, progress, patch, registered) -> DataSource:
    from medssl.data.datasets import assign_splits, case_label_names, read_manifest, validate_manifest

    folder = Path(source).expanduser()
    if isinstance(manifest, pd.DataFrame):
        df = validate_manifest(manifest)
    elif manifest is not None:
        df = read_manifest(manifest)
    else:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: data source must be 'demo' or an existing folder")
        from medssl.data.adapters import manifest_from_folder

        df = manifest_from_folder(folder, layout=layout)
    df = assign_splits(df, seed=split_seed)
    names = next((n for n in (case_label_names(r) for _, r in df.iterrows()) if n), None)
    data = DataSource(
        manifest=df,
        preprocess_config=config,
        label_names=names,
        cohort=None,
        provenance=provenance_statement(folder),
        source=str(folder),
        progress=progress,
        patch_size_vox=patch,
        registered=bool(registered),
    )
    # The scan and the cache are one pass (scan_dataset would read and preprocess
    # every case a second time): bad files are all listed before anything is trained.
    data.build_cache(on_error=on_error)
    return data
