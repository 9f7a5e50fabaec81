"""kNN few-shot label transfer: organ segmentation from frozen dense descriptors, no fine-tuning.

Blendowski, Nickisch, Heinrich, MICCAI 2019 (Table 2, Fig. 2): describe every 4th voxel of
n labelled atlas scans and of a query scan; label each query position by the majority vote
of its k = 21 nearest atlas descriptors; report Dice per organ against n = 1..9. medssl's protocol:

- **Grid.** Descriptors on the dense grid of :func:`medssl.evaluate.dense.dense_embeddings`
  (stride ``stride_vox``, default 4). Grid point ``g`` describes the patch cut at its anchor
  voxel; its label (atlases) and its prediction (queries) live at that voxel.
- **Body only.** Only grid points on the body (:func:`medssl.sampling.regions.foreground_mask`,
  from intensity, never from labels) are described and searched; query points off the body
  are background. The same rule holds for every method and baseline.
- **Exact kNN, per atlas.** For each query point the k nearest descriptors (squared
  Euclidean) are found *in each atlas of the pool separately* by :func:`knn_search`: float32
  candidates (faiss ``IndexFlatL2`` when installed, else torch) ranked by float64 distances, with a
  per-row certificate that no other point can be nearer, ties by the smaller index; the answer does
  not depend on where the candidates came from (``benchmarks/segmentation.py`` times it against
  NumPy brute force, scikit-learn and faiss alone). The k nearest among
  any subset of atlases are then exactly the k nearest of the union of those per-atlas lists
  (each of them is among the k nearest of its own atlas), so every draw of n atlases costs
  one merge, not one search. Votes are counted over the k labels; ties go to the smaller
  organ code (background first).
- **Back to the image grid.** The vote fractions of every organ are interpolated trilinearly
  from the grid points to every voxel (constant beyond the outermost grid points), and each
  voxel takes the organ with the largest fraction.
- **Scores.** :func:`medssl.evaluate.segmetrics.segmentation_scores` (MONAI Dice, foreground
  only, per volume; MONAI surface Dice at the largest n).
- **Atlases and queries never overlap**: atlases come from the training split, queries are
  held out (validation subjects for choices such as k, test subjects for the scores), and
  :func:`check_disjoint` refuses any shared subject or patient group.

Shortcut rows in the same table (:data:`BASELINE_ROWS`): ``identity`` (each query grid point
takes the atlas label at the same world coordinate; n atlases vote), ``aligned-identity
(scale+shift)`` (the same after :func:`medssl.geometry.moment_alignment` of the query's body
onto each atlas's body: translation and per-axis scale, no rotation), plus the descriptor
baselines the caller adds as methods: each method's untrained twin (``random-init[...]``,
:func:`medssl.evaluate.runs.load_run_methods`; ``xavier`` for Reg2D/Heatmap) and
``raw-intensity`` (:class:`RawIntensityDescriptor`).

The positive **control** (``registrars``): **multi-atlas registration**. Every atlas of the pool
is registered onto the query once (:class:`medssl.evaluate.registration.Registrar`, cached), each
query grid point is mapped into each atlas and takes that atlas's labels there (``"linear"``:
each organ's indicator interpolated trilinearly, a per-label vote; ``"nearest"``: the label of
the nearest voxel), and the atlases of a draw vote. No training; it shows what the task allows.

The identity and registration rows go through the same grid, body rule and upsampling as the
kNN rows, so they differ from a method only in where the labels come from.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from medssl.data.volume import Volume
from medssl.evaluate.correspondence import ALIGNED_IDENTITY, IDENTITY
from medssl.evaluate.dense import DenseEmbedding, dense_embeddings
from medssl.evaluate.segmetrics import OrganSet, segmentation_scores
from medssl.geometry import apply_affine_mm, moment_alignment, vox_to_world, world_to_vox
from medssl.sampling.regions import foreground_mask

__all__ = [
    "ALIGNED_IDENTITY",
    "BASELINE_ROWS",
    "IDENTITY",
    "RAW_INTENSITY",
    "AtlasDraw",
    "AtlasNeighbours",
    "KnnSegmentationResult",
    "RawIntensityDescriptor",
    "atlas_draws",
    "atlas_neighbours",
    "check_disjoint",
    "choose_atlas_pool",
    "evaluate_knn_segmentation",
    "identity_fractions",
    "knn_search",
    "labels_on_image",
    "predict_labels",
    "row_kind",
    "transferred_fractions",
    "vote_fractions",
]

RAW_INTENSITY = "raw-intensity"
BASELINE_ROWS = (IDENTITY, ALIGNED_IDENTITY)


class RawIntensityDescriptor(nn.Module):
    """Raw intensities as descriptors: the patch average-pooled to ``pooled_size_vox^3`` and flattened.

    A method-like module (``embed``, ``patch_size_vox``) so that dense grids embed it like any
    method. ``(B, C, *P) -> (B, C * pooled_size_vox^3)``.
    """

    trains = False
    random_init = False

    def __init__(self, patch_size_vox: int = 16, pooled_size_vox: int = 4) -> None:
        super().__init__()
        if patch_size_vox < pooled_size_vox or pooled_size_vox < 1:
            raise ValueError(f"need patch_size_vox >= pooled_size_vox >= 1, got {patch_size_vox}, {pooled_size_vox}")
        self.size = int(patch_size_vox)
        self.pooled = int(pooled_size_vox)
        self.name = RAW_INTENSITY

    @property
    def patch_size_vox(self) -> tuple[int, int, int]:
        return (self.size,) * 3

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool3d(x.float(), self.pooled).flatten(1)


def row_kind(name: str, model: Any = None) -> str:
    """``"baseline"`` for shortcut rows and untrained descriptors (random-init twins, raw intensities,
    registered methods that never train), ``"control"`` for positive controls (registration), else ``"method"``."""
    from medssl.evaluate.headlines import kind_of  # the one rule for row kinds, shared with every headline table

    if model is not None and (getattr(model, "random_init", False) or getattr(model, "trains", True) is False):
        return "baseline"
    kind = kind_of(name)
    return kind if kind in ("baseline", "control") else "method"


# ---------------------------------------------------------------------------- atlases and draws


@dataclass(frozen=True)
class AtlasDraw:
    """One random choice of ``n`` atlases (case ids) from the pool; ``draw`` numbers the draws of one n."""

    n: int
    draw: int
    atlases: tuple[str, ...]


def atlas_draws(pool: Sequence[str], n_values: Sequence[int], n_draws: int, seed: int = 0) -> list[AtlasDraw]:
    """Seeded, distinct atlas subsets: ``n_draws`` per ``n`` (fewer when fewer distinct subsets exist).

    They depend only on the pool, ``n`` and the seed, so every method and baseline is scored on
    the same draws. Each subset is sorted by pool order.
    """
    ids = [str(c) for c in pool]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the atlas pool has repeated case ids: {ids}")
    out = []
    for n in n_values:
        n = int(n)
        if not 1 <= n <= len(ids):
            raise ValueError(f"n_atlases={n} needs a pool of at least {n} labelled training subjects; it has {len(ids)}")
        total = math.comb(len(ids), n)
        rng = np.random.default_rng([int(seed), n])
        if total <= n_draws:
            subsets = list(itertools.combinations(range(len(ids)), n))
        else:
            seen: list[tuple[int, ...]] = []
            while len(seen) < n_draws:
                s = tuple(sorted(rng.choice(len(ids), size=n, replace=False).tolist()))
                if s not in seen:
                    seen.append(s)
            subsets = seen
        out += [AtlasDraw(n, d, tuple(ids[i] for i in s)) for d, s in enumerate(subsets)]
    return out


def check_disjoint(atlases: Sequence[Volume], queries: Sequence[Volume]) -> None:
    """Raise if an atlas and a query are the same subject (case id) or the same patient (group)."""
    a_ids = {str(v.case_id) for v in atlases}
    q_ids = {str(v.case_id) for v in queries}
    a_groups = {str(v.group) for v in atlases}
    q_groups = {str(v.group) for v in queries}
    both = sorted(a_ids & q_ids)
    if both:
        raise ValueError(f"atlas and query subjects overlap: {both}; atlases must come from the training split, "
                         "queries from held-out subjects")
    shared = sorted(a_groups & q_groups)
    if shared:
        raise ValueError(f"atlas and query subjects share patient groups {shared}: the queries are not held out")


# ---------------------------------------------------------------------------- exact kNN


def knn_search(database: np.ndarray, queries: np.ndarray, k: int, backend: str = "exact") -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by squared Euclidean distance.

    Args:
        database: ``(M, D)``; queries: ``(N, D)``; both finite.
        k: neighbours per query (``min(k, M)`` are real; the rest are padded with
            distance ``inf`` and index ``-1``).
        backend: ``"exact"`` (the default, :func:`_exact_knn`: float32 candidates, ranked by float64
            distances, with a per-row certificate that the result is exact; the candidates come from
            faiss ``IndexFlatL2`` when faiss-cpu is installed, else from torch, and the answer is the
            same either way), ``"torch"`` (the same with torch's candidates whether or not faiss is
            installed), ``"sklearn"`` (``NearestNeighbors(algorithm="brute")``), ``"faiss"``
            (``IndexFlatL2`` alone: its float32 distances and its own order of near-ties; needs
            ``pip install faiss-cpu``), or ``"auto"`` (the same as ``"exact"``).

    Returns:
        ``(sqdist (N, k) float32, index (N, k) int64)``, nearest first; ``"exact"`` and ``"torch"``
        break exact ties by the smaller database index.
    """
    db = np.ascontiguousarray(database, dtype=np.float32)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if db.ndim != 2 or q.ndim != 2 or db.shape[1] != q.shape[1]:
        raise ValueError(f"database (M, D) and queries (N, D) must share D; got {db.shape} and {q.shape}")
    for name, arr in (("database", db), ("queries", q)):
        if not np.isfinite(arr).all():
            raise ValueError(f"the {name} hold NaN or inf descriptors ({int((~np.isfinite(arr)).any(axis=1).sum())} of "
                             f"{len(arr)} rows): drop them before the search")
    kk = min(int(k), len(db))
    dist = np.full((len(q), int(k)), np.inf, dtype=np.float32)
    index = np.full((len(q), int(k)), -1, dtype=np.int64)
    if kk == 0 or len(q) == 0:
        return dist, index
    if backend in ("exact", "auto"):
        d, i = _exact_knn(db, q, kk, candidates="faiss" if _faiss() is not None else "torch")
    elif backend == "torch":
        d, i = _exact_knn(db, q, kk, candidates="torch")
    elif backend == "faiss":
        faiss = _faiss()
        if faiss is None:
            raise ImportError("backend='faiss' needs the faiss-cpu package (pip install faiss-cpu)")
        idx = faiss.IndexFlatL2(db.shape[1])
        idx.add(db)
        d, i = idx.search(q, kk)
    elif backend == "sklearn":
        from sklearn.neighbors import NearestNeighbors
        from threadpoolctl import threadpool_limits

        # one BLAS/OpenMP thread: on the shared 2-core machine two threads spin against other processes
        # (measured under load: 0.42 s vs 0.06 s for 200 queries x 6,500 128-d points); results are the same
        with threadpool_limits(1):
            d, i = NearestNeighbors(n_neighbors=kk, algorithm="brute").fit(db).kneighbors(q)
        d = d.astype(np.float32) ** 2
    else:
        raise ValueError(f"backend must be 'exact', 'auto', 'torch', 'faiss' or 'sklearn', got {backend!r}")
    dist[:, :kk], index[:, :kk] = d, i
    return dist, index


# Rows of queries per block of the exact search: a (rows, M) float32 block of a 128^3 atlas at stride 4
# (~10,000 body points) is ~10 MB at 256 rows: written by the matrix product, read by the selection from cache.
_KNN_ROWS = 256
# Extra candidates per row beyond k, selected in float32: the certificate needs the gap between the k-th
# neighbour and the first point left out to exceed the float32 error bound.
_KNN_MARGIN = 8
# Columns per group of torch's two-stage selection (see _torch_candidates); 16 was fastest for ~10,000
# points (12, 24 and 32 were 3-25 % slower, 8 twice as slow in the first stage).
_KNN_GROUP = 16
# The value of a padding column: above every real |a|^2 - 2 q.a, below float32 overflow.
_KNN_PAD = 3.0e38
# Largest squared distance scale that float32 candidates may meet (float32 overflows at 3.4e38): descriptors
# farther apart (norms around 1e18 and up) are searched in float64 only.
_F32_SAFE = 1.0e37


def _exact_knn(db: np.ndarray, q: np.ndarray, k: int, candidates: str = "torch") -> tuple[np.ndarray, np.ndarray]:
    """``(sqdist (N, k) float32, index (N, k) int64)``: the exact k nearest of each query, nearest first.

    Written here rather than taken from scikit-learn (``NearestNeighbors``: float64 distance blocks on
    one thread, 2x slower here) or faiss alone (float32 distances, and its own order of near-ties);
    all three are timed in ``benchmarks/segmentation.py``. Everything is computed on vectors centred on
    the database mean (distances do not change; the float32 rounding errors scale with the spread of
    the descriptors rather than their distance from the origin).

    1. **Candidates**: the ``c = k + _KNN_MARGIN`` smallest float32 squared distances of each query,
       from faiss ``IndexFlatL2`` (``candidates="faiss"``) or from :func:`_torch_candidates`. Every
       point left out has a float32 distance at least as large as every candidate's.
    2. **Ranking**: the candidates in float32 order; those that can still be among the k nearest
       (within ``2 err`` of the k-th) are ranked by their float64 distances, ties by the smaller index.
    3. **Certificate.** Every float32 distance lies within ``err`` of the exact one. ``err`` is bounded
       per row from the rounding of the centred inputs to float32 and from the float32 arithmetic:
       ``gamma_{D+4} (|q~| + |a~|)^2`` covers a dot product of ``D + 1`` terms with ``|a|^2`` folded in
       (torch), the expansion ``|q|^2 + |a|^2 - 2 q.a`` and the direct sum of ``D`` squared differences
       (faiss uses both), plus the float64 step. Every point not ranked in float64 has a float32
       distance ``>= T`` (the smallest one not ranked), so its exact distance is at least ``T - err``.
       If the k-th ranked float64 distance lies strictly below that, no point left out can be nearer
       or tie with it, and the k found are the exact k nearest in order. Rows where this fails
       (near-duplicate descriptors) are searched exhaustively in float64 (:func:`_exact_rows`).

    The answer is the same whichever source gives the candidates.
    """
    m, n, dim = len(db), len(q), db.shape[1]
    c = min(k + _KNN_MARGIN, m)
    u = float(np.finfo(np.float32).eps) / 2  # unit roundoff
    u64 = float(np.finfo(np.float64).eps) / 2
    mu = db.mean(axis=0, dtype=np.float64)
    ac = torch.from_numpy(db.astype(np.float64) - mu)  # (M, D) float64, centred
    qc = torch.from_numpy(q.astype(np.float64) - mu)
    ac_sq = (ac * ac).sum(1)
    qc_sq = (qc * qc).sum(1)
    a32, q32 = ac.float(), qc.float()
    a_norm = float(ac_sq.max().sqrt())
    a32_norm = float(torch.linalg.vector_norm(a32.double(), dim=1).max())
    a_err = float(torch.linalg.vector_norm(a32.double() - ac, dim=1).max())
    q_norm = qc_sq.sqrt()
    q32_norm = torch.linalg.vector_norm(q32.double(), dim=1)
    q_err = torch.linalg.vector_norm(q32.double() - qc, dim=1)
    gamma = (dim + 4) * u / (1.0 - (dim + 4) * u)
    # the inputs' rounding: ||x + e|^2 - |x|^2| <= 2 |x| |e| + |e|^2 with x = q - a, |e| <= q_err + a_err
    err = 2.0 * (q_norm + a_norm) * (q_err + a_err) + (q_err + a_err) ** 2
    err += gamma * (q32_norm + a32_norm) ** 2  # the float32 arithmetic (either way of computing it)
    err += 4.0 * (dim + 4) * u64 * (a_norm + q_norm) ** 2  # the float64 distances
    err = 1.01 * err
    if 4.0 * (a_norm + float(q_norm.max())) ** 2 > _F32_SAFE:  # float32 distances could overflow: no certificate
        d, i = np.empty((n, k)), np.empty((n, k), dtype=np.int64)
        _exact_rows(ac, qc, ac_sq, torch.arange(n), k, d, i)
        with np.errstate(over="ignore"):  # squared distances beyond float32 are returned as inf
            return np.maximum(d, 0.0).astype(np.float32), i
    if candidates == "faiss":
        blocks = _faiss_candidates(a32.numpy(), q32.numpy(), c)
    elif candidates == "torch":
        blocks = _torch_candidates(a32, q32, ac_sq, qc_sq, c)
    else:
        raise ValueError(f"candidates must be 'faiss' or 'torch', got {candidates!r}")
    out_d = torch.empty((n, k), dtype=torch.float64)
    out_i = torch.empty((n, k), dtype=torch.int64)
    failed: list[torch.Tensor] = []
    with torch.no_grad():
        for s, val, cand in blocks:  # val: (rows, c) float64 float32-computed squared distances
            e = s + len(val)
            val, order = torch.sort(val, dim=1)
            cand = torch.gather(cand, 1, order)
            # candidates that can still be among the k nearest: within 2 err of the k-th in float32
            reach = val <= val[:, k - 1 : k] + 2.0 * err[s:e, None]
            kept = max(k, int(reach.sum(dim=1).max()))
            ranked, _ = torch.sort(cand[:, :kept], dim=1)  # by index: the stable sort below breaks ties by index
            exact = qc_sq[s:e, None] + ac_sq[ranked] - 2.0 * torch.bmm(ac[ranked], qc[s:e, :, None]).squeeze(-1)
            exact, order = torch.sort(exact, dim=1, stable=True)
            out_d[s:e] = exact[:, :k]
            out_i[s:e] = torch.gather(ranked, 1, order[:, :k])
            if kept < m:  # some points were left out: certify that none of them can be among the k nearest
                floor = val[:, min(kept, c - 1)]
                failed.append(s + torch.nonzero(~(exact[:, k - 1] < floor - err[s:e])).flatten())
    d, i = out_d.numpy(), out_i.numpy()
    rows = torch.cat(failed) if failed else torch.empty(0, dtype=torch.int64)
    if len(rows):
        _exact_rows(ac, qc, ac_sq, rows, k, d, i)
    return np.maximum(d, 0.0).astype(np.float32), i


def _faiss_candidates(a32: np.ndarray, q32: np.ndarray, c: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Blocks ``(first row, (rows, c) float64 float32 distances, (rows, c) int64 indices)`` from faiss
    ``IndexFlatL2`` on the centred float32 vectors: the c nearest by faiss's float32 distances."""
    index = _faiss().IndexFlatL2(a32.shape[1])
    index.add(a32)
    dist, idx = index.search(q32, c)
    dist, idx = torch.from_numpy(dist).double(), torch.from_numpy(idx)
    for s in range(0, len(q32), _KNN_ROWS):
        yield s, dist[s : s + _KNN_ROWS], idx[s : s + _KNN_ROWS]


def _torch_candidates(a32: torch.Tensor, q32: torch.Tensor, ac_sq: torch.Tensor, qc_sq: torch.Tensor,
                      c: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Blocks as :func:`_faiss_candidates`, from torch, per block of ``_KNN_ROWS`` query rows:

    1. ``v = |a|^2 - 2 q.a`` in float32 as one matrix product of augmented vectors ``[-2q, 1]`` and
       ``[a, |a|^2]`` (``-2q`` is exact; folding ``|a|^2`` into the product saves the pass a bias costs:
       1.45 s against 2.05 s for the 9 atlases of ``benchmarks/segmentation.py``); the distance is
       ``|q|^2 + v``, with ``|q|^2`` in float64;
    2. the ``c`` smallest ``v`` in two stages (one ``torch.topk`` over 10,000 columns cost as much as the
       product): the minimum of each group of ``_KNN_GROUP`` columns (group ``j`` holds columns ``j,
       j + P, j + 2P, ...``, so the minima are one vectorised pass), the ``c`` groups with the smallest
       minima, and the ``c`` smallest of their columns. Every other column lies in a group whose minimum
       is at least the ``c``-th smallest minimum, which is at least the ``c``-th value found.
    """
    m, n, dim = len(a32), len(q32), a32.shape[1]
    g = _KNN_GROUP if m >= 4 * c * _KNN_GROUP else 1  # grouping pays when the groups found are a small part
    p = -(-m // g)  # groups
    a_aug = torch.zeros((dim + 1, p * g), dtype=torch.float32)  # (D + 1, M padded): [a, |a|^2]
    a_aug[:dim, :m] = a32.T
    a_aug[dim, :m] = ac_sq.float()
    a_aug[dim, m:] = _KNN_PAD
    q_aug = torch.cat([-2.0 * q32, torch.ones((n, 1), dtype=torch.float32)], dim=1)
    offsets = torch.arange(g) * p
    buf = torch.empty((min(_KNN_ROWS, n), p * g), dtype=torch.float32)
    with torch.no_grad():
        for s in range(0, n, _KNN_ROWS):
            e = min(s + _KNN_ROWS, n)
            block = buf[: e - s]
            torch.mm(q_aug[s:e], a_aug, out=block)  # (rows, M) = |a|^2 - 2 q.a
            if g > 1:
                group_min = block.view(e - s, g, p).amin(dim=1)
                _, groups = torch.topk(group_min, c, dim=1, largest=False, sorted=False)
                cols = (groups[:, :, None] + offsets).reshape(e - s, c * g)
                val, j = torch.topk(torch.gather(block, 1, cols), c, dim=1, largest=False, sorted=False)
                cand = torch.gather(cols, 1, j)
            else:
                val, cand = torch.topk(block, c, dim=1, largest=False, sorted=False)
            yield s, val.double() + qc_sq[s:e, None], cand


def _exact_rows(ac: torch.Tensor, qc: torch.Tensor, ac_sq: torch.Tensor, rows: torch.Tensor, k: int,
                out_d: np.ndarray, out_i: np.ndarray) -> None:
    """The rows float32 could not certify, answered as :func:`_exact_row` over the whole database would.

    A float64 screening first: ``v = |a|^2 - 2 q.a`` per point, with an error below ``err`` (D float64
    products and additions, and the rounding of the direct distances, bounded generously). Every point
    with ``v <= v_k + 2 err`` (``v_k`` the row's k-th smallest ``v``) is a candidate; a point left out is
    strictly farther than the k points at or below ``v_k``, so :func:`_exact_row` on the candidates gives
    the k nearest with the same distances and tie order as on the whole database. A collapsed encoder's
    near-duplicate descriptors made 83,000 rows of the demo's kNN fall here, each searched over all
    points (52 s of SimSiam's 61 s row); with the screening the candidates are a few dozen per row.
    """
    u64 = float(np.finfo(np.float64).eps) / 2
    dim = ac.shape[1]
    a64, q64 = ac.numpy(), qc.numpy()
    a_norm = float(ac_sq.max().sqrt())
    for s in range(0, len(rows), _KNN_ROWS):
        block_rows = rows[s : s + _KNN_ROWS]
        q_block = qc[block_rows]
        v = torch.addmm(ac_sq, q_block, ac.T, beta=1.0, alpha=-2.0)  # (rows, M) float64
        q_norm = torch.linalg.vector_norm(q_block, dim=1)
        err = 4.0 * (dim + 4) * u64 * (a_norm + q_norm) ** 2
        limit = torch.kthvalue(v, k, dim=1).values + 2.0 * err
        for r, row, lim in zip(block_rows.tolist(), v, limit):
            cand = torch.nonzero(row <= lim).flatten().numpy()  # ascending index: ties stay ordered by index
            d_row, order = _exact_row(a64[cand], q64[r], k)
            out_d[r], out_i[r] = d_row, cand[order]


def _exact_row(a64: np.ndarray, q64: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest of one query in float64 over the whole database (ties by the smaller index)."""
    d = ((a64 - q64) ** 2).sum(-1)
    order = np.lexsort((np.arange(len(d)), d))[:k]
    return d[order], order


def _faiss() -> Any:
    try:
        import faiss  # noqa: PLC0415
    except ImportError:
        return None
    return faiss


# ---------------------------------------------------------------------------- label transfer


def _grid_codes(dense: DenseEmbedding, codes: np.ndarray) -> np.ndarray:
    """``(Gx, Gy, Gz)`` organ codes at the grid's anchor voxels."""
    if tuple(codes.shape) != tuple(dense.image_shape_vox):
        raise ValueError(f"{dense.case_id}: label map {codes.shape} is not on the image grid {dense.image_shape_vox}")
    return np.asarray(codes)[np.ix_(*dense.anchors_vox)]


def _searchable(dense: DenseEmbedding) -> np.ndarray:
    """Flat indices of grid points on the body that hold an embedding."""
    return np.flatnonzero(dense.flat_foreground & dense.computed.reshape(-1))


@dataclass(frozen=True)
class AtlasNeighbours:
    """For each body point of a query grid, its k nearest descriptors in each atlas of the pool.

    Attributes:
        atlas_ids: case ids of the pool, in order.
        sqdist: ``(A, Nq, k)`` float32 squared distances (``inf`` pads an atlas with fewer than k points).
        labels: ``(A, Nq, k)`` uint8 organ codes of those neighbours.
        query_index: ``(Nq,)`` flat grid indices of the query points.
    """

    atlas_ids: tuple[str, ...]
    sqdist: np.ndarray
    labels: np.ndarray
    query_index: np.ndarray


def atlas_neighbours(
    query: DenseEmbedding,
    atlases: Sequence[DenseEmbedding],
    atlas_codes: Sequence[np.ndarray],
    k: int = 21,
    backend: str = "exact",
) -> AtlasNeighbours:
    """Exact per-atlas k nearest neighbours of every body point of ``query`` (see the module docstring).

    ``atlas_codes``: each atlas's ``(X, Y, Z)`` organ codes on its image grid.
    """
    if len(atlases) != len(atlas_codes) or not atlases:
        raise ValueError(f"need one label map per atlas and at least one atlas; got {len(atlases)} and {len(atlas_codes)}")
    qi = _searchable(query)
    q = query.flat_embeddings[qi]
    sq, lab = [], []
    for dense, codes in zip(atlases, atlas_codes):
        if dense.embed_dim != query.embed_dim:
            raise ValueError(f"descriptor sizes differ: query {query.embed_dim}, atlas {dense.case_id} {dense.embed_dim}")
        ai = _searchable(dense)
        try:
            d, i = knn_search(dense.flat_embeddings[ai], q, k, backend)
        except ValueError as e:  # name the scans: knn_search only sees arrays
            raise ValueError(f"kNN search of query {query.case_id} (the queries) in atlas {dense.case_id} "
                             f"(the database): {e}") from None
        grid_labels = _grid_codes(dense, codes).reshape(-1)[ai]
        sq.append(d)
        lab.append(np.where(i >= 0, grid_labels[np.maximum(i, 0)], 0).astype(np.uint8))
    return AtlasNeighbours(tuple(d.case_id for d in atlases), np.stack(sq), np.stack(lab), qi)


def vote_fractions(neighbours: AtlasNeighbours, subset: Sequence[int], k: int, n_classes: int) -> np.ndarray:
    """``(Nq, n_classes)`` float32 fraction of the k nearest descriptors (over the atlases ``subset``) per organ code."""
    sub = list(subset)
    if not sub:
        raise ValueError("an atlas subset needs at least one atlas")
    k_max = neighbours.sqdist.shape[2]
    if not 1 <= k <= k_max:
        raise ValueError(f"k={k} must lie in [1, {k_max}] (the neighbours were searched with k={k_max})")
    d = np.concatenate([neighbours.sqdist[a, :, :k] for a in sub], axis=1)  # (Nq, n * k)
    lab = np.concatenate([neighbours.labels[a, :, :k] for a in sub], axis=1)
    if d.shape[1] > k:
        keep = np.argpartition(d, k - 1, axis=1)[:, :k]
        d, lab = np.take_along_axis(d, keep, axis=1), np.take_along_axis(lab, keep, axis=1)
    valid = np.isfinite(d)
    # one bincount over (row, code) pairs (np.add.at was ~10x slower); invalid pads go to a spill bin
    flat = np.where(valid, np.arange(len(d))[:, None] * n_classes + lab.astype(np.int64), len(d) * n_classes)
    counts = np.bincount(flat.ravel(), minlength=len(d) * n_classes + 1)[:-1].reshape(len(d), n_classes)
    return counts / np.maximum(valid.sum(axis=1, keepdims=True), 1)


def _to_grid(dense: DenseEmbedding, fractions: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``(Gx, Gy, Gz, C)`` fractions: the given points, background (code 0) everywhere else."""
    grid = np.zeros((int(np.prod(dense.grid_shape)), fractions.shape[1]), dtype=np.float32)
    grid[:, 0] = 1.0
    grid[index] = fractions
    return grid.reshape(*dense.grid_shape, -1)


def labels_on_image(dense: DenseEmbedding, grid_fractions: np.ndarray) -> np.ndarray:
    """``(X, Y, Z)`` uint8 organ codes on the image grid from ``(Gx, Gy, Gz, C)`` grid fractions.

    Trilinear interpolation between grid anchors, constant beyond the outermost anchors, then
    the largest fraction per voxel. Trilinear interpolation on a regular grid is separable:
    one small ``(n_vox, G)`` weight matrix per axis, applied as three matrix products.
    """
    t = torch.from_numpy(np.ascontiguousarray(grid_fractions, dtype=np.float32))  # (Gx, Gy, Gz, C)
    wx, wy, wz = (_linear_weights(a, n) for a, n in zip(dense.anchors_vox, dense.image_shape_vox))
    with _one_thread():
        t = torch.einsum("zk,ijkc->ijzc", wz, t)  # (Gx, Gy, Z, C)
        t = torch.einsum("yj,ijzc->iyzc", wy, t)  # (Gx, Y, Z, C)
        t = torch.einsum("xi,iyzc->xyzc", wx, t)  # (X, Y, Z, C)
        return t.argmax(-1).to(torch.uint8).numpy()


def _linear_weights(anchors_vox: np.ndarray, n_vox: int) -> torch.Tensor:
    """``(n_vox, G)`` linear-interpolation weights from grid anchors to every voxel (clamped at the ends)."""
    a = np.asarray(anchors_vox, dtype=np.float64)
    g = len(a)
    step = float(a[1] - a[0]) if g > 1 else 1.0
    pos = np.clip((np.arange(n_vox) - a[0]) / step, 0.0, g - 1.0)
    i0 = np.floor(pos).astype(np.int64)
    frac = pos - i0
    w = np.zeros((n_vox, g), dtype=np.float32)
    w[np.arange(n_vox), i0] += 1.0 - frac
    w[np.arange(n_vox), np.minimum(i0 + 1, g - 1)] += frac
    return torch.from_numpy(w)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run small, memory-bound torch ops on one thread: on a shared 2-core machine two OpenMP
    threads spin against other processes and made them several times slower under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _anchor_points_mm(dense: DenseEmbedding) -> np.ndarray:
    """``(Gx * Gy * Gz, 3)`` world mm of the anchor voxels (where grid labels live)."""
    mesh = np.stack(np.meshgrid(*dense.anchors_vox, indexing="ij"), axis=-1).reshape(-1, 3)
    return vox_to_world(dense.image_affine, mesh.astype(np.float64))


def body_points_mm(volume: Volume, stride_vox: int = 4) -> np.ndarray:
    """World mm of every ``stride_vox``-th body voxel (the cloud :func:`moment_alignment` aligns)."""
    body = foreground_mask(volume)[::stride_vox, ::stride_vox, ::stride_vox]
    vox = np.argwhere(body).astype(np.float64) * stride_vox
    if len(vox) < 2:
        raise ValueError(f"{volume.source or volume.case_id}: the body mask is (almost) empty")
    return vox_to_world(np.asarray(volume.affine, dtype=np.float64), vox)


def transferred_fractions(
    query: DenseEmbedding,
    atlases: Sequence[Volume],
    atlas_codes: Sequence[np.ndarray],
    maps: Sequence[Callable[[np.ndarray], np.ndarray] | None],
    n_classes: int,
    vote: str = "nearest",
) -> np.ndarray:
    """``(Nq, n_atlases, C)`` per-atlas label fractions at the query's body grid points.

    Query grid anchors (world mm) are mapped into each atlas by ``maps[a]`` (None: the same
    world coordinate) and take that atlas's labels there: ``"nearest"``: the label of the
    nearest voxel (one-hot); ``"linear"``: each organ's indicator interpolated trilinearly (a
    per-label vote; background gets the rest). Outside an atlas's image: background.
    """
    from scipy import ndimage as ndi

    if vote not in ("nearest", "linear"):
        raise ValueError(f"vote must be 'nearest' or 'linear', got {vote!r}")
    idx = np.flatnonzero(query.flat_foreground)
    pts = _anchor_points_mm(query)[idx]
    out = np.zeros((len(idx), len(atlases), n_classes), dtype=np.float32)
    for a, (vol, codes, map_fn) in enumerate(zip(atlases, atlas_codes, maps)):
        p = pts if map_fn is None else np.asarray(map_fn(pts), dtype=np.float64).reshape(-1, 3)
        ijk = world_to_vox(np.asarray(vol.affine, dtype=np.float64), p)
        codes = np.asarray(codes)
        if vote == "nearest":
            r = np.rint(ijk).astype(np.int64)
            inside = np.all((r >= 0) & (r < np.asarray(codes.shape)), axis=1)
            lab = np.zeros(len(p), dtype=np.int64)
            lab[inside] = codes[tuple(r[inside].T)]
            out[np.arange(len(p)), a, lab] = 1.0
        else:
            for c in range(1, n_classes):
                out[:, a, c] = ndi.map_coordinates((codes == c).astype(np.float32), ijk.T, order=1, mode="constant",
                                                   cval=0.0)
            out[:, a, 0] = np.clip(1.0 - out[:, a, 1:].sum(axis=1), 0.0, 1.0)
    return out


def identity_fractions(
    query: DenseEmbedding,
    atlases: Sequence[Volume],
    atlas_codes: Sequence[np.ndarray],
    aligned: bool = False,
    query_body_mm: np.ndarray | None = None,
    atlas_body_mm: Sequence[np.ndarray] | None = None,
    n_classes: int | None = None,
) -> np.ndarray:
    """``(Gx, Gy, Gz, C)`` vote fractions of the identity baseline over ``atlases``.

    Each query body grid point takes, from every atlas, the label at the *same world
    coordinate* (nearest voxel; background outside the atlas), after mapping the query's body
    onto the atlas's body by their moments when ``aligned``. No descriptors.
    """
    n_classes = n_classes or int(max(int(np.max(c)) for c in atlas_codes)) + 1
    maps: list[Callable[[np.ndarray], np.ndarray] | None] = [None] * len(atlases)
    if aligned:
        if query_body_mm is None or atlas_body_mm is None:
            raise ValueError("aligned identity needs the body points of the query and of every atlas")
        transforms = [moment_alignment(query_body_mm, body) for body in atlas_body_mm]
        maps = [(lambda pts, t=t: apply_affine_mm(t, pts)) for t in transforms]
    per_atlas = transferred_fractions(query, atlases, atlas_codes, maps, n_classes, "nearest")
    return _to_grid(query, per_atlas.mean(axis=1), np.flatnonzero(query.flat_foreground))


# ---------------------------------------------------------------------------- the evaluation


@dataclass
class KnnSegmentationResult:
    """Per-organ scores of every (row, k, draw of n atlases, query), and how to summarise them.

    ``scores`` columns: ``method, kind, k, n_atlases, draw, atlases, query, organ, dice``
    [``, nsd``] ``, true_voxels, pred_voxels, fp_ml, split``. The shortcut and control rows have ``k = 0``.
    """

    scores: pd.DataFrame
    organs: tuple[str, ...]
    split: str
    seconds: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # per row, e.g. the registration settings and s per pair

    @property
    def kinds(self) -> dict[str, str]:
        """``{row: "method" | "baseline" | "control"}`` of every row scored (methods, descriptor baselines,
        identity rows, registration controls)."""
        return dict(zip(self.scores["method"], self.scores["kind"]))

    @property
    def n_values(self) -> list[int]:
        return sorted(int(n) for n in self.scores["n_atlases"].unique())

    def per_query(self, metric: str = "dice") -> pd.DataFrame:
        """Mean over organs (present in the truth) and draws, per ``(method, kind, k, n_atlases, query)``."""
        per_draw = (self.scores.groupby(["method", "kind", "k", "n_atlases", "draw", "query"], sort=False)[metric]
                    .mean().reset_index())
        return per_draw.groupby(["method", "kind", "k", "n_atlases", "query"], sort=False)[metric].mean().reset_index()

    def curve(self, metric: str = "dice") -> pd.DataFrame:
        """Dice against the number of atlases: mean, std over query subjects and their count, per row and n."""
        q = self.per_query(metric)
        g = q.groupby(["method", "kind", "k", "n_atlases"], sort=False)[metric]
        out = pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n_queries": g.size()}).reset_index()
        out["metric"] = metric
        out["split"] = self.split
        return out

    def per_organ(self, n_atlases: int | None = None, metric: str = "dice") -> pd.DataFrame:
        """``method x organ`` table of the mean score at ``n_atlases`` (default the largest), with a ``mean`` column."""
        n = self.n_values[-1] if n_atlases is None else int(n_atlases)
        s = self.scores[self.scores["n_atlases"] == n]
        per_query = s.groupby(["method", "organ", "query"], sort=False)[metric].mean().reset_index()
        table = per_query.pivot_table(index="method", columns="organ", values=metric, aggfunc="mean", sort=False)
        table = table[[o for o in self.organs if o in table.columns]]
        table["mean"] = self.per_query(metric).query("n_atlases == @n").groupby("method", sort=False)[metric].mean()
        return table.loc[list(dict.fromkeys(s["method"]))]

    def units(self, n_atlases: int | None = None, metric: str = "dice") -> dict[str, np.ndarray]:
        """``{row: per-query mean score}`` at ``n_atlases`` (default the largest), queries in one order: paired-test units."""
        n = self.n_values[-1] if n_atlases is None else int(n_atlases)  # noqa: F841 (read by the query)
        q = self.per_query(metric).query("n_atlases == @n")
        wide = q.pivot_table(index="query", columns="method", values=metric, sort=False)
        return {m: wide[m].to_numpy() for m in dict.fromkeys(q["method"])}

    def verdicts(self, twins: Mapping[str, str] | None = None, n_atlases: int | None = None) -> pd.DataFrame:
        """Each method against its twin, the shortcut rows and the registration control at ``n_atlases``
        (default the largest), Holm over those comparisons (:func:`medssl.evaluate.stats.compare_to_baselines`)."""
        from medssl.evaluate.stats import compare_to_baselines

        n = self.n_values[-1] if n_atlases is None else int(n_atlases)
        return compare_to_baselines(self.units(n), self.kinds, twins, metric="Dice", what=f"(kNN, n = {n} atlases)")

    def false_positives(self) -> pd.DataFrame:
        """Per ``(method, kind, n_atlases)``: mean over query subjects (and draws) of the false-positive
        volume summed over organs (``fp_ml``) and of the volume predicted for organs absent from the
        truth (``absent_fp_ml``), in mL, with ``n_queries``."""
        s = self.scores.assign(absent_fp_ml=np.where(self.scores["true_voxels"] == 0, self.scores["fp_ml"], 0.0))
        per_draw = s.groupby(["method", "kind", "n_atlases", "draw", "query"], sort=False)[["fp_ml", "absent_fp_ml"]].sum()
        per_query = per_draw.groupby(["method", "kind", "n_atlases", "query"], sort=False).mean()
        g = per_query.groupby(["method", "kind", "n_atlases"], sort=False)
        return g.mean().assign(n_queries=g.size()).reset_index()

    def best_k(self) -> dict[str, int]:
        """``{method: k}`` with the highest mean Dice at the largest n (use on a *validation* result)."""
        c = self.curve("dice")
        c = c[(c["n_atlases"] == self.n_values[-1]) & (c["k"] > 0)]
        return {m: int(g.sort_values(["mean", "k"], ascending=[False, False])["k"].iloc[0])
                for m, g in c.groupby("method", sort=False)}

    def headline(self) -> pd.DataFrame:
        """Mean Dice (and surface Dice) at one atlas and at the largest n, per row, and the false-positive
        volume (mL, lower is better) at the largest n, for :meth:`RunDir.write_headline`."""
        rows = []
        ns = sorted({self.n_values[0], self.n_values[-1]})
        metrics = ["dice"] + (["nsd"] if "nsd" in self.scores and self.scores["nsd"].notna().any() else [])
        for metric in metrics:
            c = self.curve(metric)
            for n in ns:
                for r in c[c["n_atlases"] == n].itertuples(index=False):
                    if not np.isfinite(r.mean):
                        continue
                    rows.append({"method": r.method, "kind": r.kind, "metric": f"knn_{metric}_n{n}", "value": r.mean,
                                 "std": r.std, "n": r.n_queries, "split": self.split, "higher_is_better": True,
                                 "note": self._note(r.method, f"mean over {len(self.organs)} organs; n = test "
                                                              f"subjects; " + (f"k={r.k}" if r.k else "no descriptors"))})
        fp = self.false_positives()
        for r in fp[fp["n_atlases"] == self.n_values[-1]].itertuples(index=False):
            rows.append({"method": r.method, "kind": r.kind, "metric": f"knn_fp_ml_n{self.n_values[-1]}",
                         "value": r.fp_ml, "std": np.nan, "n": r.n_queries, "split": self.split,
                         "higher_is_better": False,
                         "note": f"false-positive volume summed over organs, mL per subject; of which "
                                 f"{r.absent_fp_ml:.3g} mL on organs absent from the truth"})
        return pd.DataFrame(rows)

    def _note(self, row: str, text: str) -> str:
        extra = self.notes.get(row, "")
        return f"{text}; {extra}" if extra else text


def evaluate_knn_segmentation(
    methods: Mapping[str, Any],
    atlases: Sequence[Volume],
    queries: Sequence[Volume],
    organs: OrganSet,
    n_atlases: Sequence[int] = tuple(range(1, 10)),
    n_draws: int = 5,
    k: int | Sequence[int] | Mapping[str, int | Sequence[int]] = 21,
    seed: int = 0,
    stride_vox: int = 4,
    baselines: bool = True,
    surface_tolerance_mm: float | None = 3.0,
    surface_n_atlases: Sequence[int] | None = None,
    split: str = "test",
    backend: str = "exact",
    kinds: Mapping[str, str] | None = None,
    dense: dict[tuple[str, str], DenseEmbedding] | None = None,
    log: Callable[[str], None] | None = None,
    registrars: Sequence[Any] = (),
    registration_vote: str = "linear",
    query_full_grid: bool = False,
    workers: int | str = 1,
    **dense_kwargs: Any,
) -> KnnSegmentationResult:
    """kNN label transfer of every method (and the identity rows) from atlas draws to every query.

    Args:
        methods: ``{name: descriptor model}`` (registered methods, ``random-init``, a
            :class:`RawIntensityDescriptor`); each is embedded on the dense grid.
        atlases: the atlas pool: labelled **training** subjects; draws of ``n`` come from it.
        queries: held-out subjects (validation when choosing k, test when scoring).
        organs: the organs scored (:func:`medssl.evaluate.segmetrics.organ_set`).
        n_atlases: the numbers of atlases (each at most the pool size).
        n_draws: random atlas subsets per n (identical for every row: :func:`atlas_draws`).
        k: neighbours; several values score each of them (choose on validation queries); a
            mapping gives each method its own value(s).
        stride_vox: dense grid step.
        baselines: add the ``identity`` and ``aligned-identity`` rows.
        surface_tolerance_mm: MONAI surface Dice tolerance (None: no surface metric).
        surface_n_atlases: the n at which the surface Dice is computed (default the largest).
        split: the queries' split, written into every row.
        backend: :func:`knn_search` backend.
        kinds: ``{name: "method" | "baseline"}`` overrides for :func:`row_kind`.
        dense: optional ``{(method, case_id): DenseEmbedding}`` store, reused and filled.
        log: called with a progress line per method and query (e.g. ``print``).
        registrars: :class:`medssl.evaluate.registration.Registrar` s; each adds a multi-atlas
            registration control row (``registrar.name``): every pool atlas registered onto every
            query once (cached by the registrar).
        registration_vote: ``"linear"`` (per-label trilinear vote) or ``"nearest"`` (nearest voxel).
        query_full_grid: embed the queries on the whole grid (not only the body), so that the dense
            embeddings ``20_latent_space`` cached for the same held-out subjects (same ``cache_dir``,
            stride and precision) are reused instead of computed again. Only body points are
            searched and labelled either way, so the scores do not change.
        workers: rows (methods, the identity rows, each registration control) computed at once, each
            on one thread (:mod:`medssl.evaluate.rows`: the same scores as one at a time; the
            ``seconds`` of a row are then those of a row sharing the machine); ``"auto"``: as many as
            the caller's torch threads, 1 with a model on a GPU (:func:`medssl.evaluate.rows.resolve_workers`).
        dense_kwargs: passed to :func:`medssl.evaluate.dense.dense_embeddings` (``cache_dir``,
            ``batch_size``, ``precision``, ``progress``, ``checkpoint`` is not accepted here).

    Returns:
        A :class:`KnnSegmentationResult`.
    """
    import time

    check_disjoint(atlases, queries)
    pool = [str(v.case_id) for v in atlases]
    draws = atlas_draws(pool, n_atlases, n_draws, seed)
    surface_ns = set(surface_n_atlases) if surface_n_atlases is not None else {max(int(n) for n in n_atlases)}
    codes = {str(v.case_id): _codes_of(v, organs) for v in [*atlases, *queries]}
    store: dict[tuple[str, str], DenseEmbedding] = {} if dense is None else dense
    seconds: dict[str, float] = {}
    frames = []
    say = log or (lambda msg: None)

    def _dense(name: str, vol: Volume, body_only: bool = True) -> DenseEmbedding:
        key = (name, str(vol.case_id))
        if key not in store:
            store[key] = dense_embeddings(methods[name], vol, stride_vox=stride_vox, foreground_only=body_only,
                                          **dense_kwargs)
        return store[key]

    def _score(name: str, kind: str, kk: int, draw: AtlasDraw, query: Volume, grid_fractions: np.ndarray,
               qdense: DenseEmbedding) -> pd.DataFrame:
        pred = labels_on_image(qdense, grid_fractions)
        tol = surface_tolerance_mm if draw.n in surface_ns else None
        with warnings.catch_warnings(), _one_thread():
            warnings.simplefilter("ignore", FutureWarning)  # MONAI's surface-distance internals
            s = segmentation_scores(pred, codes[str(query.case_id)], organs.names, query.spacing_mm, tol)
        return s.assign(method=name, kind=kind, k=kk, n_atlases=draw.n, draw=draw.draw,
                        atlases=" ".join(draw.atlases), query=str(query.case_id), split=split)

    def _method_row(name: str) -> tuple[list[pd.DataFrame], dict[str, float]]:
        t0 = time.perf_counter()
        model, out = methods[name], []
        kind = (kinds or {}).get(name) or row_kind(name, model)
        ks = _k_values(k, name)
        atlas_dense = [_dense(name, v) for v in atlases]
        for query in queries:
            qd = _dense(name, query, body_only=not query_full_grid)
            neigh = atlas_neighbours(qd, atlas_dense, [codes[a] for a in pool], max(ks), backend)
            for draw in draws:
                subset = [pool.index(a) for a in draw.atlases]
                for kk in ks:
                    frac = vote_fractions(neigh, subset, kk, organs.n_classes)
                    out.append(_score(name, kind, kk, draw, query, _to_grid(qd, frac, neigh.query_index), qd))
            say(f"{name}: {query.case_id} labelled from {len(draws)} atlas draws")
        return out, {name: time.perf_counter() - t0}

    def _identity_row() -> tuple[list[pd.DataFrame], dict[str, float]]:
        secs: dict[str, float] = {}
        return _identity_rows(atlases, queries, codes, draws, organs, stride_vox, kinds, _score, secs), secs

    def _registrar_row(registrar: Any) -> tuple[list[pd.DataFrame], dict[str, float]]:
        t0 = time.perf_counter()
        out = _registration_rows(registrar, atlases, queries, codes, draws, organs, stride_vox, kinds, _score,
                                 registration_vote)
        say(f"{registrar.name}: {len(queries)} queries x {len(pool)} atlases")
        return out, {registrar.name: time.perf_counter() - t0}

    from medssl.evaluate.rows import map_rows, resolve_workers

    jobs: list[Callable[[], tuple[list[pd.DataFrame], dict[str, float]]]] = [
        *[functools.partial(_method_row, name) for name in methods],
        *([_identity_row] if baselines else []),
        *[functools.partial(_registrar_row, r) for r in registrars],
    ]  # in the table's row order
    n_workers = resolve_workers(workers, len(jobs), list(methods.values()))
    for out, secs in map_rows(lambda job: job(), jobs, n_workers):
        frames += out
        seconds.update(secs)
    notes: dict[str, str] = {}
    for registrar in registrars:
        used = [(a, str(q.case_id)) for q in queries for a in pool]
        notes[registrar.name] = f"multi-atlas ({registration_vote} label vote); {registrar.note(used)}"
    scores = pd.concat(frames, ignore_index=True)
    order = ["method", "kind", "k", "n_atlases", "draw", "atlases", "query", "organ", "dice"]
    order += [c for c in ("nsd",) if c in scores] + ["true_voxels", "pred_voxels", "fp_ml", "split"]
    return KnnSegmentationResult(scores=scores[order], organs=organs.names, split=split, seconds=seconds, notes=notes)


def choose_atlas_pool(train: Sequence[Volume], size: int, seed: int = 0) -> list[Volume]:
    """``size`` labelled training subjects (seeded) that every atlas draw comes from."""
    labelled = [v for v in train if v.label is not None]
    if not 1 <= size <= len(labelled):
        raise ValueError(f"an atlas pool of {size} needs that many labelled training subjects; there are {len(labelled)}")
    order = np.random.default_rng([int(seed), 5]).permutation(len(labelled))
    return [labelled[i] for i in sorted(order[:size])]


def predict_labels(model: Any, atlases: Sequence[Volume], query: Volume, organs: OrganSet, k: int = 21,
                   stride_vox: int = 4, dense: dict[tuple[str, str], DenseEmbedding] | None = None, name: str = "",
                   backend: str = "exact", **dense_kwargs: Any) -> np.ndarray:
    """``(X, Y, Z)`` organ codes of ``query`` by kNN transfer from all ``atlases`` (for figures)."""
    check_disjoint(atlases, [query])
    store = {} if dense is None else dense

    def _dense(vol: Volume) -> DenseEmbedding:
        key = (name, str(vol.case_id))
        if key not in store:
            store[key] = dense_embeddings(model, vol, stride_vox=stride_vox, foreground_only=True, **dense_kwargs)
        return store[key]

    qd = _dense(query)
    neigh = atlas_neighbours(qd, [_dense(v) for v in atlases], [_codes_of(v, organs) for v in atlases], k, backend)
    frac = vote_fractions(neigh, range(len(atlases)), k, organs.n_classes)
    return labels_on_image(qd, _to_grid(qd, frac, neigh.query_index))


def _identity_rows(atlases, queries, codes, draws, organs, stride_vox, kinds, score, seconds) -> list[pd.DataFrame]:
    import time

    t0 = time.perf_counter()
    pool = [str(v.case_id) for v in atlases]
    by_id = {str(v.case_id): v for v in atlases}
    atlas_body = {a: body_points_mm(by_id[a], stride_vox) for a in pool}
    frames = []
    for query in queries:
        grid = _label_grid(query, stride_vox)
        q_body = body_points_mm(query, stride_vox)
        for name, aligned in ((IDENTITY, False), (ALIGNED_IDENTITY, True)):
            kind = (kinds or {}).get(name) or row_kind(name)
            for draw in draws:
                vols = [by_id[a] for a in draw.atlases]
                frac = identity_fractions(grid, vols, [codes[a] for a in draw.atlases], aligned=aligned,
                                          query_body_mm=q_body, atlas_body_mm=[atlas_body[a] for a in draw.atlases],
                                          n_classes=organs.n_classes)
                frames.append(score(name, kind, 0, draw, query, frac, grid))
    seconds[IDENTITY] = time.perf_counter() - t0
    return frames


def _registration_rows(registrar, atlases, queries, codes, draws, organs, stride_vox, kinds, score,
                       vote) -> list[pd.DataFrame]:
    pool = [str(v.case_id) for v in atlases]
    by_id = {str(v.case_id): v for v in atlases}
    name = registrar.name
    kind = (kinds or {}).get(name) or row_kind(name)
    frames = []
    for query in queries:
        grid = _label_grid(query, stride_vox)
        maps = [(lambda pts, q=query, a=by_id[a]: registrar.map_points(q, a, pts)) for a in pool]
        per_atlas = transferred_fractions(grid, [by_id[a] for a in pool], [codes[a] for a in pool], maps,
                                          organs.n_classes, vote)
        idx = np.flatnonzero(grid.flat_foreground)
        for draw in draws:
            subset = [pool.index(a) for a in draw.atlases]
            frames.append(score(name, kind, 0, draw, query, _to_grid(grid, per_atlas[:, subset].mean(axis=1), idx),
                                grid))
    return frames


def _label_grid(volume: Volume, stride_vox: int) -> DenseEmbedding:
    """The dense grid geometry of ``volume`` with no descriptors (for the identity rows): a 1-voxel patch."""
    from medssl.evaluate.dense import dense_grid

    anchors, centres = dense_grid(volume.shape_vox, stride_vox, 1)
    mesh = np.stack(np.meshgrid(*centres, indexing="ij"), axis=-1)
    affine = np.asarray(volume.affine, dtype=np.float64)
    fg = foreground_mask(volume)[np.ix_(*anchors)]
    grid_to_vox = np.eye(4)
    grid_to_vox[:3, :3] = np.diag([stride_vox] * 3)
    grid_to_vox[:3, 3] = [c[0] for c in centres]
    return DenseEmbedding(embeddings=np.zeros((*mesh.shape[:3], 1), np.float32), centres_vox=mesh,
                          centres_mm=vox_to_world(affine, mesh.reshape(-1, 3)).reshape(mesh.shape),
                          grid_affine=affine @ grid_to_vox, image_affine=affine, image_shape_vox=volume.shape_vox,
                          stride_vox=(stride_vox,) * 3, patch_size_vox=(1, 1, 1), foreground=fg,
                          case_id=str(volume.case_id))


def _codes_of(volume: Volume, organs: OrganSet) -> np.ndarray:
    if volume.label is None:
        raise ValueError(f"{volume.source or volume.case_id}: kNN segmentation needs a label map for every atlas "
                         "and query subject")
    return organs.encode(np.asarray(volume.label))


def _k_values(k: int | Sequence[int] | Mapping[str, Any], name: str) -> list[int]:
    v = k.get(name, 21) if isinstance(k, Mapping) else k
    ks = [int(v)] if isinstance(v, (int, np.integer)) else [int(x) for x in v]
    if not ks or min(ks) < 1:
        raise ValueError(f"k must be positive integers, got {v!r} for {name}")
    return ks
