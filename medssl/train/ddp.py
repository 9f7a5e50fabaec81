"""What ``fit`` needs from torch.distributed: a DDP-wrapped training step, shared decisions, per-rank state.

``DistributedDataParallel`` only overlaps gradient all-reduce with backward for what runs
inside the wrapped module's ``forward``; the trainer calls ``method.training_step``, so
:class:`TrainingStepModule` makes that the forward. Everything here is a no-op on one process.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from medssl.distributed import is_distributed, rank, world_size

__all__ = ["TrainingStepModule", "wrap_for_training", "any_rank", "all_ranks_gather", "first_true_rank"]


class TrainingStepModule(nn.Module):
    """``forward(batch) = method.training_step(batch)`` as ``(loss, logs)``."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        out = self.method.training_step(batch)
        return out.loss, out.logs


def wrap_for_training(method: nn.Module, device: torch.device, sync_batchnorm: bool = False) -> nn.Module:
    """The module whose ``forward(batch)`` trains: DDP around :class:`TrainingStepModule` when distributed.

    DDP broadcasts rank 0's parameters and buffers at construction (every rank starts
    equal) and its buffers (BatchNorm statistics) before every forward.
    ``find_unused_parameters=True``: a method may leave parts unused in a step (e.g. the
    orientation networks of a context-prediction step that samples one orientation).
    """
    step_module = TrainingStepModule(method)
    if not is_distributed():
        return step_module
    if sync_batchnorm:
        nn.SyncBatchNorm.convert_sync_batchnorm(method)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(step_module, device_ids=ids, find_unused_parameters=True)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any rank (one all-reduce), so all ranks decide alike."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def first_true_rank(flag: bool, device: torch.device) -> int | None:
    """The lowest rank where ``flag`` is True (None if nowhere); every rank gets the same answer."""
    if not is_distributed():
        return 0 if flag else None
    t = torch.zeros(world_size(), device=device)
    t[rank()] = 1.0 if flag else 0.0
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    hits = torch.nonzero(t > 0).flatten()
    return int(hits[0]) if hits.numel() else None


def all_ranks_gather(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` on one process).

    Used for small per-rank state (rng states as JSON strings, torch rng tensors) that rank 0
    writes into the checkpoint so that every rank resumes exactly.
    """
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
