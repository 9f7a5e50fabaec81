"""Heads on top of a backbone embedding, built from ``(in, out, norm, act)`` blocks."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["ProjectionHead", "LinearHead", "mlp_blocks"]

Block = tuple[int, int, "nn.Module | None", "nn.Module | None"]


class ProjectionHead(nn.Module):
    """A stack of ``Linear -> norm -> act`` blocks.

    Each block is ``(in_features, out_features, norm or None, act or None)``. The
    linear layer has a bias only when the block has no norm (a norm's shift makes it
    redundant). Examples: a linear head is ``[(1024, 512, None, None)]``; SimSiam's
    projector is three 2048-wide blocks with BatchNorm, ReLU on all but the last, and a
    non-affine BatchNorm on the last.

    Shapes: ``x (B, in_features of block 0) -> (B, out_features of the last block)``.
    """

    def __init__(self, blocks: Sequence[Block]) -> None:
        super().__init__()
        if not blocks:
            raise ValueError("ProjectionHead needs at least one block")
        layers: list[nn.Module] = []
        prev_out = None
        for in_f, out_f, norm, act in blocks:
            if prev_out is not None and in_f != prev_out:
                raise ValueError(f"block input {in_f} does not match the previous block's output {prev_out}")
            layers.append(nn.Linear(in_f, out_f, bias=norm is None))
            if norm is not None:
                layers.append(norm)
            if act is not None:
                layers.append(act)
            prev_out = out_f
        self.layers = nn.Sequential(*layers)
        self.in_features = int(blocks[0][0])
        self.out_features = int(blocks[-1][1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearHead(ProjectionHead):
    """One linear layer, ``(B, in_features) -> (B, out_features)`` (regISImed's heads), in float32 under autocast."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__([(in_features, out_features, None, None)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):  # a metric head: see backbones.fp32
            return self.layers(x.float())


def mlp_blocks(
    dims: Sequence[int],
    norm: str | None = "batch",
    act: str | None = "relu",
    last_norm: str | None | bool = True,
    last_norm_affine: bool = True,
) -> list[Block]:
    """Blocks for an MLP through ``dims`` (e.g. ``[1024, 2048, 2048, 2048]``).

    Hidden blocks get ``norm`` and ``act``. The last block gets no activation, and a
    norm only when ``last_norm`` (``True`` = same kind as ``norm``; ``False``/``None`` =
    none); ``last_norm_affine=False`` gives SimSiam's non-affine final BatchNorm.
    """
    if len(dims) < 2:
        raise ValueError(f"mlp_blocks needs at least two sizes, got {list(dims)}")
    blocks: list[Block] = []
    n = len(dims) - 1
    for k in range(n):
        last = k == n - 1
        kind = (norm if last_norm is True else last_norm or None) if last else norm
        blocks.append(
            (
                dims[k],
                dims[k + 1],
                _norm(kind, dims[k + 1], affine=last_norm_affine if last else True),
                None if last else _act(act),
            )
        )
    return blocks


def _norm(kind: str | None, n: int, affine: bool) -> nn.Module | None:
    if kind is None:
        return None
    if kind == "batch":
        return nn.BatchNorm1d(n, affine=affine)
    if kind == "layer":
        return nn.LayerNorm(n, elementwise_affine=affine)
    raise ValueError(f"unknown norm {kind!r}; use 'batch', 'layer' or None")


def _act(kind: str | None) -> nn.Module | None:
    if kind is None:
        return None
    acts = {"relu": nn.ReLU, "gelu": nn.GELU, "leakyrelu": nn.LeakyReLU}
    if kind not in acts:
        raise ValueError(f"unknown activation {kind!r}; use one of {sorted(acts)} or None")
    return acts[kind]()
