"""Manifests, patient-grouped splits and the dataset scan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medssl.data.datasets import (
    ScanReport,
    assign_splits,
    read_manifest,
    scan_dataset,
    validate_manifest,
    write_manifest,
)
from medssl.data.errors import (
    DatasetScanError,
    DimensionalityError,
    LabelGridMismatchError,
    NonFiniteVoxelsError,
    TooSmallError,
    UnreadableFileError,
)
from medssl.data.preprocess import PreprocessConfig
from tests.helpers import make_volume_file, oblique_affine, write_nifti_file


def _manifest(n_groups: int, studies_per_group, seed: int = 0) -> pd.DataFrame:
    """Fake manifest (paths are never read): group g has ``studies_per_group(g)`` cases."""
    rows = []
    for g in range(n_groups):
        for s in range(studies_per_group(g)):
            rows.append({"case_id": f"p{g:03d}_s{s}", "image": f"/raw/p{g}/s{s}.nii.gz", "label": "",
                         "group": f"p{g:03d}", "split": ""})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- manifest files


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_manifest_round_trips_and_resolves_relative_paths_against_its_folder(tmp_path, suffix):
    df = pd.DataFrame({
        "case_id": ["a", "b"], "image": ["img/a.nii.gz", "/abs/b.nii.gz"], "label": ["lab/a.nii.gz", ""],
        "group": ["p1", ""], "split": ["train", ""], "aux_lesion": ["les/a.nii.gz", ""], "dataset": ["x", "x"],
        "label_names": [json.dumps({"1": "liver"}), ""],
    })
    path = write_manifest(df, tmp_path / "sub" / f"manifest{suffix}")
    back = read_manifest(path)
    assert list(back["case_id"]) == ["a", "b"]
    assert back.loc[0, "image"] == str(tmp_path / "sub" / "img" / "a.nii.gz")
    assert back.loc[0, "aux_lesion"] == str(tmp_path / "sub" / "les" / "a.nii.gz")
    assert back.loc[1, "image"] == "/abs/b.nii.gz"
    assert back.loc[1, "label"] == "" and back.loc[1, "aux_lesion"] == ""
    assert back.loc[1, "group"] == "b", "an empty group falls back to the case id"
    assert back.loc[0, "label_names"] == json.dumps({"1": "liver"})
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary files left behind"


def test_write_manifest_failure_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    write_manifest(_manifest(2, lambda g: 1), path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", boom)
    with pytest.raises(OSError, match="disk full"):
        write_manifest(_manifest(5, lambda g: 1), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_validate_manifest_lists_every_problem_at_once():
    df = pd.DataFrame({
        "case_id": ["a", "a", "b", "c", "d"],
        "image": ["x", "y", "", "z", "w"],
        "label": [""] * 5,
        "group": ["g1", "g2", "g3", "g4", "g4"],
        "split": ["train", "val", "test", "holdout", "train"],
    })
    with pytest.raises(ValueError) as exc:
        validate_manifest(df)
    msg = str(exc.value)
    assert "duplicate case_id(s): ['a']" in msg
    assert "empty image path for case(s) ['b']" in msg
    assert "holdout" in msg


def test_validate_manifest_rejects_a_group_straddling_train_and_test():
    df = _manifest(1, lambda g: 2)
    df["split"] = ["train", "test"]
    with pytest.raises(ValueError, match="straddle"):
        validate_manifest(df)


def test_validate_manifest_names_missing_required_columns():
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['image', 'label', 'group', 'split'\]"):
        validate_manifest(pd.DataFrame({"case_id": ["a"]}))


def test_read_manifest_of_a_csv_with_an_unknown_split_names_the_file(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("case_id,image,label,group,split\na,a.nii.gz,,,training\n")
    with pytest.raises(ValueError, match=r"(?s)m\.csv.*training"):
        read_manifest(path)


# --------------------------------------------------------------------------- splits


@pytest.mark.parametrize("seed", range(12))
def test_assign_splits_never_puts_one_patient_in_two_splits(seed):
    rng = np.random.default_rng(1000 + seed)
    sizes = rng.integers(1, 5, size=40)  # 1-4 studies per patient
    df = assign_splits(_manifest(40, lambda g: int(sizes[g])), seed=seed)
    per_group = df.groupby("group")["split"].nunique()
    assert (per_group == 1).all()
    assert set(df["split"]) == {"train", "val", "test"}
    frac_train = (df["split"] == "train").mean()
    assert 0.65 < frac_train < 0.92, frac_train


def test_assign_splits_is_deterministic_from_the_seed_and_differs_between_seeds():
    df = _manifest(30, lambda g: 1 + g % 3)
    a1, a2, b = assign_splits(df, seed=7), assign_splits(df, seed=7), assign_splits(df, seed=8)
    assert a1["split"].tolist() == a2["split"].tolist()
    assert a1["split"].tolist() != b["split"].tolist()
    # and it does not depend on the row order of the input
    shuffled = assign_splits(df.sample(frac=1.0, random_state=3), seed=7).set_index("case_id")["split"]
    assert shuffled.loc[a1["case_id"]].tolist() == a1["split"].tolist()


def test_assign_splits_with_fractions_matches_case_counts_when_groups_are_single_cases():
    df = assign_splits(_manifest(100, lambda g: 1), fractions=(0.6, 0.3, 0.1), seed=0)
    assert df["split"].value_counts().to_dict() == {"train": 60, "val": 30, "test": 10}


def test_assign_splits_with_counts_assigns_exact_numbers_of_patients():
    df = assign_splits(_manifest(12, lambda g: 2), fractions=None, counts=(5, 3, 2), seed=1)
    groups_per_split = df.groupby("split")["group"].nunique().to_dict()
    assert groups_per_split == {"": 2, "train": 5, "val": 3, "test": 2}


def test_assign_splits_keeps_preset_splits_and_puts_unset_studies_with_their_patient():
    df = _manifest(10, lambda g: 2)
    df.loc[0, "split"] = "test"  # p000_s0; p000_s1 unset
    df.loc[df["group"] == "p001", "split"] = "external"
    out = assign_splits(df, seed=0)
    assert out.loc[out["group"] == "p000", "split"].tolist() == ["test", "test"]
    assert out.loc[out["group"] == "p001", "split"].tolist() == ["external", "external"]
    overwritten = assign_splits(df, seed=0, overwrite=True)
    assert "external" not in set(overwritten["split"])


def test_assign_splits_rejects_counts_larger_than_the_number_of_patients():
    with pytest.raises(ValueError, match="only 3"):
        assign_splits(_manifest(3, lambda g: 1), counts=(2, 1, 1))


# --------------------------------------------------------------------------- dataset scan


def _bad_and_good_cases(tmp_path: Path) -> tuple[pd.DataFrame, dict[str, type]]:
    """Two good cases and three different bad files; returns the manifest and the expected errors."""
    rows = []
    for i in range(2):
        v = make_volume_file(tmp_path / "raw", name=f"good{i}", seed=i)
        rows.append({"case_id": f"good{i}", "image": str(v.image_path), "label": str(v.label_path)})
    rows.append({"case_id": "missing", "image": str(tmp_path / "raw" / "nothing_here.nii.gz"), "label": ""})
    aff = oblique_affine((1.0, 1.2, 2.5), (10.0, 0.0, 5.0))
    nan = np.ones((10, 9, 8), np.float32)
    nan[2, 3, 4] = np.nan
    rows.append({"case_id": "nan", "image": str(write_nifti_file(tmp_path / "raw" / "nan.nii.gz", nan, aff)),
                 "label": ""})
    img = write_nifti_file(tmp_path / "raw" / "mism.nii.gz", np.ones((10, 9, 8), np.float32), aff)
    lab = write_nifti_file(tmp_path / "raw" / "mism_seg.nii.gz", np.ones((10, 9, 7), np.int16), aff)
    rows.append({"case_id": "mism", "image": str(img), "label": str(lab)})
    df = pd.DataFrame(rows).assign(group="", split="")
    expected = {"missing": UnreadableFileError, "nan": NonFiniteVoxelsError, "mism": LabelGridMismatchError}
    return df, expected


def test_scan_dataset_reports_every_bad_file_at_once(tmp_path):
    df, expected = _bad_and_good_cases(tmp_path)
    with pytest.raises(DatasetScanError) as exc:
        scan_dataset(df, PreprocessConfig(target_spacing_mm=(2.0, 2.0, 3.0)), progress=False)
    problems = exc.value.problems
    assert sorted(type(p).__name__ for p in problems) == sorted(t.__name__ for t in expected.values())
    msg = str(exc.value)
    for name in ("nothing_here.nii.gz", "nan.nii.gz", "mism_seg.nii.gz"):
        assert name in msg


def test_scan_dataset_skip_mode_returns_good_and_bad_cases(tmp_path):
    df, expected = _bad_and_good_cases(tmp_path)
    report = scan_dataset(df, PreprocessConfig(target_spacing_mm=(2.0, 2.0, 3.0)), on_error="skip", progress=False)
    assert isinstance(report, ScanReport)
    assert report.ok_case_ids == ["good0", "good1"]
    assert {c: type(e) for c, e in zip(report.problem_case_ids, report.problems)} == expected
    frame = report.to_frame()
    assert frame.set_index("case_id")["status"].to_dict() == {
        "good0": "ok", "good1": "ok", "missing": "bad", "nan": "bad", "mism": "bad"}
    assert report.keep_ok(df)["case_id"].tolist() == ["good0", "good1"]
    assert "3 bad" in report.summary()
    np.testing.assert_allclose(report.spacings_mm["good0"], (2.0, 2.0, 3.0), atol=1e-6)


def test_scan_dataset_flags_a_volume_smaller_than_the_patch_after_preprocessing(tmp_path):
    v = make_volume_file(tmp_path, name="small", shape=(20, 18, 16))
    df = pd.DataFrame([{"case_id": "small", "image": str(v.image_path), "label": "", "group": "", "split": ""}])
    config = PreprocessConfig(target_spacing_mm=(2.0, 2.0, 2.0))
    shape = scan_dataset(df, config, progress=False).shapes_vox["small"]
    assert scan_dataset(df, config, patch_size_vox=shape, progress=False).ok  # exactly fits
    too_big = (shape[0], shape[1] + 1, shape[2])
    with pytest.raises(DatasetScanError) as exc:
        scan_dataset(df, config, patch_size_vox=too_big, progress=False)
    (problem,) = exc.value.problems
    assert isinstance(problem, TooSmallError)
    assert problem.path == str(v.image_path)
    assert str(shape) in problem.problem


def test_scan_dataset_reports_a_2d_image_as_a_dimensionality_error(tmp_path):
    flat = write_nifti_file(tmp_path / "flat.nii.gz", np.ones((12, 10, 1), np.float32), np.eye(4))
    df = pd.DataFrame([{"case_id": "flat", "image": str(flat), "label": "", "group": "", "split": ""}])
    report = scan_dataset(df, None, on_error="skip", progress=False)
    assert [type(p) for p in report.problems] == [DimensionalityError]
