"""One way to pretrain (issue 19 item 1): ``10_pretrain.ipynb``, ``medssl train`` and ``medssl sweep`` all call
``medssl.pretraining.pretrain`` and leave the same files, records and training in the method's folder."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from medssl.cli import main
from medssl.train import load_method

TINY = ["--preset", "tiny", "--n-subjects", "4", "--target-spacing-mm", "6"]  # tiny: 2 epochs x 2 steps


def _files(method_dir) -> set[str]:
    names = {str(p.relative_to(method_dir)) for p in method_dir.rglob("*") if p.is_file()}
    names.discard("10_pretrain.ipynb")  # the executed notebook itself
    return {re.sub(r"events\.out\.tfevents\..*", "events.out.tfevents.*", n) for n in names}


def _keys(method_dir) -> dict[str, set[str]]:
    records = [json.loads(line) for line in (method_dir / "metrics.jsonl").read_text().splitlines()]
    return {split: set().union(*(r.keys() for r in records if r["split"] == split)) for split in ("train", "val")}


@pytest.mark.network
@pytest.mark.slow
def test_medssl_train_and_sweep_write_what_10_pretrain_writes(run_notebook, capsys):
    nb = run_notebook("10_pretrain.ipynb", {"method": "isimed", "preset": "tiny",
                                            "data_overrides": {"n_subjects": 4, "target_spacing_mm": 6.0}}, run="nb")
    runs = nb.run_dir.parent
    assert main(["train", "--method", "isimed", "--run", "cli", *TINY]) == 0
    # a sweep over one value of a setting the tiny preset already has: the same training under another folder name
    assert main(["sweep", "--method", "isimed", "--param", "steps_per_epoch", "--values", "2", "--run", "sw",
                 *TINY]) == 0
    capsys.readouterr()
    dirs = {"notebook": runs / "nb" / "isimed", "train": runs / "cli" / "isimed",
            "sweep": runs / "sw" / "isimed-steps_per_epoch-2"}
    expected = _files(dirs["notebook"])
    assert {"config.json", "provenance.json", "metrics.jsonl", "events.out.tfevents.*", "checkpoints/last.pt",
            "loss_curves.png", "effective_rank_val.png", "summary.csv"} <= expected
    losses = {}
    for who, d in dirs.items():
        assert _files(d) == expected, who
        assert _keys(d) == _keys(dirs["notebook"]), who
        summary = pd.read_csv(d / "summary.csv")
        assert list(summary.columns) == list(pd.read_csv(dirs["notebook"] / "summary.csv").columns), who
        assert summary.loc[0, "split"] == "val" and summary.loc[0, "steps"] == 4, who
        config = json.loads((d / "config.json").read_text())
        assert config["train"] == json.loads((dirs["notebook"] / "config.json").read_text())["train"], who
        # every entry point opened the data with the same spacing (the sweep used to ignore target_spacing_mm)
        assert load_method(d / "checkpoints" / "last.pt").preprocessing["config"]["target_spacing_mm"] == [6.0] * 3
        m = pd.read_json(d / "metrics.jsonl", lines=True)
        losses[who] = m.loc[m["split"] == "train", "loss"].tolist()
    assert losses["train"] == losses["notebook"] == losses["sweep"]  # same seed, data and settings: same training
