"""The optimisation config shared by every method."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

__all__ = ["EarlyStopping", "TrainConfig"]

_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class EarlyStopping:
    """Stop when the validation pretext measure stops improving (``TrainConfig.early_stopping``).

    ``fit`` reads the measure from every validation record (``split="val"`` in ``metrics.jsonl``:
    at step 0 and every ``eval_every_epochs`` epochs, so ``steps_per_epoch`` x ``eval_every_epochs``
    steps apart). A validation improves when it beats the best so far by more than ``min_delta``
    (absolute, in the measure's unit); after ``patience`` validations in a row without improvement
    training stops. ``epochs`` stays the cap. The best state is kept as ``checkpoints/best.pt``
    (what evaluations read, :meth:`medssl.rundir.RunDir.checkpoints`), the stop reason and the
    early-stopping state go into every checkpoint (a resume continues the count) and into
    ``early_stopping.json`` beside ``metrics.jsonl``.

    Attributes:
        patience: validations without improvement before stopping (>= 1).
        min_delta: the smallest change that counts as an improvement (>= 0).
        measure: a key of the validation record; None: the method's ``val_measure``
            (:attr:`medssl.methods.base.Method.val_measure`).
        mode: ``"min"`` or ``"max"``; None: the method's.
        min_steps: never stop before this many steps (e.g. a curriculum's warm-up).
    """

    patience: int = 5
    min_delta: float = 0.0
    measure: str | None = None
    mode: str | None = None
    min_steps: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"early_stopping.patience must be an int >= 1, got {self.patience!r}")
        if not self.min_delta >= 0:
            raise ValueError(f"early_stopping.min_delta must be >= 0, got {self.min_delta!r}")
        if self.mode not in (None, "min", "max"):
            raise ValueError(f"early_stopping.mode must be 'min', 'max' or None, got {self.mode!r}")
        if self.min_steps < 0:
            raise ValueError(f"early_stopping.min_steps must be >= 0, got {self.min_steps!r}")

    @classmethod
    def from_value(cls, value: "EarlyStopping | dict[str, Any]") -> "EarlyStopping":
        """An :class:`EarlyStopping` from itself or a dict of its fields (notebook and CLI overrides, JSON)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"early_stopping must be a dict of {[f.name for f in fields(cls)]} or None, got {value!r}")
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"early_stopping has no settings {unknown}; known: {[f.name for f in fields(cls)]}")
        return cls(**value)


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
            trains (same batches in the same order as without). Off by default: on a 2-core CPU
            torch already uses both cores and the demo's steps were no faster with it; it is meant for
            GPU runs, where sampling and view making on the CPU can overlap GPU compute.
        sync_batchnorm: under DDP, convert BatchNorm layers to ``SyncBatchNorm`` (batch
            statistics over all ranks). DDP broadcasts rank 0's buffers before every forward
            either way, so the running statistics stay identical on every rank.
        deterministic: on CUDA, ask for deterministic kernels (``torch.use_deterministic_algorithms``
            with ``warn_only``, no cuDNN benchmarking, a fixed cuBLAS workspace;
            :mod:`medssl.train.determinism`); off trades repeatability for speed. CPU runs repeat
            bit for bit either way.
        early_stopping: None (train for ``epochs``), or an :class:`EarlyStopping` (a dict of its
            fields is converted): stop when the validation measure stops improving; ``epochs``
            is then the cap. Needs ``val_volumes`` in ``fit``.
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
    early_stopping: EarlyStopping | dict | None = None

    def __post_init__(self) -> None:
        if self.early_stopping is not None:
            object.__setattr__(self, "early_stopping", EarlyStopping.from_value(self.early_stopping))
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
