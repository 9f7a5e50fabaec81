"""Checkpoints: pickle-free loading, atomic writes, rebuilding a method, rng round trips."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import medssl.train.checkpoint as ckpt
from medssl.data.volume import Volume
from medssl.methods import create_method
from medssl.train import CheckpointError, TrainConfig, fit, load_checkpoint, load_method, save_checkpoint
from medssl.train.checkpoint import CHECKPOINT_FORMAT, numpy_rng_state, restore_numpy_rng

_MARKER = {"path": None}


class _Payload:
    """Unpickling this would run code (create a file): a stand-in for a malicious object."""

    def __reduce__(self):
        return (open, (_MARKER["path"], "w"))


def _minimal_state(**extra) -> dict:
    return {"format": CHECKPOINT_FORMAT, "method": "isimed", "method_config": "{}", "model": {}, "step": 0, "epoch": 0, **extra}


def test_loading_refuses_a_checkpoint_holding_a_pickled_custom_object_and_runs_none_of_its_code(tmp_path):
    _MARKER["path"] = str(tmp_path / "pwned")
    torch.save(_minimal_state(extra_object=_Payload()), tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_loading_refuses_files_that_are_not_medssl_checkpoints(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a medssl checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_checkpoint(tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_zero_byte_checkpoint_is_named_as_empty_by_every_loader(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    empty = tmp_path / "checkpoints" / "last.pt"
    empty.write_bytes(b"")
    for load in (load_checkpoint, load_method):
        with pytest.raises(CheckpointError, match="empty") as info:
            load(empty)
        assert info.value.path == str(empty)
    with pytest.raises(CheckpointError, match="last.pt: is empty"):  # resuming a run from it
        fit(_tiny_isimed(), _volumes(2), TrainConfig(epochs=1, steps_per_epoch=1, device="cpu"), tmp_path,
            progress=False)  # fmt: skip


@pytest.mark.parametrize("key, text", [("method_config", '{"patch_size_vox": 8,'), ("train_config", "[1, 2]")])
def test_a_malformed_config_inside_a_checkpoint_is_named_with_the_file_and_the_field(tmp_path, key, text):
    method = _tiny_isimed()
    state = _minimal_state(method_config=ckpt.config_to_json(method.config), model=method.state_dict())
    save_checkpoint({**state, key: text}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=f"bad.pt: its '{key}'") as info:
        load_method(tmp_path / "bad.pt")
    assert info.value.path == str(tmp_path / "bad.pt")


def test_config_values_a_method_rejects_are_a_checkpoint_error(tmp_path):
    method = _tiny_isimed()
    config = json.loads(ckpt.config_to_json(method.config))
    config["patch_size_vox"] = -3
    save_checkpoint(_minimal_state(method_config=json.dumps(config), model=method.state_dict()), tmp_path / "neg.pt")
    with pytest.raises(CheckpointError, match="cannot rebuild method 'isimed'"):
        load_method(tmp_path / "neg.pt")


def test_a_failure_mid_save_leaves_the_previous_file_intact_and_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(_minimal_state(step=1, model={"w": torch.ones(3)}), path)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(_minimal_state(step=2, model={"w": torch.zeros(3)}), path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def _volumes(n: int) -> list[Volume]:
    rng = np.random.default_rng(0)
    affine = np.diag([1.2, 0.9, 2.5, 1.0])
    return [Volume(data=rng.normal(size=(1, 20, 18, 19)).astype(np.float32), affine=affine, case_id=f"c{i}") for i in range(n)]


def _tiny_isimed():
    torch.manual_seed(0)
    return create_method("isimed", backbone="smallcnn", patch_size_vox=16, volumes_per_batch=2, patches_per_volume=3, embed_dim=8)


def test_a_crash_while_fit_writes_a_checkpoint_keeps_the_previous_last_pt(tmp_path, monkeypatch):
    cfg = TrainConfig(epochs=1, steps_per_epoch=2, device="cpu", precision="fp32")
    fit(_tiny_isimed(), _volumes(3), cfg, tmp_path, progress=False)
    before = load_checkpoint(tmp_path / "checkpoints" / "last.pt")

    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("killed mid-write")))
    with pytest.raises(OSError, match="killed mid-write"):
        config = TrainConfig(epochs=2, steps_per_epoch=2, device="cpu", precision="fp32")
        fit(_tiny_isimed(), _volumes(3), config, tmp_path, progress=False)
    monkeypatch.undo()
    after = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert after["step"] == before["step"] == 2
    for k, v in before["model"].items():
        assert torch.equal(after["model"][k], v)
    assert not [p for p in os.listdir(tmp_path / "checkpoints") if p.endswith(".tmp")]


def test_load_method_rebuilds_the_trained_method_in_eval_mode_with_its_weights(tmp_path):
    method = _tiny_isimed()
    config = TrainConfig(epochs=1, steps_per_epoch=2, device="cpu", precision="fp32")
    result = fit(method, _volumes(3), config, tmp_path, progress=False)
    loaded = load_method(result.checkpoint_path)
    assert type(loaded) is type(method) and loaded.config == method.config and not loaded.training
    x = torch.randn(4, 1, 16, 16, 16)
    method.eval()
    torch.testing.assert_close(loaded.embed(x), method.embed(x), rtol=0, atol=0)
    assert loaded.embed(x).shape == (4, 8)


def test_numpy_generator_state_round_trips_through_json():
    rng = np.random.default_rng(2024)
    rng.normal(size=7)
    copy = restore_numpy_rng(numpy_rng_state(rng))
    np.testing.assert_array_equal(copy.integers(0, 1 << 40, size=20), rng.integers(0, 1 << 40, size=20))


def _efbig_writes(monkeypatch):
    """A real write failure: the kernel refuses writes past RLIMIT_FSIZE (EFBIG; Python ignores SIGXFSZ)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _enospc_fsync(monkeypatch):
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    return lambda: None


@pytest.mark.parametrize("failure", [_efbig_writes, _enospc_fsync], ids=["file-size-limit", "disk-full"])
def test_a_failed_checkpoint_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, failure):
    """Issue 23 item 8: `[Errno 28] No space left on device` named no file."""
    from medssl.train.checkpoint import CheckpointWriteError

    last = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(_minimal_state(step=1, weights=torch.zeros(4)), last)
    restore = failure(monkeypatch)
    try:
        with pytest.raises(CheckpointWriteError) as err:
            save_checkpoint(_minimal_state(step=2, weights=torch.zeros(100_000)), last)
    finally:
        restore()
    assert err.value.path == str(last) and str(last) in str(err.value)
    assert "previous checkpoint there is untouched" in err.value.problem
    if failure is _enospc_fsync:
        assert "disk is full" in err.value.problem
    assert load_checkpoint(last)["step"] == 1
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]  # no temp file left


@pytest.mark.parametrize(("content", "says"), [
    (bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)), "is not a PyTorch checkpoint"),
    (b"loss,step\n0.5,1\n" * 20, "is not a PyTorch checkpoint"),
    ("zip-truncated", "is a damaged PyTorch archive"),
])  # fmt: skip
def test_a_garbage_or_damaged_checkpoint_is_named_as_such_not_as_refused_pickled_objects(tmp_path, content, says):
    """Issue 23 item 11: a garbage .pt was reported as "arbitrary pickled objects are refused"."""
    path = tmp_path / "last.pt"
    if content == "zip-truncated":
        save_checkpoint(_minimal_state(weights=torch.zeros(1000)), path)
        os.truncate(path, path.stat().st_size // 2)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert err.value.path == str(path) and says in err.value.problem
    assert "pickled object" not in err.value.problem


def test_a_refused_object_is_named_in_the_message(tmp_path):
    _MARKER["path"] = str(tmp_path / "pwned")
    torch.save(_minimal_state(extra_object=_Payload()), tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"holds a pickled object \(.*open.*\).*could run arbitrary code"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(("field", "value"), [("huber_delta_mm", "abc"), ("in_channels", "abc"),
                                              ("patch_size_vox", 2.5), ("foreground_only", "yes")])
def test_a_stored_config_value_of_the_wrong_type_names_the_field(tmp_path, field, value):
    """Issue 23 item 11: a wrong config type gave `'>' not supported between 'str' and 'int'`."""
    method = create_method("isimed")
    config = json.loads(ckpt.config_to_json(method.config))
    assert field in config
    config[field] = value
    state = _minimal_state(method_config=json.dumps(config), model=method.state_dict())
    save_checkpoint(state, tmp_path / "last.pt")
    with pytest.raises(CheckpointError) as err:
        load_method(tmp_path / "last.pt")
    assert f"IsimedConfig.{field} expects" in err.value.problem and repr(value) in err.value.problem


def test_a_step_stored_as_text_is_refused_when_loading(tmp_path):
    save_checkpoint(_minimal_state(step="5"), tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="'step' must be a non-negative int, got '5' \\(str\\)"):
        load_checkpoint(tmp_path / "last.pt")
