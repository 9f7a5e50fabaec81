"""ISImed: embed patches so latent distances equal physical distances (Jabareen et al., arXiv 2410.16947)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from medssl.data.volume import Volume
from medssl.losses.isimed import IsimedDistanceLoss
from medssl.methods.base import Method, MethodConfig, StepOutput, register_method
from medssl.models.backbones import build_backbone
from medssl.sampling.base import PatchBatch
from medssl.sampling.uniform import UniformPatchSampler


@dataclass(frozen=True)
class IsimedConfig(MethodConfig):
    """Paper defaults (MethodConfig) plus the distance loss: MSE on raw mm, pairs within a volume."""

    loss: str = "mse"  # "mse" (paper) or "huber"
    huber_delta_mm: float = 10.0
    pairs: str = "within_volume"  # "all" only for registered cohorts
    scale: str = "fixed"  # "fixed" or "learned"; see IsimedDistanceLoss
    scale_mm: float = 1.0  # mm per latent unit (1.0 = raw mm, as the paper)


@register_method("isimed")
class Isimed(Method):
    """The backbone output itself carries the ISImed loss (no head, as the paper).

    ``sample``: uniform patches (no views). ``training_step`` logs the loss, the mean
    absolute error between scaled latent and physical pair distances (mm), their means
    and the number of pairs.
    """

    Config = IsimedConfig

    def __init__(self, config: IsimedConfig) -> None:
        super().__init__(config)
        self.backbone = _backbone_from_config(config)
        self.sampler = _sampler_from_config(config)
        self.loss_fn = _isimed_loss_from_config(config)

    def sample(self, volumes: Sequence[Volume], rng: np.random.Generator) -> PatchBatch:
        return self.sampler(volumes, rng)

    def training_step(self, batch: PatchBatch) -> StepOutput:
        e = self.backbone(batch.patches)  # (N, D)
        latent_mm, physical_mm = self.loss_fn.pair_distances_mm(e, batch.centres_mm, batch.volume_index)
        loss = self.loss_fn.regression_loss(latent_mm, physical_mm)
        logs = {"loss": float(loss.detach()), **isimed_distance_logs(latent_mm, physical_mm)}
        return StepOutput(loss=loss, logs=logs)


def isimed_distance_logs(latent_mm: torch.Tensor, physical_mm: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Cheap fidelity statistics of one batch's pair distances ``(P,)`` in mm."""
    lat, phys = latent_mm.detach(), physical_mm.detach()
    return {
        f"{prefix}abs_err_mm": float((lat - phys).abs().mean()),
        f"{prefix}latent_dist_mm": float(lat.mean()),
        f"{prefix}physical_dist_mm": float(phys.mean()),
        f"{prefix}n_pairs": float(lat.numel()),
    }


def _backbone_from_config(config: Any) -> nn.Module:
    return build_backbone(config.backbone, in_channels=config.in_channels, spatial_dims=3, embed_dim=config.embed_dim)


def _sampler_from_config(config: Any) -> UniformPatchSampler:
    return UniformPatchSampler(
        config.patch_size_vox,
        volumes_per_batch=config.volumes_per_batch,
        patches_per_volume=config.patches_per_volume,
        foreground_only=config.foreground_only,
    )


def _isimed_loss_from_config(config: Any) -> IsimedDistanceLoss:
    return IsimedDistanceLoss(
        loss=config.loss,
        huber_delta_mm=config.huber_delta_mm,
        pairs=config.pairs,
        scale=config.scale,
        scale_mm=config.scale_mm,
    )
