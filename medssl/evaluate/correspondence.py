"""Cross-subject correspondence through the latent space.

Take a point in subject A, embed the patch there, find the nearest patch
embedding (exact Euclidean kNN, scikit-learn) on subject B's dense grid, and
measure how far that grid point is, in mm, from the true corresponding point in
B (known exactly for the demo cohort, which stores its deformations). This tests
the "unified global coordinate system" claim of the ISImed paper.

Rows that expose shortcuts come with every evaluation (all predictions are grid points of
B, like a method's):

- ``identity`` (shortcut baseline): the grid point of B nearest to the *same world
  coordinate* as the query. On a cohort of warped copies of one CT (the demo) or on
  roughly registered scans this is already good; a method that does not beat it has not
  shown a latent coordinate system.
- ``aligned-identity (scale+shift)`` (shortcut baseline): the same after aligning the two
  bodies by their moments (:func:`medssl.geometry.moment_alignment` on the body grid points:
  centroid and extent along x, y, z): translation and per-axis scale, **no rotation** (the
  demo rotates every subject by up to 10 degrees per axis).
- ``aligned-identity (body affine)`` (shortcut baseline, when a body ``registrar`` is given):
  the same after an affine registration of the two body masks
  (:class:`~medssl.evaluate.registration.RegistrationConfig` ``image="body"``): rotation-aware,
  still no image content inside the body. Measured on the demo's 56 ordered test pairs
  (``benchmarks/registration.py``): median 8.6 mm unsnapped (12.0 mm on the 18 mm grid)
  against 24.5 mm (25.9) for the moment row, worse on none of the pairs (a rigid registration of
  the masks, 13.2 mm, was worse on 9 and was not kept). On the demo cohort (warped copies of one
  CT) the body outline fixes most of the affine part, so this shortcut is nearly as good as
  intensity registration (8.0 mm). A method is called better only if it beats every shortcut row.
- ``registration (affine)`` (positive **control**, when a ``registrar`` is given): the query
  point mapped by an intensity registration of B onto A (:mod:`medssl.evaluate.registration`),
  then snapped to B's grid like every other row. It needs no training; it shows what the
  task allows. A control near chance would mean the task measures nothing.
- ``chance`` (reference): a random body grid point of B (seeded).
- ``grid_floor`` (reference): the nearest grid point of B to the true point, the best any
  method can do at this stride.

The random-init twins are just other entries of ``methods`` (the caller adds them).

**Units.** Subjects are the unit: :func:`query_pairs` makes each held-out subject the query
against every other one (or ``n_partners`` of them), and :meth:`CorrespondenceResult.units`
averages each query subject's per-pair median errors, so the paired tests run over as many
units as there are subjects (8 in the demo), not over pairs that share subjects.

Unregistered scans: the identity rows compare world coordinates of two scans, which only
means something when both share a frame; ``aligned-identity`` and registration do not need one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.neighbors import NearestNeighbors

from medssl.data.volume import Volume
from medssl.evaluate.dense import DenseEmbedding, dense_embeddings
from medssl.geometry import apply_affine_mm, moment_alignment, world_to_vox

__all__ = [
    "ALIGNED_IDENTITY",
    "CHANCE",
    "GRID_FLOOR",
    "IDENTITY",
    "CorrespondenceResult",
    "correspondence_error",
    "correspondence_from_dense",
    "evaluate_correspondence",
    "query_pairs",
    "query_points",
    "subject_pairs",
    "summarize_correspondence",
]

_COLUMNS = [
    "method",
    "case_a",
    "case_b",
    "point",
    *(f"{w}_{a}_mm" for w in ("query", "true", "pred") for a in "xyz"),
    "error_mm",
]
CHANCE = "chance"
GRID_FLOOR = "grid_floor"
IDENTITY = "identity"
ALIGNED_IDENTITY = "aligned-identity (scale+shift)"  # moment alignment: translation + per-axis scale, no rotation
BASELINES = (IDENTITY, ALIGNED_IDENTITY)
REFERENCES = (CHANCE, GRID_FLOOR)
SHARED_ROWS = BASELINES + REFERENCES  # depend only on the two grids and the seed, not on the method


def _shared(names: pd.Series) -> pd.Series:
    """Rows that do not depend on the method (shortcuts, references, registration controls)."""
    from medssl.evaluate.registration import ALIGNED_BODY, REGISTRATION

    return names.isin(SHARED_ROWS) | names.astype(str).str.startswith((REGISTRATION, ALIGNED_BODY))


def query_points(dense_a: DenseEmbedding, n_points: int, seed: int) -> np.ndarray:
    """Seeded flat indices of ``n_points`` foreground grid points of A (all of them if fewer).

    They depend only on the grid and the seed, not on the method, so every method
    is scored on the same query points.
    """
    candidates = np.flatnonzero(dense_a.flat_foreground)
    if candidates.size == 0:
        candidates = np.arange(dense_a.flat_foreground.size)
    rng = np.random.default_rng(seed)
    n = min(int(n_points), candidates.size)
    return np.sort(rng.choice(candidates, size=n, replace=False))


def subject_pairs(case_ids: Sequence[str], n_pairs: int, seed: int = 0) -> list[tuple[str, str]]:
    """Up to ``n_pairs`` distinct ordered pairs ``(case_a, case_b)`` of different subjects, seeded.

    The first pair is always ``(case_ids[0], case_ids[1])`` so notebooks can show it.
    """
    ids = [str(c) for c in case_ids]
    if len(ids) < 2:
        raise ValueError(f"correspondence needs at least 2 held-out subjects, got {len(ids)}: {ids}")
    all_pairs = [(a, b) for a in ids for b in ids if a != b]
    rest = [p for p in all_pairs if p != (ids[0], ids[1])]
    order = np.random.default_rng(seed).permutation(len(rest))
    return [(ids[0], ids[1]), *[rest[i] for i in order]][: max(1, int(n_pairs))]


def query_pairs(case_ids: Sequence[str], n_partners: int = 0, seed: int = 0) -> list[tuple[str, str]]:
    """Every subject as the query ``case_a`` against ``n_partners`` others (0: all others), seeded.

    The partners of each query are a seeded draw among the other subjects (all of them, in
    order, when ``n_partners`` is 0 or at least their number). Every subject is a query, so the
    per-subject units of :meth:`CorrespondenceResult.units` cover all of them.
    """
    ids = [str(c) for c in case_ids]
    if len(ids) < 2:
        raise ValueError(f"correspondence needs at least 2 held-out subjects, got {len(ids)}: {ids}")
    out = []
    for q, a in enumerate(ids):
        others = [b for b in ids if b != a]
        if 0 < n_partners < len(others):
            pick = np.random.default_rng([int(seed), q]).choice(len(others), size=int(n_partners), replace=False)
            others = [others[i] for i in sorted(pick)]
        out += [(a, b) for b in others]
    return out


def _true_points_inside(dense_b: DenseEmbedding, points_mm_b: np.ndarray) -> np.ndarray:
    """True where a point lies inside B's image (its voxel index in ``[-0.5, n - 0.5]``)."""
    ijk = world_to_vox(dense_b.image_affine, points_mm_b)
    shape = np.asarray(dense_b.image_shape_vox, dtype=np.float64)
    return np.all((ijk >= -0.5) & (ijk <= shape - 0.5), axis=1) & np.all(np.isfinite(points_mm_b), axis=1)


def correspondence_from_dense(
    dense_a: DenseEmbedding,
    dense_b: DenseEmbedding,
    true_map_fn: Callable[[np.ndarray], np.ndarray],
    n_points: int = 200,
    seed: int = 0,
    method_name: str = "method",
    include_references: bool = True,
    registration: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
) -> pd.DataFrame:
    """Per-point correspondence errors from two dense embeddings of one method.

    Args:
        dense_a, dense_b: dense embeddings of subjects A and B (same method).
        true_map_fn: ``points_mm_a (N, 3) -> points_mm_b (N, 3)``, the true correspondence.
        n_points: number of query points in A's foreground.
        seed: chooses the query points and the chance baseline.
        method_name: value of the ``method`` column.
        include_references: also return the ``identity``, ``aligned-identity (scale+shift)``,
            ``chance`` and ``grid_floor`` rows (and the registration rows).
        registration: ``{row name: points_mm_a -> points_mm_b}`` of registrations of B onto A
            (:meth:`medssl.evaluate.registration.Registrar.map_points`); their predictions are
            snapped to B's grid like every other row.

    Returns:
        One row per (method, query point) with columns ``method, case_a, case_b,
        point, query_{x,y,z}_mm, true_{x,y,z}_mm, pred_{x,y,z}_mm, error_mm``.
        Query points whose true partner falls outside B's image are dropped.
    """
    if dense_a.embed_dim != dense_b.embed_dim:
        raise ValueError(f"embedding sizes differ: A has D={dense_a.embed_dim}, B has D={dense_b.embed_dim}")
    idx = query_points(dense_a, n_points, seed)
    query_mm = dense_a.flat_centres_mm[idx]
    true_mm = np.asarray(true_map_fn(query_mm), dtype=np.float64).reshape(-1, 3)
    if true_mm.shape != query_mm.shape:
        raise ValueError(f"true_map_fn returned shape {true_mm.shape} for {query_mm.shape} points")
    keep = _true_points_inside(dense_b, true_mm)
    idx, query_mm, true_mm = idx[keep], query_mm[keep], true_mm[keep]
    if idx.size == 0:
        return pd.DataFrame(columns=_COLUMNS)

    from threadpoolctl import threadpool_limits

    # exact search, one thread: two OpenMP threads spin on a loaded 2-core machine (0.3 s vs 0.06 s per pair)
    with threadpool_limits(1):
        nn_index = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(dense_b.flat_embeddings)
        _, hit = nn_index.kneighbors(dense_a.flat_embeddings[idx])
    pred = {method_name: dense_b.flat_centres_mm[hit[:, 0]]}
    if include_references:
        rng = np.random.default_rng([seed, 1])
        fg_b = np.flatnonzero(dense_b.flat_foreground)
        fg_b = fg_b if fg_b.size else np.arange(dense_b.flat_foreground.size)
        pred[CHANCE] = dense_b.flat_centres_mm[rng.choice(fg_b, size=len(idx), replace=True)]
        grid_nn = NearestNeighbors(n_neighbors=1).fit(dense_b.flat_centres_mm)
        pred[GRID_FLOOR] = dense_b.flat_centres_mm[grid_nn.kneighbors(true_mm)[1][:, 0]]
        pred[IDENTITY] = dense_b.flat_centres_mm[grid_nn.kneighbors(query_mm)[1][:, 0]]
        align = moment_alignment(_body_points(dense_a), _body_points(dense_b))
        pred[ALIGNED_IDENTITY] = dense_b.flat_centres_mm[grid_nn.kneighbors(apply_affine_mm(align, query_mm))[1][:, 0]]
        for row, map_fn in (registration or {}).items():
            mapped = np.asarray(map_fn(query_mm), dtype=np.float64).reshape(-1, 3)
            pred[row] = dense_b.flat_centres_mm[grid_nn.kneighbors(mapped)[1][:, 0]]

    frames = []
    for name, pred_mm in pred.items():
        frame = pd.DataFrame(
            {
                "method": name,
                "case_a": dense_a.case_id,
                "case_b": dense_b.case_id,
                "point": idx,
                **{f"query_{a}_mm": query_mm[:, i] for i, a in enumerate("xyz")},
                **{f"true_{a}_mm": true_mm[:, i] for i, a in enumerate("xyz")},
                **{f"pred_{a}_mm": pred_mm[:, i] for i, a in enumerate("xyz")},
                "error_mm": np.linalg.norm(pred_mm - true_mm, axis=1),
            }
        )
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _body_points(dense: DenseEmbedding) -> np.ndarray:
    fg = dense.flat_foreground
    return dense.flat_centres_mm[fg] if fg.any() else dense.flat_centres_mm


def correspondence_error(
    method: Any,
    vol_a: Volume,
    vol_b: Volume,
    true_map_fn: Callable[[np.ndarray], np.ndarray],
    n_points: int = 200,
    seed: int = 0,
    stride_vox: int | Sequence[int] = 4,
    method_name: str | None = None,
    **dense_kwargs: Any,
) -> pd.DataFrame:
    """Per-point correspondence errors of ``method`` from subject A to subject B.

    Embeds both volumes densely (:func:`medssl.evaluate.dense.dense_embeddings`,
    ``dense_kwargs`` passed on) and calls :func:`correspondence_from_dense`.
    Summarise with :func:`summarize_correspondence`.
    """
    name = method_name or getattr(method, "name", "") or type(method).__name__
    dense_a = dense_embeddings(method, vol_a, stride_vox=stride_vox, **dense_kwargs)
    dense_b = dense_embeddings(method, vol_b, stride_vox=stride_vox, **dense_kwargs)
    return correspondence_from_dense(dense_a, dense_b, true_map_fn, n_points=n_points, seed=seed, method_name=name)


def summarize_correspondence(points: pd.DataFrame, notes: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Per method: median, mean and 90th percentile error (mm), the numbers of points, pairs and query
    subjects, the row kind (:func:`medssl.evaluate.headlines.kind_of`) and a note (``notes[row]``).

    The shared rows (identity, aligned identity, registration, chance, grid floor) are pooled over
    methods: they depend on the grid and the seed, and are identical for methods with the same stride.
    """
    from medssl.evaluate.headlines import kind_of

    refs = _shared(points["method"])
    pts = pd.concat(
        [points[~refs], points[refs].drop_duplicates(["method", "case_a", "case_b", "point"])], ignore_index=True
    )
    g = pts.groupby("method", sort=False)["error_mm"]
    out = pd.DataFrame(
        {
            "median_error_mm": g.median(),
            "mean_error_mm": g.mean(),
            "p90_error_mm": g.quantile(0.9),
            "n_points": g.size(),
            "n_pairs": pts.groupby("method", sort=False)[["case_a", "case_b"]].apply(
                lambda d: len(d.drop_duplicates())
            ),
            "n_subjects": pts.groupby("method", sort=False)["case_a"].nunique(),
        }
    ).reset_index()
    shared = [n for n in pd.unique(pts["method"]) if _shared(pd.Series([n])).iloc[0]]
    rest = [n for n in pd.unique(pts["method"]) if n not in shared]
    shared_order = [*BASELINES, *[n for n in shared if n not in SHARED_ROWS], *REFERENCES]
    order = {name: i for i, name in enumerate([*rest, *shared_order])}
    out["kind"] = out["method"].map(kind_of)
    out["note"] = out["method"].map(lambda m: (notes or {}).get(m, ""))
    return out.sort_values("method", key=lambda s: s.map(order)).reset_index(drop=True)


@dataclass(frozen=True)
class CorrespondenceResult:
    """``points``: one row per (method, pair, query point); ``summary``: one row per method;
    ``registration_seconds``: ``{row: mean seconds per registered pair}``."""

    points: pd.DataFrame
    summary: pd.DataFrame
    registration_seconds: dict[str, float] = field(default_factory=dict)

    def per_pair(self) -> pd.DataFrame:
        """Median error (mm) per ``(method, case_a, case_b)`` (shared rows once)."""
        refs = _shared(self.points["method"])
        pts = pd.concat([self.points[~refs],
                         self.points[refs].drop_duplicates(["method", "case_a", "case_b", "point"])])
        return pts.groupby(["method", "case_a", "case_b"], sort=False)["error_mm"].median().reset_index()

    def units(self) -> dict[str, np.ndarray]:
        """``{row: per query subject mean of its pairs' median errors (mm)}``, subjects in one order: the
        paired-test units (each held-out subject once)."""
        per_query = self.per_pair().groupby(["method", "case_a"], sort=False)["error_mm"].mean().reset_index()
        wide = per_query.pivot_table(index="case_a", columns="method", values="error_mm", sort=False)
        return {m: wide[m].to_numpy() for m in dict.fromkeys(per_query["method"])}

    def verdicts(self, twins: Mapping[str, str] | None = None, what: str = "(correspondence)") -> pd.DataFrame:
        """Each method against its twin, the shortcut rows and the registration control
        (:func:`medssl.evaluate.stats.compare_to_baselines`; lower error is better; units = query subjects)."""
        from medssl.evaluate.stats import compare_to_baselines

        kinds = dict(zip(self.summary["method"], self.summary["kind"]))
        return compare_to_baselines(self.units(), kinds, twins, higher_is_better=False,
                                    metric="median error (mm)", what=what, unit="query subject")


def evaluate_correspondence(
    methods: Mapping[str, Any],
    volumes: Sequence[Volume] | Mapping[str, Volume],
    pairs: Sequence[tuple[str, str]],
    true_map_fn: Callable[[str, str, np.ndarray], np.ndarray],
    n_points: int = 200,
    seed: int = 0,
    stride_vox: int | Sequence[int] = 4,
    dense: dict[tuple[str, str], DenseEmbedding] | None = None,
    registrars: Sequence[Any] = (),
    workers: int | str = 1,
    **dense_kwargs: Any,
) -> CorrespondenceResult:
    """Correspondence error of several methods over several held-out subject pairs.

    Args:
        methods: ``{name: method}``; include the random-init twins here.
        volumes: the held-out volumes (a sequence or ``{case_id: volume}``).
        pairs: ``[(case_a, case_b), ...]``.
        true_map_fn: ``(case_a, case_b, points_mm_a (N, 3)) -> points_mm_b (N, 3)``,
            e.g. ``source.cohort.correspondence``.
        n_points: query points per pair.
        seed: base seed; pair ``p`` uses ``seed + p``, identical for every method.
        stride_vox: dense grid stride.
        dense: optional ``{(method name, case_id): DenseEmbedding}`` store, reused and
            filled, so the latent maps can share the embeddings.
        registrars: :class:`medssl.evaluate.registration.Registrar` s: each adds its control row
            (``registrar.name``), B registered onto A once per pair (cached by the registrar).
        workers: methods computed at once, each on one thread (:mod:`medssl.evaluate.rows`: the same
            numbers as one at a time); ``"auto"``: as many as the caller's torch threads, 1 with a model on
            a GPU (:func:`medssl.evaluate.rows.resolve_workers`).
        dense_kwargs: passed to :func:`dense_embeddings` (``batch_size``, ``cache_dir``, ...).
    """
    by_id = dict(volumes) if isinstance(volumes, Mapping) else {str(v.case_id): v for v in volumes}
    missing = sorted({c for p in pairs for c in p} - set(by_id))
    if missing:
        raise KeyError(f"pairs name cases that are not among the volumes: {missing}")
    store: dict[tuple[str, str], DenseEmbedding] = {} if dense is None else dense

    def _dense(name: str, case: str) -> DenseEmbedding:
        if (name, case) not in store:
            store[(name, case)] = dense_embeddings(methods[name], by_id[case], stride_vox=stride_vox, **dense_kwargs)
        return store[(name, case)]

    def _row(i: int, name: str) -> list[pd.DataFrame]:
        frames = []
        for p, (case_a, case_b) in enumerate(pairs):
            # the registration rows do not depend on the method: scored with the first one only
            reg = {r.name: (lambda pts, r=r, a=case_a, b=case_b: r.map_points(by_id[a], by_id[b], pts))
                   for r in registrars} if i == 0 else None
            frames.append(
                correspondence_from_dense(
                    _dense(name, case_a),
                    _dense(name, case_b),
                    lambda pts, a=case_a, b=case_b: true_map_fn(a, b, pts),
                    n_points=n_points,
                    seed=seed + p,
                    method_name=name,
                    registration=reg,
                )
            )
        return frames

    from medssl.evaluate.rows import map_rows, resolve_workers

    n_workers = resolve_workers(workers, len(methods), list(methods.values()))
    rows = map_rows(lambda item: _row(*item), list(enumerate(methods)), n_workers)
    points = pd.concat([f for frames in rows for f in frames], ignore_index=True)
    used = [(b, a) for a, b in pairs]  # (moving, fixed)
    notes = {r.name: r.note(used) for r in registrars}
    seconds = {r.name: float(np.mean([r.seconds[u] for u in used if u in r.seconds])) for r in registrars}
    return CorrespondenceResult(points=points, summary=summarize_correspondence(points, notes),
                                registration_seconds=seconds)
