"""Seeded evaluation patch sets: drawn once per seed, saved in the run directory, reused by every method.

Every evaluation compares methods on *identical* inputs. A
:class:`PatchSet` holds the patches together with their geometry (centres in world
millimetres from each volume's affine, voxel boxes), the case and patient (group)
of every patch, optional labels and the seed it was drawn from. It is saved as an
``.npz`` (arrays only, loaded with ``allow_pickle=False``) plus a ``.json`` sidecar
(scalars and provenance, written last so it marks a complete save).

The drawing rules live in :mod:`medssl.sampling.sets` (one sampling layer); this module
wraps them and stores the result:

- :func:`draw_uniform_patch_set`: ``n_per_volume`` centres per volume, uniformly over the body.
- :func:`draw_pair_set`: a uniform set plus random pairs of patches *within* a volume,
  for distance fidelity.
- :func:`draw_labelled_patch_set`: "is this patch centred on a lesion?" or "does it contain
  any voxel of organ X?" (a lesion map in ``Volume.aux`` or an organ named in
  ``Volume.label_names``), balanced 50/50, with negatives matched in position
  (:func:`medssl.sampling.sets.draw_labelled_centres`); each patch records its target share.

A set is defined by its **centre voxels**; :meth:`PatchSet.for_size` cuts patches of
another size around the same centres, so methods with different input sizes are still
compared on identical positions.

:func:`get_or_draw` loads a saved set or draws and saves it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

from medssl._files import atomic_path, atomic_write_text, file_sha256
from medssl.data.volume import Volume
from medssl.geometry import as_size, box_centres_mm, boxes_for_centres
from medssl.sampling.patches import extract_patches
from medssl.sampling.sets import (
    DrawnCentres,
    draw_labelled_centres,
    draw_uniform_centres,
    target_mask,
    within_volume_pairs,
)

__all__ = [
    "PatchSet",
    "draw_uniform_patch_set",
    "draw_pair_set",
    "draw_labelled_patch_set",
    "target_mask",
    "assemble_patch_set",
    "draw_by_split",
    "concat_patch_sets",
    "get_or_draw",
    "patch_set_path",
]

_FORMAT_VERSION = 2  # 2: centres_vox stored (sets are defined by their centre voxels)


@dataclass
class PatchSet:
    """Patches plus the geometry and provenance the evaluations need.

    Attributes:
        patches: ``(N, C, *S)`` float32.
        centres_mm: ``(N, 3)`` float64 world (RAS) mm of each patch centre, from its volume's affine.
        boxes_vox: ``(N, 6)`` int64 half-open voxel boxes ``[x0, y0, z0, x1, y1, z1)``.
        centres_vox: ``(N, 3)`` int64 centre voxel of each box (the centre-voxel rule of
            :mod:`medssl.geometry`): what defines the set across patch sizes.
        case_ids: ``(N,)`` str, the case each patch came from.
        groups: ``(N,)`` str, the patient of each patch (for grouped cross-validation).
        labels: ``(N,)`` int64 (e.g. lesion 0/1) or None.
        pairs: ``(P, 2)`` int64 indices of patch pairs (within one volume) or None.
        splits: ``(N,)`` str, the data split of each patch (``"val"``: for choices and
            fitting probes; ``"test"``: scored once), or None.
        target_share: ``(N,)`` float64, the fraction of the labelled box's voxels that are target
            voxels (a positive's lesion share; 0 for negatives), or None. It describes the box the
            set was drawn with, like ``labels`` (kept by :meth:`for_size`).
        seed: the seed it was drawn with.
        description: what the set is, in words (shown in reports).
        meta: JSON-serialisable provenance (drawing parameters, skipped cases, ...).
    """

    patches: np.ndarray
    centres_mm: np.ndarray
    boxes_vox: np.ndarray
    case_ids: np.ndarray
    groups: np.ndarray
    seed: int
    centres_vox: np.ndarray | None = None
    description: str = ""
    labels: np.ndarray | None = None
    pairs: np.ndarray | None = None
    splits: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    target_share: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.patches)
        self.patches = np.asarray(self.patches, dtype=np.float32)
        self.centres_mm = np.asarray(self.centres_mm, dtype=np.float64).reshape(-1, 3)
        self.boxes_vox = np.asarray(self.boxes_vox, dtype=np.int64).reshape(-1, 6)
        if self.centres_vox is None:
            size = self.boxes_vox[:, 3:] - self.boxes_vox[:, :3]
            self.centres_vox = self.boxes_vox[:, :3] + size // 2
        self.centres_vox = np.asarray(self.centres_vox, dtype=np.int64).reshape(-1, 3)
        self.case_ids = np.asarray(self.case_ids, dtype=str)
        self.groups = np.asarray(self.groups, dtype=str)
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.pairs is not None:
            self.pairs = np.asarray(self.pairs, dtype=np.int64).reshape(-1, 2)
        if self.splits is not None:
            self.splits = np.asarray(self.splits, dtype=str)
        if self.target_share is not None:
            self.target_share = np.asarray(self.target_share, dtype=np.float64)
        for name in ("centres_mm", "boxes_vox", "centres_vox", "case_ids", "groups", "labels", "splits",
                     "target_share"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"PatchSet.{name} has {len(value)} rows but there are {n} patches")
        if self.pairs is not None and len(self.pairs) and (self.pairs.min() < 0 or self.pairs.max() >= n):
            raise ValueError(f"PatchSet.pairs indexes outside [0, {n})")

    def __len__(self) -> int:
        return int(self.patches.shape[0])

    @property
    def content_sha256(self) -> str:
        """sha256 over the patches and their geometry: the identity used by embedding caches."""
        h = hashlib.sha256()
        for arr in (self.patches, self.centres_mm, self.boxes_vox):
            a = np.ascontiguousarray(arr)
            h.update(str((a.dtype.str, a.shape)).encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Save as ``<path>.npz`` + ``<path>.json`` (each written atomically; the json last).

        ``path`` may carry either suffix or none. Returns the ``.npz`` path.
        """
        npz_path, json_path = _paths(path)
        npz_path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "patches": self.patches,
            "centres_mm": self.centres_mm,
            "boxes_vox": self.boxes_vox,
            "centres_vox": self.centres_vox,
            "case_ids": self.case_ids,
            "groups": self.groups,
        }
        if self.labels is not None:
            arrays["labels"] = self.labels
        if self.pairs is not None:
            arrays["pairs"] = self.pairs
        if self.splits is not None:
            arrays["splits"] = self.splits
        if self.target_share is not None:
            arrays["target_share"] = self.target_share
        with atomic_path(npz_path, ".npz") as tmp:
            np.savez(tmp, **arrays)
        info = {
            "format_version": _FORMAT_VERSION,
            "seed": int(self.seed),
            "description": self.description,
            "n_patches": len(self),
            "patch_shape": list(self.patches.shape[1:]),
            "content_sha256": self.content_sha256,
            "npz_sha256": file_sha256(npz_path),
            "meta": self.meta,
        }
        atomic_write_text(json_path, json.dumps(info, indent=2, sort_keys=True))
        return npz_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PatchSet":
        """Load a set written by :meth:`save` (no pickle). Raises if the pair of files is incomplete or altered."""
        npz_path, json_path = _paths(path)
        if not npz_path.exists() or not json_path.exists():
            raise FileNotFoundError(f"{npz_path.with_suffix('')}: patch set needs both .npz and .json (one is missing)")
        info = json.loads(json_path.read_text())
        if info.get("npz_sha256") != file_sha256(npz_path):
            raise ValueError(
                f"{npz_path}: content does not match its .json sidecar (partial or altered save); redraw it"
            )
        with np.load(npz_path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return cls(
            patches=arrays["patches"],
            centres_mm=arrays["centres_mm"],
            boxes_vox=arrays["boxes_vox"],
            centres_vox=arrays.get("centres_vox"),
            case_ids=arrays["case_ids"],
            groups=arrays["groups"],
            labels=arrays.get("labels"),
            pairs=arrays.get("pairs"),
            splits=arrays.get("splits"),
            target_share=arrays.get("target_share"),
            seed=int(info["seed"]),
            description=str(info.get("description", "")),
            meta=dict(info.get("meta", {})),
        )

    def label_counts(self) -> "pd.DataFrame":
        """Patches per subject (rows) and label (columns), with totals: shows the per-subject balance."""
        import pandas as pd

        labels = self.labels if self.labels is not None else np.zeros(len(self), np.int64)
        return pd.crosstab(pd.Series(self.groups, name="subject"), pd.Series(labels, name="label"), margins=True,
                           margins_name="total")

    def subset(self, index: np.ndarray) -> "PatchSet":
        """The patches at ``index`` (pairs are dropped: they index the full set)."""
        index = np.asarray(index)
        return PatchSet(
            patches=self.patches[index],
            centres_mm=self.centres_mm[index],
            boxes_vox=self.boxes_vox[index],
            centres_vox=self.centres_vox[index],
            case_ids=self.case_ids[index],
            groups=self.groups[index],
            labels=None if self.labels is None else self.labels[index],
            splits=None if self.splits is None else self.splits[index],
            target_share=None if self.target_share is None else self.target_share[index],
            seed=self.seed,
            description=self.description,
            meta=dict(self.meta),
        )


    def split(self, name: str) -> "PatchSet":
        """The patches of split ``name`` (pairs kept where both ends are in it, re-indexed)."""
        if self.splits is None:
            raise ValueError("this patch set records no splits")
        keep = np.flatnonzero(self.splits == name)
        if keep.size == 0:
            raise ValueError(f"no patches of split {name!r}; the set has {sorted(set(self.splits.tolist()))}")
        out = self.subset(keep)
        if self.pairs is not None:
            new_index = np.full(len(self), -1, np.int64)
            new_index[keep] = np.arange(keep.size)
            p = new_index[self.pairs]
            out.pairs = p[np.all(p >= 0, axis=1)]
        return out

    @property
    def patch_size_vox(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.patches.shape[2:5])  # type: ignore[return-value]

    def inputs_for(self, model: Any, volumes: Sequence[Volume] | None = None) -> np.ndarray:
        """What ``model.embed`` takes at this set's centres: the stored patches when they fit, else cut anew.

        A model whose input is a cube of this set's patch size gets :attr:`patches`; any other
        (another size, or its own ``cut_inputs`` such as planar 2.5D patches) gets its input cut
        from ``volumes`` around the same centre voxels, so every method is compared on
        identical positions.
        """
        from medssl.methods.base import cuts_cubes

        size = tuple(getattr(model, "input_size_vox", getattr(model, "patch_size_vox", self.patch_size_vox)))
        if cuts_cubes(model) and size == self.patch_size_vox:
            return self.patches
        if volumes is None:
            raise ValueError(
                f"{getattr(model, 'registry_name', type(model).__name__)} needs inputs of size {size} (or its own "
                f"cut); this patch set holds {self.patch_size_vox}: pass the volumes so they can be cut"
            )
        by_id = self._volumes_by_id(volumes)
        parts: list[np.ndarray] = []
        order: list[np.ndarray] = []
        for case in dict.fromkeys(self.case_ids.tolist()):
            rows = np.flatnonzero(self.case_ids == case)
            parts.append(np.asarray(model.cut_inputs(by_id[case].data, self.centres_vox[rows]), dtype=np.float32))
            order.append(rows)
        out = np.empty((len(self), *parts[0].shape[1:]), dtype=np.float32)
        for rows, part in zip(order, parts):
            out[rows] = part
        return out

    def _volumes_by_id(self, volumes: Sequence[Volume]) -> dict[str, Volume]:
        by_id = {str(v.case_id): v for v in volumes}
        missing = sorted(set(self.case_ids.tolist()) - set(by_id))
        if missing:
            raise ValueError(f"the patch set needs the volumes of cases {missing}")
        return by_id

    def for_size(self, size_vox: int | Sequence[int], volumes: Sequence[Volume]) -> "PatchSet":
        """The same centre voxels with patches of ``size_vox`` cut from ``volumes`` (padded outside the image).

        ``volumes`` must include every case of the set (matched by case id). Returns ``self``
        when the size is already this set's.
        """
        size = as_size(size_vox)
        if size == self.patch_size_vox:
            return self
        by_id = self._volumes_by_id(volumes)
        patches = np.empty((len(self), self.patches.shape[1], *size), dtype=np.float32)
        centres_mm = np.empty((len(self), 3))
        for case in dict.fromkeys(self.case_ids.tolist()):
            rows = np.flatnonzero(self.case_ids == case)
            v = by_id[case]
            patches[rows] = extract_patches(v.data, self.centres_vox[rows], size)
            centres_mm[rows] = box_centres_mm(v.affine, boxes_for_centres(self.centres_vox[rows], size))
        return PatchSet(
            patches=patches, centres_mm=centres_mm, boxes_vox=boxes_for_centres(self.centres_vox, size),
            centres_vox=self.centres_vox, case_ids=self.case_ids, groups=self.groups, seed=self.seed,
            description=self.description, labels=self.labels, pairs=self.pairs, splits=self.splits,
            target_share=self.target_share, meta={**self.meta, "cut_at_size_vox": list(size)},
        )


# --------------------------------------------------------------------------- drawing


def draw_uniform_patch_set(
    volumes: Sequence[Volume],
    n_per_volume: int,
    patch_size_vox: int | Sequence[int],
    seed: int,
    foreground_only: bool = True,
    description: str = "",
) -> PatchSet:
    """``n_per_volume`` patches per volume, centres uniformly over the body (``foreground_only``) or anywhere they fit.

    Deterministic given ``seed`` and the volumes (in order).
    """
    size = as_size(patch_size_vox)
    drawn = draw_uniform_centres(volumes, n_per_volume, size, np.random.default_rng(seed), foreground_only)
    where = ", centres on the body" if foreground_only else ""
    return assemble_patch_set(volumes, drawn, size, seed,
                              description or f"uniform {n_per_volume} patches/volume of {size} vox{where}")


def draw_pair_set(
    volumes: Sequence[Volume],
    n_per_volume: int,
    patch_size_vox: int | Sequence[int],
    seed: int,
    n_pairs_per_volume: int | None = None,
    foreground_only: bool = True,
) -> PatchSet:
    """A uniform patch set plus random pairs of distinct patches within each volume (distance fidelity).

    ``n_pairs_per_volume=None`` keeps every within-volume pair (strict upper triangle).
    """
    ps = draw_uniform_patch_set(volumes, n_per_volume, patch_size_vox, seed, foreground_only=foreground_only)
    pairs = []
    for case in dict.fromkeys(ps.case_ids.tolist()):
        idx = np.flatnonzero(ps.case_ids == case)
        pairs.append(idx[within_volume_pairs(np.zeros(len(idx)), n_pairs_per_volume, [seed, 1, len(pairs)])])
    ps.pairs = np.concatenate(pairs).astype(np.int64) if pairs else np.zeros((0, 2), np.int64)
    ps.description = f"{ps.description}; {len(ps.pairs)} within-volume pairs"
    ps.meta.update(kind="pairs", n_pairs_per_volume=n_pairs_per_volume)
    return ps


def draw_labelled_patch_set(
    volumes: Sequence[Volume],
    target: str | Sequence[str] | Callable[[Volume], np.ndarray],
    n_per_class: int,
    patch_size_vox: int | Sequence[int],
    seed: int,
    negatives: str = "auto",
    correspondence: Callable[[str, str, np.ndarray], np.ndarray] | None = None,
    shell_mm: float = 30.0,
    positives: str = "auto",
    min_share: float = 0.0,
) -> PatchSet:
    """Patches labelled 1 if they hold ``target`` (by the ``positives`` rule), 0 if they hold none; balanced 50/50,
    negatives matched in position.

    ISImed Table 1 task, made passable: for lesions (``positives="auto"`` -> ``"centred"``) a
    positive is centred on a lesion voxel (the lesion chosen uniformly); for organs a positive
    contains any voxel of the organ. See :func:`medssl.sampling.sets.draw_labelled_centres`
    for ``target``, ``negatives`` (``"auto"``: corresponding points in other subjects for
    sparse targets when ``correspondence`` is given, the organ's neighbourhood for organs),
    ``correspondence``, ``shell_mm``, ``positives`` and ``min_share``. The set records each
    patch's target share (``PatchSet.target_share``).
    """
    size = as_size(patch_size_vox)
    drawn = draw_labelled_centres(volumes, target, n_per_class, size, np.random.default_rng(seed),
                                  negatives=negatives, correspondence=correspondence, shell_mm=shell_mm,
                                  positives=positives, min_share=min_share)
    m = drawn.meta
    what = (f"centred on a '{m['target']}' voxel" if m["positives"] == "centred"
            else f"contains any '{m['target']}' voxel")
    if m["min_target_voxels"] > 1:
        what += f" with >= {m['min_target_voxels']} of them"
    desc = f"{size} vox patches: {what} (1) or none (0); {n_per_class} per class; negatives: {m['negatives']}"
    return assemble_patch_set(volumes, drawn, size, seed, desc)


def draw_by_split(
    volumes_by_split: dict[str, Sequence[Volume]], draw_fn: Callable[..., PatchSet], seed: int, **draw_kwargs: Any
) -> PatchSet:
    """One set drawn separately within each split (``{"val": [...], "test": [...]}``), concatenated with ``splits``.

    Every drawing rule then stays inside its split (matched negatives never cross from
    validation to test subjects). Split k uses seed ``[seed, k]``-style offsets (``seed + 1000 k``).
    """
    parts = {}
    for k, (split, vols) in enumerate(volumes_by_split.items()):
        if len(vols):
            parts[split] = draw_fn(volumes=list(vols), seed=seed + 1000 * k, **draw_kwargs)
    if not parts:
        raise ValueError("draw_by_split got no volumes in any split")
    return concat_patch_sets(parts, seed)


def concat_patch_sets(sets: dict[str, PatchSet], seed: int) -> PatchSet:
    """Concatenate sets of the same patch size, recording each one's key as the split of its patches."""
    items = list(sets.items())
    offsets = np.cumsum([0] + [len(ps) for _, ps in items[:-1]])
    pairs = [ps.pairs + o for (_, ps), o in zip(items, offsets) if ps.pairs is not None]
    labels = [ps.labels for _, ps in items]
    first = items[0][1]
    return PatchSet(
        patches=np.concatenate([ps.patches for _, ps in items]),
        centres_mm=np.concatenate([ps.centres_mm for _, ps in items]),
        boxes_vox=np.concatenate([ps.boxes_vox for _, ps in items]),
        centres_vox=np.concatenate([ps.centres_vox for _, ps in items]),
        case_ids=np.concatenate([ps.case_ids for _, ps in items]),
        groups=np.concatenate([ps.groups for _, ps in items]),
        labels=None if any(lab is None for lab in labels) else np.concatenate(labels),
        pairs=np.concatenate(pairs) if len(pairs) == len(items) else None,
        splits=np.concatenate([np.full(len(ps), split) for split, ps in items]),
        target_share=(None if any(ps.target_share is None for _, ps in items)
                      else np.concatenate([ps.target_share for _, ps in items])),
        seed=int(seed),
        description=f"{first.description} (drawn within each split: {', '.join(k for k, _ in items)})",
        meta={**first.meta, "splits": {k: ps.meta for k, ps in items}},
    )


def assemble_patch_set(
    volumes: Sequence[Volume], drawn: DrawnCentres, size_vox: Sequence[int], seed: int, description: str
) -> PatchSet:
    """Cut the patches of drawn centres (boxes inside the volumes) and record their geometry."""
    vols = list(volumes)
    size = as_size(size_vox)
    order = np.argsort(drawn.volume_index, kind="stable")  # patches of one volume together
    vi, centres = drawn.volume_index[order], drawn.centres_vox[order]
    labels = None if drawn.labels is None else drawn.labels[order]
    share = None if drawn.target_share is None else drawn.target_share[order]
    patches = np.empty((len(vi), vols[0].n_channels, *size), dtype=np.float32)
    centres_mm = np.empty((len(vi), 3))
    for k in np.unique(vi):
        rows = np.flatnonzero(vi == k)
        patches[rows] = extract_patches(vols[k].data, centres[rows], size)
        centres_mm[rows] = box_centres_mm(vols[k].affine, boxes_for_centres(centres[rows], size))
    return PatchSet(
        patches=patches,
        centres_mm=centres_mm,
        boxes_vox=boxes_for_centres(centres, size),
        centres_vox=centres,
        case_ids=np.asarray([vols[k].case_id for k in vi]),
        groups=np.asarray([vols[k].group for k in vi]),
        labels=labels,
        target_share=share,
        seed=int(seed),
        description=description,
        meta={**drawn.meta, "cases": sorted({vols[k].case_id for k in vi})},
    )


# --------------------------------------------------------------------------- storage


def patch_set_path(eval_dir: str | os.PathLike, name: str, seed: int, spec_hash: str = "") -> Path:
    """``<eval_dir>/patchsets/<name>_seed<seed>[_<spec_hash>].npz``."""
    suffix = f"_{spec_hash}" if spec_hash else ""
    return Path(eval_dir) / "patchsets" / f"{name}_seed{int(seed)}{suffix}.npz"


def get_or_draw(
    eval_dir: str | os.PathLike, name: str, seed: int, draw: Callable[..., PatchSet], **draw_kwargs: Any
) -> PatchSet:
    """Load the saved set ``name`` for ``seed``, or draw it with ``draw(seed=seed, **draw_kwargs)`` and save it.

    The file name carries a short hash of ``draw_kwargs`` (volumes enter by case id, grid
    and a hash of their voxels), so changing a drawing parameter draws a new set and the
    same parameters always reuse the saved one: every method sees identical patches.

    Example::

        ps = get_or_draw(RunDir(run).eval_dir, "probe_lesion", 0, draw_labelled_patch_set,
                         volumes=test_volumes, target="lesion", n_per_class=200, patch_size_vox=32)
    """
    spec = {"draw": getattr(draw, "__qualname__", str(draw))}
    spec.update({k: _spec_value(v) for k, v in sorted(draw_kwargs.items())})
    spec_hash = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:10]
    path = patch_set_path(eval_dir, name, seed, spec_hash)
    if path.exists() and path.with_suffix(".json").exists():
        return PatchSet.load(path)
    ps = draw(seed=seed, **draw_kwargs)
    if int(ps.seed) != int(seed):
        raise ValueError(f"get_or_draw({name!r}, seed={seed}): draw() returned a set drawn with seed {ps.seed}")
    ps.meta.setdefault("name", name)
    ps.meta["spec"] = spec
    ps.save(path)
    return ps


def _spec_value(value: Any) -> Any:
    """A JSON-able identity of a drawing argument (volumes by case id, grid and voxel hash)."""
    if isinstance(value, Volume):
        h = hashlib.sha256(np.ascontiguousarray(value.data).tobytes())
        h.update(np.asarray(value.affine, dtype=np.float64).tobytes())
        return {"case_id": value.case_id, "shape_vox": list(value.shape_vox), "sha256": h.hexdigest()[:16]}
    if isinstance(value, (list, tuple)):
        return [_spec_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _spec_value(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        digest = hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()[:16]
        return {"shape": list(value.shape), "sha256": digest}
    if callable(value):
        return getattr(value, "__qualname__", str(value))
    return value


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".npz", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".npz"), p.with_name(p.name + ".json")




