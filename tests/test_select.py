"""Settings are chosen on the validation split: sweep trains per value and summarises on val only."""

import pandas as pd
import pytest

from medssl.select import choose, sweep


def test_choose_picks_the_best_validation_value_and_refuses_other_splits():
    t = pd.DataFrame({"value": [1, 10, 50], "split": "val", "spearman": [0.2, 0.9, 0.8]})
    assert choose(t) == 10
    assert choose(t.assign(err=[3.0, 1.0, 2.0]), "err", higher_is_better=False) == 10
    with pytest.raises(ValueError, match="validation"):
        choose(t.assign(split=["val", "test", "val"]))


@pytest.mark.network
@pytest.mark.slow
def test_sweep_trains_one_run_per_value_and_never_loads_the_test_split(tmp_path, notebook_data_dir, monkeypatch):
    import medssl.data.source as source

    monkeypatch.setenv("MEDSSL_DATA", str(notebook_data_dir))
    monkeypatch.setenv("MEDSSL_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("MEDSSL_CACHE", raising=False)
    loaded = []
    original = source.DataSource.volumes
    monkeypatch.setattr(source.DataSource, "volumes", lambda self, split=None: loaded.append(split) or original(self, split))
    table = sweep("isimed", "scale_mm", [1.0, 50.0], preset="tiny", run="sw", data={"n_subjects": 6}, progress=False,
                  train_overrides={"epochs": 1, "steps_per_epoch": 1})
    assert list(table["value"]) == [1.0, 50.0] and (table["split"] == "val").all()
    assert (table["steps"] == 1).all() and table["spearman"].between(-1, 1).all()
    assert "test" not in loaded and set(loaded) == {"train", "val"}
    assert (tmp_path / "runs" / "sw" / "sweeps" / "isimed-scale_mm.csv").is_file()
