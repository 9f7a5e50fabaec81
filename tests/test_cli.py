"""The `medssl` command: clear errors without tracebacks, type-checked overrides, safe run names, helpful --help."""

import pytest

from medssl.cli import main


def test_errors_print_a_message_and_exit_non_zero_without_a_traceback(capsys):
    assert main(["train", "--method", "isimed", "--run", "../../escape"]) == 1
    err = capsys.readouterr().err
    assert "plain name" in err and "Traceback" not in err


@pytest.mark.parametrize(("args", "message"), [
    (["-t", "epochs", "abc"], "TrainConfig.epochs expects int, got 'abc'"),
    (["-t", "epohcs", "3"], "did you mean epochs"),
    (["-m", "patches_per_volume", "1.5"], "patches_per_volume expects int"),
])
def test_overrides_are_type_checked_before_anything_runs(capsys, args, message):
    assert main(["train", "--method", "isimed", "--run", "ok", *args]) == 1
    assert message in capsys.readouterr().err


def test_debug_shows_the_traceback():
    with pytest.raises(TypeError, match="expects int"):
        main(["--debug", "train", "--method", "isimed", "-t", "epochs", "abc"])


def test_help_lists_methods_and_presets(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "isimed" in out and "simclr" in out and "demo" in out and "paper" in out


@pytest.mark.parametrize(("device", "cuda", "message"), [
    ("cuda", None, "-t device cuda: this torch build has no CUDA support; use -t device cpu"),
    ("cuda", "12.4", "-t device cuda: no CUDA GPU is visible on this machine"),
    ("cuda:3", "12.4+1gpu", "-t device cuda:3: this machine has 1 CUDA device(s)"),
    ("gpu", None, "-t device gpu: not a device name"),
])  # fmt: skip
def test_a_device_this_machine_lacks_is_refused_before_any_data_is_built(capsys, monkeypatch, device, cuda, message):
    """Issue 23 item 10: `-t device cuda` on a CPU machine gave torch's raw "Torch not compiled with CUDA
    enabled", after the data had been built."""
    import torch

    import medssl.data.source

    monkeypatch.setattr(torch.version, "cuda", None if cuda is None else cuda.split("+")[0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda is not None and cuda.endswith("1gpu"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 if cuda and cuda.endswith("1gpu") else 0)
    monkeypatch.setattr(medssl.data.source, "open_data", lambda *a, **k: pytest.fail("data was built"))
    assert main(["train", "--method", "isimed", "--run", "ok", "-t", "device", device]) == 1
    assert message in capsys.readouterr().err
