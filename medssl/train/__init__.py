"""Training: one ``fit`` for every method, atomic checkpoints, resume, optimisation config."""

from medssl.train.checkpoint import CheckpointError, load_checkpoint, load_method, save_checkpoint
from medssl.train.config import TrainConfig
from medssl.train.loop import FitResult, NonFiniteLossError, fit, read_metrics

__all__ = [
    "TrainConfig",
    "fit",
    "FitResult",
    "NonFiniteLossError",
    "read_metrics",
    "load_method",
    "load_checkpoint",
    "save_checkpoint",
    "CheckpointError",
]
