"""The demo data: the TotalSegmentator fetch, label naming, the synthetic cohort and its correspondences.

Network tests share one fetch per CI run (the default data folder); cohorts are
built small (3-4 subjects at 6 mm) into ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from medssl.data.demo import (
    TOTALSEG_SDIST_SHA256,
    ChecksumMismatchError,
    DemoCohort,
    SubjectDeformation,
    build_demo_cohort,
    fetch_totalseg_examples,
    load_example_label_names,
)
from medssl.data.errors import LabelGridMismatchError, MedsslDataError
from medssl.data.volume import Volume
from medssl.provenance import DEMO_PROVENANCE, provenance_statement

CT_LABELS = "example_seg_fast_force_split.nii.gz"
LESION_ORGANS = {"liver", "spleen", "kidney_left", "kidney_right"}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def examples() -> Path:
    """The real example volumes, fetched once into the default data folder (shared across the CI run)."""
    return fetch_totalseg_examples(progress=False)


@pytest.fixture(scope="module")
def cohort(examples, tmp_path_factory) -> DemoCohort:
    return build_demo_cohort(n_subjects=3, seed=0, spacing_mm=6.0, out_dir=tmp_path_factory.mktemp("c") / "seed0",
                             progress=False, examples_dir=examples, n_workers=1)  # fmt: skip


def _nii(path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def _subject_files(c: DemoCohort, case_id: str) -> dict[str, np.ndarray]:
    d = c.root / "subjects" / case_id
    return {k: _nii(d / f"{k}.nii.gz")[0] for k in ("image", "label", "lesion")}


def _world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _vox(affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    inv = np.linalg.inv(affine)
    return np.rint(xyz @ inv[:3, :3].T + inv[:3, 3]).astype(int)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fake_sdist(tmp_path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    path = tmp_path / "fake.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return path


# --------------------------------------------------------------------------- fetch


@pytest.mark.network
def test_fetch_verifies_the_pinned_sha256_and_extracts_only_the_needed_members(examples):
    source = json.loads((examples / "SOURCE.json").read_text())
    assert source["archive_sha256"] == TOTALSEG_SDIST_SHA256
    assert source["license"] == "Apache-2.0" and "Apache License" in (examples / "LICENSE").read_text()
    for name, digest in list(source["files"].items())[:5]:
        assert hashlib.sha256((examples / name).read_bytes()).hexdigest() == digest
    extracted = {str(p.relative_to(examples)) for p in examples.rglob("*") if p.is_file()}
    own = {"SOURCE.json", "label_names.json", "example_seg_dicom_on_image_grid.nii.gz"}
    assert extracted == set(source["files"]) | own  # nothing else from the 38 MB archive (e.g. aorta_report/)
    assert len([f for f in extracted if f.startswith("example_ct_dicom/")]) == 20
    assert len([f for f in extracted if f.startswith("example_seg_fast/")]) == 117


@pytest.mark.network
def test_second_fetch_is_a_noop(examples):
    before = (examples / "SOURCE.json").stat().st_mtime_ns
    assert fetch_totalseg_examples(progress=False) == examples
    assert (examples / "SOURCE.json").stat().st_mtime_ns == before  # nothing downloaded or rewritten


def test_fetch_rejects_an_archive_with_the_wrong_sha256_and_leaves_nothing_behind(tmp_path):
    fake = _fake_sdist(tmp_path, {"totalsegmentator-2.18.0/tests/reference_files/example_ct.nii.gz": b"not a ct"})
    dest = tmp_path / "data" / "demo" / "totalseg-2.18.0"
    with pytest.raises(ChecksumMismatchError) as err:
        fetch_totalseg_examples(dest, sdist=fake, progress=False)
    msg = str(err.value)
    assert "sha256" in msg and TOTALSEG_SDIST_SHA256 in msg and str(fake) in msg
    assert hashlib.sha256(fake.read_bytes()).hexdigest() in msg
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # no temporary folder left either


def test_fetch_refuses_archive_members_that_escape_the_target_folder(tmp_path):
    prefix = "totalsegmentator-2.18.0/tests/reference_files/"
    dest = tmp_path / "out" / "totalseg"
    traversal = _fake_sdist(tmp_path, {prefix + "../../../../evil.txt": b"x", prefix + "example_ct.nii.gz": b"y"})
    with pytest.raises(MedsslDataError, match="unsafe member"):
        fetch_totalseg_examples(dest, sdist=traversal, expected_sha256=_sha(traversal), progress=False)
    link = _fake_sdist(tmp_path, {}, links={prefix + "example_ct.nii.gz": "/etc/passwd"})
    with pytest.raises(MedsslDataError, match="not a regular file"):
        fetch_totalseg_examples(dest, sdist=link, expected_sha256=_sha(link), progress=False)
    assert not dest.exists() and not list(tmp_path.rglob("evil.txt"))
    assert list(dest.parent.iterdir()) == []


# --------------------------------------------------------------------------- label names


@pytest.mark.network
def test_label_names_put_liver_spleen_and_kidneys_on_ids_whose_regions_match_the_structure_masks(examples):
    names = load_example_label_names(examples, CT_LABELS)
    assert len(names) == 61 and LESION_ORGANS <= set(names.values())
    ids = {n: i for i, n in names.items()}
    full, affine = _nii(examples / CT_LABELS)
    for organ in ("liver", "spleen", "kidney_left"):
        mask, _ = _nii(examples / "example_seg_fast" / f"{organ}.nii.gz")  # the crop = z 82..111 of the full volume
        region = full[:, :, 82:112] == ids[organ]
        dice = 2 * np.sum(region & (mask > 0)) / (region.sum() + (mask > 0).sum())
        assert dice > 0.95, (organ, dice)
    # anatomy in RAS world mm: liver and right kidney on the patient's right (+x) of spleen and left kidney
    centre_x = {o: _world(affine, np.argwhere(full == ids[o]).mean(0))[0] for o in LESION_ORGANS}
    assert centre_x["liver"] > centre_x["spleen"] and centre_x["kidney_right"] > centre_x["kidney_left"]


@pytest.mark.network
def test_mr_and_dicom_labels_are_named_and_the_dicom_label_is_reindexed_onto_the_dicom_grid(examples):
    from medssl.data.io import read_volume

    mr = load_example_label_names(examples, "example_seg_mr.nii.gz")
    assert {"liver", "spleen", "kidney_left"} <= set(mr.values())
    with pytest.raises(LabelGridMismatchError):  # as shipped: y axis stored reversed w.r.t. the DICOM series
        read_volume(examples / "example_ct_dicom", examples / "example_seg_dicom.nii.gz")
    vol = read_volume(examples / "example_ct_dicom", examples / "example_seg_dicom_on_image_grid.nii.gz")
    names = load_example_label_names(examples, "example_seg_dicom_on_image_grid.nii.gz")
    liver = {n: i for i, n in names.items()}["liver"]
    hu = vol.data[0][vol.label == liver]
    assert 20 < np.median(hu) < 150  # soft tissue: the re-indexed label sits on the liver
    assert np.median(vol.data[0][vol.label == 0]) < -100  # background is mostly air/fat


# --------------------------------------------------------------------------- cohort


@pytest.mark.network
def test_same_seed_gives_identical_cohorts_whatever_the_workers_and_other_seeds_differ(cohort, examples, tmp_path):
    again = build_demo_cohort(n_subjects=3, seed=0, spacing_mm=6.0, out_dir=tmp_path / "again", progress=False,
                              examples_dir=examples, n_workers=2)  # fmt: skip
    other = build_demo_cohort(n_subjects=3, seed=1, spacing_mm=6.0, out_dir=tmp_path / "other", progress=False,
                              examples_dir=examples, n_workers=1)  # fmt: skip
    for case in cohort.case_ids("train") + cohort.case_ids("val") + cohort.case_ids("test"):
        a, b, c = (_subject_files(x, case) for x in (cohort, again, other))
        for key in ("image", "label", "lesion"):
            assert np.array_equal(a[key], b[key]), (case, key)
        assert not np.array_equal(a["image"], c["image"])
        assert not np.array_equal(a["label"], c["label"])


@pytest.mark.network
def test_cohorts_of_two_seeds_share_a_cache_without_receiving_each_others_subjects(cohort, examples, tmp_path,
                                                                                     monkeypatch):  # fmt: skip
    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path / "cache"))
    other = build_demo_cohort(n_subjects=3, seed=1, spacing_mm=6.0, out_dir=tmp_path / "seed1", progress=False,
                              examples_dir=examples, n_workers=1)  # fmt: skip
    first = {v.case_id: np.asarray(v.data) for v in cohort.volumes("train", progress=False)}
    second = {v.case_id: v for v in other.volumes("train", progress=False)}  # same ids, same settings, same cache
    again = {v.case_id: v for v in cohort.volumes("train", progress=False)}
    assert set(first) == set(second) == {"demo-s000"}
    assert second["demo-s000"].source.startswith(str(other.root))
    assert again["demo-s000"].source.startswith(str(cohort.root))
    np.testing.assert_array_equal(np.asarray(again["demo-s000"].data), first["demo-s000"])
    assert not np.array_equal(np.asarray(second["demo-s000"].data[:, :5, :5, :5]), first["demo-s000"][:, :5, :5, :5])


@pytest.mark.network
def test_second_build_with_the_same_parameters_is_a_noop_and_other_parameters_rebuild(cohort, examples, tmp_path):
    stamp = (cohort.root / "cohort.json").stat().st_mtime_ns
    same = build_demo_cohort(n_subjects=3, seed=0, spacing_mm=6.0, out_dir=cohort.root, progress=False,
                             examples_dir=examples)  # fmt: skip
    assert (cohort.root / "cohort.json").stat().st_mtime_ns == stamp  # not rebuilt
    assert same.info["built"] == cohort.info["built"]
    copy = tmp_path / "copy"
    shutil.copytree(cohort.root, copy)
    rebuilt = build_demo_cohort(n_subjects=3, seed=0, spacing_mm=6.0, lesions_per_subject=(1, 1), out_dir=copy,
                                progress=False, examples_dir=examples)  # fmt: skip
    assert rebuilt.config.lesions_per_subject == (1, 1)
    assert all(len(s["lesions"]) == 1 for s in rebuilt.info["subjects"])
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # the old cohort and the temp folder are gone


@pytest.mark.network
def test_a_cohort_from_an_older_synthesis_is_refused_by_name_and_rebuilt(cohort, examples, tmp_path):
    from medssl.data.demo.synthesis import SYNTHESIS_VERSION

    old = tmp_path / "old"
    shutil.copytree(cohort.root, old)
    info = json.loads((old / "cohort.json").read_text())
    assert info["synthesis_version"] == SYNTHESIS_VERSION
    info["synthesis_version"] = SYNTHESIS_VERSION - 1  # an old cache: other lesions for the same settings
    (old / "cohort.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"cohort\.json.*version .*rebuilds it"):
        DemoCohort(old)
    rebuilt = build_demo_cohort(n_subjects=3, seed=0, spacing_mm=6.0, out_dir=old, progress=False, examples_dir=examples)
    assert rebuilt.info["synthesis_version"] == SYNTHESIS_VERSION  # rebuilt, not reused


@pytest.mark.network
def test_cohort_manifest_has_splits_groups_and_the_real_volumes_as_external_cases(cohort):
    m = cohort.manifest
    assert list(m.loc[m["split"] != "external", "split"]) == ["train", "val", "test"]
    assert (m["group"] == m["case_id"]).all()
    ext = m[m["split"] == "external"].set_index("case_id")
    assert set(ext.index) == {"totalseg-ct", "totalseg-mr", "totalseg-dicom"}
    assert all(Path(p).exists() for p in m["image"]) and all(Path(p).is_file() for p in m["label"] if p)
    assert json.loads(ext.loc["totalseg-mr", "label_names"])["5"] == "liver"
    info = cohort.info
    assert info["provenance"] == DEMO_PROVENANCE and info["source"]["archive_sha256"] == TOTALSEG_SDIST_SHA256
    assert all(s["min_jacobian_det"] > 0 for s in info["subjects"])  # the warps do not fold


@pytest.mark.network
def test_each_subject_is_the_template_sampled_at_its_stored_deformation(cohort, examples):
    """Independent check of to_template_mm: subject label(x) == template label(T(x)) at voxel centres."""
    template, t_affine = _nii(examples / CT_LABELS)
    case = cohort.case_ids("train")[0]
    label, affine = _nii(cohort.root / "subjects" / case / "label.nii.gz")
    ijk = np.argwhere(np.ones(label.shape, bool))[::7]
    t_vox = _vox(t_affine, cohort.to_template_mm(case, _world(affine, ijk)))
    inside = np.all((t_vox >= 0) & (t_vox < template.shape), axis=1)
    expected = np.zeros(len(ijk), template.dtype)
    expected[inside] = template[tuple(t_vox[inside].T)]
    assert np.mean(label[tuple(ijk.T)] == expected) > 0.999  # rounding ties only


@pytest.mark.network
def test_correspondence_round_trip_is_below_1mm_and_organ_labels_agree_at_corresponding_points(cohort):
    a, b = cohort.case_ids("train")[0], cohort.case_ids("val")[0]
    la, aff_a = _nii(cohort.root / "subjects" / a / "label.nii.gz")
    lb, aff_b = _nii(cohort.root / "subjects" / b / "label.nii.gz")
    ids = {n: i for i, n in cohort.label_names.items()}
    rng = np.random.default_rng(0)
    agree, total = 0, 0
    for organ in ("liver", "spleen", "kidney_left", "kidney_right", "urinary_bladder"):
        inner = ndi.binary_erosion(la == ids[organ])  # points well inside big organs
        vox = np.argwhere(inner)
        vox = vox[rng.choice(len(vox), min(len(vox), 300), replace=False)]
        p_a = _world(aff_a, vox.astype(float))
        p_b = cohort.correspondence(a, b, p_a)
        back = cohort.correspondence(b, a, p_b)
        assert np.abs(back - p_a).max() < 1.0  # mm; the inversion tolerance is 1e-4 mm
        assert np.linalg.norm(cohort.to_template_mm(b, p_b) - cohort.to_template_mm(a, p_a), axis=1).max() < 1e-3
        vb = _vox(aff_b, p_b)
        ok = np.all((vb >= 0) & (vb < lb.shape), axis=1)
        agree += int(np.sum(lb[tuple(vb[ok].T)] == ids[organ]))
        total += len(vb)
    assert agree / total > 0.9, agree / total


def test_deformation_on_a_grid_equals_the_pointwise_map_on_axis_aligned_and_oblique_grids():
    """The separable fast path of ``on_grid`` (diagonal affines, as every demo subject) against ``T(x)`` point by point."""
    rng = np.random.default_rng(5)
    d = SubjectDeformation(centre_mm=np.array([10.0, -20.0, 5.0]), matrix=np.diag([1.08, 0.93, 1.02]) @ np.eye(3),
                           translation_mm=np.array([4.0, -7.0, 2.0]), grid_origin_mm=np.array([-60.0, -50.0, -40.0]),
                           grid_spacing_mm=np.array([30.0, 25.0, 22.0]), displacement_mm=rng.normal(0, 5, (3, 6, 6, 6)))
    shape = (23, 17, 19)
    anisotropic = np.diag([3.5, -2.0, 2.5, 1.0])  # axis-aligned, one axis flipped, anisotropic
    anisotropic[:3, 3] = [-55.0, 30.0, -35.0]
    oblique = np.eye(4)
    oblique[:3, :3] = np.array([[2.9, 0.5, 0.0], [-0.4, 2.1, 0.3], [0.0, -0.2, 2.6]])
    oblique[:3, 3] = [-50.0, -40.0, -30.0]
    for affine in (anisotropic, oblique):
        ijk = np.indices(shape).reshape(3, -1).T.astype(float)
        expected = d(_world(affine, ijk))  # C order, as on_grid
        np.testing.assert_allclose(d.on_grid(shape, affine), expected, atol=1e-9)


def test_deformation_inverse_recovers_points_of_a_strong_oblique_warp():
    rng = np.random.default_rng(3)
    angle = np.deg2rad(25)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    d = SubjectDeformation(centre_mm=np.array([10.0, -20.0, 5.0]), matrix=rot @ np.diag([1.1, 0.9, 1.05]),
                           translation_mm=np.array([4.0, -7.0, 2.0]), grid_origin_mm=np.array([-100.0, -100, -60]),
                           grid_spacing_mm=np.array([40.0, 40.0, 24.0]),
                           displacement_mm=rng.normal(0, 5, (3, 6, 6, 6)))  # fmt: skip
    x = rng.uniform(-90, 90, (500, 3))
    assert np.abs(d.inverse(d(x)) - x).max() < 1e-3
    assert np.allclose(SubjectDeformation.identity()(x), x)


@pytest.mark.network
def test_lesions_lie_inside_liver_spleen_or_kidneys_and_every_lesion_map_is_non_empty(cohort):
    names = cohort.label_names
    lo, hi = cohort.config.lesions_per_subject
    for case in cohort.case_ids("train") + cohort.case_ids("val") + cohort.case_ids("test"):
        f = _subject_files(cohort, case)
        assert np.count_nonzero(f["lesion"]) > 0, case
        organs_under_lesions = {names[int(i)] for i in np.unique(f["label"][f["lesion"] > 0])}
        assert organs_under_lesions <= LESION_ORGANS, (case, organs_under_lesions)
        record = cohort.subject(case)
        assert lo <= len(record["lesions"]) <= hi
        assert sorted(np.unique(f["lesion"][f["lesion"] > 0]).tolist()) == [r["id"] for r in record["lesions"]]
        for r in record["lesions"]:  # each lesion wholly inside the organ it was drawn in
            assert set(np.unique(f["label"][f["lesion"] == r["id"]]).tolist()) == {r["organ_id"]}


def _lesion_records(c: DemoCohort) -> list[dict]:
    return [dict(r, case=s["case_id"], scale=s["intensity_scale"], shift=s["intensity_shift_hu"])
            for s in c.info["subjects"] for r in s["lesions"]]


@pytest.mark.network
def test_lesions_are_10_to_30_mm_with_ct_like_contrast_for_their_organ(examples, tmp_path):
    """Sizes and contrasts of every lesion of a 6-subject cohort at the demo's 3 mm, against the stated ranges.

    The contrast is measured here on the written image (with its noise): the mean over the lesion's
    voxels against the median of the same organ's voxels in a shell 1-2 lesion diameters around it.
    """
    c = build_demo_cohort(n_subjects=6, seed=3, spacing_mm=3.0, out_dir=tmp_path / "c", progress=False,
                          examples_dir=examples, n_workers=1)  # fmt: skip
    cfg = c.config
    assert cfg.lesion_diameter_mm == (10.0, 30.0)
    records = _lesion_records(c)
    assert len(records) >= 6
    kinds = {r["kind"] for r in records}
    assert kinds <= {"hypodense", "hyperdense", "cyst"} and "hypodense" in kinds
    voxel_ml = 27.0 / 1000
    for r in records:
        d = np.asarray(r["diameters_mm"])
        assert np.all(d >= 10.0 - 1e-6) and np.all(d <= 30.0 + 1e-6), r
        # the painted map holds the ellipsoid: pi/6 d1 d2 d3, within the voxelisation error at 3 mm
        expected_ml = np.pi / 6 * np.prod(d) / 1000
        assert 0.5 * expected_ml <= r["voxels"] * voxel_ml <= 1.6 * expected_ml, r
        if r["kind"] == "cyst":
            assert r["organ"].startswith("kidney") and 0.0 <= r["cyst_hu"] <= 15.0
        elif r["kind"] == "hyperdense":
            assert r["organ"] == "liver" and 20.0 <= r["delta_hu"] <= 40.0
        else:
            assert r["organ"] in ("liver", "spleen") and -60.0 <= r["delta_hu"] <= -20.0
    for case in c.case_ids("train") + c.case_ids("val") + c.case_ids("test"):
        f = _subject_files(c, case)
        image = f["image"].astype(np.float64)
        for r in (r for r in records if r["case"] == case):
            inside = f["lesion"] == r["id"]
            grown = ndi.binary_dilation(inside, iterations=int(np.ceil(max(r["diameters_mm"]) / 3.0)))
            shell = grown & ~ndi.binary_dilation(inside, iterations=2) & (f["label"] == r["organ_id"]) & (f["lesion"] == 0)
            if shell.sum() < 20:
                continue
            measured = image[inside].mean() - np.median(image[shell])
            if r["kind"] == "cyst":  # water, in the subject's calibration, where the lesion is dense enough
                assert abs(image[inside].mean() - (r["cyst_hu"] * r["scale"] + r["shift"])) < 25.0, (r, measured)
            else:  # the sign of the change, and at least a third of its size once the smooth edge and noise are in
                assert np.sign(measured) == np.sign(r["delta_hu"]) and abs(measured) >= abs(r["delta_hu"]) / 3, (
                    r, measured)


@pytest.mark.network
def test_open_data_demo_gives_cached_volumes_with_lesions_label_names_and_provenance(cohort, examples, tmp_path,
                                                                                       monkeypatch):  # fmt: skip
    from medssl.data.source import open_data

    (tmp_path / "data" / "demo").mkdir(parents=True)
    (tmp_path / "data" / "demo" / examples.name).symlink_to(examples.resolve(), target_is_directory=True)
    monkeypatch.setenv("MEDSSL_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("MEDSSL_CACHE", raising=False)
    data = open_data("demo", n_subjects=3, cohort_seed=0, target_spacing_mm=6.0, progress=False)
    assert data.provenance == DEMO_PROVENANCE and data.cohort is not None
    train = data.volumes("train")
    assert [v.case_id for v in train] == ["demo-s000"]
    v = train[0]
    assert isinstance(v, Volume) and np.allclose(v.spacing_mm, 6.0) and "lesion" in v.aux
    assert v.label_names[{n: i for i, n in data.label_names.items()}["liver"]] == "liver"
    assert np.count_nonzero(v.aux["lesion"]) > 0
    summary = data.summary()
    assert len(summary) == 6 and set(summary["split"]) == {"train", "val", "test", "external"}
    assert (summary.loc[summary["split"] == "train", "n_lesions"] >= 1).all()
    assert (tmp_path / "data" / "cache").is_dir()  # cached under MEDSSL_DATA, not elsewhere


def test_provenance_statement_says_synthetic_single_real_ct_model_labels_and_synthetic_lesions():
    text = provenance_statement("demo").lower()
    for phrase in ("synthetic", "one real", "totalsegmentator 2.18.0", "apache-2.0", "model outputs",
                   "not manual masks", "lesions are synthetic"):  # fmt: skip
        assert phrase in text, phrase
    assert "/my/data" in provenance_statement("/my/data")


# --------------------------------------------------------------------------- viewers


def _marker_volume(affine: np.ndarray) -> Volume:
    """A volume with one bright voxel at the patient's right (max RAS x), whatever the array order."""
    shape = (9, 7, 5)
    ijk = np.argwhere(np.ones(shape, bool))
    x = _world(affine, ijk.astype(float))[:, 0]
    data = np.zeros(shape, np.float32)
    target = tuple(ijk[np.argmax(x)])
    data[target] = 100.0
    label = np.zeros(shape, np.int16)
    label[target] = 5
    return Volume(data=data[None], affine=affine, case_id="m", label=label, label_names={5: "marker"})


@pytest.mark.parametrize("oblique", [False, True])
def test_orthogonal_slices_show_the_patients_right_on_the_screen_left_for_lps_anisotropic_grids(oblique):
    import matplotlib.pyplot as plt

    from medssl.viz.slices import orthogonal_slices

    direction = np.diag([-1.0, -1.0, 1.0])  # LPS array order
    if oblique:
        a = np.deg2rad(12)
        direction = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ direction
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag([0.8, 1.5, 3.0])
    vol = _marker_volume(affine)
    fig = orthogonal_slices(vol)  # default point: the label's centroid = the marker
    axial = fig.axes[0].images[0].get_array()  # (vertical, horizontal) as drawn
    _, col = np.unravel_index(np.argmax(axial), axial.shape)
    assert col == 0  # patient's right at the screen's left (radiological)
    extent = fig.axes[0].images[0].get_extent()
    assert np.isclose(extent[1], 9 * 0.8) and np.isclose(extent[3], 7 * 1.5)  # mm extents keep the aspect
    assert any("marker" in t.get_text() for t in fig.legends[0].get_texts())
    plt.close(fig)


def test_slice_viewer_is_a_widget_whose_image_follows_the_slider():
    from medssl.viz.slices import slice_viewer

    vol = _marker_volume(np.diag([2.0, 2.0, 3.0, 1.0]))
    viewer = slice_viewer(vol)
    controls, image, caption = viewer.children
    _plane, slider, opacity = controls.children
    first = bytes(image.value)
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and "marker" in caption.value
    slider.value = slider.max if slider.value == 0 else 0  # a slice without the marker
    assert bytes(image.value) != first and "marker" not in caption.value
    _plane.value = "sagittal"
    assert slider.max == vol.shape_vox[0] - 1


def test_open_data_on_a_folder_lists_every_bad_file_or_skips_them_and_caches_the_rest(tmp_path, monkeypatch):
    from medssl.data.errors import DatasetScanError
    from medssl.data.io import write_nifti
    from medssl.data.source import open_data

    monkeypatch.setenv("MEDSSL_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("MEDSSL_CACHE", raising=False)
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(5):
        image = rng.normal(5, 1, (20, 18, 16)).astype(np.float32)
        write_nifti(folder / f"case{i}.nii.gz", image, np.diag([2, 2, 3, 1.0]))
    (folder / "broken.nii.gz").write_bytes(b"garbage")
    with pytest.raises(DatasetScanError, match="broken.nii.gz"):
        open_data(folder, target_spacing_mm=4.0, progress=False)
    data = open_data(folder, target_spacing_mm=4.0, progress=False, on_error="skip")
    assert sorted(data.manifest["case_id"]) == [f"case{i}" for i in range(5)]
    assert data.scan_report.problem_case_ids == ["broken"]
    assert data.cohort is None and str(folder) in data.provenance
    vols = data.volumes(None)
    assert len(vols) == 5 and all(np.allclose(v.spacing_mm, 4.0) for v in vols)
    assert set(data.summary()["split"]) <= {"train", "val", "test"}
    assert (folder / "broken.nii.gz").read_bytes() == b"garbage"  # the user's files are untouched


@pytest.mark.network
def test_cli_data_demo_builds_the_cohort_and_writes_summary_and_figures(examples, tmp_path, monkeypatch, capsys):
    from medssl.cli import main

    (tmp_path / "data" / "demo").mkdir(parents=True)
    (tmp_path / "data" / "demo" / examples.name).symlink_to(examples.resolve(), target_is_directory=True)
    monkeypatch.setenv("MEDSSL_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("MEDSSL_CACHE", raising=False)
    out = tmp_path / "out"
    code = main(["data", "demo", "--n-subjects", "3", "--spacing-mm", "6", "--show-subjects", "1",
                 "--out-dir", str(out), "--quiet"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert DEMO_PROVENANCE in printed and "demo-s000" in printed and "totalseg-dicom" in printed
    assert (tmp_path / "data" / "demo" / "cohort-seed0-n3-6mm" / "cohort.json").is_file()
    assert len(open(out / "cohort_summary.csv").read().splitlines()) == 1 + 3 + 3
    written = {p.name for p in out.iterdir()}
    assert {"slices_demo-s000.png", "lesions_demo-s000.png", "slices_totalseg-mr.png"} <= written


def test_cli_registry_holds_data_and_pipeline_and_refuses_a_second_command_of_the_same_name():
    from medssl.cli import build_parser, register_command

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"data", "pipeline"} <= set(sub.choices)
    with pytest.raises(ValueError, match="already registered"):
        register_command("data")(lambda s: None)
