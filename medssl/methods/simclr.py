"""SimCLR baseline of the ISImed paper: NT-Xent on two coarse dropout/shuffle views, no projector."""

from __future__ import annotations

from dataclasses import dataclass

from medssl.losses.ntxent import NTXentLoss
from medssl.methods.base import register_method
from medssl.methods.two_view import TwoViewConfig, TwoViewMethod


@dataclass(frozen=True)
class SimclrConfig(TwoViewConfig):
    """ISImed-paper settings (sec. 2.2): tau = 0.05, no projector, coarse dropout/shuffle views."""

    temperature: float = 0.05


@register_method("simclr")
class Simclr(TwoViewMethod):
    """SimCLR (NT-Xent, tau 0.05) on coarse dropout + shuffle views, no projector."""

    Config = SimclrConfig
    family = "joint embedding"
    paper = "Chen et al., ICML 2020; as the ISImed paper's baseline (Jabareen et al., arXiv 2410.16947)"

    def __init__(self, config: SimclrConfig) -> None:
        super().__init__(config)
        self.loss_fn = NTXentLoss(temperature=config.temperature)
