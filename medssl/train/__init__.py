"""Training: one ``fit`` for every method, atomic checkpoints, resume, optimisation config.

- ``loop``: :func:`fit` (a short loop over named steps) and its batch source.
- ``checkpoint``: pickle-free atomic checkpoints, the resume state, :func:`load_method`.
- ``metrics``: ``metrics.jsonl`` records and :func:`read_metrics`.
- ``precision``: device and autocast choice.
- ``ddp``: the DDP-wrapped training step and the decisions ranks must share.
"""

from medssl.train.checkpoint import CheckpointError, load_checkpoint, load_method, save_checkpoint
from medssl.train.config import TrainConfig
from medssl.train.loop import FitResult, NonFiniteLossError, fit
from medssl.train.metrics import read_metrics

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
