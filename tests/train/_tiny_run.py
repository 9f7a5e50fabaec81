"""A tiny training run for tests/train/test_fault_injection.py.

Usage: ``python _tiny_run.py RUN_DIR KILL_AT``. With ``KILL_AT`` = k > 0 the process
SIGKILLs itself while writing ``last.pt`` for the k-th time, with half of the new
file's bytes on disk (the rename never happens).
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import torch

from medssl.data.volume import Volume
from medssl.methods import create_method
from medssl.train import TrainConfig, fit


def train(run_dir: str):
    """Three epochs of two steps on four random volumes, one CPU thread (bit-reproducible)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(0)
        affine = np.diag([1.2, 0.9, 2.5, 1.0])
        volumes = [Volume(rng.normal(size=(1, 20, 18, 19)).astype(np.float32), affine, f"c{i}") for i in range(4)]
        torch.manual_seed(0)
        method = create_method("isimed", backbone="smallcnn", patch_size_vox=16, volumes_per_batch=2,
                               patches_per_volume=3, embed_dim=8)  # fmt: skip
        config = TrainConfig(epochs=3, steps_per_epoch=2, device="cpu", precision="fp32", keep_last=None)
        return fit(method, volumes, config, run_dir, progress=False)
    finally:
        torch.set_num_threads(threads)


def _die_while_writing_last_pt(kill_at: int) -> None:
    real_fsync, writes = os.fsync, [0]

    def fsync_or_die(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".last.pt."):
            writes[0] += 1
            if writes[0] == kill_at:
                os.ftruncate(fd, os.fstat(fd).st_size // 2)
                os.kill(os.getpid(), signal.SIGKILL)
        real_fsync(fd)

    os.fsync = fsync_or_die


if __name__ == "__main__":
    run_dir, kill_at = sys.argv[1], int(sys.argv[2])
    if kill_at:
        _die_while_writing_last_pt(kill_at)
    print("done", train(run_dir).step)
