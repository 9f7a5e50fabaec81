"""build_run: a preset plus overrides gives a seeded model and its TrainConfig."""

import pytest
import torch

from medssl.presets import build_run


def test_build_run_applies_overrides_and_seeds_the_initialisation():
    m1, t1 = build_run("isimed", "tiny", method_overrides={"patches_per_volume": 3}, train_overrides={"epochs": 5}, seed=7)
    m2, _ = build_run("isimed", "tiny", seed=7)
    m3, _ = build_run("isimed", "tiny", seed=8)
    assert m1.config.patches_per_volume == 3 and m1.config.backbone == "smallcnn"
    assert t1.epochs == 5 and t1.seed == 7
    p1, p2, p3 = (next(m.backbone.parameters()) for m in (m1, m2, m3))
    assert torch.equal(p1, p2) and not torch.equal(p1, p3)


def test_build_run_rejects_unknown_override_keys():
    with pytest.raises(TypeError, match="TrainConfig has no setting 'epoch' .did you mean epochs"):
        build_run("isimed", "tiny", train_overrides={"epoch": 3})
    with pytest.raises(TypeError, match="isimed config has no setting 'patchsize'"):
        build_run("isimed", "tiny", method_overrides={"patchsize": 3})
    with pytest.raises(TypeError, match="TrainConfig.lr expects float, got 'fast'"):
        build_run("isimed", "tiny", train_overrides={"lr": "fast"})
    with pytest.raises(TypeError, match="scale_mm expects float"):
        build_run("isimed", "tiny", method_overrides={"scale_mm": True})
