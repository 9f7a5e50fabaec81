"""The one cross-rank helper the batch-level losses use.

``gather_with_grad(x)`` concatenates ``x`` from every rank along dim 0 and keeps the
autograd path to the local shard. It is a no-op (returns ``x``) on a single process,
so losses call it unconditionally.

Gradient convention: every rank computes its loss on the gathered (global) batch, and
the backward of the gather SUMS the incoming gradients over ranks before handing each
rank the slice for its own shard. DDP then AVERAGES parameter gradients over ranks, so
the parameters receive exactly the gradient of the global-batch loss that one process
would compute on the concatenated batch (the test checks this with two processes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["gather_with_grad", "is_distributed", "rank", "world_size"]


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Shards may differ in length (e.g. a rank with fewer volumes): gather the lengths,
        # pad to the longest, gather, then drop the padding.
        n_local = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
        sizes = [torch.zeros_like(n_local) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, n_local)
        lengths = [int(s.item()) for s in sizes]
        n_max = max(lengths)
        padded = x.new_zeros((n_max, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in lengths]
        dist.all_gather(parts, padded.contiguous())
        ctx.lengths = lengths
        ctx.rank = dist.get_rank()
        return torch.cat([p[:n] for p, n in zip(parts, lengths)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # every rank's loss depends on our shard
        start = sum(ctx.lengths[: ctx.rank])
        return grad[start : start + ctx.lengths[ctx.rank]]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x (n_local, ...) -> (sum of n over ranks, ...)``, rank order, differentiable.

    Returns ``x`` itself when not running distributed. Every rank must call it, in the
    same order, with tensors of the same trailing shape and dtype.
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)
