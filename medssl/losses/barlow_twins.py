"""Barlow Twins loss (Zbontar et al., ICML 2021, eq. 1)."""

from __future__ import annotations

import torch
from torch import nn

from medssl.distributed import gather_with_grad

__all__ = ["BarlowTwinsLoss"]


class BarlowTwinsLoss(nn.Module):
    """Redundancy reduction between the embeddings of two views.

    Each embedding dimension is standardised over the (global) batch, like the paper's
    non-affine BatchNorm (biased variance, ``eps`` inside the square root), then
    ``C = z_a^T z_b / N`` and::

        loss = sum_i (1 - C_ii)^2 + lambda_offdiag * sum_{i != j} C_ij^2

    This is the standard form. The ISImed authors' code additionally divided by the
    embedding size; we do not, so ``lambda_offdiag = 5e-3`` means what it means in the
    Barlow Twins paper (and regISImed's lambda = 1e3 applies to this standard value).

    Under DDP both views are gathered from all ranks, so ``C`` is the global-batch
    cross-correlation.

    Inputs: ``z_a, z_b (N, D)`` with ``N >= 2``. Output: scalar.
    """

    def __init__(self, lambda_offdiag: float = 5e-3, eps: float = 1e-5) -> None:
        super().__init__()
        if lambda_offdiag < 0:
            raise ValueError(f"lambda_offdiag must be >= 0, got {lambda_offdiag}")
        self.lambda_offdiag = float(lambda_offdiag)
        self.eps = float(eps)

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        if z_a.ndim != 2 or z_a.shape != z_b.shape:
            raise ValueError(f"z_a and z_b must both be (N, D), got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
        z_a, z_b = gather_with_grad(z_a), gather_with_grad(z_b)
        if z_a.shape[0] < 2:
            raise ValueError(f"BarlowTwinsLoss needs a batch of at least 2, got {z_a.shape[0]}")
        with torch.autocast(device_type=z_a.device.type, enabled=False):
            a, b = self._standardise(z_a.float()), self._standardise(z_b.float())
            c = a.T @ b / a.shape[0]  # (D, D)
            on_diag = (1.0 - torch.diagonal(c)).pow(2).sum()
            off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
            return on_diag + self.lambda_offdiag * off_diag

    def _standardise(self, z: torch.Tensor) -> torch.Tensor:
        mean = z.mean(dim=0, keepdim=True)
        var = z.var(dim=0, unbiased=False, keepdim=True)
        return (z - mean) / torch.sqrt(var + self.eps)
