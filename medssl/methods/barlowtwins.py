"""BarlowTwins baseline of the ISImed paper: standard BT loss on two views, no projector."""

from __future__ import annotations

from dataclasses import dataclass

from medssl.losses.barlow_twins import BarlowTwinsLoss
from medssl.methods.base import StepOutput, register_method
from medssl.methods.simclr import TwoViewConfig, TwoViewMethod, view_agreement_logs
from medssl.sampling.base import PatchBatch


@dataclass(frozen=True)
class BarlowTwinsConfig(TwoViewConfig):
    """ISImed-paper settings (sec. 2.2): lambda = 0.005, no projector, coarse dropout/shuffle views."""

    lambda_offdiag: float = 5e-3


@register_method("barlowtwins")
class BarlowTwins(TwoViewMethod):
    Config = BarlowTwinsConfig

    def __init__(self, config: BarlowTwinsConfig) -> None:
        super().__init__(config)
        self.loss_fn = BarlowTwinsLoss(lambda_offdiag=config.lambda_offdiag)

    def training_step(self, batch: PatchBatch) -> StepOutput:
        h_a, h_b = self._embed_views(batch)
        loss = self.loss_fn(h_a, h_b)
        return StepOutput(loss=loss, logs={"loss": float(loss.detach()), **view_agreement_logs(h_a, h_b)})
