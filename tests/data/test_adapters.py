"""Dataset layouts -> manifests, on small fake trees of tiny NIfTI files."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medssl.data.adapters import (
    LayoutError,
    autopet_manifest,
    brats_manifest,
    detect_layout,
    folder_manifest,
    manifest_from_folder,
    merge_totalseg_masks,
    msd_manifest,
    totalseg_manifest,
)
from medssl.data.datasets import scan_dataset
from medssl.data.errors import LabelGridMismatchError
from tests.helpers import oblique_affine, write_dicom_series, write_nifti_file

AFFINE = oblique_affine((1.0, 1.5, 2.5), (15.0, 0.0, 10.0))


def _nii(path: Path, array: np.ndarray | None = None, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array is None:
        array = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    return write_nifti_file(path, array, affine)


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _cols(df: pd.DataFrame, *cols: str) -> list[tuple]:
    return list(df[list(cols)].itertuples(index=False, name=None))


# --------------------------------------------------------------------------- folder


def test_folder_pairs_images_and_labels_in_two_subfolders_by_stem(tmp_path):
    for c in ("a", "b", "c"):
        _nii(tmp_path / "images" / f"{c}.nii.gz")
    _nii(tmp_path / "labels" / "a.nii.gz")
    _nii(tmp_path / "labels" / "b_seg.nii.gz")  # a label suffix is tolerated here too
    df = folder_manifest(tmp_path)
    assert _cols(df, "case_id", "label") == [
        ("a", str(tmp_path / "labels" / "a.nii.gz")), ("b", str(tmp_path / "labels" / "b_seg.nii.gz")), ("c", "")]
    assert df["image"].tolist() == [str(tmp_path / "images" / f"{c}.nii.gz") for c in "abc"]
    assert df["group"].tolist() == ["a", "b", "c"] and set(df["dataset"]) == {tmp_path.name}


def test_folder_pairs_image_and_label_suffixes_in_one_folder(tmp_path):
    _nii(tmp_path / "liver3_img.nii.gz")
    _nii(tmp_path / "liver3_seg.nii.gz")
    _nii(tmp_path / "kidney-1.nii")
    _nii(tmp_path / "kidney-1-label.nii.gz")
    _nii(tmp_path / "lonely.nii.gz")
    (tmp_path / "notes.txt").write_text("not an image")
    df = folder_manifest(tmp_path, group_fn=lambda c: c.split("-")[0])
    assert _cols(df, "case_id", "image", "label", "group") == [
        ("kidney-1", str(tmp_path / "kidney-1.nii"), str(tmp_path / "kidney-1-label.nii.gz"), "kidney"),
        ("liver3", str(tmp_path / "liver3_img.nii.gz"), str(tmp_path / "liver3_seg.nii.gz"), "liver3"),
        ("lonely", str(tmp_path / "lonely.nii.gz"), "", "lonely"),
    ]


def test_folder_reports_every_unpaired_label(tmp_path):
    _nii(tmp_path / "a.nii.gz")
    _nii(tmp_path / "b_seg.nii.gz")
    _nii(tmp_path / "c_mask.nii.gz")
    with pytest.raises(LayoutError) as exc:
        folder_manifest(tmp_path)
    assert "b_seg.nii.gz" in str(exc.value) and "c_mask.nii.gz" in str(exc.value)
    with pytest.warns(UserWarning, match="no matching image"):
        df = folder_manifest(tmp_path, unpaired_labels="warn")
    assert df["case_id"].tolist() == ["a"]


def test_folder_rejects_two_images_with_the_same_case_name(tmp_path):
    _nii(tmp_path / "a.nii.gz")
    _nii(tmp_path / "a_img.nii")
    with pytest.raises(LayoutError, match="sharing one case name"):
        folder_manifest(tmp_path)


def test_folder_treats_a_dicom_series_folder_as_one_image(tmp_path):
    write_dicom_series(tmp_path / "images" / "ct01", np.zeros((4, 4, 3), np.int16),
                       oblique_affine((1.0, 1.0, 2.0), flip_axes=(0, 1)))
    _nii(tmp_path / "labels" / "ct01.nii.gz")
    df = folder_manifest(tmp_path)
    assert _cols(df, "case_id", "image") == [("ct01", str(tmp_path / "images" / "ct01"))]


# --------------------------------------------------------------------------- MSD / nnU-Net


def _msd(root: Path) -> None:
    for c in ("spleen_2", "spleen_10"):
        _nii(root / "imagesTr" / f"{c}.nii.gz")
        _nii(root / "labelsTr" / f"{c}.nii.gz", np.ones((6, 5, 4), np.uint8))
    _nii(root / "imagesTs" / "spleen_1.nii.gz")
    _nii(root / "imagesTr" / "._spleen_2.nii.gz")  # macOS resource fork, as shipped in MSD tarballs
    spec = {"name": "Spleen", "labels": {"0": "background", "1": "spleen"},
            "training": [{"image": "./imagesTr/spleen_2.nii.gz", "label": "./labelsTr/spleen_2.nii.gz"},
                         {"image": "./imagesTr/spleen_10.nii.gz", "label": "./labelsTr/spleen_10.nii.gz"}],
            "test": ["./imagesTs/spleen_1.nii.gz"]}
    (root / "dataset.json").write_text(json.dumps(spec))


def test_msd_reads_the_training_list_label_names_and_test_images(tmp_path):
    root = tmp_path / "Task09_Spleen"
    _msd(root)
    df = msd_manifest(root)
    assert _cols(df, "case_id", "split") == [("spleen_1", "external"), ("spleen_10", ""), ("spleen_2", "")]
    row = df.set_index("case_id").loc["spleen_10"]
    assert row["label"] == str(root / "labelsTr" / "spleen_10.nii.gz")
    assert json.loads(row["label_names"]) == {"0": "background", "1": "spleen"}
    assert df.set_index("case_id").loc["spleen_1", "label"] == ""
    assert set(df["dataset"]) == {"Task09_Spleen"}
    assert msd_manifest(root, include_test=False)["case_id"].tolist() == ["spleen_10", "spleen_2"]


def test_msd_missing_label_is_an_error_naming_the_image(tmp_path):
    root = tmp_path / "Task09_Spleen"
    _msd(root)
    (root / "labelsTr" / "spleen_10.nii.gz").unlink()
    with pytest.raises(LayoutError, match="imagesTr/spleen_10.nii.gz"):
        msd_manifest(root)
    df = msd_manifest(root, require_labels=False)
    assert df.set_index("case_id").loc["spleen_10", "label"] == ""


def test_nnunet_v2_channel_files_and_name_to_id_labels(tmp_path):
    root = tmp_path / "Dataset002_Heart"
    for c in ("la_003", "la_004"):
        _nii(root / "imagesTr" / f"{c}_0000.nii.gz")
        _nii(root / "imagesTr" / f"{c}_0001.nii.gz")
        _nii(root / "labelsTr" / f"{c}.nii.gz", np.zeros((6, 5, 4), np.uint8))
    spec = {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "left atrium": 1, "region": [1]},
            "numTraining": 2, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(spec))
    df = msd_manifest(root)
    assert _cols(df, "case_id", "image") == [
        ("la_003", str(root / "imagesTr" / "la_003_0000.nii.gz")),
        ("la_004", str(root / "imagesTr" / "la_004_0000.nii.gz")),
    ]
    assert json.loads(df.loc[0, "label_names"]) == {"0": "background", "1": "left atrium"}
    assert msd_manifest(root, channel=1).loc[1, "image"] == str(root / "imagesTr" / "la_004_0001.nii.gz")
    with pytest.raises(LayoutError, match="without channel 2"):
        msd_manifest(root, channel=2)


def test_msd_label_without_image_is_reported(tmp_path):
    root = tmp_path / "TaskX"
    _nii(root / "imagesTr" / "a.nii.gz")
    _nii(root / "labelsTr" / "a.nii.gz")
    _nii(root / "labelsTr" / "b.nii.gz")
    with pytest.raises(LayoutError, match="labelsTr/b.nii.gz"):
        msd_manifest(root)


# --------------------------------------------------------------------------- autoPET


def _autopet(root: Path) -> None:
    studies = {"PETCT_0011": ["08-12-2005-NA-PET-CT Ganzkoerper  primaer mit KM-10445",
                              "03-05-2006-NA-PET-CT Ganzkoerper  primaer mit KM-20199"],
               "PETCT_0223": ["11-30-2002-NA-Unspecified CT ABDOMEN-93772"]}
    for patient, names in studies.items():
        for s in names:
            for f in ("CTres", "SUV", "SEG"):
                _nii(root / patient / s / f"{f}.nii.gz")


def test_autopet_groups_studies_by_patient(tmp_path):
    root = tmp_path / "FDG-PET-CT-Lesions"
    _autopet(root)
    df = autopet_manifest(root)
    assert _cols(df, "case_id", "group") == [
        ("PETCT_0011_03-05-2006", "PETCT_0011"), ("PETCT_0011_08-12-2005", "PETCT_0011"),
        ("PETCT_0223_11-30-2002", "PETCT_0223")]
    assert all(Path(p).name == "CTres.nii.gz" for p in df["image"])
    assert all(Path(p).name == "SEG.nii.gz" for p in df["label"])
    assert json.loads(df.loc[0, "label_names"]) == {"1": "lesion"}
    assert all(Path(p).name == "SUV.nii.gz" for p in autopet_manifest(root, image="SUV")["image"])


def test_autopet_missing_seg_is_an_error_listing_the_studies(tmp_path):
    root = tmp_path / "ap"
    _autopet(root)
    seg = next(root.glob("PETCT_0223/*/SEG.nii.gz"))
    seg.unlink()
    with pytest.raises(LayoutError, match="PETCT_0223"):
        autopet_manifest(root)
    assert autopet_manifest(root, require_labels=False).set_index("group").loc["PETCT_0223", "label"] == ""


# --------------------------------------------------------------------------- BraTS


def test_brats_2021_cases_with_chosen_contrast_and_label_names(tmp_path):
    root = tmp_path / "BraTS2021_Training_Data"
    for c in ("BraTS2021_00000", "BraTS2021_00002"):
        for m in ("t1", "t1ce", "t2", "flair", "seg"):
            _nii(root / c / f"{c}_{m}.nii.gz")
    df = brats_manifest(root, modality="flair")
    assert df["case_id"].tolist() == ["BraTS2021_00000", "BraTS2021_00002"]
    assert df["group"].tolist() == df["case_id"].tolist()
    assert df["image"].tolist() == [str(root / c / f"{c}_flair.nii.gz") for c in df["case_id"]]
    assert json.loads(df.loc[0, "label_names"])["4"] == "enhancing tumour (ET)"


def test_brats_2023_groups_time_points_of_one_patient(tmp_path):
    root = tmp_path / "BraTS2023"
    for c in ("BraTS-GLI-00001-000", "BraTS-GLI-00001-001", "BraTS-GLI-00007-000"):
        for m in ("t1n", "t1c", "t2w", "t2f", "seg"):
            _nii(root / c / f"{c}-{m}.nii.gz")
    df = brats_manifest(root, modality="t1")  # 2021 name, translated to t1n
    assert df["group"].tolist() == ["BraTS-GLI-00001", "BraTS-GLI-00001", "BraTS-GLI-00007"]
    assert all(p.endswith("-t1n.nii.gz") for p in df["image"])
    assert json.loads(df.loc[0, "label_names"])["3"] == "enhancing tumour (ET)"


def test_brats_missing_segmentation_is_an_error(tmp_path):
    root = tmp_path / "b"
    _nii(root / "BraTS2021_00000" / "BraTS2021_00000_t1.nii.gz")
    with pytest.raises(LayoutError, match="BraTS2021_00000_seg"):
        brats_manifest(root)
    assert brats_manifest(root, require_labels=False).loc[0, "label"] == ""


# --------------------------------------------------------------------------- TotalSegmentator


def _totalseg(root: Path, subjects=("s0001", "s0002")) -> dict[str, dict[str, np.ndarray]]:
    masks = {}
    rng = np.random.default_rng(0)
    for s in subjects:
        _nii(root / s / "ct.nii.gz", rng.normal(size=(6, 5, 4)).astype(np.float32))
        masks[s] = {}
        for name, lo in (("spleen", 0), ("liver", 2), ("aorta", 4)):
            m = np.zeros((6, 5, 4), np.uint8)
            m[lo : lo + 2, 1:4, :] = 1
            masks[s][name] = m
            _nii(root / s / "segmentations" / f"{name}.nii.gz", m)
    (root / "meta.csv").write_text("image_id;age;gender;split\ns0001;60;m;train\ns0002;71;f;test\n")
    return masks


def test_totalseg_merges_masks_outside_the_raw_folder_with_consistent_ids(tmp_path):
    root, derived = tmp_path / "Totalsegmentator_dataset", tmp_path / "derived"
    masks = _totalseg(root)
    raw_before = _tree(root)
    df = totalseg_manifest(root, derived_dir=derived, progress=False)
    assert _tree(root) == raw_before, "raw folder untouched"
    assert _cols(df, "case_id", "split", "group") == [("s0001", "train", "s0001"), ("s0002", "test", "s0002")]
    names = {int(k): v for k, v in json.loads(df.loc[0, "label_names"]).items()}
    assert names == {1: "aorta", 2: "liver", 3: "spleen"}  # alphabetical, same for every subject
    merged = nib.load(df.loc[0, "label"])
    assert Path(df.loc[0, "label"]).parent == derived
    np.testing.assert_allclose(merged.affine, AFFINE, atol=1e-6)
    expected = np.zeros((6, 5, 4), np.uint8)
    for i, n in names.items():
        expected[masks["s0001"][n] > 0] = i
    np.testing.assert_array_equal(np.asanyarray(merged.dataobj), expected)
    # the manifest is usable: images read, labels on the same grid
    assert scan_dataset(df, None, progress=False).ok


def test_totalseg_reuses_an_up_to_date_merged_map(tmp_path):
    root, derived = tmp_path / "ts", tmp_path / "derived"
    _totalseg(root, subjects=("s0001",))
    df = totalseg_manifest(root, derived_dir=derived, progress=False)
    mtime = Path(df.loc[0, "label"]).stat().st_mtime_ns
    totalseg_manifest(root, derived_dir=derived, progress=False)
    assert Path(df.loc[0, "label"]).stat().st_mtime_ns == mtime
    sub = totalseg_manifest(root, derived_dir=derived, structures=["liver"], progress=False)
    assert json.loads(sub.loc[0, "label_names"]) == {"1": "liver"}
    assert set(np.unique(np.asanyarray(nib.load(sub.loc[0, "label"]).dataobj))) == {0, 1}


def test_totalseg_refuses_to_write_derived_data_into_the_raw_folder(tmp_path):
    root = tmp_path / "ts"
    _totalseg(root, subjects=("s0001",))
    with pytest.raises(ValueError, match="outside the raw data folder"):
        totalseg_manifest(root, derived_dir=root / "merged", progress=False)
    with pytest.raises(ValueError, match="outside the raw data folder"):
        merge_totalseg_masks(root / "s0001", root / "s0001" / "labels.nii.gz")


def test_totalseg_mask_on_another_grid_is_a_label_grid_mismatch(tmp_path):
    root = tmp_path / "ts"
    _totalseg(root, subjects=("s0001",))
    _nii(root / "s0001" / "segmentations" / "liver.nii.gz", np.ones((6, 5, 3), np.uint8))
    with pytest.raises(LabelGridMismatchError, match="liver.nii.gz"):
        merge_totalseg_masks(root / "s0001", tmp_path / "out.nii.gz")
    assert not (tmp_path / "out.nii.gz").exists()


def test_totalseg_subjects_with_different_mask_sets_are_reported(tmp_path):
    root = tmp_path / "ts"
    _totalseg(root)
    (root / "s0002" / "segmentations" / "aorta.nii.gz").unlink()
    with pytest.raises(LayoutError, match=r"s0002: missing \['aorta'\]"):
        totalseg_manifest(root, derived_dir=tmp_path / "d", progress=False)


# --------------------------------------------------------------------------- detection


def test_detect_layout_recognises_each_layout(tmp_path):
    _msd(tmp_path / "msd")
    _totalseg(tmp_path / "ts", subjects=("s0001",))
    _autopet(tmp_path / "ap")
    _nii(tmp_path / "br" / "BraTS2021_00000" / "BraTS2021_00000_t1.nii.gz")
    _nii(tmp_path / "fo" / "x.nii.gz")
    found = {name: detect_layout(tmp_path / name) for name in ("msd", "ts", "ap", "br", "fo")}
    assert found == {"msd": "msd", "ts": "totalseg", "ap": "autopet", "br": "brats", "fo": "folder"}


def test_unknown_layout_is_a_clear_error(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "readme.txt").write_text("hello")
    (tmp_path / "stuff" / "sub").mkdir()
    with pytest.raises(LayoutError, match="unknown dataset layout"):
        detect_layout(tmp_path / "stuff")
    with pytest.raises(LayoutError, match="not a folder"):
        detect_layout(tmp_path / "does-not-exist")
    with pytest.raises(ValueError, match="unknown layout 'nifti'"):
        manifest_from_folder(tmp_path / "stuff", layout="nifti")


def test_manifest_from_folder_detects_and_passes_options(tmp_path):
    _autopet(tmp_path / "ap")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = manifest_from_folder(tmp_path / "ap", image="SUV")
    assert len(df) == 3 and all(p.endswith("SUV.nii.gz") for p in df["image"])
