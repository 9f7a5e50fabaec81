"""Optimiser and learning-rate schedule (the ISImed paper's: AdamW, exponential decay per epoch)."""

from __future__ import annotations

from typing import Iterable

import torch

from medssl.train.config import TrainConfig

__all__ = ["make_optimizer", "make_lr_scheduler"]


def make_optimizer(params: Iterable[torch.nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``params`` with ``config.lr`` and ``config.weight_decay``.

    Weight decay applies to every parameter, as in the paper's setup (plain AdamW); norm
    and bias parameters are not exempted.
    """
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.ExponentialLR:
    """``lr = config.lr * lr_decay_per_epoch ** epoch``; call ``.step()`` once after every epoch."""
    return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay_per_epoch)
