"""fit under DistributedDataParallel with two gloo CPU processes.

- the weights after N steps equal one process training on the concatenated batches of both ranks;
- a run stopped and resumed ends with the same weights on every rank as an uninterrupted run;
- a NaN loss on one rank stops every rank with a message naming the rank (no hang).
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medssl.data.volume import Volume
from medssl.distributed import rank
from medssl.methods import make_config
from medssl.methods.isimed import Isimed
from medssl.sampling.base import PatchBatch
from medssl.train import NonFiniteLossError, TrainConfig, fit
from tests.helpers import oblique_affine

# one worker builds the two-rank runs (ddp_runs, ~18 s) once: `make test` runs pytest-xdist --dist loadgroup, and a module
# split over two workers builds its module-scoped fixtures on each
pytestmark = pytest.mark.xdist_group("ddp")

WORLD = 2
TIMEOUT_S = 240
TINY = dict(backbone="smallcnn", patch_size_vox=8, volumes_per_batch=2, patches_per_volume=3, embed_dim=8)
CFG = TrainConfig(epochs=2, steps_per_epoch=3, lr=3e-3, seed=11, device="cpu", precision="fp32", log_every=1,
                  keep_last=None)


def _volumes() -> list[Volume]:
    rng = np.random.default_rng(5)
    out = []
    for k in range(4):
        affine = oblique_affine((1.0, 1.5, 2.0), (10.0, 0.0, -5.0), (3.0 * k, 0.0, 0.0))
        data = rng.normal(size=(1, 14, 13, 12)).astype(np.float32)
        out.append(Volume(data=data, affine=affine, case_id=f"v{k}", aux={"body": np.ones((14, 13, 12), np.uint8)}))
    return out


class _SgdIsimed(Isimed):
    """ISImed with plain SGD for the equality test.

    ISImed's loss is blind to a translation of the embedding (the final bias has zero true
    gradient); Adam divides such float-noise gradients by their own tiny magnitude and
    turns them into full-size steps, so two runs that differ only in summation order drift
    apart there. SGD keeps the comparison about DDP, not about Adam's noise amplification.
    """

    def configure_optimizers(self, config):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=config.lr_decay_per_epoch)


def _method(pairs: str):
    torch.manual_seed(0)
    return _SgdIsimed(make_config("isimed", pairs=pairs, **TINY))


class _NanOnRankOne(Isimed):
    """ISImed whose third training step gives a NaN loss on rank 1 only."""

    calls = 0

    def training_step(self, batch):
        out = super().training_step(batch)
        if self.training:
            type(self).calls += 1
            if rank() == 1 and type(self).calls == 3:
                out.loss = out.loss * float("nan")
        return out


def _run_task(r: int, out: Path, task: str, pairs: str) -> None:
    if task == "nan":
        torch.manual_seed(0)
        m = _NanOnRankOne(make_config("isimed", **TINY))
        try:
            fit(m, _volumes(), CFG, out / "nan", progress=False)
            msg = "no error"
        except NonFiniteLossError as e:
            msg = str(e)
        (out / f"nan_rank{r}.txt").write_text(msg)
        return
    m = _method(pairs)
    if task == "resume":
        fit(m, _volumes(), CFG, out / "split", progress=False,
            callbacks=[lambda rec: rec["split"] == "train" and rec["step"] == 4])
        torch.manual_seed(99)
        m = _SgdIsimed(make_config("isimed", pairs=pairs, **TINY))  # other weights: all state comes from last.pt
        fit(m, _volumes(), CFG, out / "split", progress=False)
    else:
        fit(m, _volumes(), CFG, out / f"ddp_{pairs}", progress=False)
    torch.save({k: v.clone() for k, v in m.state_dict().items()}, out / f"{task}_{pairs}_rank{r}.pt")


def _worker(r: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=WORLD)
    try:  # one process group for every scenario: spawning costs more than the runs
        for task, pairs in TASKS:
            _run_task(r, Path(out_dir), task, pairs)
            dist.barrier()
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


TASKS = [("ddp", "within_volume"), ("ddp", "all"), ("resume", "within_volume"), ("nan", "within_volume")]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    ctx = mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the DDP runs did not finish in {TIMEOUT_S} s (a rank hangs)")
    return out


def _reference_weights(pairs: str) -> dict[str, torch.Tensor]:
    """One process, each step on rank 0's batch + rank 1's batch (the same rng streams)."""
    m = _method(pairs).train()
    opt, sched = m.configure_optimizers(CFG)
    rngs = [np.random.default_rng([CFG.seed, r]) for r in range(WORLD)]
    vols = _volumes()
    for step in range(1, CFG.epochs * CFG.steps_per_epoch + 1):
        batch = PatchBatch.concat([m.sample(vols, g) for g in rngs])
        # within_volume: each rank averages over its own pairs and DDP averages the ranks; with equal pair
        # counts that is the mean over all pairs. all: every rank's loss is the global one (gather_with_grad).
        loss = m.training_step(batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), CFG.grad_clip_norm)
        opt.step()
        if step % CFG.steps_per_epoch == 0:
            sched.step()
    return m.state_dict()


@pytest.mark.parametrize("pairs", ["within_volume", "all"])
def test_ddp_weights_after_n_steps_equal_one_process_on_the_concatenated_batches(ddp_runs, pairs):
    ref = _reference_weights(pairs)
    for r in range(WORLD):
        got = torch.load(ddp_runs / f"ddp_{pairs}_rank{r}.pt", weights_only=True)
        for k, v in ref.items():
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-6, msg=f"rank {r}: {k}")
    config = json.loads((ddp_runs / f"ddp_{pairs}" / "config.json").read_text())
    assert config["world_size"] == WORLD


def test_ddp_resume_is_exact_on_every_rank(ddp_runs):
    for r in range(WORLD):
        full = torch.load(ddp_runs / f"ddp_within_volume_rank{r}.pt", weights_only=True)
        resumed = torch.load(ddp_runs / f"resume_within_volume_rank{r}.pt", weights_only=True)
        for k, v in full.items():
            torch.testing.assert_close(resumed[k], v, rtol=1e-5, atol=1e-6, msg=f"rank {r}: {k}")
    state = torch.load(ddp_runs / "split" / "checkpoints" / "last.pt", weights_only=True)
    assert len(state["numpy_rngs"]) == WORLD and state["numpy_rngs"][0] != state["numpy_rngs"][1]


def test_a_nan_loss_on_one_rank_stops_every_rank_with_the_message(ddp_runs):
    for r in range(WORLD):
        msg = (ddp_runs / f"nan_rank{r}.txt").read_text()
        assert "non-finite loss on rank 1" in msg and "step 3" in msg, (r, msg)
