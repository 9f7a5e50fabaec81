"""Evaluation sets: which centre voxels of which volumes, drawn once per seed.

These are the patch-drawing rules of the evaluation protocols;
:mod:`medssl.evaluate.patchsets` stores what they draw (patches, geometry, provenance).

- :func:`draw_uniform_centres`: centres uniformly over the body (or anywhere the patch fits).
- :func:`draw_labelled_centres`: patches labelled by the target (lesions, an organ), balanced
  50/50. **Positives** follow one of :data:`POSITIVE_RULES`:

  * ``"any"``: the box holds at least one target voxel (ISImed Table 1's rule; organs).
  * ``"centred"``: the box is centred on the target: a lesion (connected component of the
    target) chosen uniformly, then one of its voxels as the centre, so small lesions are as
    frequent as large ones and every positive shows its lesion whole or nearly so. Near the
    volume's border the box moves inwards just enough to fit (it still holds that voxel).
  * ``"auto"``: ``"centred"`` for sparse targets (lesion maps), ``"any"`` for structures.

  ``min_share`` further asks each positive box to hold at least that fraction of target
  voxels; every drawn centre records its box's target share (``DrawnCentres.target_share``).
  Negative boxes hold no target voxel, and **negatives are matched in position** so that
  where a patch lies cannot tell its label (otherwise a linear probe on the patch centre in
  mm solves the task, and the probe measures position, not what the features know):

  * ``"corresponding"``: the point corresponding to a positive's centre in another
    subject (through a known correspondence, e.g. the demo cohort's stored
    deformations; moved inwards to fit near the border), where that subject has no
    target voxel in the box, assigned so that every subject has as many negatives as
    positives. Sparse targets placed at random (the demo's lesions) then carry no
    positional signal, and no subject's own look (noise, calibration) tells the label.
  * ``"same_structure"``: a centre in the same labelled structure (organ id of the
    label map at the positive's centre) of the same subject, box free of target.
  * ``"nearby"``: the target-free boxes closest to each positive, within ``shell_mm``
    of the closest one.
  * ``"shell"``: the organ's neighbourhood: target-free boxes whose centre lies within
    ``shell_mm`` of the smallest distance to the target any target-free box achieves.
    For organ tasks (organ presence stays largely positional in a cohort of warped
    copies of one CT: say so next to the numbers).
  * ``"body"``: anywhere on the body (the old, position-confounded rule).
  * ``"auto"``: ``"shell"`` for structures; for sparse targets ``"corresponding"`` when a
    correspondence is given, else ``"same_structure"`` when the volumes have a label
    map, else ``"nearby"``.

- :func:`within_volume_pairs`: index pairs of patches from the same volume (distance fidelity).

All functions are deterministic given the seed (or rng) and the volumes in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from medssl.data.volume import Volume
from medssl.geometry import as_size, centre_window, spacing_from_affine, vox_to_world, world_to_vox
from medssl.sampling.regions import BODY, check_fits, foreground_mask, valid_centres

__all__ = [
    "DrawnCentres",
    "NEGATIVE_RULES",
    "POSITIVE_RULES",
    "draw_uniform_centres",
    "draw_labelled_centres",
    "within_volume_pairs",
    "target_mask",
    "box_target_counts",
]

NEGATIVE_RULES = ("auto", "corresponding", "same_structure", "nearby", "shell", "body")
POSITIVE_RULES = ("auto", "any", "centred")
Correspondence = Callable[[str, str, np.ndarray], np.ndarray]


@dataclass
class DrawnCentres:
    """Centre voxels drawn from a list of volumes.

    Attributes:
        volume_index: ``(N,)`` int64 index into the volumes.
        centres_vox: ``(N, 3)`` int64 centre voxels (centre-voxel rule of :mod:`medssl.geometry`).
        labels: ``(N,)`` int64 or None.
        meta: JSON-serialisable description of how they were drawn.
        target_share: ``(N,)`` float64, the fraction of each box's voxels that are target voxels
            (labelled sets; 0 for every negative), or None.
    """

    volume_index: np.ndarray
    centres_vox: np.ndarray
    labels: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    target_share: np.ndarray | None = None


# --------------------------------------------------------------------------- targets


def target_mask(volume: Volume, target: str | Sequence[str]) -> np.ndarray:
    """``(X, Y, Z)`` bool mask of the structure(s) a labelled set asks about.

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


def box_target_counts(mask: np.ndarray, size_vox: Sequence[int]) -> np.ndarray:
    """``(X, Y, Z)`` int64: target voxels in the box of ``size_vox`` centred at each voxel (-1 where it does not fit).

    One summed-volume table, then inclusion-exclusion over every box start at once.
    """
    m = np.asarray(mask, dtype=bool)
    s = np.asarray(size_vox, dtype=np.int64)
    table = np.zeros(tuple(n + 1 for n in m.shape), dtype=np.int64)
    table[1:, 1:, 1:] = m.astype(np.int64).cumsum(0).cumsum(1).cumsum(2)
    n = np.asarray(m.shape) - s + 1  # box starts per axis
    out = np.full(m.shape, -1, dtype=np.int64)
    if np.any(n < 1):
        return out

    def t(ox: int, oy: int, oz: int) -> np.ndarray:
        return table[ox : ox + n[0], oy : oy + n[1], oz : oz + n[2]]

    sx, sy, sz = (int(v) for v in s)
    sums = (t(sx, sy, sz) - t(0, sy, sz) - t(sx, 0, sz) - t(sx, sy, 0)
            + t(0, 0, sz) + t(0, sy, 0) + t(sx, 0, 0) - t(0, 0, 0))  # fmt: skip
    out[centre_window(m.shape, s)] = sums
    return out


# --------------------------------------------------------------------------- uniform


def draw_uniform_centres(
    volumes: Sequence[Volume],
    n_per_volume: int,
    size_vox: int | Sequence[int],
    rng: np.random.Generator,
    foreground_only: bool = True,
    region: str = BODY,
) -> DrawnCentres:
    """``n_per_volume`` centre voxels per volume, uniformly among those whose box fits (and lies on the body).

    Distinct positions when a volume has enough of them.
    """
    size = as_size(size_vox)
    if n_per_volume < 1:
        raise ValueError(f"n_per_volume must be >= 1, got {n_per_volume}")
    vols = _checked(volumes, size)
    index, centres = [], []
    for k, v in enumerate(vols):
        allowed = np.argwhere(valid_centres(v, size, foreground_mask(v, region) if foreground_only else None))
        pick = rng.choice(len(allowed), size=n_per_volume, replace=len(allowed) < n_per_volume)
        centres.append(allowed[pick])
        index.append(np.full(n_per_volume, k, np.int64))
    meta = {"kind": "uniform", "n_per_volume": int(n_per_volume), "patch_size_vox": list(size),
            "foreground_only": bool(foreground_only), "region": region}
    return DrawnCentres(np.concatenate(index), np.concatenate(centres).astype(np.int64), None, meta)


def within_volume_pairs(case_ids: np.ndarray, n_pairs: int | None, seed: int | Sequence[int]) -> np.ndarray:
    """``(P, 2)`` index pairs ``i < j`` of patches from the same case.

    Every within-case pair when there are at most ``n_pairs`` of them (or ``n_pairs`` is
    None); otherwise ``n_pairs`` distinct pairs drawn uniformly from all of them.
    """
    case_ids = np.asarray(case_ids).astype(str)
    blocks = [np.flatnonzero(case_ids == c) for c in dict.fromkeys(case_ids.tolist())]
    sizes = np.array([len(b) * (len(b) - 1) // 2 for b in blocks], dtype=np.int64)
    total = int(sizes.sum())
    if total == 0:
        raise ValueError("within-volume pairs need at least 2 patches from the same case")
    rng = np.random.default_rng(seed)
    chosen = np.arange(total) if n_pairs is None or n_pairs >= total else np.sort(rng.choice(total, n_pairs, replace=False))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    out = []
    for b, block in enumerate(blocks):
        local = chosen[(chosen >= offsets[b]) & (chosen < offsets[b + 1])] - offsets[b]
        if len(local):
            i, j = np.triu_indices(len(block), k=1)
            out.append(np.stack([block[i[local]], block[j[local]]], axis=1))
    return np.concatenate(out).astype(np.int64)


# --------------------------------------------------------------------------- labelled


def draw_labelled_centres(
    volumes: Sequence[Volume],
    target: str | Sequence[str] | Callable[[Volume], np.ndarray],
    n_per_class: int,
    size_vox: int | Sequence[int],
    rng: np.random.Generator,
    negatives: str = "auto",
    correspondence: Correspondence | None = None,
    shell_mm: float = 30.0,
    positives: str = "auto",
    min_share: float = 0.0,
) -> DrawnCentres:
    """Centres labelled 1 if their box holds the target (by the ``positives`` rule), 0 if it holds none; balanced 50/50.

    Args:
        volumes: the subjects to draw from (one split: negatives never come from elsewhere).
        target: an aux map key (``"lesion"``), organ name(s) from ``label_names`` (``"liver"``),
            or a function ``volume -> (X, Y, Z) bool``.
        n_per_class: total per class.
        size_vox: the box whose content defines the label.
        negatives: the rule for negatives (module docstring, :data:`NEGATIVE_RULES`).
        correspondence: ``(case_a, case_b, points_mm (N, 3)) -> points_mm in b``, for ``"corresponding"``.
        shell_mm: width of the neighbourhood for ``"nearby"`` and ``"shell"``.
        positives: the rule for positives (module docstring, :data:`POSITIVE_RULES`).
        min_share: the smallest fraction of a positive box's voxels that must be target voxels
            (0: any; e.g. 0.001 asks a 32^3 box for at least 33 voxels).

    ``"any"`` positives: a target voxel chosen uniformly, then a box position chosen
    uniformly among those that contain it and fit (large structures are sampled more often,
    per voxel); with ``min_share > 0``, a box position uniformly among those that hold enough.
    ``"centred"`` positives: a connected component of the target chosen uniformly among those
    with an eligible voxel (its box, moved inwards to fit, holds ``min_share``), then an eligible voxel of it.
    Volumes without any eligible positive are skipped (``meta["skipped_cases"]``); the others
    give equal numbers of positives. Negative boxes never contain a target voxel (checked
    exactly) and their centres lie on the body.
    """
    size = as_size(size_vox)
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    if negatives not in NEGATIVE_RULES:
        raise ValueError(f"negatives must be one of {NEGATIVE_RULES}, got {negatives!r}")
    if positives not in POSITIVE_RULES:
        raise ValueError(f"positives must be one of {POSITIVE_RULES}, got {positives!r}")
    if not 0.0 <= float(min_share) < 1.0:
        raise ValueError(f"min_share must be in [0, 1), got {min_share}")
    vols = _checked(volumes, size)
    structure = _is_structure(vols, target)
    pos_rule = positives if positives != "auto" else ("any" if structure else "centred")
    mask_fn = target if callable(target) else (lambda v: target_mask(v, target))
    masks = [np.asarray(mask_fn(v), dtype=bool) for v in vols]
    box_counts = [box_target_counts(m, size) if m.any() else None for m in masks]
    need = max(1, int(np.ceil(float(min_share) * np.prod(size) - 1e-9)))  # target voxels a positive box needs
    if pos_rule == "centred":  # target voxels whose box (moved inwards to fit) holds enough target
        eligible = [None if c is None else m & (c[_clamp_to_window(_ALL, m.shape, size)] >= need)
                    for m, c in zip(masks, box_counts)]  # fmt: skip
    else:  # box centres whose box fits and holds enough target
        eligible = [None if c is None else (c >= need) & valid_centres(v, size) for v, c in zip(vols, box_counts)]
    usable = [k for k, e in enumerate(eligible) if e is not None and e.any()]
    if not usable:
        what = f"a {size} vox box with at least {need} voxels of" if need > 1 else "any voxel of"
        raise ValueError(f"no volume contains {what} {_target_name(target)!r}; cannot draw positives")
    rule = _resolve_rule(negatives, structure, correspondence, vols)
    counts = np.full(len(usable), n_per_class // len(usable))
    counts[rng.permutation(len(usable))[: n_per_class % len(usable)]] += 1

    pos_index, pos_centres, pos_anchors = [], [], []  # anchor: the target voxel a centred box is centred on
    for k, n in zip(usable, counts):
        if pos_rule == "centred":
            picks = _centred_positive_centres(masks[k], eligible[k], int(n), rng)
            pos_anchors.append(picks)
            pos_centres.append(np.stack(_clamp_to_window(tuple(picks.T), masks[k].shape, size), axis=1))
        else:
            if need > 1:
                got = np.argwhere(eligible[k])[rng.integers(0, int(np.count_nonzero(eligible[k])), int(n))]
            else:
                got = _positive_centres(masks[k], size, int(n), rng)
            pos_centres.append(got)
            pos_anchors.append(got)
        pos_index.append(np.full(int(n), k, np.int64))
    pos_index_a, pos_centres_a = np.concatenate(pos_index), np.concatenate(pos_centres).astype(np.int64)
    negative_ok = {k: _negative_candidates(vols[k], masks[k], size, box_counts[k]) for k in usable}
    drawer = _NegativeDrawer(vols, usable, negative_ok, masks, size, rng, shell_mm, correspondence)
    neg_index, neg_centres, fallbacks = drawer.draw(rule, pos_index_a, pos_centres_a,
                                                    np.concatenate(pos_anchors).astype(np.int64))

    volume = float(np.prod(size))
    pos_share = np.asarray([box_counts[k][tuple(c)] for k, c in zip(pos_index_a, pos_centres_a)], np.float64) / volume
    meta = {
        "kind": "labelled",
        "target": _target_name(target),
        "target_kind": "structure" if structure else "sparse",
        "n_per_class": int(n_per_class),
        "patch_size_vox": list(size),
        "positives": pos_rule,
        "min_share": float(min_share),
        "min_target_voxels": int(need),
        "negatives": rule,
        "negatives_fallback_nearby": int(fallbacks),
        "shell_mm": float(shell_mm),
        "skipped_cases": [vols[k].case_id for k in range(len(vols)) if k not in usable],
    }
    return DrawnCentres(
        volume_index=np.concatenate([pos_index_a, neg_index]),
        centres_vox=np.concatenate([pos_centres_a, neg_centres]).astype(np.int64),
        labels=np.r_[np.ones(len(pos_index_a), np.int64), np.zeros(len(neg_index), np.int64)],
        meta=meta,
        target_share=np.r_[pos_share, np.zeros(len(neg_index))],
    )


def _is_structure(vols: list[Volume], target: Any) -> bool:
    """A named structure of the label map (organ), as opposed to a sparse aux map (lesions) or a function."""
    if callable(target):
        return False
    names = [target] if isinstance(target, str) else list(target)
    return not (len(names) == 1 and names[0] in vols[0].aux)


def _resolve_rule(negatives: str, structure: bool, correspondence: Correspondence | None, vols: list[Volume]) -> str:
    if negatives != "auto":
        if negatives == "corresponding" and correspondence is None:
            raise ValueError("negatives='corresponding' needs a correspondence function")
        return negatives
    if structure:
        return "shell"
    if correspondence is not None:
        return "corresponding"
    return "same_structure" if all(v.label is not None for v in vols) else "nearby"


def _positive_centres(mask: np.ndarray, size: tuple[int, int, int], n: int, rng: np.random.Generator) -> np.ndarray:
    """Centre voxels of boxes each containing a uniformly chosen mask voxel (uniform over the boxes that fit)."""
    vox = np.argwhere(mask)[rng.integers(0, int(np.count_nonzero(mask)), n)]  # (n, 3)
    shape, s = np.asarray(mask.shape), np.asarray(size)
    lo = np.maximum(vox - s + 1, 0)  # box starts that contain the voxel and fit
    hi = np.minimum(vox, shape - s)  # inclusive
    starts = (lo + np.floor(rng.random((n, 3)) * (hi - lo + 1))).astype(np.int64)
    return starts + s // 2


_ALL = None  # _clamp_to_window(_ALL, ...): the clamped centre of every voxel of the grid


def _clamp_to_window(ijk, shape: tuple[int, ...], size: tuple[int, int, int]) -> tuple[np.ndarray, ...]:
    """Voxel indices ``(i, j, k)`` moved to the nearest centre whose box fits (:func:`medssl.geometry.centre_window`).

    ``ijk=None`` gives, for every voxel of ``shape``, its clamped centre (open-grid index arrays).
    A box at the clamped centre always contains the original voxel.
    """
    window = centre_window(shape, size)
    if ijk is None:
        ijk = np.ogrid[tuple(slice(0, n) for n in shape)]
    return tuple(np.clip(a, w.start, w.stop - 1) for a, w in zip(ijk, window))


def _centred_positive_centres(mask: np.ndarray, eligible: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` centre voxels among the ``eligible`` target voxels: a connected component of ``mask`` (a lesion)
    uniformly among those with an eligible voxel, then one of its eligible voxels uniformly (scipy
    ``ndimage.label``, face connectivity)."""
    components, _ = ndimage.label(mask)
    ok = np.flatnonzero(eligible)  # flat indices of target voxels that may centre a positive
    comp = components.ravel()[ok]
    ids, sizes = np.unique(comp, return_counts=True)
    order = np.argsort(comp, kind="stable")
    chosen = rng.integers(0, len(ids), n)  # which component, uniformly
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    picks = ok[order[offsets[chosen] + (rng.random(n) * sizes[chosen]).astype(np.int64)]]
    return np.stack(np.unravel_index(picks, mask.shape), axis=1).astype(np.int64)


def _negative_candidates(volume: Volume, mask: np.ndarray, size: tuple[int, int, int],
                         counts: np.ndarray | None = None) -> np.ndarray:
    """``(X, Y, Z)`` bool: centres on the body whose box fits and holds no target voxel (``counts``: its box counts)."""
    counts = box_target_counts(mask, size) if counts is None else counts
    return valid_centres(volume, size, foreground_mask(volume)) & (counts == 0)


class _NegativeDrawer:
    """Draws one negative per positive (same count per subject for the within-subject rules)."""

    def __init__(self, vols, usable, negative_ok, masks, size, rng, shell_mm, correspondence) -> None:
        self.vols, self.usable, self.ok, self.masks = vols, usable, negative_ok, masks
        self.size, self.rng, self.shell_mm, self.correspondence = size, rng, float(shell_mm), correspondence

    def draw(self, rule: str, pos_index: np.ndarray, pos_centres: np.ndarray,
             pos_anchors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """Negatives for the positives at ``pos_centres``; ``pos_anchors``: the target voxels they were centred on
        (mapped by ``"corresponding"`` and then moved inwards like the positives, so both sides move alike)."""
        if rule == "corresponding":
            return self._corresponding(pos_index, pos_centres, pos_centres if pos_anchors is None else pos_anchors)
        index, centres, fallbacks = [], [], 0
        for k in self.usable:
            rows = np.flatnonzero(pos_index == k)
            if not rows.size:
                continue
            if not self.ok[k].any():
                v = self.vols[k]
                raise ValueError(f"{v.source or v.case_id}: every {self.size} vox box on the body contains target "
                                 "voxels; no negatives possible")
            if rule == "body":
                flat = np.flatnonzero(self.ok[k])
                got = np.stack(np.unravel_index(self.rng.choice(flat, size=rows.size), self.ok[k].shape), axis=1)
            elif rule == "shell":
                got = self._shell(k, rows.size)
            else:  # same_structure / nearby, one per positive
                got = np.empty((rows.size, 3), np.int64)
                for r, c in enumerate(pos_centres[rows]):
                    hit = self._same_structure(k, c) if rule == "same_structure" else None
                    if hit is None:
                        fallbacks += rule == "same_structure"
                        hit = self._nearby(k, c)
                    got[r] = hit
            index.append(np.full(rows.size, k, np.int64))
            centres.append(np.asarray(got, np.int64))
        return np.concatenate(index), np.concatenate(centres), fallbacks

    def _pick(self, candidates: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return np.asarray(np.unravel_index(int(self.rng.choice(candidates)), shape), np.int64)

    def _shell(self, k: int, n: int) -> np.ndarray:
        """Target-free centres within ``shell_mm`` of the closest achievable distance to the target."""
        v, ok = self.vols[k], self.ok[k]
        dist_mm = ndimage.distance_transform_edt(~self.masks[k], sampling=spacing_from_affine(v.affine))
        d = dist_mm[ok]
        flat = np.flatnonzero(ok)[d <= d.min() + self.shell_mm]
        picks = self.rng.choice(flat, size=n, replace=flat.size < n)
        return np.stack(np.unravel_index(picks, ok.shape), axis=1)

    def _same_structure(self, k: int, centre: np.ndarray) -> np.ndarray | None:
        v = self.vols[k]
        if v.label is None:
            return None
        label = np.asarray(v.label)
        structure = int(label[tuple(centre)])
        if structure == 0:
            return None
        cand = np.flatnonzero(self.ok[k] & (label == structure))
        return None if cand.size == 0 else self._pick(cand, label.shape)

    def _nearby(self, k: int, centre: np.ndarray) -> np.ndarray:
        v, ok = self.vols[k], self.ok[k]
        flat = np.flatnonzero(ok)
        ijk = np.stack(np.unravel_index(flat, ok.shape), axis=1)
        d = np.linalg.norm(vox_to_world(v.affine, ijk) - vox_to_world(v.affine, centre[None])[0], axis=1)
        return self._pick(flat[d <= d.min() + self.shell_mm], ok.shape)

    def _corresponding(self, pos_index: np.ndarray, pos_centres: np.ndarray,
                       pos_anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """For each positive, the point corresponding to its anchor in another subject where it is valid (moved
        inwards to fit), assigned so that **every subject gets exactly as many negatives as it has positives**.

        The assignment is a transportation problem (rows: positives, columns: subjects; each subject's
        column sums to its positive count), solved exactly with scipy's ``milp`` (HiGHS): a subject
        whose patches were over-represented in one class would let its noise level or intensity
        calibration predict the label. A positive gets the nearest target-free box in its own subject
        only where no assignment can do without it (counted in ``fallbacks``). Small random costs
        break ties, so the choice among valid subjects is random for a seed.
        """
        mapped = self._map_positives(pos_index, pos_anchors)  # (row, b) -> centre voxel in b or None
        n_rows = len(pos_index)
        subjects = list(self.usable)
        column = {b: j for j, b in enumerate(subjects)}
        pairs = [(r, b) for (r, b), c in mapped.items() if c is not None]
        pairs += [(r, int(pos_index[r])) for r in range(n_rows)]  # the fallback: the subject's own nearest free box
        fallback = np.r_[np.zeros(len(pairs) - n_rows), np.ones(n_rows)]
        cost = 1000.0 * fallback + self.rng.random(len(pairs))
        rows_of = np.asarray([r for r, _ in pairs])
        cols_of = np.asarray([column[b] for _, b in pairs])
        quota = np.asarray([np.sum(pos_index == b) for b in subjects], dtype=np.float64)
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import coo_matrix

        one_each = coo_matrix((np.ones(len(pairs)), (rows_of, np.arange(len(pairs)))), shape=(n_rows, len(pairs)))
        per_subject = coo_matrix((np.ones(len(pairs)), (cols_of, np.arange(len(pairs)))), shape=(len(subjects), len(pairs)))
        res = milp(cost, integrality=np.ones(len(pairs)), bounds=Bounds(0, 1),
                   constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(per_subject, quota, quota)])
        if res.x is None:  # cannot happen: every positive may fall back to its own subject
            raise RuntimeError(f"assigning position-matched negatives failed: {res.message}")
        chosen = np.flatnonzero(res.x > 0.5)
        index, centres, fallbacks = [], [], 0
        for t in chosen[np.argsort(rows_of[chosen], kind="stable")]:
            r, b = pairs[t]
            if fallback[t]:
                fallbacks += 1
                c = self._nearby(b, pos_centres[r])
            else:
                c = mapped[(r, b)]
            index.append(b)
            centres.append(c)
        return np.asarray(index, np.int64), np.asarray(centres, np.int64).reshape(-1, 3), fallbacks

    def _map_positives(self, pos_index: np.ndarray, pos_centres: np.ndarray) -> dict[tuple[int, int], np.ndarray | None]:
        out: dict[tuple[int, int], np.ndarray | None] = {}
        for a in self.usable:
            rows = np.flatnonzero(pos_index == a)
            if not rows.size:
                continue
            va = self.vols[a]
            pts_a = vox_to_world(va.affine, pos_centres[rows])
            for b in self.usable:
                if b == a:
                    continue
                vb = self.vols[b]
                pts_b = np.asarray(self.correspondence(va.case_id, vb.case_id, pts_a), np.float64).reshape(-1, 3)
                ijk = np.rint(np.nan_to_num(world_to_vox(vb.affine, pts_b), nan=-1.0)).astype(np.int64)
                inside = np.all((ijk >= 0) & (ijk < np.asarray(vb.shape_vox)), axis=1) & np.all(np.isfinite(pts_b), 1)
                # a point near the border: the box moves inwards just enough to fit, as for centred positives
                ijk = np.stack(_clamp_to_window(tuple(ijk.T), tuple(vb.shape_vox), self.size), axis=1)
                for r, c, ins in zip(rows, ijk, inside):
                    out[(int(r), b)] = c if ins and self.ok[b][tuple(c)] else None
        return out


# --------------------------------------------------------------------------- helpers


def _target_name(target: Any) -> str:
    if callable(target):
        return getattr(target, "__name__", "custom")
    return target if isinstance(target, str) else "+".join(target)


def _checked(volumes: Sequence[Volume], size: tuple[int, int, int]) -> list[Volume]:
    vols = list(volumes)
    if not vols:
        raise ValueError("no volumes to draw patches from")
    for v in vols:
        check_fits(v, size)
    return vols

