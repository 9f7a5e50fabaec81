"""BarlowTwins baseline of the ISImed paper: standard BT loss on two views, no projector."""

from __future__ import annotations

from dataclasses import dataclass

from medssl.losses.barlow_twins import BarlowTwinsLoss
from medssl.methods.base import register_method
from medssl.methods.two_view import TwoViewConfig, TwoViewMethod


@dataclass(frozen=True)
class BarlowTwinsConfig(TwoViewConfig):
    """ISImed-paper settings (sec. 2.2): lambda = 0.005, no projector, coarse dropout/shuffle views."""

    lambda_offdiag: float = 5e-3


@register_method("barlowtwins")
class BarlowTwins(TwoViewMethod):
    """BarlowTwins (standard loss, lambda 0.005) on coarse dropout + shuffle views, no projector."""

    Config = BarlowTwinsConfig
    family = "joint embedding"
    paper = "Zbontar et al., ICML 2021; as the ISImed paper's baseline (Jabareen et al., arXiv 2410.16947)"

    def __init__(self, config: BarlowTwinsConfig) -> None:
        super().__init__(config)
        self.loss_fn = BarlowTwinsLoss(lambda_offdiag=config.lambda_offdiag)
