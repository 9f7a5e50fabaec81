"""NT-Xent, the SimCLR contrastive loss (Chen et al., ICML 2020, eq. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medssl.distributed import gather_with_grad

__all__ = ["NTXentLoss"]


class NTXentLoss(nn.Module):
    """Normalised temperature-scaled cross-entropy over 2N views.

    The two views are stacked into 2N embeddings and L2-normalised; for each one the
    positive is the other view of the same sample and the 2N - 2 remaining embeddings
    are negatives. Its loss is cross-entropy over the 2N - 1 others of the cosine
    similarities divided by ``temperature``; the result is the mean over all 2N.
    ``temperature = 0.05`` is the ISImed paper's value (found by random search).

    Under DDP both views are gathered from all ranks, so negatives span the global batch.

    Inputs: ``z_a, z_b (N, D)``. Output: scalar.
    """

    def __init__(self, temperature: float = 0.05) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        if z_a.ndim != 2 or z_a.shape != z_b.shape:
            raise ValueError(f"z_a and z_b must both be (N, D), got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
        z_a, z_b = gather_with_grad(z_a), gather_with_grad(z_b)
        n = z_a.shape[0]
        with torch.autocast(device_type=z_a.device.type, enabled=False):
            z = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)  # (2N, D)
            logits = z @ z.T / self.temperature  # (2N, 2N)
            # excluding self-similarity leaves the 2N - 1 others in each row
            logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
            target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
            return F.cross_entropy(logits, target)
