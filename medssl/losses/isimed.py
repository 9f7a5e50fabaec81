"""ISImed distance-regression loss (Jabareen, Yuan, Lukassen, arXiv 2410.16947, eq. 1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medssl.distributed import gather_with_grad

__all__ = ["IsimedDistanceLoss"]

# Above this many (pairs x dims) elements the pair differences would need too much
# memory (e.g. all 523,776 pairs of 1024 patches x 1024 dims = 2 GB), so distances
# come from the Gram matrix of the centred embeddings instead.
_DIRECT_MAX_ELEMENTS = 1 << 24


class IsimedDistanceLoss(nn.Module):
    """Regress latent pair distances onto physical pair distances in millimetres.

    For patches ``i < j`` (strict upper triangle; within the same volume by default)::

        loss = mean_ij  rho( s * ||e_i - e_j||  -  ||c_i - c_j||_mm )

    with ``rho`` the squared error ("mse", the paper) or Huber with ``huber_delta_mm``.
    The target is ``||e_i - e_j|| = d_ij / s``: one latent unit is ``s`` mm. The residual
    is taken in mm (``s * D_latent - D_mm``), so a learned ``s`` cannot shrink the loss
    by collapsing the target, and ``huber_delta_mm`` is a physical length.

    Scale choice: the default is ``scale="fixed", scale_mm=1.0`` -- raw millimetres, as
    the paper. Latent distances are then directly readable in mm and there is no extra
    parameter. The price is large loss values (distances of 10-300 mm give MSE values
    of 1e3-1e4 mm^2 at initialisation), which AdamW handles because its update size is
    invariant to the gradient scale; SGD would need a matching learning rate, and the
    size matters when weighting against another loss (regISImed's lambda). ``"learned"``
    makes ``log s`` a parameter initialised at ``log(scale_mm)``, so the network can
    keep small activations.

    Pairs: "within_volume" (default) uses only pairs from the same volume, because
    world coordinates of different patients only share a frame if they are registered.
    "all" uses every pair (registered cohorts); under DDP it gathers the batch from all
    ranks first. Within-volume pairs never cross ranks (each rank samples its own
    volumes), so that mode does not gather.

    Distances use ``sqrt(clamp(sq, eps))``: when two embeddings coincide the gradient
    is zero instead of NaN.

    Inputs: ``embeddings (N, D)``, ``centres_mm (N, 3)``, ``volume_index (N,)`` int.
    Output: scalar.
    """

    def __init__(
        self,
        loss: str = "mse",
        huber_delta_mm: float = 10.0,
        pairs: str = "within_volume",
        scale: str = "fixed",
        scale_mm: float = 1.0,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        if loss not in ("mse", "huber"):
            raise ValueError(f'loss must be "mse" or "huber", got {loss!r}')
        if pairs not in ("within_volume", "all"):
            raise ValueError(f'pairs must be "within_volume" or "all", got {pairs!r}')
        if scale not in ("fixed", "learned"):
            raise ValueError(f'scale must be "fixed" or "learned", got {scale!r}')
        if not (scale_mm > 0 and math.isfinite(scale_mm)):
            raise ValueError(f"scale_mm must be a positive finite number of mm, got {scale_mm}")
        if not huber_delta_mm > 0:
            raise ValueError(f"huber_delta_mm must be positive, got {huber_delta_mm}")
        self.loss = loss
        self.huber_delta_mm = float(huber_delta_mm)
        self.pairs = pairs
        self.scale = scale
        self.eps = float(eps)
        log_s = torch.tensor(math.log(scale_mm), dtype=torch.float32)
        if scale == "learned":
            self.log_scale_mm = nn.Parameter(log_s)
        else:
            self.register_buffer("log_scale_mm", log_s)

    @property
    def latent_distance_scale_mm(self) -> float:
        """Millimetres per latent unit: ``distance_mm ~= latent_distance_scale_mm * ||e_i - e_j||``."""
        return float(self.log_scale_mm.detach().exp())

    def forward(self, embeddings: torch.Tensor, centres_mm: torch.Tensor, volume_index: torch.Tensor) -> torch.Tensor:
        latent_mm, physical_mm = self.pair_distances_mm(embeddings, centres_mm, volume_index)
        return self.regression_loss(latent_mm, physical_mm)

    def pair_distances_mm(
        self, embeddings: torch.Tensor, centres_mm: torch.Tensor, volume_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled latent and physical distances of the selected pairs, both ``(P,)`` in mm."""
        self._check(embeddings, centres_mm, volume_index)
        if self.pairs == "all":
            embeddings, centres_mm = gather_with_grad(embeddings), gather_with_grad(centres_mm)
        # float32 even under autocast: bf16 distances would be off by ~1 mm at 300 mm
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            e = embeddings.float()
            c = centres_mm.to(device=e.device, dtype=torch.float32)
            i, j = self._pair_indices(volume_index.to(e.device), e.shape[0])
            physical = (c[i] - c[j]).norm(dim=1)  # (P,) targets need no gradient
            latent = _pair_distances(e, i, j, self.eps)
            return latent * self.log_scale_mm.float().exp(), physical

    def regression_loss(self, latent_mm: torch.Tensor, physical_mm: torch.Tensor) -> torch.Tensor:
        """``rho(latent_mm - physical_mm)`` averaged over pairs; inputs ``(P,)``."""
        if self.loss == "mse":
            return F.mse_loss(latent_mm, physical_mm)
        return F.huber_loss(latent_mm, physical_mm, delta=self.huber_delta_mm)

    def _pair_indices(self, volume_index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        i, j = torch.triu_indices(n, n, offset=1, device=volume_index.device)
        if self.pairs == "within_volume":
            same = volume_index[i] == volume_index[j]
            i, j = i[same], j[same]
            if i.numel() == 0:
                raise ValueError(
                    "IsimedDistanceLoss(pairs='within_volume') found no pair of patches from the same volume; "
                    "sample at least 2 patches per volume"
                )
        return i, j

    def _check(self, embeddings: torch.Tensor, centres_mm: torch.Tensor, volume_index: torch.Tensor) -> None:
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be (N, D), got shape {tuple(embeddings.shape)}")
        n = embeddings.shape[0]
        if centres_mm.shape != (n, 3):
            raise ValueError(f"centres_mm must be (N, 3) = ({n}, 3), got shape {tuple(centres_mm.shape)}")
        if volume_index.shape != (n,):
            raise ValueError(f"volume_index must be (N,) = ({n},), got shape {tuple(volume_index.shape)}")
        if n < 2:
            raise ValueError(f"IsimedDistanceLoss needs at least 2 embeddings, got {n}")


def _pair_distances(e: torch.Tensor, i: torch.Tensor, j: torch.Tensor, eps: float) -> torch.Tensor:
    """``||e_i - e_j||`` for index vectors ``i, j (P,)``; ``e (N, D)`` -> ``(P,)``.

    ``clamp(min=eps)`` passes no gradient where ``sq < eps``, so coincident embeddings
    get a zero (not NaN) gradient; elsewhere ``d||x||/dx = x/||x||`` is bounded.
    """
    if i.numel() * e.shape[1] <= _DIRECT_MAX_ELEMENTS:
        diff = e[i] - e[j]
        sq = (diff * diff).sum(dim=1)
    else:
        # Centring first keeps |e|^2 small, which limits cancellation in |a|^2 + |b|^2 - 2ab.
        ec = e - e.mean(dim=0, keepdim=True)
        norms = (ec * ec).sum(dim=1)
        sq = norms[i] + norms[j] - 2.0 * (ec @ ec.T)[i, j]
    return sq.clamp(min=eps).sqrt()
