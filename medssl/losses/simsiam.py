"""SimSiam's symmetric negative-cosine loss with stop-gradient (Chen & He, CVPR 2021, eq. 1-4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SimSiamLoss", "negative_cosine"]


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``D(p, z) = -mean_i <p_i / ||p_i||, z_i / ||z_i||>`` over the rows of ``p, z (N, D)``; ``z`` is detached.

    The stop-gradient sits here, on the target, because SimSiam needs it everywhere this
    distance is used: without it the two branches can agree by collapsing (SimSiam sec. 4.1).
    """
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


class SimSiamLoss(nn.Module):
    """``L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2`` (thesis eq. 4.1).

    ``p1, p2``: predictor outputs of the two views, ``z1, z2``: projector outputs, all ``(N, D)``.
    Gradients reach the projector only through the predictor (``sg`` = stop-gradient). The value
    lies in ``[-1, 1]``; -1 when every prediction points exactly at the other view's projection.
    Per-sample, so no cross-rank gathering is needed under DDP. Computed in float32.
    """

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        shapes = {tuple(t.shape) for t in (p1, p2, z1, z2)}
        if len(shapes) != 1 or p1.ndim != 2:
            raise ValueError(f"p1, p2, z1, z2 must all be (N, D), got {[tuple(t.shape) for t in (p1, p2, z1, z2)]}")
        with torch.autocast(device_type=p1.device.type, enabled=False):
            return 0.5 * negative_cosine(p1.float(), z2.float()) + 0.5 * negative_cosine(p2.float(), z1.float())
