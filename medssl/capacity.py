"""Capacity of an embedding: effective rank (RankMe), the share of used dimensions, and collapse.

The ISImed paper notes that plain ISImed may collapse into a few informative dimensions
and that regISImed counters it; these numbers show whether that happens. The SimSiam
collapse coefficient (:func:`collapse_coefficient`) is logged by methods every training
step, by the training loop on its validation patches and by the evaluations, so it lives in this
base module (numpy and torch only) that methods, ``train`` and ``evaluate`` can all import.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["effective_rank", "dim_variance_fraction", "collapse_coefficient"]

# RankMe adds a small epsilon to the normalised singular values before the log
# (Garrido et al., 2023, eq. 1) so that zero singular values contribute 0, not NaN.
_RANKME_EPS = 1e-7


def _as_matrix(z: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(z, torch.Tensor):
        z = z.detach().to("cpu", torch.float64).numpy()
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < 1 or z.shape[1] < 1:
        raise ValueError(f"embeddings must have shape (N, D) with N, D >= 1, got {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("embeddings contain NaN or Inf")
    return z


def effective_rank(z: np.ndarray | torch.Tensor, centre: bool = False) -> float:
    """RankMe effective rank of an embedding matrix.

    RankMe (Garrido et al., ICML 2023): ``exp(-sum_k p_k log p_k)`` with
    ``p_k = sigma_k / ||sigma||_1 + eps`` over the singular values ``sigma`` of ``z``.
    It lies in ``[1, min(N, D)]`` (up to eps): 1 when all embeddings lie on one line
    through the origin, ``min(N, D)`` when all singular values are equal.

    We follow RankMe and do NOT centre by default: RankMe is defined on the raw
    embedding matrix, so a constant offset counts as one direction. Pass
    ``centre=True`` to measure the rank of the spread around the mean instead (a fully
    collapsed, constant embedding then has rank 0).

    Args:
        z: ``(N, D)`` embeddings.
        centre: subtract the per-dimension mean first.

    Returns:
        The effective rank as a float. An all-zero matrix returns 0.0.
    """
    m = _as_matrix(z)
    if centre:
        m = m - m.mean(axis=0, keepdims=True)
    sigma = np.linalg.svd(m, compute_uv=False)
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma / total + _RANKME_EPS
    return float(np.exp(-np.sum(p * np.log(p))))


def dim_variance_fraction(z: np.ndarray | torch.Tensor, rel_threshold: float = 1e-3) -> float:
    """Fraction of embedding dimensions whose variance is not negligible.

    A dimension counts as used when its variance over the ``N`` embeddings exceeds
    ``rel_threshold`` times the largest per-dimension variance (relative, so the
    answer does not depend on the embedding's scale).

    Args:
        z: ``(N, D)`` embeddings.
        rel_threshold: variance threshold relative to the largest per-dimension variance.

    Returns:
        A float in ``[0, 1]``; 0.0 when every dimension is constant.
    """
    if not rel_threshold >= 0:
        raise ValueError(f"rel_threshold must be >= 0, got {rel_threshold}")
    m = _as_matrix(z)
    var = m.var(axis=0)
    top = var.max()
    if top <= 0:
        return 0.0
    return float(np.mean(var > rel_threshold * top))


def collapse_coefficient(z: np.ndarray | torch.Tensor) -> float:
    """SimSiam-style collapse coefficient ``max(0, 1 - sqrt(d) * s)`` of ``z (N, d)``.

    ``s`` is the mean over channels of the per-channel std of the l2-normalised outputs
    (Chen & He, SimSiam, sec. 4.1: ``s -> 1/sqrt(d)`` for outputs spread over the sphere, ``0``
    when collapsed; the thesis's eq. 4.3). 0 = no collapse, 1 = complete collapse (a constant
    output). The thesis measures it on the predictor output p, the SimSiam paper on the
    projection z. A BatchNorm standardises every channel over the batch, so after one the
    coefficient cannot see a collapse that happened before it (SimSiam's z after its final
    BatchNorm read 0.015 for a rank-1 backbone); :class:`medssl.methods.simsiam.SimSiam` logs it
    on the backbone output, on p, and on z before the final BatchNorm on validation only.
    Population std (``ddof=0``), in float64.
    """
    e = _as_matrix(z)
    if e.shape[0] < 2:
        raise ValueError(f"collapse_coefficient needs N >= 2 rows, got shape {e.shape}")
    unit = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    s = float(unit.std(axis=0).mean())
    return max(0.0, 1.0 - float(np.sqrt(e.shape[1])) * s)
