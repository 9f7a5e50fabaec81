"""The preprocessed-volume cache: each case stored once, memory-mappable, with JSON provenance.

Layout (one folder per preprocessing configuration)::

    <root>/<config.digest()[:16]>/
        config.json                      # the PreprocessConfig and its full digest
        <case_id>-<source key>/          # source key: hash of the absolute source paths
            image.npy                    # float32 (C, X, Y, Z)
            label.npy                    # if any; smallest integer dtype that holds the ids
            aux_<name>.npy               # further label maps, same rule
            meta.json                    # affine, spacing, shape, sources (path, size, mtime), config, ...
        .tmp-<entry>.<host>.<pid>.<random>.tmp/   # an entry being written (never read)
        .locks/<n>.lock                  # per-entry locks (striped), see below

Entries are keyed by the case id *and* where its files are, so two datasets that both
have a case ``brain1`` (or two demo cohorts of different seeds) never share an entry;
every load checks that the entry's recorded sources still have the size and mtime they
had when it was built, and that it was made for the manifest row asking for it.

Why not MONAI's ``PersistentDataset``: it pickles whole transform outputs
(``torch.save``), which cannot be memory-mapped, must be unpickled to be read,
and keys entries on the transform chain's repr rather than on the source files'
size/mtime. Training reads crops straight from the memmaps here.

Writes are atomic: an entry is written into a temporary folder next to its final
place and moved there with ``os.replace``. A failure part-way leaves existing
entries, and the raw data (never written), untouched and no partial entry.

Several processes may build and read one cache at once. Each builder stages into
folders named after itself and only ever deletes its own; it commits an entry under
an exclusive lock and skips the commit if another process committed an up-to-date
entry first. Loads hold a shared lock while they open an entry, so they never see one
half-replaced. Locks are ``flock`` locks, which the OS releases when a process dies.
Temporary folders of builders that died (killed, power loss) are removed by the next
build.

A cache that is up to date is only read: it may sit on a read-only mount (a shared
dataset on a cluster). Readers that cannot create the lock files read without them
(nobody can commit through that mount); a build that would have to write names the
folder and the cases missing (:class:`CacheWriteError`).
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import threading
import warnings
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Mapping, Sequence

try:  # POSIX; elsewhere the cache works without cross-process locks
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from medssl import paths
from medssl._errors import PathProblemError
from medssl._files import atomic_write_text, remove_stale_temps, replace_dir, temp_path
from medssl._processes import can_spawn_workers, die_with_parent
from medssl.data.datasets import (
    AUX_PREFIX,
    ScanReport,
    _check_fits_patch,
    _guarded,
    case_aux_paths,
    case_label_names,
    load_case,
    read_warnings_of,
    validate_manifest,
)
from medssl.data.errors import CacheEntryError, DatasetScanError, MedsslDataError, TooSmallError
from medssl.data.limits import max_volume_bytes
from medssl.data.npy import LazyNpy
from medssl.data.volume import Volume

if TYPE_CHECKING:  # pragma: no cover
    from medssl.data.preprocess import PreprocessConfig

PathLike = str | os.PathLike

_META = "meta.json"
_IMAGE = "image.npy"
_LABEL = "label.npy"
_TMP_PREFIX = ".tmp-"
_LOCK_DIR = ".locks"
_LOCK_STRIPES = 64  # entries share 64 lock files: bounded files, rare and harmless contention
_FORMAT_VERSION = 2  # 2: entries keyed by source identity
# Errors that mean "this cache cannot be written" (read-only mount, no write permission)
_READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)

__all__ = ["VolumeCache", "CacheBuildReport", "CacheEntryError", "CacheWriteError"]

Case = str | Mapping[str, Any]  # a case id, or a manifest row (dict or pandas Series)


class CacheWriteError(PathProblemError, OSError):
    """Writing a cache entry failed (disk full, quota, write limit). ``path`` names the file."""


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
    """Preprocessed volumes on disk, keyed by the preprocessing configuration's digest and each case's sources.

    Args:
        root: cache root (default :func:`medssl.paths.cache_dir`).
        config: the :class:`~medssl.data.preprocess.PreprocessConfig`; its
            ``digest()`` names the sub-folder, so a changed setting gets new entries.

    Cases are named by manifest rows (a dict or a DataFrame row), which say where the
    files are; a bare case id also works when exactly one entry holds that case.

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

    def entry_dir(self, case: Case) -> Path:
        """Folder of a case's entry (it may not exist).

        For a manifest row this is ``<case_id>-<key of its source paths>``; for a bare
        case id, the one existing entry of that case (:class:`CacheEntryError` if there
        are none or several).
        """
        if isinstance(case, str):
            return self._entry_of_case_id(case)
        case_id = str(case["case_id"])
        _check_case_id(case_id)
        return self.dir / f"{case_id}-{_source_key(case)}"

    def is_cached(self, case: Case) -> bool:
        """True if a complete, uncorrupted, up-to-date entry made with this config exists."""
        try:
            self._open(case, mode="meta")
        except CacheEntryError:
            return False
        return True

    def case_ids(self) -> list[str]:
        """Case ids with a complete entry, sorted (a case cached from two sources appears twice)."""
        out = []
        for entry in self._entries():
            try:
                out.append(self._checked_meta(entry)["case_id"])
            except CacheEntryError:
                continue
        return sorted(out)

    def _entries(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _entry_of_case_id(self, case_id: str) -> Path:
        _check_case_id(case_id)
        for attempt in range(8):  # a lookup that falls in a commit's swap waits for it and looks again
            found = [p for p in self._entries() if p.name.rsplit("-", 1)[0] == case_id]
            if found or (not self._wait_for_commits_of(case_id) and attempt > 0):
                break
        if len(found) == 1:
            return found[0]
        if not found:
            raise CacheEntryError(self.dir / case_id, "not cached")
        sources = []
        for p in found:
            try:
                sources.append(self._read_meta(p)["sources"]["image"]["path"])
            except (CacheEntryError, KeyError, TypeError):
                sources.append(p.name)
        raise CacheEntryError(
            self.dir / case_id,
            f"{len(found)} cached cases share this id (from {sources}); pass the manifest row to say which",
        )

    def _wait_for_commits_of(self, case_id: str) -> bool:
        """Wait for commits swapping an entry of ``case_id``; True if there were any.

        A commit replaces an entry by parking the old folder as ``.old-<entry>...tmp`` for a moment
        (``replace_dir``), under the entry's exclusive lock. A lookup by case id lists the folder
        before it can know which lock to take, so it may fall in that moment: the parked name says
        which entry is being swapped; a shared lock on it waits for the commit to end. (A parked
        folder left by a dead process holds no lock: this returns at once.) The entry or its parked
        folder always exists (the new folder is in place before the parked one is deleted), so a
        second look after a missed entry and no parked folder finds a commit that just ended.
        """
        prefix = f".old-{case_id}-"
        try:
            names = [p.name for p in self.dir.iterdir() if p.name.startswith(prefix)]
        except OSError:
            return False
        entries = {n[len(".old-"): len(prefix) + 12] for n in names if n[len(prefix) + 12: len(prefix) + 13] == "."}
        for name in sorted(entries):
            with self._lock(self.dir / name, shared=True):
                pass
        return bool(entries)

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
                ``fork`` would copy in a locked state). Spawned workers re-run the
                calling script's top-level code, so when that code is not under
                ``if __name__ == "__main__":`` the build runs in this process instead
                (with a warning); notebooks need nothing.
            patch_size_vox: if given, cases smaller than this after preprocessing are
                bad (:class:`TooSmallError`), whether built now or cached before.

        Errors that are not about the data (e.g. the disk is full:
        :class:`CacheWriteError`) propagate after removing this build's temporary folders.
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        manifest = validate_manifest(manifest)
        max_volume_bytes()  # a bad MEDSSL_MAX_VOLUME_BYTES is one error here, not one per file
        report = CacheBuildReport(cache_dir=self.dir)
        rows = {row["case_id"]: row for row in manifest.to_dict(orient="records")}
        todo = []
        for case_id, row in rows.items():  # reads only: a cache that is up to date may be read-only
            meta = self._fresh_meta(row)
            if meta is None:
                todo.append(row)
            elif patch_size_vox is not None and not self._fits(meta, row, patch_size_vox, report):
                continue
            else:
                report.reused_case_ids.append(case_id)
        if todo or not self.dir.is_dir():
            self._prepare_for_writing(todo)
        else:
            remove_stale_temps(self.dir)  # dead builders' folders (a no-op where the cache is read-only)
        staged: dict[str, Path] = {}
        own_tmp = [temp_path(self.dir, f"{_TMP_PREFIX}{self.entry_dir(row).name}") for row in todo]
        try:
            for case_id, tmp, err in self._stage_all(todo, own_tmp, workers, progress, patch_size_vox):
                if err is not None:
                    report.add_problem(case_id, err)
                else:
                    staged[case_id] = tmp
            if report.problems and on_error == "raise":
                raise DatasetScanError(report.problems)
            for case_id, tmp in staged.items():
                committed = self._commit(rows[case_id], tmp)
                (report.built_case_ids if committed else report.reused_case_ids).append(case_id)
        finally:
            for tmp in own_tmp:  # only this build's own folders: never another process's
                shutil.rmtree(tmp, ignore_errors=True)
        done = set(report.built_case_ids) | set(report.reused_case_ids)
        report.ok_case_ids = [c for c in manifest["case_id"] if c in done]
        for case_id in report.ok_case_ids:
            meta = self._read_meta(self.entry_dir(rows[case_id]))
            report.shapes_vox[case_id] = tuple(meta["shape_vox"])
            report.spacings_mm[case_id] = tuple(meta["spacing_mm"])
            report.n_channels[case_id] = int(meta["n_channels"])
            report.warnings += read_warnings_of(case_id, meta.get("volume_meta", {}))  # also for reused entries
        return report

    def _fits(self, meta: dict, row: dict, patch_size_vox: Any, report: CacheBuildReport) -> bool:
        """Check a cached entry's shape against the patch; record a TooSmallError if it does not fit."""
        shaped = Volume(data=np.empty((0, *meta["shape_vox"]), np.float32), affine=np.asarray(meta["affine"]),
                        case_id=row["case_id"])  # fmt: skip
        try:
            _check_fits_patch(shaped, patch_size_vox, row["image"])
        except TooSmallError as e:
            report.add_problem(row["case_id"], e)
            return False
        return True

    def _stage_all(
        self, rows: list[dict], tmps: list[Path], workers: int, progress: bool, patch_size_vox: Any
    ) -> Iterator[tuple[str, Path | None, MedsslDataError | None]]:
        bar = tqdm(total=len(rows), desc="caching volumes", disable=not progress, unit="case")
        sources = [_source_record(row, missing_ok=True) for row in rows]  # before reading: a later change rebuilds
        args = [(row, self.config, self.digest, str(t), s, patch_size_vox) for row, t, s in zip(rows, tmps, sources)]
        if workers > 1 and len(rows) > 1 and not can_spawn_workers():
            warnings.warn(
                "building the cache in this process: worker processes would re-run this script's top-level code "
                "(put it under `if __name__ == \"__main__\":` to use them)",
                stacklevel=4,
            )
            workers = 1
        try:
            if workers == 1 or len(rows) <= 1:
                for a in args:
                    yield _unpack_stage_result(_stage_case(*a))
                    bar.update()
                return
            # spawn, not fork: the parent may hold torch/OpenMP threads. Workers ignore Ctrl-C: the
            # parent alone handles it, lets running cases finish and stops the pool (a pool whose
            # workers die of SIGINT mid-start can hang in shutdown). Workers die with the parent
            # (a SIGKILLed builder would otherwise leave them running).
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=(os.getpid(),)) as pool:
                with _sigint_ignored_in_children():
                    futures = [pool.submit(_stage_case, *a) for a in args]  # the first submit starts the workers
                try:
                    for fut in futures:  # in manifest order, so reports are deterministic
                        yield _unpack_stage_result(fut.result())
                        bar.update()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
        finally:
            bar.close()

    def _prepare_for_writing(self, todo: list[dict]) -> None:
        """Create the folder and its config.json and sweep dead builders' folders; a read-only cache is named."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._write_config_file()
            probe = temp_path(self.dir, ".write-probe")
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            os.unlink(probe)
        except OSError as e:
            if e.errno not in _READ_ONLY_ERRNOS:
                raise
            names = ", ".join(str(r["case_id"]) for r in todo[:5]) + (" ..." if len(todo) > 5 else "")
            raise CacheWriteError(
                self.dir, f"the cache cannot be written ({e.strerror or e}) and {len(todo)} case(s) need building "
                f"({names or 'the cache folder itself'}); an up-to-date read-only cache is read without writing, "
                "but this one is missing entries: build it where it is writable, or point MEDSSL_CACHE at a "
                "writable folder",
            ) from e  # fmt: skip
        remove_stale_temps(self.dir)  # folders of builders that died (a live builder's are kept)

    def _commit(self, row: dict, tmp: Path) -> bool:
        """Move a staged entry into place; False if an up-to-date entry appeared meanwhile (``tmp`` is dropped)."""
        entry = self.entry_dir(row)
        with self._lock(entry, shared=False):
            if self._fresh_meta(row) is not None:  # another process built the same entry first
                return False
            replace_dir(tmp, entry)  # a replaced entry is parked as ".old-<entry>...tmp" until swapped
        return True

    @contextmanager
    def _lock(self, entry: Path, shared: bool) -> Iterator[None]:
        """An flock on the entry's lock stripe: shared for loads, exclusive for commits."""
        if fcntl is None:  # pragma: no cover
            yield
            return
        lock_dir = self.dir / _LOCK_DIR
        stripe = int(hashlib.sha256(entry.name.encode()).hexdigest()[:8], 16) % _LOCK_STRIPES
        lock_path = lock_dir / f"{stripe}.lock"
        try:
            lock_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            if not shared or e.errno not in _READ_ONLY_ERRNOS:
                raise
            # A cache we cannot write (read-only mount, shared read-only dataset): nobody can commit
            # through this mount, so a reader goes on with the lock file if it exists, else without one.
            try:
                fd = os.open(lock_path, os.O_RDONLY)
            except OSError:
                yield
                return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # also releases the lock

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

    def _fresh_meta(self, row: dict) -> dict | None:
        """meta.json of the row's entry if it is complete and up to date, else None (no lock taken)."""
        try:
            meta = self._checked_meta(self.entry_dir(row))
        except CacheEntryError:
            return None
        return meta if _stale_reason(meta, row) is None else None

    # ------------------------------------------------------------------ load

    def load(self, case: Case, mmap: bool = True, *, lazy: bool = False) -> Volume:
        """The cached Volume of a case (a manifest row, or a case id cached from one source only).

        With ``mmap=True`` the arrays are read-only ``np.memmap``s (nothing is
        read until used); with ``mmap=False`` they are read into RAM. With
        ``lazy=True`` they are :class:`~medssl.data.npy.LazyNpy` arrays that hold no
        file handle until read (for pools of thousands of volumes).

        Raises:
            CacheEntryError: no entry, a corrupt/incomplete one, one whose source files
                changed since it was built, or one made for another manifest row (names
                the folder; ``build`` rebuilds it).
        """
        return self._open(case, mode="lazy" if lazy else ("mmap" if mmap else "ram"))

    def _open(self, case: Case, mode: str) -> Volume | dict:
        entry = self.entry_dir(case)
        with self._lock(entry, shared=True):  # no commit can swap the entry while we open it
            meta = self._checked_meta(entry)
            arrays = None if mode == "meta" else self._open_arrays(entry, meta, mode)
        reason = _stale_reason(meta, None if isinstance(case, str) else case)
        if reason:
            raise CacheEntryError(entry, f"{reason}; rebuild with VolumeCache.build (DataSource.build_cache)")
        if arrays is None:
            return meta
        data, label, aux = arrays
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

    def _open_arrays(self, entry: Path, meta: dict, mode: str):
        files = {"data": entry / _IMAGE}
        if meta["has_label"]:
            files["label"] = entry / _LABEL
        files.update({f"aux:{n}": entry / f"{AUX_PREFIX}{n}.npy" for n in meta["aux"]})
        out = {}
        try:
            for key, path in files.items():
                if mode == "lazy":
                    shape, dtype, offset = meta["_npy_headers"][path.name]
                    out[key] = LazyNpy(path, shape, dtype, owner=str(entry), offset=offset)
                else:
                    out[key] = np.load(path, mmap_mode="r" if mode == "mmap" else None, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CacheEntryError(entry, f"cannot read the cached arrays ({e}); rebuild with VolumeCache.build") from e
        aux = {k[4:]: v for k, v in out.items() if k.startswith("aux:")}
        return out["data"], out.get("label"), aux

    def load_all(
        self,
        manifest_or_case_ids: pd.DataFrame | Sequence[str],
        split: str | None = None,
        mmap: bool = True,
        *,
        lazy: bool = False,
    ) -> list[Volume]:
        """Load several cases, in manifest order; ``split`` filters a manifest (see :meth:`load`).

        Raises:
            CacheEntryError: listing every case that is not (validly) cached.
        """
        if isinstance(manifest_or_case_ids, pd.DataFrame):
            df = manifest_or_case_ids
            if split is not None:
                df = df[df["split"] == split]
            cases: list[Case] = df.to_dict(orient="records")
        else:
            if split is not None:
                raise ValueError("split= needs a manifest DataFrame, not a list of case ids")
            cases = [str(c) for c in manifest_or_case_ids]
        volumes, bad = [], []
        for case in cases:
            try:
                volumes.append(self.load(case, mmap=mmap, lazy=lazy))
            except CacheEntryError as e:
                case_id = case if isinstance(case, str) else case["case_id"]
                bad.append(f"{case_id}: {e.problem}")
        if bad:
            raise CacheEntryError(
                self.dir, f"{len(bad)} case(s) not cached or unreadable (run build first):\n  " + "\n  ".join(bad)
            )
        return volumes

    # ------------------------------------------------------------------ entry checks

    def _read_meta(self, entry: Path) -> dict:
        path = entry / _META
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise CacheEntryError(entry, "not cached (no meta.json)") from e
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CacheEntryError(path, f"corrupt cache metadata ({e}); rebuild with VolumeCache.build") from e
        if not isinstance(meta, dict):
            raise CacheEntryError(path, "corrupt cache metadata (not a JSON object); rebuild with VolumeCache.build")
        return meta

    def _checked_meta(self, entry: Path) -> dict:
        """meta.json of a complete entry made with this config, else CacheEntryError."""
        meta = self._read_meta(entry)
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
        headers = {_IMAGE: _check_npy(entry / _IMAGE, (int(meta["n_channels"]),) + shape)}
        if meta["has_label"]:
            headers[_LABEL] = _check_npy(entry / _LABEL, shape)
        for name in meta["aux"]:
            headers[f"{AUX_PREFIX}{name}.npy"] = _check_npy(entry / f"{AUX_PREFIX}{name}.npy", shape)
        meta["_npy_headers"] = headers  # not stored: what was checked, for lazy opening
        return meta


def _check_case_id(case_id: str) -> None:
    if not case_id or "/" in case_id or "\\" in case_id or case_id.startswith("."):
        raise ValueError(f"case id {case_id!r} cannot be used as a cache folder name")


def _source_paths(row: Mapping[str, Any]) -> dict[str, str]:
    """``{role: absolute path}`` of the image, label and aux files of a row."""
    files = {"image": row["image"]}
    if row.get("label"):
        files["label"] = row["label"]
    files.update({f"{AUX_PREFIX}{k}": v for k, v in case_aux_paths(row).items()})
    return {role: os.path.abspath(os.fspath(p)) for role, p in files.items()}


def _source_key(row: Mapping[str, Any]) -> str:
    """12 hex digits identifying where a case's files are (their absolute paths)."""
    text = json.dumps(_source_paths(row), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _stale_reason(meta: dict, row: Mapping[str, Any] | None) -> str | None:
    """Why an entry no longer matches its sources (or the manifest row asking for it); None if it does.

    Without a row, the entry is checked against the files it records.
    """
    recorded = meta.get("sources")
    if not isinstance(recorded, dict):
        return "made by an older medssl (no source record)"
    if row is not None:
        if {role: rec.get("path") for role, rec in recorded.items()} != _source_paths(row):
            return f"made from other files ({recorded.get('image', {}).get('path')}) than {row['image']}"
        if meta.get("group") != (row.get("group") or row["case_id"]):
            return f"made for group {meta.get('group')!r}, the manifest says {row.get('group')!r}"
        if meta.get("manifest_label_names") != _label_names_json(case_label_names(row)):
            return "made with other label names than the manifest's"
    for role, rec in recorded.items():
        try:
            size, mtime_ns = _file_stat(rec["path"])
        except OSError:
            return f"its {role} source {rec['path']} is missing"
        if (size, mtime_ns) != (rec.get("size"), rec.get("mtime_ns")):
            return f"its {role} source {rec['path']} changed since it was cached (size or modification time)"
    return None


# ---------------------------------------------------------------------- staging (runs in workers too)


def _init_worker(parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent_pid)


@contextmanager
def _sigint_ignored_in_children() -> Iterator[None]:
    """Ignore SIGINT while worker processes start, so they inherit it from their first instruction.

    (A Python child keeps an inherited SIG_IGN for SIGINT; the pool initializer alone would
    leave the import phase of a starting worker open to Ctrl-C.) Main thread only.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stage_case(
    row: dict, config: Any, digest: str, tmp: str, sources: dict, patch_size_vox: Any
) -> tuple[str, str | None, MedsslDataError | None]:
    """Read + preprocess one case into the temporary folder ``tmp`` (named by the parent build).

    Returns ``(case_id, tmp, None)`` or ``(case_id, None, error)``. Non-data errors
    propagate after removing the folder; a failed write becomes :class:`CacheWriteError`.
    """
    case_id = row["case_id"]
    vol, err = _guarded(load_case, row, config, patch_size_vox=patch_size_vox)
    if err is not None:
        return case_id, None, err
    tmp_dir = Path(tmp)
    tmp_dir.mkdir()
    try:
        _write_entry(tmp_dir, vol, row, config, digest, sources)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return case_id, tmp, None


def _unpack_stage_result(res: tuple) -> tuple[str, Path | None, MedsslDataError | None]:
    case_id, tmp, err = res
    return case_id, None if tmp is None else Path(tmp), err


def _save(path: Path, array: np.ndarray, case_id: str) -> None:
    """``np.save`` that names the file when the write fails (numpy's message does not)."""
    try:
        np.save(path, array, allow_pickle=False)
    except OSError as e:
        raise CacheWriteError(
            path, f"cannot write case {case_id!r}'s cache entry ({e or type(e).__name__}; {array.nbytes} bytes): "
            "is the disk full? Free space, or point MEDSSL_CACHE at another disk; nothing was committed",
        ) from e  # fmt: skip


def _write_entry(tmp: Path, vol: Volume, row: dict, config: Any, digest: str, sources: dict) -> None:
    from medssl import __version__

    case_id = row["case_id"]
    data = np.ascontiguousarray(np.asarray(vol.data), dtype=np.float32)
    if data.ndim != 4:
        raise MedsslDataError(row["image"], f"preprocessing returned data of shape {data.shape}, expected (C, X, Y, Z)")
    shape = tuple(int(s) for s in data.shape[1:])
    _save(tmp / _IMAGE, data, case_id)
    if vol.label is not None:
        _save(tmp / _LABEL, _as_smallest_int(vol.label, row["label"]), case_id)
    for name, arr in (vol.aux or {}).items():
        _save(tmp / f"{AUX_PREFIX}{name}.npy", _as_smallest_int(arr, row["image"]), case_id)
    affine = np.asarray(vol.affine, dtype=np.float64)
    meta = {
        "format_version": _FORMAT_VERSION,
        "case_id": case_id,
        "group": vol.group or row.get("group") or case_id,
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
    try:
        (tmp / _META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    except OSError as e:
        problem = f"cannot write case {case_id!r}'s cache metadata ({e}): is the disk full?"
        raise CacheWriteError(tmp / _META, problem) from e


def _source_record(row: Mapping[str, Any], missing_ok: bool = False) -> dict[str, dict]:
    """``{role: {path, size, mtime_ns}}`` for the image, label and aux files of a row."""
    out = {}
    for role, path in _source_paths(row).items():
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


def _check_npy(path: Path, shape: tuple[int, ...]) -> tuple[tuple[int, ...], np.dtype, int]:
    """Header and file size of an .npy agree with ``shape`` (catches missing and truncated files).

    Returns the header's ``(shape, dtype, data offset)``.
    """
    try:
        header = _npy_header(path)
    except FileNotFoundError as e:
        raise CacheEntryError(path, "missing cached array; rebuild with VolumeCache.build") from e
    except (OSError, ValueError) as e:
        raise CacheEntryError(path, f"corrupt cached array ({e}); rebuild with VolumeCache.build") from e
    stored_shape, dtype, offset = header
    if tuple(stored_shape) != tuple(shape):
        raise CacheEntryError(path, f"cached array has shape {stored_shape}, meta.json says {shape}; rebuild")
    expected_size = offset + int(np.prod(stored_shape)) * dtype.itemsize
    actual = os.path.getsize(path)
    if actual != expected_size:
        raise CacheEntryError(path, f"cached array is {actual} bytes, expected {expected_size} (truncated?); rebuild")
    return header


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset from an .npy header (the data is not read)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        if fortran_order:
            raise ValueError("stored in Fortran order; medssl writes C order")
        return tuple(shape), dtype, f.tell()


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


