"""Two augmented views of the same patches: the joint-embedding recipe of the ISImed paper's baselines.

SimCLR and BarlowTwins (and regISImed) embed two coarse dropout + coarse shuffle views of
every sampled patch. Both views are augmentations of the SAME patches, so they share
``centres_mm``; a step costs two forward passes per distinct patch (``views_per_patch = 2``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medssl.augment import CoarseDropoutShuffleViews
from medssl.data.volume import Volume
from medssl.methods.base import Method, MethodConfig, StepOutput, backbone_from_config, uniform_sampler_from_config
from medssl.sampling.base import PatchBatch

__all__ = ["TwoViewConfig", "TwoViewMethod", "views_from_config", "view_agreement_logs"]


@dataclass(frozen=True)
class TwoViewConfig(MethodConfig):
    """MethodConfig plus the ISImed paper's views: coarse dropout then coarse shuffle (sizes in voxels, inclusive)."""

    view_mode: str = "random"  # "foreground" (6 holes dropped), "background" (6 regions kept) or "random" per patch
    dropout_holes: int = 6
    fg_hole_min_vox: int = 3
    fg_hole_max_vox: int = 10
    bg_keep_min_vox: int = 3
    bg_keep_max_vox: int = 21
    shuffle_prob: float = 0.8
    shuffle_holes: int = 2
    shuffle_size_vox: int = 6


class TwoViewMethod(Method):
    """Uniform patches plus two augmented views; ``self.loss_fn(h_a, h_b)`` on the backbone outputs.

    ``sample`` puts the views in ``batch.extras["views"]`` ``(2, N, C, *S)``.
    """

    views_per_patch: ClassVar[int] = 2

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.backbone = backbone_from_config(config)
        self.sampler = uniform_sampler_from_config(config)
        self.views = views_from_config(config)

    def sample(self, volumes: Sequence[Volume], rng: np.random.Generator) -> PatchBatch:
        batch = self.sampler(volumes, rng)
        batch.extras["views"] = self.views(batch.patches, rng)
        return batch

    def training_step(self, batch: PatchBatch) -> StepOutput:
        h_a, h_b = self._embed_views(batch)
        loss = self.loss_fn(h_a, h_b)  # type: ignore[attr-defined]
        return StepOutput(loss=loss, logs={"loss": float(loss.detach()), **view_agreement_logs(h_a, h_b)})

    def _embed_views(self, batch: PatchBatch) -> tuple[torch.Tensor, torch.Tensor]:
        views = batch.extras["views"]  # (2, N, C, *S)
        h = self.backbone(views.flatten(0, 1))  # one pass over both views: (2N, D)
        return h[: views.shape[1]], h[views.shape[1] :]


def views_from_config(config: Any) -> CoarseDropoutShuffleViews:
    return CoarseDropoutShuffleViews(
        mode=config.view_mode,
        holes=config.dropout_holes,
        fg_hole_size=(config.fg_hole_min_vox, config.fg_hole_max_vox),
        bg_keep_size=(config.bg_keep_min_vox, config.bg_keep_max_vox),
        shuffle_prob=config.shuffle_prob,
        shuffle_holes=config.shuffle_holes,
        shuffle_size=config.shuffle_size_vox,
    )


def view_agreement_logs(h_a: torch.Tensor, h_b: torch.Tensor) -> dict[str, float]:
    """Cheap collapse/invariance indicators: mean cosine between views, mean per-dim std."""
    a, b = h_a.detach().float(), h_b.detach().float()
    return {
        "view_cosine": float(F.cosine_similarity(a, b, dim=1).mean()),
        "embedding_std": float(F.normalize(a, dim=1).std(dim=0).mean()),
    }
