"""Every checkpoint records the preprocessing of its training volumes; readers of the checkpoint check new inputs against it."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from medssl.data.io import read_volume
from medssl.data.preprocess import PreprocessConfig, preprocess
from medssl.data.source import open_data
from medssl.evaluate.dense import dense_embeddings
from medssl.methods import create_method
from medssl.train import TrainConfig, fit, load_checkpoint, load_method
from medssl.train.preprocessing import (
    LEGACY_ASSUMPTION,
    PreprocessingMismatchError,
    config_from_record,
    record_from_volumes,
    resolve_preprocessing,
)
from tests.helpers import make_volume_file, oblique_affine

AFFINE = oblique_affine((2.0, 2.5, 3.0), (15.0, -10.0, 20.0), (-30.0, 20.0, -25.0))
# Not the defaults of anything: a CT window of our own, 4 mm, a body threshold in raw units.
TRAINED = PreprocessConfig(target_spacing_mm=(4.0, 4.0, 4.0), intensity="ct_window", ct_window_hu=(50.0, 450.0),
                           foreground_threshold=50.0)
ONE_STEP = TrainConfig(epochs=1, steps_per_epoch=1, device="cpu", precision="fp32", log_every=1, eval_every_epochs=100)


def _tiny_isimed():
    torch.manual_seed(0)
    return create_method("isimed", backbone="smallcnn", patch_size_vox=8, volumes_per_batch=2, patches_per_volume=4)


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path / "cache"))


def test_fit_records_the_preprocessing_of_volumes_opened_from_a_folder(tmp_path, cache_env):
    for i in range(3):
        make_volume_file(tmp_path / "scans", shape=(30, 28, 20), affine=AFFINE, name=f"c{i}", label=False, seed=i)
    data = open_data(tmp_path / "scans", preprocess=TRAINED, progress=False)
    volumes = data.volumes()  # lazy volumes from the cache: their meta carries the config
    fit(_tiny_isimed(), volumes, ONE_STEP, tmp_path / "run", progress=False)

    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")  # weights_only=True inside
    assert isinstance(state["preprocessing"], str)  # a JSON string: nothing to unpickle
    record = json.loads(state["preprocessing"])
    assert config_from_record(record) == TRAINED
    assert record["config"]["ct_window_hu"] == [50.0, 450.0] and record["config"]["intensity"] == "ct_window"
    assert record["n_volumes"] == 3 and record["n_without_record"] == 0
    assert record["intensity_modes"] == {"ct_window": 3}
    assert record["patch_size_vox"] == [8, 8, 8] and record["input_size_vox"] == [8, 8, 8]
    np.testing.assert_allclose(record["spacing_mm_min"], [4.0, 4.0, 4.0], atol=1e-6)
    assert record["digests"] == [TRAINED.digest()]
    assert load_method(tmp_path / "run" / "checkpoints" / "last.pt").preprocessing == record


def test_volumes_without_a_record_or_with_mixed_ones_give_an_unknown_config_and_a_declared_one_is_checked(tmp_path):
    scans = [make_volume_file(tmp_path, shape=(30, 28, 20), affine=AFFINE, name=f"c{i}", label=False, seed=i)
             for i in range(2)]
    raw = [read_volume(s.image_path) for s in scans]
    mixed = [preprocess(raw[0], TRAINED), preprocess(raw[1], LEGACY_ASSUMPTION)]
    record = record_from_volumes(mixed, (8, 8, 8))
    assert record["config"] is None and len(record["configs"]) == 2
    with pytest.warns(UserWarning, match="preprocessed in 2 different ways"):
        resolve_preprocessing(record)

    in_memory = [preprocess(v, TRAINED).with_(meta={}) for v in raw]  # arrays without their record
    assert record_from_volumes(in_memory, (8, 8, 8))["n_without_record"] == 2
    fit(_tiny_isimed(), in_memory, ONE_STEP, tmp_path / "declared", progress=False, preprocessing=TRAINED)
    assert config_from_record(load_method(tmp_path / "declared" / "checkpoints" / "last.pt").preprocessing) == TRAINED

    with pytest.raises(ValueError, match="contradicts the training volumes' own record"):
        fit(_tiny_isimed(), [preprocess(v, TRAINED) for v in raw], ONE_STEP, tmp_path / "contradiction",
            progress=False, preprocessing=LEGACY_ASSUMPTION)


def test_resolve_uses_the_record_rejects_a_disagreeing_setting_and_forces_it_only_when_asked():
    record = {"format": "medssl-preprocessing-v1", "config": json.loads(json.dumps(asdict(TRAINED)))}
    assert resolve_preprocessing(record) == TRAINED
    assert resolve_preprocessing(record, {"intensity": "ct_window", "target_spacing_mm": [4, 4, 4]}) == TRAINED
    with pytest.raises(PreprocessingMismatchError) as err:
        resolve_preprocessing(record, {"intensity": "percentile", "target_spacing_mm": (3.0, 3.0, 3.0)}, where="ck.pt")
    text = str(err.value)
    assert "ck.pt" in text and "intensity: checkpoint 'ct_window', given 'percentile'" in text
    assert "target_spacing_mm: checkpoint (4, 4, 4), given (3, 3, 3)" in text
    assert set(err.value.differences) == {"intensity", "target_spacing_mm"}
    with pytest.raises(PreprocessingMismatchError, match="crop_margin_vox"):  # a whole config: every field compared
        resolve_preprocessing(record, PreprocessConfig(**{**asdict(TRAINED), "crop_margin_vox": 5}))
    with pytest.warns(UserWarning, match="forced away.*intensity: trained 'ct_window', used 'percentile'"):
        forced = resolve_preprocessing(record, {"intensity": "percentile"}, force=True)
    assert forced.intensity == "percentile" and forced.ct_window_hu == (50.0, 450.0)
    with pytest.raises(ValueError, match="unknown preprocessing settings.*spacing"):
        resolve_preprocessing(record, {"spacing": 3})


def test_an_older_checkpoint_is_used_with_a_warning_that_lists_every_assumed_setting():
    with pytest.warns(UserWarning, match="no preprocessing record") as caught:
        config = resolve_preprocessing(None, {"foreground_threshold": -500}, where="old.pt")
    assert config == PreprocessConfig(**{**asdict(LEGACY_ASSUMPTION), "foreground_threshold": -500.0})
    said = str(caught[0].message)
    for part in ("old.pt", "written before", "target_spacing_mm=(3, 3, 3)", "intensity='percentile'",
                 "percentiles=(5, 95)", "foreground_threshold=-500.0", "orientation='RAS'"):
        assert part in said


def test_dense_embeddings_refuse_volumes_prepared_otherwise_than_the_checkpoints_training_data(tmp_path):
    raw = [read_volume(make_volume_file(tmp_path, shape=(30, 28, 20), affine=AFFINE, name=f"c{i}", label=False,
                                        seed=i).image_path) for i in range(2)]  # fmt: skip
    fit(_tiny_isimed(), [preprocess(v, TRAINED) for v in raw], ONE_STEP, tmp_path / "run", progress=False)
    method = load_method(tmp_path / "run" / "checkpoints" / "last.pt")
    same = dense_embeddings(method, preprocess(raw[0], TRAINED), stride_vox=4, progress=False)
    assert np.isfinite(same.embeddings).all()
    other = preprocess(raw[0], LEGACY_ASSUMPTION)
    with pytest.raises(PreprocessingMismatchError, match=r"case c0 .*c0\.nii\.gz.*isimed.*intensity: checkpoint "
                                                         r"'ct_window', volume 'percentile'"):
        dense_embeddings(method, other, stride_vox=4, progress=False)
    untrained = _tiny_isimed()  # built in memory: no record, nothing to check against
    assert dense_embeddings(untrained, other, stride_vox=4, progress=False).embeddings.shape[-1] == method.embed_dim


def test_fine_tuning_refuses_subjects_prepared_otherwise_before_any_step(tmp_path):
    from medssl.evaluate.finetune import FinetuneConfig, finetune
    from medssl.evaluate.segmetrics import OrganSet

    scans = [make_volume_file(tmp_path, shape=(30, 28, 20), affine=AFFINE, name=f"c{i}", seed=i) for i in range(2)]
    raw = [read_volume(s.image_path, s.label_path) for s in scans]
    fit(_tiny_isimed(), [preprocess(v, TRAINED) for v in raw], ONE_STEP, tmp_path / "run", progress=False)
    method = load_method(tmp_path / "run" / "checkpoints" / "last.pt")
    steps = []
    with pytest.raises(PreprocessingMismatchError, match=r"case c1 .*target_spacing_mm: checkpoint \(4, 4, 4\), "
                                                         r"volume \(3, 3, 3\)"):
        finetune(method, [preprocess(raw[0], TRAINED)], OrganSet(names=("blob",), label_ids=(1,)),
                 FinetuneConfig(steps=1, device="cpu"), test_volumes=[preprocess(raw[1], LEGACY_ASSUMPTION)],
                 step_callback=lambda step, net: steps.append(step))
    assert steps == []  # refused before the first step
