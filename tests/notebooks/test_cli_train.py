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
from medssl.presets import preset

TINY_DEMO = ["--preset", "tiny", "--n-subjects", "4", "--target-spacing-mm", "6", "-t", "epochs", "2"]


@pytest.mark.network
def test_medssl_train_writes_a_complete_run_folder(tmp_path, notebook_data_dir, monkeypatch, capsys):
    monkeypatch.setenv("MEDSSL_DATA", str(notebook_data_dir))
    monkeypatch.setenv("MEDSSL_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("MEDSSL_CACHE", raising=False)
    assert main(["train", "--method", "isimed", "--run", "c", *TINY_DEMO, "-m", "patches_per_volume", "3"]) == 0
    out = tmp_path / "runs" / "c" / "isimed"
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert preset("isimed", "tiny")[0]["patches_per_volume"] != 3  # so a 3 can only come from the -m override
    assert config["method"] == "isimed" and config["method_config"]["patches_per_volume"] == 3  # the -m override
    assert config["train"]["epochs"] == 2 and config["resolved"]["patches_per_step"] == 3 * config["method_config"][
        "volumes_per_batch"]
    assert (out / "checkpoints" / "last.pt").is_file()
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


def _folder_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSSL_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path / "cache"))


def test_medssl_train_on_a_three_scan_folder_trains_without_needing_a_test_split(tmp_path, monkeypatch,
                                                                                             capsys):
    # a user's folder of three scans: too few for val/test splits, which training does not need
    from tests.helpers import make_volume_file

    folder = tmp_path / "scans"
    folder.mkdir()
    for k in range(3):
        make_volume_file(folder, shape=(40, 38, 36), name=f"case{k}", seed=k, label=False)
    _folder_env(tmp_path, monkeypatch)
    code = main(["train", "--method", "isimed", "--run", "f", "--source", str(folder), "--preset", "tiny",
                 "--target-spacing-mm", "1", "-t", "epochs", "1", "-t", "steps_per_epoch", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (tmp_path / "runs" / "f" / "isimed" / "checkpoints" / "last.pt").is_file()


def test_medssl_train_refuses_a_case_smaller_than_a_patch_before_any_step(tmp_path, monkeypatch, capsys):
    from tests.helpers import make_volume_file

    folder = tmp_path / "scans"
    folder.mkdir()
    make_volume_file(folder, shape=(28, 26, 24), name="big", label=False)
    make_volume_file(folder, shape=(6, 6, 6), name="small", label=False)
    _folder_env(tmp_path, monkeypatch)
    code = main(["train", "--method", "isimed", "--run", "s", "--source", str(folder), "--preset", "tiny",
                 "--target-spacing-mm", "2", "-t", "epochs", "1", "-t", "steps_per_epoch", "2"])
    err = capsys.readouterr().err
    assert code == 1 and "small" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "s" / "isimed" / "checkpoints").exists()  # nothing was trained
