"""Device and mixed-precision choice for training (CUDA autocast on GPUs, bf16 on CPUs that have it)."""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

__all__ = ["resolve_device", "resolve_precision", "autocast"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> this rank's CUDA device when CUDA is present, else CPU; otherwise ``torch.device(device)``.

    This rank's CUDA device is ``cuda:$LOCAL_RANK`` (torchrun sets it; 0 without), also for a bare
    ``"cuda"``, so that every rank of a multi-GPU run trains on its own GPU.
    """
    if str(device) != "auto":
        d = torch.device(device)
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if d.type == "cuda" and d.index is None else d
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bf16"`` / ``"fp16"`` / ``"fp32"`` for ``device`` (see TrainConfig.precision)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and _cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def _cpu_has_fast_bf16() -> bool:
    # bf16 autocast only pays off with native bf16 instructions (AMX tiles or AVX512-BF16);
    # on plain AVX2 it is emulated and slower than fp32.
    if not any(k in torch.backends.cpu.get_cpu_capability() for k in ("AVX512", "AMX")):
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(p()) for p in probes if callable(p))


def autocast(device: torch.device, precision: str):
    """The autocast context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)
