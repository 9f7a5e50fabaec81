"""The optimisation config shared by every method."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TrainConfig"]

_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """How ``fit`` trains. Defaults are the ISImed paper's (AdamW lr 1e-3, x0.9 per epoch, 50 epochs).

    The optimiser and schedule come from the method (``Method.configure_optimizers``; the
    default is AdamW with ``lr``, ``weight_decay`` and ``lr_decay_per_epoch`` below); a method
    with its own recipe (SimSiam's SGD, Blendowski's Adam) reads what it needs from here.

    Attributes:
        epochs: number of epochs.
        steps_per_epoch: optimiser steps per epoch; ``None`` -> ``ceil(len(train_volumes) /
            (volumes_per_batch * world_size))``, i.e. one epoch sees each volume about once.
        lr: base learning rate.
        weight_decay: weight decay; 1e-2 is PyTorch's AdamW default (the ISImed paper gives none).
        lr_decay_per_epoch: exponential decay factor applied after every epoch (default schedule).
        grad_clip_norm: clip the global gradient L2 norm to this; ``None`` disables clipping.
        seed: seeds the sampling rng (numpy; rank r of a DDP run uses ``[seed, r]``) and torch
            (dropout etc.). The model is built, and so initialised, before ``fit``: seed that yourself.
        device: ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        precision: ``"auto"`` (bf16 autocast on CPUs with AMX/AVX512-BF16 and on CUDA GPUs that
            support it, fp16 autocast + GradScaler on older GPUs, else fp32), ``"fp32"``, ``"bf16"``, ``"fp16"``.
        log_every: write a training record to ``metrics.jsonl`` every this many steps.
        eval_every_epochs: validate every this many epochs (and after the last one).
        checkpoint_every_epochs: write ``epoch-XXXX.pt`` every this many epochs (``last.pt`` is
            written after every epoch and when training stops).
        keep_last: keep this many ``epoch-XXXX.pt`` files (``None`` keeps all; 0 keeps only ``last.pt``).
        val_seed: seed of the fixed validation patch set (drawn once, reused at every evaluation).
        val_batches: number of ``method.sample`` batches in the fixed validation set.
        prefetch: draw the next training batch in a background thread while the current one
            trains (same batches in the same order as without). Off by default: on the 2-core CPU
            torch already uses both cores and SimCLR's demo steps took 20.0-20.4 s per 80 steps
            with and 19.8-20.1 s without; it is meant for GPU runs, where sampling and view
            making on the CPU can overlap GPU compute.
        sync_batchnorm: under DDP, convert BatchNorm layers to ``SyncBatchNorm`` (batch
            statistics over all ranks). DDP broadcasts rank 0's buffers before every forward
            either way, so the running statistics stay identical on every rank.
        deterministic: on CUDA, ask for deterministic kernels (``torch.use_deterministic_algorithms``
            with ``warn_only``, no cuDNN benchmarking, a fixed cuBLAS workspace;
            :mod:`medssl.train.determinism`); off trades repeatability for speed. CPU runs repeat
            bit for bit either way.
    """

    epochs: int = 50
    steps_per_epoch: int | None = None
    lr: float = 1e-3
    weight_decay: float = 1e-2
    lr_decay_per_epoch: float = 0.9
    grad_clip_norm: float | None = 1.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    log_every: int = 10
    eval_every_epochs: int = 1
    checkpoint_every_epochs: int = 1
    keep_last: int | None = 3
    val_seed: int = 12345
    val_batches: int = 1
    prefetch: bool = False
    sync_batchnorm: bool = False
    deterministic: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1 or None, got {self.steps_per_epoch}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.lr_decay_per_epoch <= 1:
            raise ValueError(f"lr_decay_per_epoch must be in (0, 1], got {self.lr_decay_per_epoch}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"grad_clip_norm must be > 0 or None, got {self.grad_clip_norm}")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {_PRECISIONS}, got {self.precision!r}")
        for name in ("log_every", "eval_every_epochs", "checkpoint_every_epochs", "val_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.keep_last is not None and self.keep_last < 0:
            raise ValueError(f"keep_last must be >= 0 or None, got {self.keep_last}")
