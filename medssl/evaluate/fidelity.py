"""Distance fidelity: do latent distances equal physical distances? (ISImed Fig. 1)

For random pairs of patches *within one volume* (world frames of different patients
are not shared unless registered), compare

- ``D_physical``: distance of the patch centres in mm (from each volume's affine), and
- ``D_latent``: Euclidean distance of the embeddings, times the method's scale in mm
  per latent unit where the method has a "metric latent" (ISImed-type losses).

Reported: the median and 90th percentile of ``|D_latent - D_physical|`` in mm, Spearman
and Pearson correlations, and a histogram. For methods without a metric latent
(SimCLR, BarlowTwins, random init) raw latent units are not mm, so the absolute error
is not reported; instead the best affine fit ``D_phys ~= a * D_lat + b`` (least squares)
and the residuals after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn

from medssl.evaluate.embed import embed_patches, frozen
from medssl.evaluate.patchsets import PatchSet
from medssl.sampling.sets import within_volume_pairs

__all__ = [
    "FidelityResult",
    "distance_fidelity",
    "method_fidelity",
    "within_volume_pairs",
    "fidelity_table",
    "metric_latent",
]

DEFAULT_BINS_MM = np.arange(0.0, 205.0, 5.0)


@dataclass
class FidelityResult:
    """Pair distances and their summary.

    Attributes:
        latent_mm: ``(P,)`` latent distances (times ``scale_mm`` when given; raw units otherwise).
        physical_mm: ``(P,)`` physical distances in mm.
        scale_mm: mm per latent unit, or None (no metric latent).
        summary: scalars, see :func:`distance_fidelity`.
    """

    latent_mm: np.ndarray
    physical_mm: np.ndarray
    scale_mm: float | None
    summary: dict[str, float] = field(default_factory=dict)

    @property
    def abs_error_mm(self) -> np.ndarray:
        """``|D_latent - D_physical|`` per pair (``(P,)``); NaN without a metric latent."""
        if self.scale_mm is None:
            return np.full_like(self.physical_mm, np.nan)
        return np.abs(self.latent_mm - self.physical_mm)

    @property
    def affine_residual_mm(self) -> np.ndarray:
        """``|a * D_latent + b - D_physical|`` per pair after the least-squares affine fit."""
        a, b = self.summary["affine_a"], self.summary["affine_b"]
        return np.abs(a * self.latent_mm + b - self.physical_mm)

    def histogram(self, bins_mm: np.ndarray = DEFAULT_BINS_MM, residual: str = "auto") -> tuple[np.ndarray, np.ndarray]:
        """Counts and bin edges of the absolute error (``residual="abs"``) or the affine-fit residual ("affine").

        ``"auto"`` uses the absolute error for metric latents and the affine residual otherwise.
        Values beyond the last edge are counted in the last bin.
        """
        kind = ("abs" if self.scale_mm is not None else "affine") if residual == "auto" else residual
        values = self.abs_error_mm if kind == "abs" else self.affine_residual_mm
        edges = np.asarray(bins_mm, dtype=np.float64)
        counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
        return counts, edges

    def as_row(self) -> dict[str, float]:
        return dict(self.summary)


def distance_fidelity(
    emb: np.ndarray,
    centres_mm: np.ndarray,
    case_ids: np.ndarray,
    *,
    scale_mm: float | None = None,
    pairs: np.ndarray | None = None,
    n_pairs: int | None = 20000,
    seed: int = 0,
) -> FidelityResult:
    """Latent versus physical pair distances within volumes.

    Args:
        emb: ``(N, D)`` embeddings.
        centres_mm: ``(N, 3)`` world mm patch centres.
        case_ids: ``(N,)`` case of each patch; pairs never cross cases.
        scale_mm: mm per latent unit for a metric latent (e.g. ISImed's
            ``latent_distance_scale_mm``), or None for methods without one.
        pairs: ``(P, 2)`` explicit pairs (e.g. ``PatchSet.pairs``); they must be within a case.
        n_pairs: how many within-case pairs to draw when ``pairs`` is None (None = all).
        seed: pair draw seed.

    Returns:
        :class:`FidelityResult` whose ``summary`` holds ``n_pairs``, ``metric_latent``
        (1.0/0.0), ``scale_mm``, ``abs_err_median_mm``, ``abs_err_p90_mm``, ``abs_err_mean_mm``
        (NaN without a metric latent), ``spearman``, ``pearson``, ``affine_a``, ``affine_b``,
        ``affine_resid_median_mm``, ``affine_resid_p90_mm``.
    """
    emb = np.asarray(emb, dtype=np.float64)
    centres_mm = np.asarray(centres_mm, dtype=np.float64)
    case_ids = np.asarray(case_ids).astype(str)
    n = emb.shape[0]
    if emb.ndim != 2 or centres_mm.shape != (n, 3) or case_ids.shape != (n,):
        raise ValueError(
            "expected emb (N, D), centres_mm (N, 3), case_ids (N,); "
            f"got {emb.shape}, {centres_mm.shape}, {case_ids.shape}"
        )
    if scale_mm is not None and not (np.isfinite(scale_mm) and scale_mm > 0):
        raise ValueError(f"scale_mm must be a positive number of mm per latent unit, got {scale_mm}")
    if pairs is None:
        pairs = within_volume_pairs(case_ids, n_pairs, seed)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if np.any(case_ids[pairs[:, 0]] != case_ids[pairs[:, 1]]):
        raise ValueError("distance fidelity pairs must lie within one case (world frames differ between subjects)")
    i, j = pairs[:, 0], pairs[:, 1]
    physical = np.linalg.norm(centres_mm[i] - centres_mm[j], axis=1)
    latent = np.linalg.norm(emb[i] - emb[j], axis=1) * (1.0 if scale_mm is None else float(scale_mm))
    scale = None if scale_mm is None else float(scale_mm)
    result = FidelityResult(latent_mm=latent, physical_mm=physical, scale_mm=scale)
    result.summary = _summary(latent, physical, scale_mm)
    return result


def _summary(latent: np.ndarray, physical: np.ndarray, scale_mm: float | None) -> dict[str, float]:
    s: dict[str, float] = {"n_pairs": float(len(latent)), "metric_latent": float(scale_mm is not None)}
    s["scale_mm"] = float("nan") if scale_mm is None else float(scale_mm)
    if scale_mm is not None:
        err = np.abs(latent - physical)
        s.update(abs_err_median_mm=float(np.median(err)), abs_err_p90_mm=float(np.percentile(err, 90)),
                 abs_err_mean_mm=float(err.mean()))
    else:
        s.update(abs_err_median_mm=np.nan, abs_err_p90_mm=np.nan, abs_err_mean_mm=np.nan)
    constant = np.ptp(latent) == 0 or np.ptp(physical) == 0
    s["spearman"] = float("nan") if constant else float(stats.spearmanr(latent, physical).statistic)
    s["pearson"] = float("nan") if constant else float(stats.pearsonr(latent, physical).statistic)
    if np.ptp(latent) == 0:
        a, b = 0.0, float(physical.mean())  # a constant latent explains nothing: best fit is the mean
    else:
        a, b = (float(v) for v in np.polyfit(latent, physical, 1))
    resid = np.abs(a * latent + b - physical)
    s.update(affine_a=a, affine_b=b, affine_resid_median_mm=float(np.median(resid)),
             affine_resid_p90_mm=float(np.percentile(resid, 90)))
    return s


def fidelity_table(results: Mapping[str, FidelityResult]) -> pd.DataFrame:
    """One row per method: ``method`` plus every summary column."""
    return pd.DataFrame([{"method": name, **r.as_row()} for name, r in results.items()])


def metric_latent(method: nn.Module, emb: np.ndarray) -> tuple[np.ndarray, float | None]:
    """The method's metric latent for ``emb`` (``(N, D)`` from ``method.embed``) and its mm per unit.

    Asks the method (:meth:`medssl.methods.base.Method.metric_latent`): ISImed's embedding
    itself, regISImed's ISImed head applied to it; ``(emb, None)`` for methods without one,
    for modules that are not Methods, and for the random-init baseline.
    """
    ask = getattr(method, "metric_latent", None)
    if not callable(ask) or getattr(method, "random_init", False):
        return emb, None  # untrained weights have no metric latent, whatever the class says
    with frozen(method):
        out = ask(torch.as_tensor(np.asarray(emb, dtype=np.float32)))
    if out is None:
        return emb, None
    latent, scale_mm = out
    return latent.float().cpu().numpy(), float(scale_mm)


def method_fidelity(
    method: nn.Module,
    patch_set: PatchSet,
    n_pairs: int | None = 20000,
    seed: int = 0,
    embeddings: np.ndarray | None = None,
    **embed_kw,
) -> FidelityResult:
    """Distance fidelity of a method on a patch set, in one call (e.g. the pretraining notebook's summary).

    Embeds ``patch_set`` frozen (:func:`medssl.evaluate.embed.embed_patches`) unless
    ``embeddings`` ``(N, D)`` are given, maps them to the method's metric latent with its
    scale (:func:`metric_latent`), and uses ``patch_set.pairs`` when the set has them
    (:func:`medssl.evaluate.patchsets.draw_pair_set`), else ``n_pairs`` random within-case pairs.
    """
    emb = embed_patches(method, patch_set, **embed_kw) if embeddings is None else embeddings
    z, scale_mm = metric_latent(method, emb)
    return distance_fidelity(z, patch_set.centres_mm, patch_set.case_ids, scale_mm=scale_mm,
                             pairs=patch_set.pairs, n_pairs=n_pairs, seed=seed)
