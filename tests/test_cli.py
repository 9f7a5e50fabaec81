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
