"""The preprocessed-volume cache: each case stored once, memory-mappable, with JSON provenance.

Layout (one folder per preprocessing configuration)::

    <root>/<config.digest()[:16]>/
        config.json                      # the PreprocessConfig and its full digest
        <case_id>/
            image.npy                    # float32 (C, X, Y, Z)
            label.npy                    # if any; smallest integer dtype that holds the ids
            aux_<name>.npy               # further label maps, same rule
            meta.json                    # affine, spacing, shape, sources (size, mtime), config, ...
        .tmp-<case_id>-<uuid>/           # an entry being written (never read)

Why not MONAI's ``PersistentDataset``: it pickles whole transform outputs
(``torch.save``), which cannot be memory-mapped, must be unpickled to be read,
and keys entries on the transform chain's repr rather than on the source files'
size/mtime. Training reads crops straight from the memmaps here.

Writes are atomic: an entry is written into a temporary folder next to its final
place and moved there with ``os.replace``. A failure part-way leaves existing
entries, and the raw data (never written), untouched and no partial entry.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import multiprocessing
import os
import shutil
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from medssl import paths
from medssl._files import atomic_write_text, replace_dir
from medssl.data.datasets import (
    AUX_PREFIX,
    ScanReport,
    _guarded,
    case_aux_paths,
    case_label_names,
    load_case,
    validate_manifest,
)
from medssl.data.errors import DatasetScanError, MedsslDataError
from medssl.data.volume import Volume

if TYPE_CHECKING:  # pragma: no cover
    from medssl.data.preprocess import PreprocessConfig

PathLike = str | os.PathLike

_META = "meta.json"
_IMAGE = "image.npy"
_LABEL = "label.npy"
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
# Temporary folders older than this are leftovers of a killed build, safe to delete.
_STALE_TMP_SECONDS = 24 * 3600
_FORMAT_VERSION = 1

__all__ = ["VolumeCache", "CacheBuildReport", "CacheEntryError"]


class CacheEntryError(MedsslDataError):
    """A cache entry is missing, corrupt or was made with other settings."""


@dataclass
class CacheBuildReport(ScanReport):
    """A :class:`ScanReport` plus what the build did.

    Attributes:
        built_case_ids: entries (re)written by this build.
        reused_case_ids: entries already up to date (no file touched).
        cache_dir: ``<root>/<digest[:16]>``.
    """

    built_case_ids: list[str] = field(default_factory=list)
    reused_case_ids: list[str] = field(default_factory=list)
    cache_dir: Path | None = None

    def summary(self) -> str:
        head = f"cache {self.cache_dir}: {len(self.built_case_ids)} built, {len(self.reused_case_ids)} up to date"
        return head + "\n" + super().summary()


class VolumeCache:
    """Preprocessed volumes on disk, keyed by the preprocessing configuration's digest.

    Args:
        root: cache root (default :func:`medssl.paths.cache_dir`).
        config: the :class:`~medssl.data.preprocess.PreprocessConfig`; its
            ``digest()`` names the sub-folder, so a changed setting gets new entries.

    Example::

        cache = VolumeCache(config=PreprocessConfig())
        report = cache.build(manifest)            # a second call is a no-op
        volumes = cache.load_all(manifest, split="train")   # read-only memmaps
    """

    def __init__(self, root: PathLike | None = None, config: "PreprocessConfig | None" = None) -> None:
        if config is None:
            from medssl.data.preprocess import PreprocessConfig

            config = PreprocessConfig()
        self.config = config
        self.root = Path(root).expanduser() if root is not None else paths.cache_dir()
        self.digest: str = str(config.digest())
        self.dir: Path = self.root / self.digest[:16]

    def __repr__(self) -> str:
        return f"VolumeCache(dir={str(self.dir)!r})"

    # ------------------------------------------------------------------ queries

    def entry_dir(self, case_id: str) -> Path:
        """Folder of ``case_id``'s entry (it may not exist)."""
        if not case_id or "/" in case_id or "\\" in case_id or case_id.startswith("."):
            raise ValueError(f"case id {case_id!r} cannot be used as a cache folder name")
        return self.dir / case_id

    def is_cached(self, case_id: str) -> bool:
        """True if a complete, uncorrupted entry made with this config exists.

        (Whether its source files changed since is checked by :meth:`build`.)
        """
        try:
            self._checked_meta(case_id)
        except CacheEntryError:
            return False
        return True

    def case_ids(self) -> list[str]:
        """Case ids with a complete entry, sorted."""
        if not self.dir.is_dir():
            return []
        names = sorted(p.name for p in self.dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        return [n for n in names if self.is_cached(n)]

    # ------------------------------------------------------------------ build

    def build(
        self,
        manifest: pd.DataFrame,
        on_error: Literal["raise", "skip"] = "raise",
        progress: bool = True,
        workers: int = 1,
        *,
        patch_size_vox: int | Sequence[int] | None = None,
    ) -> CacheBuildReport:
        """Preprocess and store every case of ``manifest`` not already cached.

        An entry is reused untouched when it is complete, was made with the same
        config digest, from the same source paths with unchanged size and mtime,
        and the same group and label names. Anything else (including a corrupt
        entry) is rebuilt.

        Args:
            manifest: a manifest DataFrame.
            on_error: ``"raise"``: if any case is bad, commit nothing new and raise
                :class:`DatasetScanError` listing every bad file; ``"skip"``: cache
                the good cases and report the bad ones.
            progress: show a progress bar.
            workers: processes for reading/preprocessing (1: in this process).
                Workers are *spawned* (the parent may hold torch/OpenMP threads, which
                ``fork`` would copy in a locked state), so a script calling this with
                ``workers > 1`` needs the ``if __name__ == "__main__":`` guard;
                notebooks need nothing.
            patch_size_vox: if given, cases smaller than this after
                preprocessing are bad (:class:`TooSmallError`).

        Errors that are not about the data (e.g. the disk is full) propagate after
        removing this build's temporary folders.
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        manifest = validate_manifest(manifest)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_config_file()
        self._remove_leftovers()
        report = CacheBuildReport(cache_dir=self.dir)
        todo = []
        for row in manifest.to_dict(orient="records"):
            if self._is_fresh(row):
                report.reused_case_ids.append(row["case_id"])
            else:
                todo.append(row)
        staged: dict[str, Path] = {}
        try:
            for case_id, tmp, err in self._stage_all(todo, workers, progress, patch_size_vox):
                if err is not None:
                    report.add_problem(case_id, err)
                else:
                    staged[case_id] = tmp
            if report.problems and on_error == "raise":
                raise DatasetScanError(report.problems)
            for case_id in list(staged):
                self._commit(case_id, staged.pop(case_id))
                report.built_case_ids.append(case_id)
        finally:
            for tmp in staged.values():
                shutil.rmtree(tmp, ignore_errors=True)
        done = set(report.built_case_ids) | set(report.reused_case_ids)
        report.ok_case_ids = [c for c in manifest["case_id"] if c in done]
        for case_id in report.ok_case_ids:
            meta = self._read_meta(case_id)
            report.shapes_vox[case_id] = tuple(meta["shape_vox"])
            report.spacings_mm[case_id] = tuple(meta["spacing_mm"])
        return report

    def _stage_all(
        self, rows: list[dict], workers: int, progress: bool, patch_size_vox: Any
    ) -> Iterator[tuple[str, Path | None, MedsslDataError | None]]:
        bar = tqdm(total=len(rows), desc="caching volumes", disable=not progress, unit="case")
        args = [(row, self.config, self.digest, str(self.dir), patch_size_vox) for row in rows]
        try:
            if workers == 1 or len(rows) <= 1:
                for a in args:
                    yield _unpack_stage_result(_stage_case(*a))
                    bar.update()
                return
            # spawn, not fork: the parent may hold torch/OpenMP threads.
            ctx = multiprocessing.get_context("spawn")
            try:
                with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                    futures = [pool.submit(_stage_case, *a) for a in args]
                    try:
                        for fut in futures:  # in manifest order, so reports are deterministic
                            yield _unpack_stage_result(fut.result())
                            bar.update()
                    except BaseException:
                        for fut in futures:
                            fut.cancel()
                        raise
            except BaseException:
                # after the pool has shut down, so no worker is still writing
                _remove_case_tmp_dirs(self.dir, [r["case_id"] for r in rows], younger_than_s=3600)
                raise
        finally:
            bar.close()

    def _commit(self, case_id: str, tmp: Path) -> None:
        replace_dir(tmp, self.entry_dir(case_id))  # a replaced entry is parked as ".old-<case>-*" until swapped

    def _write_config_file(self) -> None:
        path = self.dir / "config.json"
        if path.is_file():
            try:
                stored = json.loads(path.read_text(encoding="utf-8")).get("digest")
            except (OSError, json.JSONDecodeError, AttributeError):
                stored = None
            if stored == self.digest:
                return
            if stored is not None:
                raise CacheEntryError(
                    path, f"holds digest {stored} but this config's digest is {self.digest} (same 16-char prefix); "
                    "use another cache root"
                )
        atomic_write_text(path, json.dumps({"digest": self.digest, "config": _config_json(self.config)}, indent=1))

    def _remove_leftovers(self) -> None:
        """Delete temporary folders of builds that were killed long ago."""
        now = time.time()
        for p in self.dir.iterdir():
            if p.name.startswith((_TMP_PREFIX, _OLD_PREFIX)) and p.is_dir():
                try:
                    if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                        shutil.rmtree(p, ignore_errors=True)
                except FileNotFoundError:
                    pass

    def _is_fresh(self, row: dict) -> bool:
        try:
            meta = self._checked_meta(row["case_id"])
        except CacheEntryError:
            return False
        try:
            sources = _source_record(row)
        except OSError:
            return False  # a missing source: let the rebuild report it
        return (
            meta.get("sources") == sources
            and meta.get("group") == (row.get("group") or row["case_id"])
            and meta.get("manifest_label_names") == _label_names_json(case_label_names(row))
        )

    # ------------------------------------------------------------------ load

    def load(self, case_id: str, mmap: bool = True) -> Volume:
        """The cached Volume of ``case_id``.

        With ``mmap=True`` the arrays are read-only ``np.memmap``s (nothing is
        read until used); with ``mmap=False`` they are read into RAM.

        Raises:
            CacheEntryError: no entry, or a corrupt/incomplete one (names the folder;
                ``build`` rebuilds it).
        """
        meta = self._checked_meta(case_id)
        entry = self.entry_dir(case_id)
        mode = "r" if mmap else None
        try:
            data = np.load(entry / _IMAGE, mmap_mode=mode, allow_pickle=False)
            label = np.load(entry / _LABEL, mmap_mode=mode, allow_pickle=False) if meta["has_label"] else None
            aux = {n: np.load(entry / f"{AUX_PREFIX}{n}.npy", mmap_mode=mode, allow_pickle=False) for n in meta["aux"]}
        except (OSError, ValueError) as e:
            raise CacheEntryError(entry, f"cannot read the cached arrays ({e}); rebuild with VolumeCache.build") from e
        names = meta.get("label_names")
        return Volume(
            data=data,
            affine=np.asarray(meta["affine"], dtype=np.float64),
            case_id=meta["case_id"],
            group=meta["group"],
            label=label,
            aux=aux,
            label_names={int(k): v for k, v in names.items()} if names else None,
            source=meta["sources"]["image"]["path"],
            meta={
                **meta.get("volume_meta", {}),
                "cache_entry": str(entry),
                "preprocess_digest": meta["preprocess_digest"],
                "cached_at": meta["created"],
            },
        )

    def load_all(
        self,
        manifest_or_case_ids: pd.DataFrame | Sequence[str],
        split: str | None = None,
        mmap: bool = True,
    ) -> list[Volume]:
        """Load several cases, in manifest order; ``split`` filters a manifest.

        Raises:
            CacheEntryError: listing every case that is not (validly) cached.
        """
        if isinstance(manifest_or_case_ids, pd.DataFrame):
            df = manifest_or_case_ids
            if split is not None:
                df = df[df["split"] == split]
            case_ids = [str(c) for c in df["case_id"]]
        else:
            if split is not None:
                raise ValueError("split= needs a manifest DataFrame, not a list of case ids")
            case_ids = [str(c) for c in manifest_or_case_ids]
        volumes, bad = [], []
        for case_id in case_ids:
            try:
                volumes.append(self.load(case_id, mmap=mmap))
            except CacheEntryError as e:
                bad.append(f"{case_id}: {e.problem}")
        if bad:
            raise CacheEntryError(
                self.dir, f"{len(bad)} case(s) not cached or unreadable (run build first):\n  " + "\n  ".join(bad)
            )
        return volumes

    # ------------------------------------------------------------------ entry checks

    def _read_meta(self, case_id: str) -> dict:
        path = self.entry_dir(case_id) / _META
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise CacheEntryError(self.entry_dir(case_id), "not cached (no meta.json)") from e
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CacheEntryError(path, f"corrupt cache metadata ({e}); rebuild with VolumeCache.build") from e
        if not isinstance(meta, dict):
            raise CacheEntryError(path, "corrupt cache metadata (not a JSON object); rebuild with VolumeCache.build")
        return meta

    def _checked_meta(self, case_id: str) -> dict:
        """meta.json of a complete entry made with this config, else CacheEntryError."""
        meta = self._read_meta(case_id)
        entry = self.entry_dir(case_id)
        required = ("case_id", "group", "affine", "shape_vox", "spacing_mm", "sources", "has_label", "aux",
                    "preprocess_digest", "created", "n_channels")
        missing = [k for k in required if k not in meta]
        if missing:
            raise CacheEntryError(entry / _META, f"corrupt cache metadata (missing {missing}); rebuild")
        if meta["preprocess_digest"] != self.digest:
            raise CacheEntryError(
                entry, f"made with preprocessing digest {meta['preprocess_digest']}, not {self.digest}"
            )
        shape = tuple(meta["shape_vox"])
        _check_npy(entry / _IMAGE, (int(meta["n_channels"]),) + shape)
        if meta["has_label"]:
            _check_npy(entry / _LABEL, shape)
        for name in meta["aux"]:
            _check_npy(entry / f"{AUX_PREFIX}{name}.npy", shape)
        return meta


# ---------------------------------------------------------------------- staging (runs in workers too)


def _stage_case(
    row: dict, config: Any, digest: str, digest_dir: str, patch_size_vox: Any
) -> tuple[str, str | None, tuple[type, str, str] | None]:
    """Read + preprocess one case into ``<digest_dir>/.tmp-<case>-<uuid>/``.

    Returns ``(case_id, tmp_dir, None)`` or ``(case_id, None, (error class, path,
    problem))``; errors travel as parts because MedsslDataError does not pickle.
    Non-data errors (e.g. a failed write) propagate after removing the folder.
    """
    case_id = row["case_id"]
    sources = _source_record(row, missing_ok=True)  # before reading: a change during the read forces a rebuild
    vol, err = _guarded(load_case, row, config, patch_size_vox=patch_size_vox)
    if err is not None:
        return case_id, None, (type(err), err.path, err.problem)
    tmp = Path(digest_dir) / f"{_TMP_PREFIX}{case_id}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        _write_entry(tmp, vol, row, config, digest, sources)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return case_id, str(tmp), None


def _unpack_stage_result(res: tuple) -> tuple[str, Path | None, MedsslDataError | None]:
    case_id, tmp, err = res
    if err is not None:
        cls, path, problem = err
        return case_id, None, cls(path, problem)
    return case_id, Path(tmp), None


def _write_entry(tmp: Path, vol: Volume, row: dict, config: Any, digest: str, sources: dict) -> None:
    from medssl import __version__

    data = np.ascontiguousarray(np.asarray(vol.data), dtype=np.float32)
    if data.ndim != 4:
        raise MedsslDataError(row["image"], f"preprocessing returned data of shape {data.shape}, expected (C, X, Y, Z)")
    shape = tuple(int(s) for s in data.shape[1:])
    np.save(tmp / _IMAGE, data, allow_pickle=False)
    if vol.label is not None:
        np.save(tmp / _LABEL, _as_smallest_int(vol.label, row["label"]), allow_pickle=False)
    for name, arr in (vol.aux or {}).items():
        np.save(tmp / f"{AUX_PREFIX}{name}.npy", _as_smallest_int(arr, row["image"]), allow_pickle=False)
    affine = np.asarray(vol.affine, dtype=np.float64)
    meta = {
        "format_version": _FORMAT_VERSION,
        "case_id": row["case_id"],
        "group": vol.group or row.get("group") or row["case_id"],
        "affine": affine.tolist(),
        "spacing_mm": np.linalg.norm(affine[:3, :3], axis=0).tolist(),
        "shape_vox": list(shape),
        "n_channels": int(data.shape[0]),
        "has_label": vol.label is not None,
        "aux": sorted((vol.aux or {}).keys()),
        "label_names": _label_names_json(vol.label_names if vol.label_names else case_label_names(row)),
        "manifest_label_names": _label_names_json(case_label_names(row)),
        "sources": sources,
        "preprocess_digest": digest,
        "preprocess_config": _config_json(config),
        "volume_meta": _jsonable(vol.meta or {}),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "medssl_version": __version__,
    }
    # meta.json last: an entry folder without it is never mistaken for a complete one.
    (tmp / _META).write_text(json.dumps(meta, indent=1), encoding="utf-8")


def _source_record(row: dict, missing_ok: bool = False) -> dict[str, dict]:
    """``{role: {path, size, mtime_ns}}`` for the image, label and aux files of a row."""
    files = {"image": row["image"]}
    if row.get("label"):
        files["label"] = row["label"]
    files.update({f"{AUX_PREFIX}{k}": v for k, v in case_aux_paths(row).items()})
    out = {}
    for role, p in files.items():
        path = os.path.abspath(os.fspath(p))
        try:
            size, mtime_ns = _file_stat(path)
        except OSError:
            if not missing_ok:
                raise
            size, mtime_ns = -1, -1
        out[role] = {"path": path, "size": size, "mtime_ns": mtime_ns}
    return out


def _file_stat(path: str) -> tuple[int, int]:
    """Size and mtime; for a DICOM series folder, total size and newest mtime of its files."""
    st = os.stat(path)
    if not os.path.isdir(path):
        return int(st.st_size), int(st.st_mtime_ns)
    size, mtime = 0, int(st.st_mtime_ns)
    for dirpath, _, names in os.walk(path):
        for n in names:
            s = os.stat(os.path.join(dirpath, n))
            size += int(s.st_size)
            mtime = max(mtime, int(s.st_mtime_ns))
    return size, mtime


def _remove_case_tmp_dirs(digest_dir: Path, case_ids: list[str], younger_than_s: float) -> None:
    now = time.time()
    for case_id in case_ids:
        for p in digest_dir.glob(f"{_TMP_PREFIX}{case_id}-*"):
            if now - p.stat().st_mtime < younger_than_s:
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------- small helpers


def _smallest_int_dtype(lo: int, hi: int) -> np.dtype:
    candidates = (np.uint8, np.uint16, np.uint32, np.uint64) if lo >= 0 else (np.int8, np.int16, np.int32, np.int64)
    for dt in candidates:
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dt)
    raise ValueError(f"label values [{lo}, {hi}] do not fit any integer dtype")


def _as_smallest_int(arr: Any, path: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.dtype == bool:
        return a.astype(np.uint8)
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise MedsslDataError(path, "label map holds non-integer values after preprocessing")
    if a.size == 0:
        return a.astype(np.uint8)
    return np.ascontiguousarray(a.astype(_smallest_int_dtype(int(a.min()), int(a.max()))))


def _check_npy(path: Path, shape: tuple[int, ...]) -> None:
    """Header and file size of an .npy agree with ``shape`` (catches missing and truncated files)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            stored_shape, _, dtype = read_header(f)
            expected_size = f.tell() + int(np.prod(stored_shape)) * dtype.itemsize
    except FileNotFoundError as e:
        raise CacheEntryError(path, "missing cached array; rebuild with VolumeCache.build") from e
    except (OSError, ValueError) as e:
        raise CacheEntryError(path, f"corrupt cached array ({e}); rebuild with VolumeCache.build") from e
    if tuple(stored_shape) != tuple(shape):
        raise CacheEntryError(path, f"cached array has shape {stored_shape}, meta.json says {shape}; rebuild")
    actual = os.path.getsize(path)
    if actual != expected_size:
        raise CacheEntryError(path, f"cached array is {actual} bytes, expected {expected_size} (truncated?); rebuild")


def _label_names_json(names: dict[int, str] | None) -> dict[str, str] | None:
    return {str(int(k)): str(v) for k, v in names.items()} if names else None


def _config_json(config: Any) -> Any:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return _jsonable(dataclasses.asdict(config))
    return _jsonable(config)


def _jsonable(x: Any) -> Any:
    """A JSON-serialisable copy (numpy scalars/arrays, tuples, paths, enums converted)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, enum.Enum):
        return _jsonable(x.value)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


