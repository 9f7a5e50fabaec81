"""Seeded evaluation patch sets: drawn once per seed, saved in the run directory, reused by every method.

Every evaluation compares methods on *identical* inputs (design/evaluation.md). A
:class:`PatchSet` holds the patches together with their geometry (centres in world
millimetres from each volume's affine, voxel boxes), the case and patient (group)
of every patch, optional labels and the seed it was drawn from. It is saved as an
``.npz`` (arrays only, loaded with ``allow_pickle=False``) plus a ``.json`` sidecar
(scalars and provenance, written last so it marks a complete save).

Three ways to draw one:

- :func:`draw_uniform_patch_set`: ``n_per_volume`` boxes per volume, uniformly over
  positions (optionally only where the centre voxel is foreground).
- :func:`draw_pair_set`: a uniform set plus random pairs of patches *within* a volume,
  for distance fidelity.
- :func:`draw_labelled_patch_set`: "does this patch contain any voxel of X?" (a lesion
  map in ``Volume.aux`` or an organ named in ``Volume.label_names``), balanced 50/50
  by construction, with equal positives and negatives from every subject.

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
from medssl.geometry import box_centres_mm

__all__ = [
    "PatchSet",
    "draw_uniform_patch_set",
    "draw_pair_set",
    "draw_labelled_patch_set",
    "positive_mask",
    "foreground_mask",
    "get_or_draw",
    "patch_set_path",
]

# Rejection sampling gives up after this many candidate boxes per requested patch.
_MAX_TRIES_PER_PATCH = 200
_FORMAT_VERSION = 1


@dataclass
class PatchSet:
    """Patches plus the geometry and provenance the evaluations need.

    Attributes:
        patches: ``(N, C, *S)`` float32.
        centres_mm: ``(N, 3)`` float64 world (RAS) mm of each patch centre, from its volume's affine.
        boxes_vox: ``(N, 6)`` int64 half-open voxel boxes ``[x0, y0, z0, x1, y1, z1)``.
        case_ids: ``(N,)`` str, the case each patch came from.
        groups: ``(N,)`` str, the patient of each patch (for grouped cross-validation).
        labels: ``(N,)`` int64 (e.g. lesion 0/1) or None.
        pairs: ``(P, 2)`` int64 indices of patch pairs (within one volume) or None.
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
    description: str = ""
    labels: np.ndarray | None = None
    pairs: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.patches)
        self.patches = np.asarray(self.patches, dtype=np.float32)
        self.centres_mm = np.asarray(self.centres_mm, dtype=np.float64).reshape(-1, 3)
        self.boxes_vox = np.asarray(self.boxes_vox, dtype=np.int64).reshape(-1, 6)
        self.case_ids = np.asarray(self.case_ids, dtype=str)
        self.groups = np.asarray(self.groups, dtype=str)
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.pairs is not None:
            self.pairs = np.asarray(self.pairs, dtype=np.int64).reshape(-1, 2)
        for name in ("centres_mm", "boxes_vox", "case_ids", "groups", "labels"):
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
            "case_ids": self.case_ids,
            "groups": self.groups,
        }
        if self.labels is not None:
            arrays["labels"] = self.labels
        if self.pairs is not None:
            arrays["pairs"] = self.pairs
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
            case_ids=arrays["case_ids"],
            groups=arrays["groups"],
            labels=arrays.get("labels"),
            pairs=arrays.get("pairs"),
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
            case_ids=self.case_ids[index],
            groups=self.groups[index],
            labels=None if self.labels is None else self.labels[index],
            seed=self.seed,
            description=self.description,
            meta=dict(self.meta),
        )


# --------------------------------------------------------------------------- masks


def foreground_mask(volume: Volume) -> np.ndarray:
    """``(X, Y, Z)`` bool: where a patch centre counts as "foreground".

    The same rule as the training sampler (``medssl.sampling.uniform``): ``label > 0``
    when the volume has a label map, else any channel above that channel's minimum
    (the padding/air floor).
    """
    if volume.label is not None:
        return np.asarray(volume.label) > 0
    data = np.asarray(volume.data)
    floor = data.reshape(data.shape[0], -1).min(axis=1)
    return np.any(data > floor[:, None, None, None], axis=0)


def positive_mask(volume: Volume, target: str | Sequence[str]) -> np.ndarray:
    """``(X, Y, Z)`` bool mask of the structure(s) a labelled patch set asks about.

    ``target`` is a key of ``volume.aux`` (e.g. ``"lesion"``: voxels > 0), or one or more
    structure names from ``volume.label_names``. A name also matches its sided parts:
    ``"kidney"`` matches ``"kidney_left"`` and ``"kidney_right"`` (TotalSegmentator names).
    """
    names = [target] if isinstance(target, str) else list(target)
    if len(names) == 1 and names[0] in volume.aux:
        return np.asarray(volume.aux[names[0]]) > 0
    if volume.label is None or not volume.label_names:
        raise ValueError(
            f"{volume.source or volume.case_id}: {target!r} is not an aux map ({sorted(volume.aux)}) and the volume "
            "has no named label map to look it up in"
        )
    ids = _label_ids(volume.label_names, names)
    if not ids:
        raise ValueError(
            f"{volume.source or volume.case_id}: no label named {target!r}; "
            f"known names: {sorted(set(volume.label_names.values()))}"
        )
    return np.isin(np.asarray(volume.label), ids)


def _label_ids(label_names: dict[int, str], names: Sequence[str]) -> list[int]:
    wanted = [n.lower() for n in names]
    return sorted(
        int(i)
        for i, n in label_names.items()
        if any(n.lower() == w or n.lower().startswith(w + "_") for w in wanted)
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
    """``n_per_volume`` patch boxes per volume, uniformly over positions.

    With ``foreground_only`` the centre voxel must be foreground (:func:`foreground_mask`),
    so patches are not pure air; centres are chosen uniformly among valid foreground voxels.
    Deterministic given ``seed`` and the volumes (in order).
    """
    size = _patch_size(patch_size_vox)
    if n_per_volume < 1:
        raise ValueError(f"n_per_volume must be >= 1, got {n_per_volume}")
    rng = np.random.default_rng(seed)
    parts = []
    for v in _check_volumes(volumes, size):
        allowed = _valid_centres(v, size, foreground_mask(v) if foreground_only else None)  # (M, 3) box starts
        # distinct positions when the volume has enough of them
        pick = rng.choice(len(allowed), size=n_per_volume, replace=len(allowed) < n_per_volume)
        parts.append((v, allowed[pick].astype(np.int64), None))
    where = ", foreground centres" if foreground_only else ""
    desc = description or f"uniform {n_per_volume} patches/volume of {size} vox{where}"
    meta = {
        "kind": "uniform",
        "n_per_volume": n_per_volume,
        "patch_size_vox": list(size),
        "foreground_only": foreground_only,
    }
    return _assemble(parts, size, seed, desc, meta)


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
    rng = np.random.default_rng([seed, 1])
    pairs = []
    for case in dict.fromkeys(ps.case_ids.tolist()):
        idx = np.flatnonzero(ps.case_ids == case)
        i, j = np.triu_indices(len(idx), k=1)
        if n_pairs_per_volume is not None and n_pairs_per_volume < len(i):
            keep = np.sort(rng.choice(len(i), size=n_pairs_per_volume, replace=False))
            i, j = i[keep], j[keep]
        pairs.append(np.stack([idx[i], idx[j]], axis=1))
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
    foreground_only: bool = True,
) -> PatchSet:
    """Patches labelled 1 if they contain any voxel of ``target``, else 0; balanced 50/50 by construction.

    ISImed Table 1 task ("32^3 patch contains any lesion voxel"). ``target`` is an aux
    map key (``"lesion"``), organ name(s) from ``label_names`` (``"liver"``, ``"kidney"``),
    or a function ``volume -> (X, Y, Z) bool``.

    ``n_per_class`` is the total per class. Volumes without any target voxel are skipped
    (listed in ``meta["skipped_cases"]``); the others each give the same number of
    positives and negatives (the remainder goes to randomly chosen volumes), so a
    subject's identity cannot predict the label.

    - Positive: a target voxel chosen uniformly, then a box position chosen uniformly
      among those that contain it and fit in the volume (so large structures are
      sampled more often, per voxel).
    - Negative: a uniform box (foreground centre if ``foreground_only``) whose box holds
      no target voxel, checked exactly with a summed-volume table.
    """
    size = _patch_size(patch_size_vox)
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    vols = _check_volumes(volumes, size)
    mask_fn = target if callable(target) else (lambda v: positive_mask(v, target))
    masks = [np.asarray(mask_fn(v), dtype=bool) for v in vols]
    usable = [k for k, m in enumerate(masks) if m.any()]
    skipped = [vols[k].case_id for k in range(len(vols)) if k not in usable]
    if not usable:
        raise ValueError(f"no volume contains any voxel of {_target_name(target)!r}; cannot draw positives")
    rng = np.random.default_rng(seed)
    counts = np.full(len(usable), n_per_class // len(usable))
    counts[rng.permutation(len(usable))[: n_per_class % len(usable)]] += 1
    parts = []
    for k, n in zip(usable, counts):
        if n == 0:
            continue
        v, m = vols[k], masks[k]
        table = _summed_volume_table(m)
        pos = _positive_starts(m, size, int(n), rng)
        neg = _negative_starts(v, m, table, size, int(n), rng, foreground_only)
        starts = np.concatenate([pos, neg])
        labels = np.r_[np.ones(len(pos), np.int64), np.zeros(len(neg), np.int64)]
        parts.append((v, starts, labels))
    name = _target_name(target)
    desc = f"{size} vox patches: contains any '{name}' voxel (1) or none (0); {n_per_class} per class"
    meta = {
        "kind": "labelled",
        "target": name,
        "n_per_class": n_per_class,
        "patch_size_vox": list(size),
        "foreground_only": foreground_only,
        "skipped_cases": skipped,
    }
    return _assemble(parts, size, seed, desc, meta)


def _target_name(target: Any) -> str:
    if callable(target):
        return getattr(target, "__name__", "custom")
    return target if isinstance(target, str) else "+".join(target)


def _patch_size(patch_size_vox: int | Sequence[int]) -> tuple[int, int, int]:
    size = (int(patch_size_vox),) * 3 if np.isscalar(patch_size_vox) else tuple(int(s) for s in patch_size_vox)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"patch_size_vox must be a positive int or 3 ints, got {patch_size_vox!r}")
    return size  # type: ignore[return-value]


def _check_volumes(volumes: Sequence[Volume], size: tuple[int, int, int]) -> list[Volume]:
    vols = list(volumes)
    if not vols:
        raise ValueError("no volumes to draw patches from")
    for v in vols:
        if any(s < p for s, p in zip(v.shape_vox, size)):
            raise ValueError(
                f"{v.source or v.case_id}: volume shape {v.shape_vox} is smaller than the patch size {size}; "
                "choose a smaller patch or a finer target spacing"
            )
    return vols


def _valid_centres(v: Volume, size: tuple[int, int, int], mask: np.ndarray | None) -> np.ndarray:
    """``(M, 3)`` box start voxels whose box fits and (with a mask) whose centre voxel is in the mask."""
    shape = np.asarray(v.shape_vox)
    n_starts = shape - np.asarray(size) + 1  # start positions per axis
    if mask is None:
        grid = np.indices(tuple(n_starts)).reshape(3, -1).T
        return grid
    offset = np.asarray(size) // 2  # the centre voxel (upper middle for even sizes) of a box
    sub = mask[tuple(slice(o, o + n) for o, n in zip(offset, n_starts))]
    starts = np.argwhere(sub)
    if len(starts) == 0:
        raise ValueError(f"{v.source or v.case_id}: no foreground voxel can be a patch centre for patch size {size}")
    return starts


def _positive_starts(mask: np.ndarray, size: tuple[int, int, int], n: int, rng: np.random.Generator) -> np.ndarray:
    """Box starts, each containing a uniformly chosen mask voxel (uniform over the boxes that fit)."""
    vox = np.argwhere(mask)[rng.integers(0, int(mask.sum()), n)]  # (n, 3)
    shape, s = np.asarray(mask.shape), np.asarray(size)
    lo = np.maximum(vox - s + 1, 0)
    hi = np.minimum(vox, shape - s)  # inclusive
    return (lo + np.floor(rng.random((n, 3)) * (hi - lo + 1))).astype(np.int64)


def _negative_starts(
    v: Volume, mask: np.ndarray, table: np.ndarray, size: tuple[int, int, int], n: int,
    rng: np.random.Generator, foreground_only: bool,
) -> np.ndarray:
    allowed = _valid_centres(v, size, foreground_mask(v) if foreground_only else None)
    empty = _box_counts(table, allowed, size) == 0
    allowed = allowed[empty]
    if len(allowed) < 1:
        raise ValueError(
            f"{v.source or v.case_id}: every {size} vox box {'with a foreground centre ' if foreground_only else ''}"
            "contains target voxels; no negatives possible"
        )
    pick = rng.choice(len(allowed), size=n, replace=len(allowed) < n)
    return allowed[pick].astype(np.int64)


def _summed_volume_table(mask: np.ndarray) -> np.ndarray:
    """3D integral image with a zero border: ``T[x, y, z] = mask[:x, :y, :z].sum()``."""
    t = np.zeros(tuple(s + 1 for s in mask.shape), dtype=np.int64)
    t[1:, 1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1).cumsum(2)
    return t


def _box_counts(table: np.ndarray, starts: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """Number of mask voxels in each box ``[start, start + size)`` by inclusion-exclusion. ``(M,)``."""
    a = starts.T
    b = a + np.asarray(size)[:, None]
    x = (a[0], b[0])
    y = (a[1], b[1])
    z = (a[2], b[2])
    total = np.zeros(starts.shape[0], dtype=np.int64)
    for ix, sx in ((1, 1), (0, -1)):
        for iy, sy in ((1, 1), (0, -1)):
            for iz, sz in ((1, 1), (0, -1)):
                total += sx * sy * sz * table[x[ix], y[iy], z[iz]]
    return total


def _assemble(parts: list, size: tuple[int, int, int], seed: int, description: str, meta: dict) -> PatchSet:
    patches, centres, boxes, cases, groups, labels = [], [], [], [], [], []
    for v, starts, lab in parts:
        box = np.concatenate([starts, starts + np.asarray(size)], axis=1).astype(np.int64)
        data = v.data
        for x0, y0, z0, x1, y1, z1 in box:
            patches.append(np.asarray(data[:, x0:x1, y0:y1, z0:z1], dtype=np.float32))
        centres.append(box_centres_mm(v.affine, box))
        boxes.append(box)
        cases += [v.case_id] * len(box)
        groups += [v.group] * len(box)
        if lab is not None:
            labels.append(lab)
    return PatchSet(
        patches=np.stack(patches),
        centres_mm=np.concatenate(centres),
        boxes_vox=np.concatenate(boxes),
        case_ids=np.asarray(cases),
        groups=np.asarray(groups),
        labels=np.concatenate(labels) if labels else None,
        seed=int(seed),
        description=description,
        meta={**meta, "cases": sorted(set(cases))},
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

        ps = get_or_draw(run_dir / "eval", "probe_lesion", 0, draw_labelled_patch_set,
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




