"""gather_with_grad: a no-op on one process; on two gloo processes it concatenates the
shards and, after DDP's gradient averaging, gives exactly the single-process gradient."""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medssl.distributed import gather_with_grad, is_distributed, rank, world_size
from medssl.losses import BarlowTwinsLoss, IsimedDistanceLoss, NTXentLoss

WORLD = 2
ROWS = (3, 2)  # unequal shards on purpose


def _shard(r: int) -> torch.Tensor:
    start = sum(ROWS[:r])
    return torch.arange(start * 4, (start + ROWS[r]) * 4, dtype=torch.float32).view(ROWS[r], 4)


def _global_batch(seed: int, n: int, d: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _two_view_case(loss: torch.nn.Module, seed: int):
    """(model, loss on the global batch, loss on rank r's shard) for a two-view loss."""
    xa, xb = _global_batch(seed, 8, 5), _global_batch(seed + 100, 8, 5)

    def global_loss(m):
        return loss(m(xa), m(xb))

    def local_loss(m, r):
        sl = slice(r * 4, (r + 1) * 4)
        out = m(torch.cat([xa[sl], xb[sl]]))  # one forward over both views, as the methods do
        return loss(out[:4], out[4:])

    return 6, global_loss, local_loss


def _isimed_all_pairs_case():
    x = _global_batch(7, 8, 5)
    centres_mm = _global_batch(8, 8, 3) * 100
    vol = torch.zeros(8, dtype=torch.long)
    loss = IsimedDistanceLoss(pairs="all")

    def local_loss(m, r):
        sl = slice(r * 4, (r + 1) * 4)
        return loss(m(x[sl]), centres_mm[sl], vol[sl])

    return 3, lambda m: loss(m(x), centres_mm, vol), local_loss


def _cases():
    return [
        _two_view_case(BarlowTwinsLoss(), 1),
        _two_view_case(NTXentLoss(temperature=0.5), 2),
        _isimed_all_pairs_case(),
    ]


def _model(out_features: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(5, out_features)


def _worker(r: int, init_file: str) -> None:
    # single-process references first, before the process group exists (the losses gather
    # whenever torch.distributed is initialised)
    expected = []
    for out_features, global_loss, _ in _cases():
        ref = _model(out_features)
        global_loss(ref).backward()
        expected.append([p.grad.clone() for p in ref.parameters()])

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=WORLD)
    try:
        _run_checks(r, expected)
        # DDP reducers must be gone and both ranks done before the group is torn down,
        # otherwise gloo's threads can abort the process at exit
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_checks(r: int, expected: list[list[torch.Tensor]]) -> None:
    assert is_distributed() and rank() == r and world_size() == WORLD
    # 1. forward: concatenation in rank order, unequal shard sizes
    x = _shard(r).requires_grad_(True)
    g = gather_with_grad(x)
    torch.testing.assert_close(g, torch.cat([_shard(0), _shard(1)]))
    # 2. backward: the local shard receives the sum over ranks of each rank's loss gradient
    weights = torch.arange(g.numel(), dtype=torch.float32).view_as(g)
    (g * weights * (r + 1)).sum().backward()
    start = sum(ROWS[:r])
    torch.testing.assert_close(x.grad, weights[start : start + ROWS[r]] * (1 + 2))
    # 3. under DDP, the batch-level losses (which gather internally) give parameter
    #    gradients equal to one process computing the loss on the global batch
    for (out_features, _, local_loss), grads in zip(_cases(), expected):
        model = _model(out_features)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        local_loss(ddp, r).backward()
        for p, q in zip(model.parameters(), grads):
            torch.testing.assert_close(p.grad, q, rtol=1e-4, atol=1e-5)
        del ddp


def test_gather_with_grad_is_identity_on_one_process():
    x = torch.randn(3, 2, requires_grad=True)
    assert not is_distributed() and rank() == 0 and world_size() == 1
    assert gather_with_grad(x) is x


def test_gather_concatenates_shards_and_ddp_gradients_match_single_process_on_two_cpu_ranks(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "dist_init"),), nprocs=WORLD, join=True)
