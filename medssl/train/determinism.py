"""Bitwise-repeatable training: the one known numerical fault on CPUs and the CUDA settings.

**CPU.** A seeded ``fit`` on the CPU repeats bit for bit (same seed, config, data, torch
thread count and CPU instruction set; ``tests/train/test_determinism.py``), with one fault
found on the way: oneDNN's bf16 kernel for the weight gradient of a 3D convolution
(``jit_bf16:avx512_core_bf16`` in oneDNN 3.12, torch 2.13, AVX512-BF16 CPUs) returns wrong values,
different on every call and sometimes Inf/NaN, when the input is so thin along the first
spatial axis that the padding covers all of it (measured: kernel 3 / padding 1 at depth 2, kernel
5 / padding 2 at depths 2-4, relative errors from 0.8 to 1e19 against fp32; depth 1 and the
forward pass and input gradient are fine). SmallCNN meets it on 16^3 patches (its fifth block sees
2^3 maps) and DenseNet121 on 32^3 (dense block 3); the demo's 32^3 SmallCNN does not.
:class:`Bf16Conv3dGuard`, which ``fit`` applies under CPU bf16 autocast, runs exactly those
convolutions (``depth <= 2 * padding``) in float32: a few tiny layers, so the cost is nil.

**CUDA.** Some CUDA kernels (atomics in scatter/index_add backward, cuBLAS workspaces, cuDNN
algorithm search) are not deterministic. With ``TrainConfig.deterministic`` (the default)
:func:`deterministic_algorithms` makes ``fit`` ask torch for deterministic kernels
(``torch.use_deterministic_algorithms(True, warn_only=True)``: an op without one warns instead
of failing), turns off cuDNN benchmarking and sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` when it is
not set (cuBLAS reads it when its first handle is made, so the pipeline sets it for every
notebook kernel before start; a process that used CUDA before ``fit`` keeps its workspace).
Bitwise equality across different GPUs, drivers or library versions is not promised.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["Bf16Conv3dGuard", "conv3d_needs_fp32", "deterministic_algorithms", "CUBLAS_WORKSPACE"]

CUBLAS_WORKSPACE = ":4096:8"  # the setting NVIDIA documents for deterministic cuBLAS


def _depth_padding(conv: nn.Conv3d) -> int:
    """The padding (voxels) before the first spatial axis of ``conv``."""
    if isinstance(conv.padding, str):  # "same" (stride 1): half the dilated kernel; "valid": none
        return 0 if conv.padding == "valid" else conv.dilation[0] * (conv.kernel_size[0] - 1) // 2
    return int(conv.padding[0])


def conv3d_needs_fp32(conv: nn.Conv3d, x: torch.Tensor) -> bool:
    """True where oneDNN's CPU bf16 weight gradient of ``conv`` on input ``x (B, C, D, H, W)`` is wrong (module doc)."""
    pad = _depth_padding(conv)
    return x.device.type == "cpu" and x.ndim == 5 and pad > 0 and int(x.shape[2]) <= 2 * pad


class Bf16Conv3dGuard:
    """While installed, every ``nn.Conv3d`` of ``module`` whose input is too thin for oneDNN's bf16
    weight gradient (:func:`conv3d_needs_fp32`) runs in float32 under CPU bf16 autocast.

    Forward hooks, so nothing of the module changes (state dict, checkpoints); :meth:`remove` takes
    them off. Convolutions outside bf16 CPU autocast are untouched.
    """

    def __init__(self, module: nn.Module) -> None:
        self._local = threading.local()
        self._handles = []
        for m in module.modules():
            if isinstance(m, nn.Conv3d):
                self._handles.append(m.register_forward_pre_hook(self._before))
                self._handles.append(m.register_forward_hook(self._after, always_call=True))
        self.n_convs = len(self._handles) // 2
        self.n_guarded_calls = 0  # forward calls run in float32 so far

    def _stack(self) -> list:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def _before(self, conv: nn.Conv3d, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0]
        active = (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
                  and isinstance(x, torch.Tensor) and conv3d_needs_fp32(conv, x))
        if not active:
            self._stack().append(None)
            return None
        ctx = torch.autocast(device_type="cpu", enabled=False)
        ctx.__enter__()
        self._stack().append(ctx)
        self.n_guarded_calls += 1
        return (x.float(), *args[1:])

    def _after(self, conv: nn.Conv3d, args: tuple[Any, ...], output: Any) -> None:
        stack = self._stack()
        ctx = stack.pop() if stack else None
        if ctx is not None:
            ctx.__exit__(None, None, None)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@contextmanager
def deterministic_algorithms(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """On CUDA (and ``enabled``): deterministic kernels, no cuDNN benchmarking, a fixed cuBLAS workspace.

    The previous global settings are restored on exit. On other devices nothing changes: CPU
    training is repeatable without them (module docstring).
    """
    if not enabled or device.type != "cuda":
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
