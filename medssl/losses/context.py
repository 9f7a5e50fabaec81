"""Context-prediction losses (Blendowski, Nickisch, Heinrich, MICCAI 2019, sec. 2.1).

- :class:`OffsetL1Loss` (Reg2D): L1 between predicted and true in-plane offsets ``(Delta1, Delta2)``.
- :func:`heatmap_target` and :class:`HeatmapMSELoss` (Heatmap): the paper's target
  ``10 * exp(-15 * ((i/9 - Delta1)^2 + (j/9 - Delta2)^2))`` on ``(i, j) in {-9, ..., 9}^2`` and MSE;
  :func:`heatmap_offsets` reads an offset back from a heatmap (for the validation error).
- :class:`NeighbourCrossEntropy` (3D Doersch): cross-entropy over the 6 face neighbours.

Offsets are in the sampler's unit (patch half-widths, :mod:`medssl.sampling.context`). The paper's
formula is in its image units, where ``i/9`` runs over ``[-1, 1]`` and one image unit is 2.5 patch
half-widths (its patch side is 0.8): the heatmap grid spans ``+-2.5`` half-widths
(:data:`HEATMAP_EXTENT_HW`), and offsets are divided by that extent before they enter the formula, so
the target is the paper's at every pixel. Row ``i`` (tensor axis -2) runs along ``Delta1``, column ``j``
along ``Delta2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HEATMAP_EXTENT_HW", "HEATMAP_SIZE", "HeatmapMSELoss", "NeighbourCrossEntropy", "OffsetL1Loss",
           "heatmap_offsets", "heatmap_target"]

HEATMAP_SIZE = 19  # (i, j) in {-9, ..., +9}
HEATMAP_AMPLITUDE = 10.0
HEATMAP_SHARPNESS = 15.0
# The grid's half-extent in patch half-widths: the paper's image axis [-1, 1] over its patch half-width 0.4.
HEATMAP_EXTENT_HW = 2.5


def _check_offsets(offsets: torch.Tensor, name: str = "offsets") -> None:
    if offsets.ndim != 2 or offsets.shape[1] != 2:
        raise ValueError(f"{name} must have shape (B, 2) as (Delta1, Delta2), got {tuple(offsets.shape)}")


def heatmap_target(offsets: torch.Tensor, size: int = HEATMAP_SIZE, amplitude: float = HEATMAP_AMPLITUDE,
                   sharpness: float = HEATMAP_SHARPNESS, extent_hw: float = HEATMAP_EXTENT_HW) -> torch.Tensor:
    """``(B, size, size)``: ``amplitude * exp(-sharpness * ((i/r - Delta1/E)^2 + (j/r - Delta2/E)^2))``.

    ``offsets``: ``(B, 2)`` in half-widths; ``r = (size - 1) / 2``; ``E = extent_hw``, the half-widths at the
    grid's border (the paper's ``i/9 = 1``), so ``Delta / E`` is the offset in the paper's image units. Row
    ``i`` and column ``j`` run over ``-r .. r``: the peak of ``(Delta1, Delta2)`` sits at row ``r + r Delta1 / E``,
    column ``r + r Delta2 / E``.
    """
    _check_offsets(offsets)
    if size < 3 or size % 2 == 0:
        raise ValueError(f"heatmap size must be odd and >= 3, got {size}")
    if not extent_hw > 0:
        raise ValueError(f"extent_hw must be > 0, got {extent_hw}")
    r = (size - 1) // 2
    grid = torch.arange(-r, r + 1, device=offsets.device, dtype=torch.float32) / r  # i / 9, image units
    off = offsets.float() / float(extent_hw)  # image units
    d1 = (grid[None, :, None] - off[:, 0, None, None]) ** 2  # (B, size, 1)
    d2 = (grid[None, None, :] - off[:, 1, None, None]) ** 2  # (B, 1, size)
    return amplitude * torch.exp(-sharpness * (d1 + d2))


def _peak_shift(left: torch.Tensor, centre: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Sub-pixel shift of a maximum from its neighbours: the vertex of the parabola through the three values'
    logarithms (exact for a Gaussian bump such as the target), or through the values where one is <= 0."""
    positive = (left > 0) & (centre > 0) & (right > 0)
    tiny = torch.finfo(centre.dtype).tiny
    l, c, r = (torch.where(positive, v.clamp_min(tiny).log(), v) for v in (left, centre, right))
    curvature = l - 2 * c + r
    shift = torch.where(curvature < 0, (l - r) / (2 * curvature.clamp_max(-1e-12)), torch.zeros_like(c))
    return shift.clamp(-0.5, 0.5)


def heatmap_offsets(heatmaps: torch.Tensor, extent_hw: float = HEATMAP_EXTENT_HW) -> torch.Tensor:
    """``(B, 2)`` offsets in half-widths read from ``(B, S, S)`` heatmaps spanning ``+-extent_hw``: the peak
    pixel, refined to sub-pixel precision.

    Along each axis the peak moves to the vertex of the parabola through the logarithms of the peak and
    its two neighbours, which is exact for the Gaussian target; the argmax alone would round offsets to
    ``extent_hw / 9`` half-widths. At the border of the map the peak pixel is kept.
    """
    if heatmaps.ndim != 3 or heatmaps.shape[1] != heatmaps.shape[2]:
        raise ValueError(f"heatmaps must have shape (B, S, S), got {tuple(heatmaps.shape)}")
    h = heatmaps.detach().float()
    B, S, _ = h.shape
    r = (S - 1) / 2
    peak = h.flatten(1).argmax(1)
    rows, cols = peak // S, peak % S
    b = torch.arange(B, device=h.device)
    centre = h[b, rows, cols]
    inner_r, inner_c = (rows > 0) & (rows < S - 1), (cols > 0) & (cols < S - 1)
    up, down = h[b, (rows - 1).clamp_min(0), cols], h[b, (rows + 1).clamp_max(S - 1), cols]
    left, right = h[b, rows, (cols - 1).clamp_min(0)], h[b, rows, (cols + 1).clamp_max(S - 1)]
    row = rows.float() + torch.where(inner_r, _peak_shift(up, centre, down), torch.zeros_like(centre))
    col = cols.float() + torch.where(inner_c, _peak_shift(left, centre, right), torch.zeros_like(centre))
    return torch.stack([(row - r) / r, (col - r) / r], dim=1) * float(extent_hw)


class OffsetL1Loss(nn.Module):
    """Reg2D: mean absolute error between predicted and true offsets, ``pred, target: (B, 2)``."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_offsets(pred, "pred")
        if target.shape != pred.shape:
            raise ValueError(f"target shape {tuple(target.shape)} differs from pred shape {tuple(pred.shape)}")
        return F.l1_loss(pred.float(), target.float())


class HeatmapMSELoss(nn.Module):
    """Heatmap: mean squared error between predicted heatmaps ``(B, S, S)`` and :func:`heatmap_target` of ``offsets (B, 2)``."""

    def __init__(self, amplitude: float = HEATMAP_AMPLITUDE, sharpness: float = HEATMAP_SHARPNESS,
                 extent_hw: float = HEATMAP_EXTENT_HW) -> None:
        super().__init__()
        self.amplitude, self.sharpness, self.extent_hw = float(amplitude), float(sharpness), float(extent_hw)

    def forward(self, pred: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if pred.ndim != 3 or pred.shape[1] != pred.shape[2] or pred.shape[0] != offsets.shape[0]:
            raise ValueError(f"pred must be (B, S, S) heatmaps for the B offsets, got {tuple(pred.shape)} for "
                             f"{tuple(offsets.shape)} offsets")
        target = heatmap_target(offsets, pred.shape[-1], self.amplitude, self.sharpness, self.extent_hw)
        return F.mse_loss(pred.float(), target)


class NeighbourCrossEntropy(nn.Module):
    """3D Doersch: cross-entropy of ``logits (B, 6)`` against the neighbour class ``labels (B,)`` in ``0 .. 5``."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or logits.shape[1] != 6 or labels.shape != logits.shape[:1]:
            raise ValueError(f"need logits (B, 6) and labels (B,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
        return F.cross_entropy(logits.float(), labels.long())
