"""Every registered method names a validation pretext measure that its validation records really hold.

Runs over ``list_methods()`` like the shared contract tests: a one-step ``fit`` with a validation set
writes the method's real validation record, and ``Method.val_measure`` must name a finite value in it.
"""

from __future__ import annotations

import math

import pytest

from medssl.methods import create_method, get_method_class, list_methods, method_info
from medssl.train import TrainConfig, fit, read_metrics
from tests.methods.test_shared_method_contract import _tiny_config, _volumes

# the pretext measure each paper's task is judged by (early stopping watches it in the reference study)
EXPECTED = {
    "isimed": ("abs_err_mm", "min"),  # |latent - physical distance| in mm
    "regisimed": ("abs_err_mm", "min"),
    "reg2d": ("offset_err_hw", "min"),  # offset error in patch half-widths
    "heatmap": ("offset_err_hw", "min"),
    "doersch": ("accuracy", "max"),  # which of the six neighbours
}


@pytest.mark.parametrize("name", list_methods())
def test_val_measure_is_a_key_of_the_validation_record_and_early_stopping_watches_it(tmp_path, name):
    import json

    import torch

    measure, mode = get_method_class(name).val_measure
    assert mode in ("min", "max")
    assert method_info(name)["val_measure"] == (measure, mode)
    if name in EXPECTED:
        assert (measure, mode) == EXPECTED[name]
    torch.manual_seed(0)
    method = create_method(name, **_tiny_config(name))
    trains = get_method_class(name).trains
    # nothing counts as an improvement (min_delta 1e9), patience 1: a trained method stops after its first step
    early = {"patience": 1, "min_delta": 1e9} if trains else None
    config = TrainConfig(epochs=2, steps_per_epoch=1, device="cpu", precision="fp32", early_stopping=early)
    result = fit(method, _volumes(3), config, tmp_path, val_volumes=_volumes(2), progress=False, tensorboard=False)
    val = read_metrics(tmp_path).query("split == 'val'")
    assert len(val) == (2 if trains else 1)
    assert measure in val.columns, f"{name}: val_measure {measure!r} not in its validation record {sorted(val.columns)}"
    assert all(math.isfinite(float(v)) for v in val[measure])
    if trains:
        state = json.loads((tmp_path / "early_stopping.json").read_text())
        assert state["measure"] == measure and [h[0] for h in state["history"]] == [0, 1]
        assert result.step == 1 and result.stopped_early and result.best_step == 0
        assert (tmp_path / "checkpoints" / "best.pt").is_file()
