"""kill -9 during a checkpoint write, then resume: the weights and metrics.jsonl equal an uninterrupted run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medssl.train import load_checkpoint
from medssl.train.metrics import keep_metrics_up_to
from tests.train._tiny_run import train

REPO = Path(__file__).resolve().parents[2]
RUN = Path(__file__).with_name("_tiny_run.py")


def _run(run_dir: Path, kill_at: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(RUN), str(run_dir), str(kill_at)], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def _records(path: Path) -> list[dict]:
    """The JSON records of a metrics.jsonl (a torn line raises)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_keep_metrics_up_to_drops_the_records_after_the_checkpoint_and_torn_lines_and_only_those(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"split": s, "step": k, "loss": 1.0 / (k + 1)} for k in range(7) for s in ("train", "val") if k % 2 == 0 or
               s == "train"]  # fmt: skip
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + 'not json\n{"split": "val", "st')
    keep_metrics_up_to(path, 4)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [r for r in records if r["step"] <= 4]
    keep_metrics_up_to(path, 4)  # idempotent
    assert len(path.read_text().splitlines()) == len([r for r in records if r["step"] <= 4])
    keep_metrics_up_to(path, 0)  # no checkpoint: a fresh start, the old records go
    assert path.read_text() == ""
    keep_metrics_up_to(tmp_path / "none.jsonl", 3)  # nothing to do
    assert not (tmp_path / "none.jsonl").exists()


def test_kill_9_while_writing_last_pt_then_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    assert train(str(tmp_path / "reference")).step == 6  # uninterrupted, in this process

    killed = _run(tmp_path / "crashed", kill_at=2)  # dies writing last.pt after epoch 2, half the bytes written
    assert killed.returncode == -9
    ckpt_dir = tmp_path / "crashed" / "checkpoints"
    assert load_checkpoint(ckpt_dir / "last.pt")["step"] == 2  # the previous last.pt is intact
    leftovers = [p.name for p in ckpt_dir.iterdir() if p.name.startswith(".last.pt.")]
    assert len(leftovers) == 1  # the killed writer's half-written temp file
    metrics = tmp_path / "crashed" / "metrics.jsonl"
    lost = [r for r in _records(metrics) if r["step"] > 2]
    assert lost, "the killed run logged no step after its last good checkpoint: this test would check nothing"
    with open(metrics, "a", encoding="utf-8") as f:
        f.write('{"split": "train", "step": 4, "lo')  # and a torn last line, as a kill mid-write leaves

    assert train(str(tmp_path / "crashed")).step == 6  # resumed, in this process
    # metrics.jsonl: each step's record once, none lost, no torn line; the same records as the uninterrupted run
    got, want = _records(metrics), _records(tmp_path / "reference" / "metrics.jsonl")
    key = lambda r: (r["split"], r["step"])  # noqa: E731
    assert [key(r) for r in got] == [key(r) for r in want] and len(set(map(key, got))) == len(got)
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-6) and g["lr"] == pytest.approx(w["lr"]), (g, w)

    want = load_checkpoint(tmp_path / "reference" / "checkpoints" / "last.pt")
    got = load_checkpoint(ckpt_dir / "last.pt")
    assert got["step"] == want["step"] == 6
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    assert not [p for p in ckpt_dir.iterdir() if ".tmp" in p.name]  # the dead writer's temp file was cleaned
