"""The latent space against the physical axes (ISImed Fig. 2).

- :func:`pca_frame`, :func:`umap_frame`: low-dimensional views of patch embeddings as
  DataFrames, with the patch centres in mm alongside so figures can colour by x, y, z.
- :func:`decode_coordinates`: ridge regression embedding -> (x, y, z) mm. Protocol: alpha
  chosen by a grouped CV over the validation subjects, the ridge fit on them and scored once
  per test subject (``splits``); without splits, grouped cross-validation (alpha from an
  inner grouped CV on each train side). Features standardised on the fitting side only.
- :func:`pc_axis_correlation`: Pearson correlation of the top principal components with
  each axis.
- :func:`collapse_stats`: effective rank (RankMe) and the share of used dimensions.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medssl.capacity import collapse_coefficient, dim_variance_fraction, effective_rank

__all__ = [
    "z_slab_groups",
    "pca_frame",
    "umap_frame",
    "decode_coordinates",
    "pc_axis_correlation",
    "collapse_stats",
    "collapse_coefficient",
    "AXES",
]

AXES = ("x", "y", "z")
DEFAULT_ALPHAS = np.logspace(-3, 4, 15)


def _check_emb(emb: np.ndarray) -> np.ndarray:
    e = np.asarray(emb, dtype=np.float64)
    if e.ndim != 2 or e.shape[0] < 2:
        raise ValueError(f"embeddings must be (N, D) with N >= 2, got shape {e.shape}")
    if not np.all(np.isfinite(e)):
        raise ValueError("embeddings contain NaN or Inf")
    return e


def _attach(
    frame: pd.DataFrame, centres_mm: np.ndarray | None, case_ids: np.ndarray | None, index: np.ndarray
) -> pd.DataFrame:
    if centres_mm is not None:
        c = np.asarray(centres_mm, dtype=np.float64)[index]
        for k, ax in enumerate(AXES):
            frame[f"{ax}_mm"] = c[:, k]
    if case_ids is not None:
        frame["case_id"] = np.asarray(case_ids).astype(str)[index]
    return frame


def pca_frame(
    emb: np.ndarray, n: int = 3, centres_mm: np.ndarray | None = None, case_ids: np.ndarray | None = None
) -> pd.DataFrame:
    """First ``n`` principal components of ``emb (N, D)`` as columns ``PC1..PCn``.

    Also ``index`` (row of ``emb``) and, when given, ``x_mm, y_mm, z_mm`` and ``case_id``.
    ``frame.attrs["explained_variance_ratio"]`` lists each component's share of variance.
    """
    e = _check_emb(emb)
    k = min(n, *e.shape)
    pca = PCA(n_components=k, svd_solver="full").fit(e)
    z = pca.transform(e)
    frame = pd.DataFrame(z, columns=[f"PC{i + 1}" for i in range(k)])
    frame.insert(0, "index", np.arange(len(e)))
    frame.attrs["explained_variance_ratio"] = [float(v) for v in pca.explained_variance_ratio_]
    return _attach(frame, centres_mm, case_ids, np.arange(len(e)))


def umap_frame(
    emb: np.ndarray,
    n: int = 2,
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    max_points: int | None = None,
    centres_mm: np.ndarray | None = None,
    case_ids: np.ndarray | None = None,
) -> pd.DataFrame:
    """UMAP (McInnes et al. 2018, umap-learn) of ``emb (N, D)`` to ``n`` dimensions, columns ``UMAP1..``.

    ``max_points`` subsamples rows first (seeded); ``index`` holds the chosen rows. The
    first call in a process compiles umap's numba kernels (slow once); later calls are fast.
    Seeded runs are single-threaded and reproducible.
    """
    import umap  # slow import (numba); only when a UMAP is asked for

    e = _check_emb(emb)
    if n not in (2, 3):
        raise ValueError(f"umap_frame: n must be 2 or 3, got {n}")
    index = np.arange(len(e))
    if max_points is not None and len(e) > max_points:
        index = np.sort(np.random.default_rng(seed).choice(len(e), max_points, replace=False))
    sub = e[index]
    if len(sub) <= n + 1:
        raise ValueError(f"umap_frame needs more than {n + 1} points, got {len(sub)}")
    reducer = umap.UMAP(
        n_components=n, n_neighbors=min(n_neighbors, len(sub) - 1), min_dist=min_dist, random_state=seed, n_jobs=1
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs.*")
        warnings.filterwarnings("ignore", message=".*spectral initialisation.*")
        z = reducer.fit_transform(sub)
    frame = pd.DataFrame(z, columns=[f"UMAP{i + 1}" for i in range(n)])
    frame.insert(0, "index", index)
    return _attach(frame, centres_mm, case_ids, index)


def decode_coordinates(
    emb: np.ndarray,
    centres_mm: np.ndarray,
    groups: np.ndarray,
    n_splits: int = 5,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    inner_splits: int = 3,
    return_per_fold: bool = False,
    splits: np.ndarray | None = None,
    fit_split: str = "val",
    score_split: str = "test",
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Linear decoding of patch position from the embedding, on subjects held out from pretraining.

    With ``splits`` (``PatchSet.splits``) holding both ``fit_split`` and ``score_split``: a
    ``StandardScaler`` + ``RidgeCV`` pipeline is fit on the ``fit_split`` subjects, with
    ``alpha`` chosen by a grouped CV over them only, and scored on every ``score_split``
    subject separately (the units of the summary). Otherwise: ``GroupKFold`` folds, alpha
    chosen by an inner ``GroupKFold`` over each fold's train subjects (one alpha shared by
    the three axes; scikit-learn allows per-axis alphas only with leave-one-out, which
    would not be grouped).

    Args:
        emb: ``(N, D)``; centres_mm: ``(N, 3)`` targets in mm; groups: ``(N,)`` subject ids.

    Returns:
        DataFrame with rows ``x, y, z, xyz`` and columns ``r2``, ``r2_std`` (over units),
        ``error_mm``, ``error_mm_std``, ``n_folds`` (units). For ``x/y/z`` the error is the mean
        absolute error along the axis; for ``xyz`` the mean Euclidean error and ``r2`` the
        mean of the three axes. With ``return_per_fold`` also the per-unit table
        (``fold, n_test, r2_<axis>, error_mm_<axis>, alpha_<axis>``).
    """
    e = _check_emb(emb)
    y = np.asarray(centres_mm, dtype=np.float64)
    g = np.asarray(groups).astype(str)
    if y.shape != (len(e), 3) or g.shape != (len(e),):
        raise ValueError(f"centres_mm must be (N, 3) and groups (N,), got {y.shape} and {g.shape} for N = {len(e)}")
    sp = None if splits is None else np.asarray(splits).astype(str)
    if sp is not None and fit_split != score_split and np.any(sp == fit_split) and np.any(sp == score_split):
        per_fold = _decode_split(e, y, g, sp == fit_split, sp == score_split, alphas, inner_splits)
    else:
        per_fold = _decode_cv(e, y, g, n_splits, alphas, inner_splits)
    summary = _decoding_summary(per_fold)
    return (summary, per_fold) if return_per_fold else summary


def _ridge(e: np.ndarray, y: np.ndarray, g: np.ndarray, alphas, inner_splits: int):
    inner = _clamp_splits(inner_splits, len(np.unique(g)), "decode_coordinates (inner)", warn=False)
    folds = list(GroupKFold(n_splits=inner).split(e, y, g))
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.asarray(alphas), cv=folds))
    return model.fit(e, y)


def _decode_split(e, y, g, fit, score, alphas, inner_splits) -> pd.DataFrame:
    if set(g[fit]) & set(g[score]):
        raise ValueError("decode_coordinates: a subject is in both the fitting and the scoring split")
    model = _ridge(e[fit], y[fit], g[fit], alphas, inner_splits)
    rows = []
    for subject in sorted(np.unique(g[score])):
        sel = score & (g == subject)
        rows.append(_decoding_fold_row(subject, y[sel], model.predict(e[sel]), model[-1].alpha_))
    return pd.DataFrame(rows)


def _decode_cv(e, y, g, n_splits, alphas, inner_splits) -> pd.DataFrame:
    n_groups = len(np.unique(g))
    if n_groups < 3:
        # Too few subjects for grouped CV: hold out slabs along z within each subject instead, so no
        # patch is ever predicted by a model that saw its neighbourhood... but the subjects are shared.
        warnings.warn(f"decode_coordinates: {n_groups} subject(s): held out by z-slabs within each subject "
                      "(units are slabs, not subjects)")
        g = z_slab_groups(y, g)
        n_groups = len(np.unique(g))
    n_splits = _clamp_splits(n_splits, n_groups, "decode_coordinates")
    rows = []
    for fold, (tr, te) in enumerate(GroupKFold(n_splits=n_splits).split(e, y, g)):
        model = _ridge(e[tr], y[tr], g[tr], alphas, inner_splits)
        rows.append(_decoding_fold_row(fold, y[te], model.predict(e[te]), model[-1].alpha_))
    return pd.DataFrame(rows)


def z_slab_groups(centres_mm: np.ndarray, groups: np.ndarray, n_slabs: int = 5) -> np.ndarray:
    """``(N,)`` group ids ``"<subject>|slab<k>"``: each subject's patches cut into ``n_slabs`` bins along z (quantiles).

    The fallback unit of the grouped evaluations when a collection has fewer subjects
    than folds need: neighbouring patches (which overlap) stay on one side.
    """
    c = np.asarray(centres_mm, dtype=np.float64)
    g = np.asarray(groups).astype(str)
    out = np.empty(len(g), dtype=object)
    for subject in np.unique(g):
        sel = g == subject
        z = c[sel, 2]
        edges = np.quantile(z, np.linspace(0, 1, n_slabs + 1)[1:-1])
        out[sel] = [f"{subject}|slab{int(k)}" for k in np.searchsorted(edges, z, side="right")]
    return out.astype(str)


def _decoding_fold_row(fold, truth: np.ndarray, pred: np.ndarray, alpha: np.ndarray) -> dict:
    row: dict = {"fold": fold, "n_test": len(truth)}
    for k, ax in enumerate(AXES):
        ss_res = float(np.sum((truth[:, k] - pred[:, k]) ** 2))
        ss_tot = float(np.sum((truth[:, k] - truth[:, k].mean()) ** 2))
        row[f"r2_{ax}"] = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
        row[f"error_mm_{ax}"] = float(np.mean(np.abs(truth[:, k] - pred[:, k])))
        row[f"alpha_{ax}"] = float(np.atleast_1d(alpha)[min(k, np.size(alpha) - 1)])
    row["r2_xyz"] = float(np.mean([row[f"r2_{ax}"] for ax in AXES]))
    row["error_mm_xyz"] = float(np.mean(np.linalg.norm(truth - pred, axis=1)))
    return row


def _decoding_summary(per_fold: pd.DataFrame) -> pd.DataFrame:
    out = []
    for ax in (*AXES, "xyz"):
        out.append({
            "axis": ax,
            "r2": per_fold[f"r2_{ax}"].mean(),
            "r2_std": per_fold[f"r2_{ax}"].std(ddof=1) if len(per_fold) > 1 else float("nan"),
            "error_mm": per_fold[f"error_mm_{ax}"].mean(),
            "error_mm_std": per_fold[f"error_mm_{ax}"].std(ddof=1) if len(per_fold) > 1 else float("nan"),
            "n_folds": len(per_fold),
        })
    return pd.DataFrame(out)


def _clamp_splits(n_splits: int, n_groups: int, who: str, warn: bool = True) -> int:
    if n_splits < 2:
        raise ValueError(f"{who}: n_splits must be >= 2, got {n_splits}")
    if n_groups < 2:
        raise ValueError(f"{who}: grouped CV needs >= 2 subjects, got {n_groups}")
    if n_splits > n_groups:
        if warn:
            warnings.warn(
                f"{who}: {n_splits} folds requested but only {n_groups} subjects; "
                f"using {n_groups} (leave-one-subject-out)"
            )
        return n_groups
    return n_splits


def pc_axis_correlation(emb: np.ndarray, centres_mm: np.ndarray, n_components: int = 3) -> pd.DataFrame:
    """Pearson r of each top principal component with x, y, z in mm.

    Returns a DataFrame indexed ``PC1..PCk`` with columns ``x, y, z`` (signed; a PC's
    sign is arbitrary, so read ``|r|``) and ``explained_variance_ratio``.
    """
    frame = pca_frame(emb, n=n_components)
    c = np.asarray(centres_mm, dtype=np.float64)
    if c.shape != (len(frame), 3):
        raise ValueError(f"centres_mm must be (N, 3) with N = {len(frame)}, got {c.shape}")
    pcs = [col for col in frame.columns if col.startswith("PC")]
    table = pd.DataFrame(index=pcs, columns=list(AXES), dtype=float)
    for pc in pcs:
        for k, ax in enumerate(AXES):
            a, b = frame[pc].to_numpy(), c[:, k]
            table.loc[pc, ax] = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
    table["explained_variance_ratio"] = frame.attrs["explained_variance_ratio"]
    return table


def collapse_stats(emb: np.ndarray, rel_threshold: float = 1e-3) -> dict:
    """Capacity of an embedding ``(N, D)``.

    Returns ``effective_rank`` (RankMe, uncentred), ``effective_rank_centred``,
    ``collapse_coefficient`` (:func:`collapse_coefficient`),
    ``used_dim_fraction`` (dims with variance > ``rel_threshold`` x the largest),
    ``embed_dim``, ``total_variance`` and ``dim_variance`` (``(D,)`` per-dimension
    variance, sorted descending).
    """
    e = _check_emb(emb)
    var = np.sort(e.var(axis=0))[::-1]
    return {
        "effective_rank": effective_rank(e),
        "effective_rank_centred": effective_rank(e, centre=True),
        "collapse_coefficient": collapse_coefficient(e),
        "used_dim_fraction": dim_variance_fraction(e, rel_threshold=rel_threshold),
        "embed_dim": int(e.shape[1]),
        "total_variance": float(var.sum()),
        "dim_variance": var,
    }
