"""ISImed: embed patches so latent distances equal physical distances (Jabareen et al., arXiv 2410.16947)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from medssl.losses.isimed import IsimedDistanceLoss
from medssl.methods.base import (
    Method,
    MethodConfig,
    StepOutput,
    backbone_from_config,
    register_method,
    uniform_sampler_from_config,
)
from medssl.sampling.base import PatchBatch

# The demo preset's scale (mm per latent unit), chosen on the VALIDATION split with the demo's 210 steps:
# `medssl sweep --method isimed --param scale_mm --values 1 10 50 100 --preset demo` gave validation Spearman
# 0.276 / 0.546 / 0.894 / 0.892 (the test split was never loaded). A SmallCNN cannot grow its outputs to the
# hundreds of units raw mm (scale 1, the paper's) asks for in a few hundred steps.
DEMO_SCALE_MM = 50.0


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
    """ISImed: latent L2 distances regressed onto the physical distances (mm) between patch centres.

    The backbone output itself carries the ISImed loss (no head, as the paper); it is the
    metric latent. ``sample``: uniform patches (no views). ``training_step`` logs the loss,
    the mean absolute error between scaled latent and physical pair distances (mm), their
    means and the number of pairs.
    """

    Config = IsimedConfig
    family = "distance regression"
    in_finetune_demo = True  # the demo's fine-tuning (variants too, when in the demo)
    paper = "Jabareen, Yuan, Lukassen: ISImed, arXiv 2410.16947"
    presets = {"demo": {"method": {"scale_mm": DEMO_SCALE_MM}}}
    val_measure = ("abs_err_mm", "min")  # the pretext task: |latent - physical distance| in mm, val pairs

    def __init__(self, config: IsimedConfig) -> None:
        super().__init__(config)
        self.backbone = backbone_from_config(config)
        self.sampler = uniform_sampler_from_config(config)
        self.loss_fn = isimed_loss_from_config(config)

    def sample(self, volumes, rng):
        if self.config.pairs == "all":
            check_shared_frame(volumes)
        return self.sampler(volumes, rng)

    def training_step(self, batch: PatchBatch) -> StepOutput:
        e = self.backbone(batch.patches)  # (N, D), fp32 even under autocast (the backbone's tail runs in fp32)
        latent_mm, physical_mm = self.loss_fn.pair_distances_mm(e, batch.centres_mm, batch.volume_index)
        loss = self.loss_fn.regression_loss(latent_mm, physical_mm)
        logs = {"loss": float(loss.detach()), **isimed_distance_logs(latent_mm, physical_mm)}
        return StepOutput(loss=loss, logs=logs)

    @torch.no_grad()
    def metric_latent(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, float]:
        return embeddings, self.loss_fn.latent_distance_scale_mm


def isimed_distance_logs(latent_mm: torch.Tensor, physical_mm: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Cheap fidelity statistics of one batch's pair distances ``(P,)`` in mm."""
    lat, phys = latent_mm.detach(), physical_mm.detach()
    return {
        f"{prefix}abs_err_mm": float((lat - phys).abs().mean()),
        f"{prefix}latent_dist_mm": float(lat.mean()),
        f"{prefix}physical_dist_mm": float(phys.mean()),
        f"{prefix}n_pairs": float(lat.numel()),
    }


def check_shared_frame(volumes: Any) -> None:
    """Refuse cross-volume pairs unless every volume says it lives in one shared world frame.

    ``pairs="all"`` regresses latent distances onto world-mm distances between patches of
    *different* subjects, which only means something for a registered cohort
    (``open_data(..., registered=True)``; the demo cohort is one). Volumes built by hand
    without a ``meta["frame"]`` are taken as the caller says.
    """
    frames = {v.meta.get("frame") for v in volumes if isinstance(getattr(v, "meta", None), dict)}
    frames.discard(None)
    if len(frames) > 1 or any(str(f).startswith("own:") for f in frames) and len(volumes) > 1:
        own = sorted(str(f)[4:] for f in frames if str(f).startswith("own:"))[:5]
        raise ValueError(
            "ISImed pairs='all' compares world-mm positions of patches from different subjects, which needs a "
            f"registered cohort; these volumes do not share a world frame (e.g. {own or sorted(frames)[:3]}). "
            "Use pairs='within_volume' (the default), or open_data(..., registered=True) if you registered them."
        )


def isimed_loss_from_config(config: Any) -> IsimedDistanceLoss:
    return IsimedDistanceLoss(
        loss=config.loss,
        huber_delta_mm=config.huber_delta_mm,
        pairs=config.pairs,
        scale=config.scale,
        scale_mm=config.scale_mm,
    )
