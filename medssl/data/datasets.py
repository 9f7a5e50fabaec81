"""Manifests, patient-grouped splits and the pre-training dataset scan.

A **manifest** is the single source of truth for a run: one row per case, as a
pandas DataFrame and on disk as CSV or JSON (a list of records). Columns:

- ``case_id`` (unique), ``image`` (path; a file or a DICOM series folder),
  ``label`` (path or empty), ``group`` (patient id; empty means the case id),
  ``split`` (``train``, ``val``, ``test``, ``external`` or empty);
- optional ``aux_<name>`` columns: further label maps on the image grid
  (e.g. ``aux_lesion``), path or empty;
- optional ``dataset`` (which collection the case came from) and
  ``label_names`` (a JSON object ``{"1": "liver", ...}``).

Relative paths in a manifest file are relative to the file's folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from medssl._files import atomic_path
from medssl.data.errors import (
    ChannelCountError,
    DatasetScanError,
    MedsslDataError,
    SettingError,
    TooLargeError,
    TooSmallError,
)
from medssl.data.volume import Volume
from medssl.geometry import as_size

if TYPE_CHECKING:  # pragma: no cover - typing only
    from medssl.data.preprocess import PreprocessConfig

PathLike = str | os.PathLike

REQUIRED_COLUMNS: tuple[str, ...] = ("case_id", "image", "label", "group", "split")
OPTIONAL_COLUMNS: tuple[str, ...] = ("dataset", "label_names")
AUX_PREFIX = "aux_"
SPLITS: tuple[str, ...] = ("train", "val", "test", "external")
_ASSIGNABLE_SPLITS: tuple[str, ...] = ("train", "val", "test")

__all__ = [
    "REQUIRED_COLUMNS",
    "SPLITS",
    "AUX_PREFIX",
    "ScanReport",
    "ScanWarning",
    "read_manifest",
    "write_manifest",
    "validate_manifest",
    "assign_splits",
    "scan_dataset",
    "load_case",
    "case_label_names",
    "case_aux_paths",
    "check_channel_counts",
]


# --------------------------------------------------------------------------- manifest files


def read_manifest(path: PathLike) -> pd.DataFrame:
    """Read a manifest written as CSV (``.csv``) or JSON (``.json``, a list of records).

    Relative ``image``/``label``/``aux_*`` paths are resolved against the manifest's
    folder. The result is validated (see :func:`validate_manifest`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest file not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    elif suffix == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: manifest is not valid JSON ({e})") from e
        if isinstance(records, dict) and "cases" in records:
            records = records["cases"]
        if not isinstance(records, list):
            raise ValueError(f"{path}: a JSON manifest must be a list of case records (or {{'cases': [...]}})")
        df = pd.DataFrame.from_records(records)
    else:
        raise ValueError(f"{path}: manifest must be a .csv or .json file, got {suffix!r}")
    df = _normalise(df)
    base = path.resolve().parent
    for col in _path_columns(df):
        df[col] = [_resolve(p, base) for p in df[col]]
    try:
        return validate_manifest(df)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def write_manifest(df: pd.DataFrame, path: PathLike) -> Path:
    """Validate ``df`` and write it atomically to ``path`` (``.csv`` or ``.json``).

    The file is written to a temporary file in the same folder and moved into
    place with ``os.replace``, so readers never see a half-written manifest.
    """
    path = Path(path)
    df = validate_manifest(df)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ValueError(f"{path}: manifest must be a .csv or .json file, got {suffix!r}")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        if suffix == ".csv":
            df.to_csv(f, index=False)
        else:
            json.dump(df.to_dict(orient="records"), f, indent=1)
    return path


def validate_manifest(df: pd.DataFrame) -> pd.DataFrame:
    """Check a manifest and return a normalised copy.

    Normalisation: all columns become strings, missing values become ``""``, an
    empty ``group`` becomes the ``case_id``.

    Raises:
        ValueError: missing required columns, empty or duplicate case ids, empty
            image paths, unknown split names, a group in more than one of
            train/val/test, or unparsable ``label_names``. The message lists every
            offending row.
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"a manifest must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"manifest is missing required column(s) {missing}; required: {list(REQUIRED_COLUMNS)}, "
            f"found: {list(df.columns)}"
        )
    df = _normalise(df)
    errors: list[str] = []
    empty_ids = df.index[df["case_id"] == ""].tolist()
    if empty_ids:
        errors.append(f"empty case_id in row(s) {empty_ids}")
    dup = df["case_id"][df["case_id"].duplicated(keep=False) & (df["case_id"] != "")]
    if len(dup):
        errors.append(f"duplicate case_id(s): {sorted(set(dup))}")
    bad_chars = [c for c in df["case_id"] if c and (c in (".", "..") or "/" in c or "\\" in c or c.startswith("."))]
    if bad_chars:
        errors.append(f"case_id(s) {bad_chars} cannot be used as folder names (no '/', '\\' or leading '.')")
    no_image = df["case_id"][df["image"] == ""].tolist()
    if no_image:
        errors.append(f"empty image path for case(s) {no_image}")
    bad_split = df[~df["split"].isin(("",) + SPLITS)]
    if len(bad_split):
        pairs = dict(zip(bad_split["case_id"], bad_split["split"]))
        errors.append(f"unknown split name(s) {pairs}; allowed: {list(SPLITS)} or empty")
    straddling = _groups_straddling_splits(df)
    if straddling:
        errors.append(
            "group(s) in more than one of train/val/test (a patient's studies must not straddle splits): "
            f"{straddling}"
        )
    if "label_names" in df.columns:
        for cid, text in zip(df["case_id"], df["label_names"]):
            try:
                _parse_label_names(text)
            except ValueError as e:
                errors.append(f"case {cid!r}: {e}")
    if errors:
        raise ValueError("invalid manifest:\n  - " + "\n  - ".join(errors))
    return df


def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for col in ("label", "group", "split"):
        if col not in df.columns and "case_id" in df.columns:
            df[col] = ""
    for col in df.columns:
        df[col] = [_as_text(v) for v in df[col]]
    if "group" in df.columns and "case_id" in df.columns:
        df["group"] = np.where(df["group"] == "", df["case_id"], df["group"])
    df = df.reset_index(drop=True)
    first = [c for c in REQUIRED_COLUMNS if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def _as_text(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    if isinstance(v, dict):
        return json.dumps({str(k): val for k, val in v.items()})
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return str(v).strip()


def _path_columns(df: pd.DataFrame) -> list[str]:
    return ["image", "label"] + [c for c in df.columns if c.startswith(AUX_PREFIX)]


def _resolve(p: str, base: Path) -> str:
    if not p:
        return p
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (base / q))


def _groups_straddling_splits(df: pd.DataFrame) -> dict[str, list[str]]:
    assigned = df[df["split"].isin(_ASSIGNABLE_SPLITS)]
    per_group = assigned.groupby("group")["split"].unique()
    return {g: sorted(s) for g, s in per_group.items() if len(s) > 1}


def _parse_label_names(text: str) -> dict[int, str] | None:
    if not text:
        return None
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise TypeError
        return {int(k): str(v) for k, v in raw.items()}
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"label_names must be a JSON object like {{\"1\": \"liver\"}}, got {text[:80]!r}") from e


def case_label_names(row: pd.Series | dict) -> dict[int, str] | None:
    """``{id: name}`` from a manifest row's ``label_names`` column (None if absent)."""
    return _parse_label_names(str(row.get("label_names", "") or ""))


def case_aux_paths(row: pd.Series | dict) -> dict[str, str]:
    """``{name: path}`` for a manifest row's non-empty ``aux_<name>`` columns."""
    return {k[len(AUX_PREFIX) :]: str(v) for k, v in row.items() if k.startswith(AUX_PREFIX) and v}


# --------------------------------------------------------------------------- splits


def assign_splits(
    df: pd.DataFrame,
    fractions: Sequence[float] | None = (0.8, 0.1, 0.1),
    *,
    counts: Sequence[int] | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Assign ``train``/``val``/``test`` splits grouped by ``group`` (patient).

    All cases of a group land in the same split, so a patient's studies never
    straddle splits. The result depends only on the manifest's groups and ``seed``.

    Args:
        df: a manifest.
        fractions: target fractions of *cases* for (train, val, test); groups are
            shuffled with ``seed`` and each goes to the split that contains the
            middle of its case range on the cumulative case axis, so the
            fractions are met as closely as whole groups allow.
        counts: alternatively, exact numbers of *groups* for (train, val, test);
            overrides ``fractions``. Their sum must not exceed the number of
            groups to assign; left-over groups get an empty split.
        seed: the shuffle seed.
        overwrite: if False (default), rows with a split already set keep it, and
            unset rows of a group that already has a split join that split; only
            wholly unassigned groups are shuffled. ``external`` rows are never
            reassigned unless ``overwrite`` is True.

    Returns:
        A new manifest with the ``split`` column filled.
    """
    df = validate_manifest(df)
    if overwrite:
        df["split"] = ""
    preset = df[df["split"] != ""].groupby("group")["split"].first().to_dict()
    df["split"] = [s or preset.get(g, "") for s, g in zip(df["split"], df["group"])]
    open_rows = df["split"] == ""
    sizes = df[open_rows].groupby("group", sort=True).size()  # cases per unassigned group
    order = np.random.default_rng(seed).permutation(len(sizes))
    groups = sizes.index.to_numpy()[order]
    group_split = _split_groups(groups, sizes.to_numpy()[order], fractions, counts)
    df.loc[open_rows, "split"] = [group_split[g] for g in df.loc[open_rows, "group"]]
    return validate_manifest(df)


def _split_groups(
    groups: np.ndarray, sizes: np.ndarray, fractions: Sequence[float] | None, counts: Sequence[int] | None
) -> dict[str, str]:
    if counts is not None:
        counts = [int(c) for c in counts]
        if len(counts) != 3 or min(counts) < 0:
            raise ValueError(f"counts must be 3 non-negative group counts (train, val, test), got {counts}")
        if sum(counts) > len(groups):
            raise ValueError(f"counts {counts} ask for {sum(counts)} groups but only {len(groups)} are unassigned")
        labels = np.repeat(_ASSIGNABLE_SPLITS, counts).tolist() + [""] * (len(groups) - sum(counts))
        return dict(zip(groups, labels))
    if fractions is None or len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(f"fractions must be 3 non-negative numbers (train, val, test), got {fractions}")
    edges = np.cumsum(np.asarray(fractions, dtype=np.float64) / float(sum(fractions)))
    total = max(int(sizes.sum()), 1)
    mids = (np.cumsum(sizes) - sizes / 2.0) / total  # centre of each group on the case axis
    which = np.minimum(np.searchsorted(edges, mids, side="right"), 2)
    return {g: _ASSIGNABLE_SPLITS[i] for g, i in zip(groups, which)}


# --------------------------------------------------------------------------- dataset scan


@dataclass(frozen=True)
class ScanWarning:
    """A file that was used, but with a repair or an assumption the user must know about.

    E.g. a NIfTI ``sform_code`` of 7: nibabel ignores that transform and the orientation
    comes from the qform. ``path`` names the file, ``problem`` says what rule was applied.
    """

    case_id: str
    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def read_warnings_of(case_id: str, volume_meta: dict) -> list[ScanWarning]:
    """The :class:`ScanWarning` records a reader left in ``Volume.meta["read_warnings"]``."""
    return [ScanWarning(case_id, str(w.get("path", "")), str(w.get("problem", "")))
            for w in (volume_meta or {}).get("read_warnings") or [] if isinstance(w, dict)]  # fmt: skip


@dataclass
class ScanReport:
    """What a dataset scan found.

    Attributes:
        ok_case_ids: cases that read, validated and preprocessed cleanly.
        problems: one :class:`MedsslDataError` per bad case (each names its file).
        problem_case_ids: the case id of each entry of ``problems``.
        shapes_vox: preprocessed ``(X, Y, Z)`` shape of each good case.
        spacings_mm: preprocessed voxel spacing of each good case.
        n_channels: image channels of each good case.
        warnings: :class:`ScanWarning` of good cases read with a repair or an assumption
            (e.g. an invalid NIfTI orientation code), each naming the file and the rule applied.
    """

    ok_case_ids: list[str] = field(default_factory=list)
    problems: list[MedsslDataError] = field(default_factory=list)
    problem_case_ids: list[str] = field(default_factory=list)
    shapes_vox: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    spacings_mm: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    n_channels: dict[str, int] = field(default_factory=dict)
    warnings: list[ScanWarning] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add_problem(self, case_id: str, error: MedsslDataError) -> None:
        self.problem_case_ids.append(case_id)
        self.problems.append(error)

    def to_frame(self) -> pd.DataFrame:
        """One row per case, then one per warning: ``case_id, status, error, path, problem, shape_vox, spacing_mm``.

        ``status`` is ``ok``, ``bad`` or ``warning`` (a good case read with a repair or assumption).
        """
        rows = [
            {"case_id": c, "status": "ok", "error": "", "path": "", "problem": "",
             "shape_vox": self.shapes_vox.get(c), "spacing_mm": self.spacings_mm.get(c)}
            for c in self.ok_case_ids
        ]
        rows += [
            {"case_id": c, "status": "bad", "error": type(e).__name__, "path": e.path, "problem": e.problem,
             "shape_vox": None, "spacing_mm": None}
            for c, e in zip(self.problem_case_ids, self.problems)
        ]
        rows += [
            {"case_id": w.case_id, "status": "warning", "error": "", "path": w.path, "problem": w.problem,
             "shape_vox": None, "spacing_mm": None}
            for w in self.warnings
        ]
        cols = ["case_id", "status", "error", "path", "problem", "shape_vox", "spacing_mm"]
        return pd.DataFrame(rows, columns=cols)

    def keep_ok(self, manifest: pd.DataFrame) -> pd.DataFrame:
        """The manifest rows of the good cases only."""
        return manifest[manifest["case_id"].isin(self.ok_case_ids)].reset_index(drop=True)

    def summary(self) -> str:
        head = f"{len(self.ok_case_ids)} case(s) ok, {len(self.problems)} bad"
        if self.warnings:
            head += f", {len(self.warnings)} warning(s)"
        lines = [f"  - [{c}] {type(e).__name__}: {e}" for c, e in zip(self.problem_case_ids, self.problems)]
        lines += [f"  ! [{w.case_id}] warning: {w}" for w in self.warnings]
        return "\n".join([head] + lines)

    def __str__(self) -> str:
        return self.summary()


def check_channel_counts(report: ScanReport, manifest: pd.DataFrame) -> list[MedsslDataError]:
    """Cases whose channel count differs from the dataset's become problems (:class:`ChannelCountError`).

    A model takes one number of input channels, so a folder mixing 1- and 3-channel scans is refused at scan
    time, before anything is trained or written. The dataset's count is the most common one (ties: that of
    the first case in manifest order); the others' cases move from ``ok_case_ids`` to ``problems``.
    Returns the new problems.
    """
    counts = {c: report.n_channels[c] for c in report.ok_case_ids if c in report.n_channels}
    if len(set(counts.values())) <= 1:
        return []
    tally = pd.Series(list(counts.values())).value_counts()
    best = tally.max()
    common = next(n for n in counts.values() if tally[n] == best)  # first in manifest order among the most common
    images = dict(zip(manifest["case_id"], manifest["image"]))
    same = [c for c, n in counts.items() if n == common]
    new = []
    for case_id, n in counts.items():
        if n == common:
            continue
        err = ChannelCountError(
            images.get(case_id, case_id),
            f"has {n} image channel(s) but {len(same)} other case(s) have {common} (e.g. {', '.join(same[:3])}); "
            "a model takes one number of input channels: convert the scans to one channel count, or drop this one",
        )  # fmt: skip
        report.ok_case_ids.remove(case_id)
        report.add_problem(case_id, err)
        new.append(err)
    return new


def load_case(
    row: pd.Series | dict,
    preprocess_config: "PreprocessConfig | None" = None,
    *,
    patch_size_vox: int | Sequence[int] | None = None,
) -> Volume:
    """Read one manifest row, validate it, preprocess it if a config is given, and
    check it can hold a patch of ``patch_size_vox``.

    Raises:
        MedsslDataError: a subclass naming the bad file (from ``read_volume`` or
            ``preprocess``), or :class:`TooSmallError` if the result is smaller
            than the patch.
    """
    from medssl.data.io import read_volume  # local import: io pulls in the readers

    vol = read_volume(
        row["image"],
        row.get("label") or None,
        case_id=row["case_id"],
        group=row.get("group") or None,
        aux_paths=case_aux_paths(row) or None,
        label_names=case_label_names(row),
    )
    if preprocess_config is not None:
        from medssl.data.preprocess import preprocess

        vol = preprocess(vol, preprocess_config)
    if patch_size_vox is not None:
        _check_fits_patch(vol, patch_size_vox, row["image"])
    return vol


def _check_fits_patch(vol: Volume, patch_size_vox: int | Sequence[int], path: str) -> None:
    patch = as_size(patch_size_vox)
    if any(s < p for s, p in zip(vol.shape_vox, patch)):
        raise TooSmallError(
            path,
            f"volume shape {vol.shape_vox} vox (after preprocessing, spacing "
            f"{np.round(vol.spacing_mm, 3).tolist()} mm) is smaller than the patch size {patch} vox; "
            "choose a smaller patch or a finer target spacing, or drop this case",
        )


def _guarded(fn, row, *args, **kwargs):
    """Run ``fn``; turn an unexpected exception into a MedsslDataError naming the file.

    Readers and MONAI raise many exception types for odd files; one such file must
    not hide the problems of all the others, so it is reported like any bad file
    (the original exception stays attached as ``__cause__``).
    """
    try:
        return fn(row, *args, **kwargs), None
    except SettingError:  # about a setting, not this file: one error for the whole scan
        raise
    except MedsslDataError as e:
        return None, e
    except MemoryError as e:  # this file was too large for the machine; the others may be fine
        problem = f"ran out of memory while reading/preprocessing it ({e or 'MemoryError'})"
        return None, TooLargeError(row["image"], problem)
    except Exception as e:  # noqa: BLE001 - see docstring
        err = MedsslDataError(row["image"], f"unexpected {type(e).__name__} while reading/preprocessing: {e}")
        err.__cause__ = e
        return None, err


def scan_dataset(
    manifest: pd.DataFrame,
    preprocess_config: "PreprocessConfig | None" = None,
    *,
    patch_size_vox: int | Sequence[int] | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    progress: bool = True,
) -> ScanReport:
    """Read, validate and (if a config is given) preprocess every case before training.

    Every bad case is collected, not just the first. Nothing is written anywhere.

    Args:
        manifest: a manifest DataFrame.
        preprocess_config: preprocessing to apply (None: read and validate only).
        patch_size_vox: if given, a case smaller than this after preprocessing is
            reported as :class:`TooSmallError`.
        on_error: ``"raise"``: raise :class:`DatasetScanError` listing every bad
            file; ``"skip"``: return the report so the caller can drop them
            (``report.keep_ok(manifest)``).
        progress: show a progress bar.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    manifest = validate_manifest(manifest)
    from medssl.data.limits import max_volume_bytes

    max_volume_bytes()  # a bad MEDSSL_MAX_VOLUME_BYTES is one error here, not one per file
    report = ScanReport()
    rows = manifest.to_dict(orient="records")
    for row in tqdm(rows, desc="scanning cases", disable=not progress, unit="case"):
        vol, err = _guarded(load_case, row, preprocess_config, patch_size_vox=patch_size_vox)
        if err is not None:
            report.add_problem(row["case_id"], err)
            continue
        report.ok_case_ids.append(row["case_id"])
        report.shapes_vox[row["case_id"]] = vol.shape_vox
        report.spacings_mm[row["case_id"]] = tuple(float(s) for s in vol.spacing_mm)
        report.n_channels[row["case_id"]] = vol.n_channels
        report.warnings += read_warnings_of(row["case_id"], vol.meta)
    check_channel_counts(report, manifest)
    if report.problems and on_error == "raise":
        raise DatasetScanError(report.problems)
    return report
