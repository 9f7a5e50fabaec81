"""The run's data spec (issue 19 item 4): written once (00_data, or the first pretraining of a run), read by every
later step, overridable per call; a bad spec file is an error naming the file."""

from __future__ import annotations

import json

import pytest

from medssl.data.spec import DataSpec, DataSpecError
from medssl.rundir import RunDir


def test_a_run_without_a_spec_has_the_demo_defaults_and_overrides_are_checked(tmp_path):
    rd = RunDir(tmp_path / "r")
    assert not rd.data_spec_file.exists()
    assert rd.data_spec() == DataSpec(source="demo", n_subjects=48, target_spacing_mm=3.0)
    assert rd.data_spec({"n_subjects": 12}).n_subjects == 12
    with pytest.raises(TypeError, match="n_subjcts"):
        rd.data_spec({"n_subjcts": 12})  # a typo is refused, with the field's name
    with pytest.raises(TypeError, match="n_subjects expects int"):
        rd.data_spec({"n_subjects": "12"})
    with pytest.raises(ValueError, match="target_spacing_mm must be > 0"):
        rd.data_spec({"target_spacing_mm": 0})


def test_the_written_spec_is_what_later_steps_read_with_their_overrides_on_top(tmp_path):
    rd = RunDir(tmp_path / "r")
    folder = tmp_path / "scans"
    spec = DataSpec(source=str(folder), layout="msd", split_seed=3, target_spacing_mm=1.5, registered=True)
    path = rd.write_data_spec(spec)
    assert path == rd.path / "00_data" / "data_spec.json" and json.loads(path.read_text())["layout"] == "msd"
    assert rd.data_spec() == spec  # every field survives, layout, split seed and registration included
    assert rd.data_spec({"target_spacing_mm": 3}) == DataSpec(source=str(folder), layout="msd", split_seed=3,
                                                              target_spacing_mm=3.0, registered=True)
    assert RunDir(tmp_path / "r").data_spec() == spec  # nothing was written by reading with overrides


@pytest.mark.parametrize(("content", "problem"), [
    ("{not json", "cannot read"),
    ("[1, 2]", "JSON object"),
    ('{"source": "demo", "colour": "red"}', "no setting 'colour'"),
])  # fmt: skip
def test_a_bad_spec_file_is_an_error_naming_the_file(tmp_path, content, problem):
    rd = RunDir(tmp_path / "r")
    rd.data_spec_file.parent.mkdir(parents=True)
    rd.data_spec_file.write_text(content)
    with pytest.raises(DataSpecError, match=problem) as err:
        rd.data_spec()
    assert str(rd.data_spec_file) in str(err.value)
    assert rd.data_spec_file.read_text() == content  # left as it was


def test_open_data_of_a_run_opens_its_folder_at_its_spacing(tmp_path, monkeypatch, make_volume_file):
    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "scans"
    folder.mkdir()
    for k in range(3):
        make_volume_file(directory=folder, shape=(24, 22, 20), name=f"case{k}", seed=k, label=False)
    rd = RunDir(tmp_path / "r")
    rd.write_data_spec(DataSpec(source=str(folder), target_spacing_mm=2.0))
    data = rd.open_data(progress=False)
    assert data.source == str(folder) and data.preprocess_config.target_spacing_mm == (2.0, 2.0, 2.0)
    assert rd.open_data({"target_spacing_mm": 4.0}, progress=False).preprocess_config.target_spacing_mm == (4.0,) * 3


def test_the_first_pretraining_of_a_run_records_its_data_for_the_later_notebooks(tmp_path, monkeypatch,
                                                                                     make_volume_file):
    from medssl.pretraining import Pretraining

    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "scans"
    folder.mkdir()
    for k in range(3):
        make_volume_file(directory=folder, shape=(40, 38, 36), name=f"case{k}", seed=k, label=False)
    rd = RunDir(tmp_path / "r")
    job = Pretraining(rd, "isimed", "tiny", {"source": str(folder), "target_spacing_mm": 1.0}, progress=False)
    assert not rd.data_spec_file.exists()  # nothing is opened or written before the data are needed
    assert job.train_volumes and rd.data_spec() == DataSpec(source=str(folder), target_spacing_mm=1.0)
    # a later call with other overrides uses them but leaves the run's record alone
    other = Pretraining(rd, "isimed", "tiny", {"target_spacing_mm": 2.0}, progress=False)
    assert other.data.preprocess_config.target_spacing_mm == (2.0,) * 3
    assert rd.data_spec().target_spacing_mm == 1.0
