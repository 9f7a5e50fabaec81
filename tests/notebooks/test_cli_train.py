"""`medssl train`: the headless pretraining entry point, in one process and under torchrun with two CPU ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from medssl.cli import main

TINY_DEMO = ["--preset", "tiny", "--n-subjects", "4", "--target-spacing-mm", "6", "-t", "epochs", "2"]


@pytest.mark.network
def test_medssl_train_writes_a_complete_run_folder(tmp_path, notebook_data_dir, monkeypatch, capsys):
    monkeypatch.setenv("MEDSSL_DATA", str(notebook_data_dir))
    monkeypatch.setenv("MEDSSL_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("MEDSSL_CACHE", raising=False)
    assert main(["train", "--method", "isimed", "--run", "c", *TINY_DEMO, "-m", "patches_per_volume", "3"]) == 0
    out = tmp_path / "runs" / "c" / "isimed"
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert "patches_per_volume" in json.dumps(config) and (out / "checkpoints" / "last.pt").is_file()
    assert pd.read_csv(out / "summary.csv").loc[0, "method"] == "isimed"
    assert "SYNTHETIC" in capsys.readouterr().out


@pytest.mark.network
@pytest.mark.slow
def test_medssl_train_runs_under_torchrun_with_two_cpu_ranks(tmp_path, notebook_data_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MEDSSL_DATA": str(notebook_data_dir), "MEDSSL_RUNS": str(tmp_path / "runs"),
           "OMP_NUM_THREADS": "1"}
    env.pop("MEDSSL_CACHE", None)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
           "-m", "medssl.cli", "train", "--method", "simclr", "--run-name", "ddp", *TINY_DEMO]
    proc = subprocess.run(cmd, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "runs" / "ddp" / "simclr"
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["world_size"] == 2
    metrics = pd.read_json(out / "metrics.jsonl", lines=True)
    assert metrics["step"].max() == 4 and metrics["loss"].notna().all()  # only rank 0 wrote, once per step
    assert metrics[metrics["split"] == "train"]["step"].is_unique
