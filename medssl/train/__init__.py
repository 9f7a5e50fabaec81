"""Training: one ``fit`` for every method, atomic checkpoints, resume, optimisation config.

- ``config``: :class:`TrainConfig` and :class:`~medssl.train.config.EarlyStopping`.
- ``loop``: :func:`fit` (a short loop over named steps) and its batch source.
- ``checkpoint``: pickle-free atomic checkpoints, the resume state, :func:`load_method`.
- ``metrics``: ``metrics.jsonl`` records, TensorBoard events and :func:`read_metrics`.
- ``precision``: device and autocast choice.
- ``determinism``: deterministic kernels and the bf16 conv3d guard.
- ``ddp``: the DDP-wrapped training step and the decisions ranks must share.
- ``preprocessing``: the training volumes' preprocessing record every checkpoint carries.

The names below load on first use, so that ``from medssl.train.config import TrainConfig`` (presets, the
command line's help) does not load the training loop.
"""

from __future__ import annotations

from medssl._lazy import lazy_attributes

_LAZY = {
    "TrainConfig": "config",
    "fit": "loop",
    "FitResult": "loop",
    "NonFiniteLossError": "loop",
    "read_metrics": "metrics",
    "load_method": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "CheckpointError": "checkpoint",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
