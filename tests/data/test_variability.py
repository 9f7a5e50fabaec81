"""The demo cohort with inter-subject variability: exact ground truth, organs that really differ, reproducible.

Cohorts are built small (4 subjects at 6 mm) into ``tmp_path``; the real example CT is fetched
once per CI run (network).
"""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from medssl.data.demo import DemoCohort, build_demo_cohort, default_cohort_dir, fetch_totalseg_examples
from medssl.data.demo.deformation import SubjectDeformation
from medssl.data.demo.variability import ComposedDeformation, GridWarp, load_deformation, variability_settings
from tests.helpers import oblique_affine

# one worker builds its module-scoped cohort once: `make test` runs pytest-xdist --dist loadgroup, and a module
# split over two workers builds its module-scoped fixtures on each
pytestmark = pytest.mark.xdist_group("variability_cohort")

ORGANS = ("liver", "spleen", "kidney_left", "kidney_right")
CT_LABELS = "example_seg_fast_force_split.nii.gz"


@pytest.fixture(scope="module")
def examples():
    return fetch_totalseg_examples(progress=False)


def _build(examples, out, variability, seed=0, n=4):
    return build_demo_cohort(n_subjects=n, split_counts=(2, 1, 1), seed=seed, spacing_mm=6.0, out_dir=out,
                             progress=False, examples_dir=examples, n_workers=1, variability=variability)


@pytest.fixture(scope="module")
def study(examples, tmp_path_factory) -> DemoCohort:
    return _build(examples, tmp_path_factory.mktemp("study") / "c", "study")


@pytest.fixture(scope="module")
def plain(examples, tmp_path_factory) -> DemoCohort:
    return _build(examples, tmp_path_factory.mktemp("plain") / "c", None)


def _nii(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def _world(affine, ijk):
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _vox(affine, xyz):
    inv = np.linalg.inv(affine)
    return np.rint(xyz @ inv[:3, :3].T + inv[:3, 3]).astype(int)


def _organ_volumes_ml(c: DemoCohort) -> dict[str, np.ndarray]:
    ids = {n: i for i, n in c.label_names.items()}
    out = {o: [] for o in ORGANS}
    for case in c.case_ids("train") + c.case_ids("val") + c.case_ids("test"):
        lab, aff = _nii(c.root / "subjects" / case / "label.nii.gz")
        for o in ORGANS:
            out[o].append((lab == ids[o]).sum() * abs(np.linalg.det(aff[:3, :3])) / 1000)
    return {o: np.asarray(v) for o, v in out.items()}


@pytest.mark.network
def test_correspondence_round_trip_stays_exact_and_organs_agree_at_corresponding_points(study):
    a, b = study.case_ids("train")[0], study.case_ids("test")[0]
    assert isinstance(study.deformation(a), ComposedDeformation)  # the organ warp is read back from disk
    la, aff_a = _nii(study.root / "subjects" / a / "label.nii.gz")
    lb, aff_b = _nii(study.root / "subjects" / b / "label.nii.gz")
    ids = {n: i for i, n in study.label_names.items()}
    rng = np.random.default_rng(0)
    agree = total = 0
    for organ in ORGANS:
        vox = np.argwhere(ndi.binary_erosion(la == ids[organ]))
        vox = vox[rng.choice(len(vox), min(len(vox), 200), replace=False)]
        p_a = _world(aff_a, vox.astype(float))
        p_b = study.correspondence(a, b, p_a)
        assert np.abs(study.correspondence(b, a, p_b) - p_a).max() < 0.1  # mm
        assert np.linalg.norm(study.to_template_mm(b, p_b) - study.to_template_mm(a, p_a), axis=1).max() < 1e-3
        vb = _vox(aff_b, p_b)
        ok = np.all((vb >= 0) & (vb < lb.shape), axis=1)
        agree += int(np.sum(lb[tuple(vb[ok].T)] == ids[organ]))
        total += len(vb)
    assert agree / total > 0.85, agree / total


@pytest.mark.network
def test_each_subject_is_the_template_sampled_at_its_stored_composed_deformation(study, examples):
    """The deformation on disk (base warp + organ warp, float32 grid) is the one the subject was made with."""
    template, t_affine = _nii(examples / CT_LABELS)
    case = study.case_ids("val")[0]
    label, affine = _nii(study.root / "subjects" / case / "label.nii.gz")
    ijk = np.argwhere(np.ones(label.shape, bool))[::5]
    t_mm = study.to_template_mm(case, _world(affine, ijk.astype(float)))
    inv = np.linalg.inv(t_affine)
    t_cont = t_mm @ inv[:3, :3].T + inv[:3, 3]
    # points that fall within a voxel of the template's border are left out: scipy's order-0 "constant" mode and
    # rounding disagree there about inside/outside, which says nothing about the deformation
    away = np.all((t_cont > 0.5) & (t_cont < np.asarray(template.shape) - 1.5), axis=1)
    t_vox = np.rint(t_cont[away]).astype(int)
    assert away.mean() > 0.5
    assert np.mean(label[tuple(ijk[away].T)] == template[tuple(t_vox.T)]) > 0.999  # rounding ties only


@pytest.mark.network
def test_organ_volumes_vary_between_subjects_more_than_in_the_plain_cohort(study, plain):
    cv = {}
    for name, c in (("plain", plain), ("study", study)):
        vols = _organ_volumes_ml(c)
        cv[name] = {o: float(v.std() / v.mean()) for o, v in vols.items()}
    assert np.mean(list(cv["study"].values())) > 1.5 * np.mean(list(cv["plain"].values())), cv
    assert sum(cv["study"][o] > cv["plain"][o] for o in ORGANS) >= 3, cv
    # the record says what each subject got, and the factors differ between subjects
    factors = [{r["organ"]: r["volume_factor"] for r in s["variability"]["organ_scales"]} for s in study.info["subjects"]]
    assert len({round(f["liver"], 3) for f in factors}) == len(factors)
    lo, hi = (0.8 * 0.9) ** 3, (1.25 * 1.1) ** 3  # organ_size and organ_shape ranges, cubed (shrunk draws: closer to 1)
    assert all(lo <= f[o] <= hi for f in factors for o in ORGANS)


@pytest.mark.network
def test_intensities_and_noise_vary_and_the_plain_cohort_has_no_variability(study, plain):
    subjects = study.info["subjects"]
    assert all("organ_hu" in s["variability"] and "liver" in s["variability"]["organ_hu"] for s in subjects)
    assert len({s["variability"]["organ_hu"]["liver"] for s in subjects}) == len(subjects)
    assert study.config.variability["name"] == "study" and study.config.noise_hu == (5.0, 35.0)
    assert study.config.elastic_mm > plain.config.elastic_mm
    assert plain.config.variability is None and not any("variability" in s for s in plain.info["subjects"])
    assert type(plain.deformation(plain.case_ids("train")[0])) is SubjectDeformation


@pytest.mark.network
def test_the_same_seed_rebuilds_identical_subjects_and_another_seed_differs(study, examples, tmp_path):
    again = _build(examples, tmp_path / "again", "study")
    other = _build(examples, tmp_path / "other", "study", seed=1)

    def digest(c, case, name):
        return hashlib.sha256((c.root / "subjects" / case / name).read_bytes()).hexdigest()

    case = study.case_ids("train")[1]
    for name in ("image.nii.gz", "label.nii.gz", "deformation.npz"):
        assert digest(again, case, name) == digest(study, case, name), name
    assert digest(other, case, "image.nii.gz") != digest(study, case, "image.nii.gz")
    assert json.dumps(again.info["subjects"][1]["variability"]) == json.dumps(study.info["subjects"][1]["variability"])


def test_grid_warp_on_an_oblique_anisotropic_grid_matches_the_analytic_field():
    """A linear field is exact under trilinear interpolation: M(z) = z + (S - I)(z - c) must come back exactly."""
    affine = oblique_affine((4.0, 6.0, 9.0), (20.0, -15.0, 30.0), (-60.0, -50.0, -40.0))
    shape = (30, 20, 14)
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    pts = (affine[:3, :3] @ ijk + affine[:3, 3:4]).T
    c = np.array([5.0, -3.0, 8.0])
    s = np.array([[0.8, 0.1, 0.0], [0.0, 1.2, -0.05], [0.02, 0.0, 0.9]])  # M's Jacobian, not symmetric
    disp = ((pts - c) @ (s - np.eye(3)).T).T.reshape(3, *shape)
    warp = GridWarp(affine, disp)
    inside = (affine[:3, :3] @ np.array([[12.3], [7.7], [5.1]]) + affine[:3, 3:4]).T
    q = inside + np.random.default_rng(0).normal(0, 5, (50, 3))
    np.testing.assert_allclose(warp(q), c + (q - c) @ s.T, atol=1e-9)
    assert warp.min_jacobian() == pytest.approx(np.linalg.det(s), rel=1e-9)
    np.testing.assert_allclose(warp.inverse(warp(q)), q, atol=1e-4)


def test_composed_deformation_saves_loads_and_inverts(tmp_path):
    rng = np.random.default_rng(1)
    base = SubjectDeformation(centre_mm=np.array([1.0, 2.0, 3.0]), matrix=np.diag([1.05, 0.95, 1.1]),
                              translation_mm=np.array([3.0, -2.0, 1.0]), grid_origin_mm=np.full(3, -80.0),
                              grid_spacing_mm=np.array([40.0, 40.0, 30.0]), displacement_mm=rng.normal(0, 3, (3, 5, 5, 5)))
    affine = oblique_affine((6.0, 6.0, 8.0), (0.0, 10.0, 0.0), (-70.0, -70.0, -60.0))
    disp = ndi.gaussian_filter(rng.normal(0, 30, (3, 24, 24, 18)), (0, 3, 3, 3))
    warp = GridWarp(affine, disp.astype(np.float32).astype(np.float64))
    assert warp.min_jacobian() > 0.3
    d = ComposedDeformation(base, warp)
    d.save(tmp_path / "d.npz", subject_affine=np.eye(4))
    loaded = load_deformation(tmp_path / "d.npz")
    x = rng.uniform(-50, 50, (300, 3))
    np.testing.assert_allclose(loaded(x), d(x), atol=1e-9)
    np.testing.assert_allclose(loaded.inverse(loaded(x)), x, atol=1e-3)
    base.save(tmp_path / "plain.npz")
    assert type(load_deformation(tmp_path / "plain.npz")) is SubjectDeformation
    # the synthesis evaluates T on the subject's grid (diagonal and oblique grids take different paths)
    for grid in (np.diag([4.0, 5.0, 7.0, 1.0]) + np.array([[0, 0, 0, -40.0], [0, 0, 0, -30.0], [0, 0, 0, -20.0], [0, 0, 0, 0]]),
                 oblique_affine((4.0, 5.0, 7.0), (5.0, 0.0, 12.0), (-40.0, -30.0, -20.0))):
        shape = (9, 7, 6)
        ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
        centres = (grid[:3, :3] @ ijk + grid[:3, 3:4]).T
        np.testing.assert_allclose(d.on_grid(shape, grid), d(centres), atol=1e-9)


def test_open_data_names_the_variability_in_the_source_and_the_folder(monkeypatch, study):
    import medssl.data.demo as demo
    from medssl.data.source import open_data

    seen = []
    monkeypatch.setattr(demo, "build_demo_cohort", lambda **kw: seen.append(kw) or study)
    a = open_data("demo:study", n_subjects=4, target_spacing_mm=6.0, progress=False)
    b = open_data("demo", variability="study", n_subjects=4, target_spacing_mm=6.0, progress=False)
    assert seen[0]["variability"] == seen[1]["variability"] == "study"
    assert a.source == b.source == "demo:study" and a.registered
    assert default_cohort_dir(48, 0, 3.0, "study").name == "cohort-seed0-n48-study"
    assert default_cohort_dir(48, 0, 3.0).name == "cohort-seed0-n48"
    with pytest.raises(ValueError, match="unknown demo cohort variability"):
        variability_settings("wild")
