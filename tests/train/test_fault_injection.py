"""kill -9 during a checkpoint write, then resume: the weights equal an uninterrupted run's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from medssl.train import load_checkpoint
from tests.train._tiny_run import train

REPO = Path(__file__).resolve().parents[2]
RUN = Path(__file__).with_name("_tiny_run.py")


def _run(run_dir: Path, kill_at: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(RUN), str(run_dir), str(kill_at)], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_kill_9_while_writing_last_pt_then_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    assert train(str(tmp_path / "reference")).step == 6  # uninterrupted, in this process

    killed = _run(tmp_path / "crashed", kill_at=2)  # dies writing last.pt after epoch 2, half the bytes written
    assert killed.returncode == -9
    ckpt_dir = tmp_path / "crashed" / "checkpoints"
    assert load_checkpoint(ckpt_dir / "last.pt")["step"] == 2  # the previous last.pt is intact
    leftovers = [p.name for p in ckpt_dir.iterdir() if p.name.startswith(".last.pt.")]
    assert len(leftovers) == 1  # the killed writer's half-written temp file

    assert train(str(tmp_path / "crashed")).step == 6  # resumed, in this process

    want = load_checkpoint(tmp_path / "reference" / "checkpoints" / "last.pt")
    got = load_checkpoint(ckpt_dir / "last.pt")
    assert got["step"] == want["step"] == 6
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    assert not [p for p in ckpt_dir.iterdir() if ".tmp" in p.name]  # the dead writer's temp file was cleaned
