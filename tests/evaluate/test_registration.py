"""Registration (the positive control): recovers a known affine in world mm, caches one transform per pair."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medssl.data.volume import Volume
from medssl.evaluate.registration import Registrar, RegistrationConfig, to_sitk
from medssl.geometry import vox_to_world, world_to_vox
from tests.helpers import oblique_affine, rotation_matrix, world_grid_mm

# An abdomen-like phantom in its own frame (mm): a body ellipsoid of soft tissue, organs of other densities,
# a bright spine, all off-centre so that no rotation or flip maps it onto itself. Intensities like the demo's
# (HU / 150 after clipping): air -1, fat -0.7, soft tissue 0.3, liver 0.4, kidneys 0.2, bone 2.
_BODY = ((0.0, 0.0, 0.0), (120.0, 85.0, 90.0), 0.3)
_ORGANS = [  # (centre, semi-axes, value, organ code)
    ((-45.0, 10.0, 25.0), (40.0, 32.0, 35.0), 0.42, 1),  # liver (right)
    ((55.0, 20.0, 35.0), (18.0, 15.0, 22.0), 0.55, 2),  # spleen (left)
    ((-35.0, 35.0, -25.0), (12.0, 12.0, 20.0), 0.20, 3),  # kidney
    ((38.0, 38.0, -30.0), (12.0, 12.0, 20.0), 0.18, 4),  # kidney
    ((0.0, -20.0, -10.0), (25.0, 20.0, 15.0), -0.7, 0),  # fat / bowel pocket
]
_SPINE = ((8.0, 55.0), 12.0, 2.0)  # (x, y) of the axis, radius, value


def _soft(d: np.ndarray, edge_mm: float = 3.0) -> np.ndarray:
    """1 inside (d < 1 in normalised radius), 0 outside, with a smooth edge."""
    return 0.5 * (1.0 - np.tanh((d - 1.0) * 30.0 / edge_mm))


def phantom_values(x_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intensity and organ code at phantom-frame points ``(..., 3)``."""
    centre, axes, value = _BODY
    r_body = np.linalg.norm((x_mm - centre) / axes, axis=-1)
    img = -1.0 + (value + 1.0) * _soft(r_body)
    label = np.zeros(x_mm.shape[:-1], np.int16)
    for c, a, v, code in _ORGANS:
        r = np.linalg.norm((x_mm - np.asarray(c)) / np.asarray(a), axis=-1)
        w = _soft(r)
        img = img + (v - value) * w
        if code:
            label[r <= 1.0] = code
    (sx, sy), rad, v = _SPINE
    r = np.hypot(x_mm[..., 0] - sx, x_mm[..., 1] - sy) / rad
    img = img + (v - value) * _soft(r) * _soft(np.abs(x_mm[..., 2]) / 80.0)
    return img.astype(np.float32), label


def phantom_subject(case_id: str, matrix=None, shift_mm=(0.0, 0.0, 0.0), spacing_mm=(3.0, 3.5, 4.0),
                    angles_deg=(8.0, -6.0, 12.0), shape=(92, 66, 52), seed: int = 0) -> Volume:
    """The phantom seen in a subject whose world point ``y = matrix @ x + shift`` is phantom point ``x``.

    The grid is anisotropic and oblique, centred on the subject's body; a little noise is added.
    """
    m, t = np.eye(3) if matrix is None else np.asarray(matrix, float), np.asarray(shift_mm, float)
    affine = oblique_affine(spacing_mm, angles_deg)
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    affine[:3, 3] = t - centre  # the grid's centre on the body's centre
    y = world_grid_mm(shape, affine)
    x = (y - t) @ np.linalg.inv(m).T
    img, label = phantom_values(x)
    img = img + np.random.default_rng(seed).normal(0.0, 0.03, img.shape).astype(np.float32)
    body = (img > -0.5).astype(np.uint8)
    return Volume(img[None], affine, case_id, label=label, aux={"body": body}, source=f"phantom:{case_id}")


def true_map(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], pts_a: np.ndarray) -> np.ndarray:
    """World mm of subject A -> the same phantom point in subject B's world (each given as (matrix, shift))."""
    x = (pts_a - a[1]) @ np.linalg.inv(a[0]).T
    return x @ b[0].T + b[1]


# fixed: the phantom as it is; moving: rotated by (7, -5, 9) degrees, scaled anisotropically, shifted
FIXED = (np.eye(3), np.zeros(3))
MOVING = (rotation_matrix((7.0, -5.0, 9.0)) @ np.diag([1.08, 0.93, 1.04]), np.array([12.0, -9.0, 15.0]))


def _body_points(v: Volume, n: int = 300, seed: int = 0) -> np.ndarray:
    ijk = np.argwhere(v.aux["body"] > 0).astype(float)
    ijk = ijk[np.random.default_rng(seed).choice(len(ijk), size=n, replace=False)]
    return vox_to_world(v.affine, ijk)


def test_to_sitk_puts_every_voxel_at_its_world_position_on_an_oblique_anisotropic_grid():
    v = phantom_subject("a", shape=(20, 16, 12))
    image = to_sitk(v)
    for ijk in [(0, 0, 0), (19, 15, 11), (3, 11, 7)]:
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(ijk), vox_to_world(v.affine, ijk)[0], atol=1e-6)
        # and the value there is the volume's (ITK index order is x, y, z like medssl's array axes)
        assert image.GetPixel(ijk) == pytest.approx(float(v.data[0][ijk]))


def test_a_sheared_affine_is_refused_with_the_file_named():
    v = phantom_subject("a", shape=(10, 10, 10))
    sheared = v.affine.copy()
    sheared[0, 1] += 1.5
    with pytest.raises(ValueError, match="phantom:a.*not orthogonal"):
        to_sitk(v.with_(affine=sheared))


def test_affine_registration_recovers_a_known_rotation_anisotropic_scale_and_shift_to_under_2_mm(tmp_path):
    fixed = phantom_subject("fixed", *FIXED, seed=1)
    moving = phantom_subject("moving", *MOVING, spacing_mm=(3.5, 3.0, 3.2), angles_deg=(-5.0, 10.0, 3.0),
                             shape=(86, 70, 62), seed=2)
    pts = _body_points(fixed)
    truth = true_map(FIXED, MOVING, pts)
    before = np.median(np.linalg.norm(pts - truth, axis=1))
    reg = Registrar(RegistrationConfig(), tmp_path)
    err = np.linalg.norm(reg.map_points(fixed, moving, pts) - truth, axis=1)
    assert before > 15.0  # the transform is far from the identity
    assert np.median(err) < 2.0 and np.percentile(err, 90) < 4.0
    assert reg.seconds[("moving", "fixed")] > 0 and reg.name == "registration (affine)"


def test_one_registration_per_pair_is_cached_on_disk_and_shared(tmp_path):
    fixed = phantom_subject("fixed", *FIXED, shape=(60, 44, 36), spacing_mm=(4.5, 5.0, 5.5), seed=1)
    moving = phantom_subject("moving", *MOVING, shape=(60, 44, 36), spacing_mm=(4.5, 5.0, 5.5), seed=2)
    pts = _body_points(fixed, 50)
    first = Registrar(RegistrationConfig(), tmp_path)
    a = first.map_points(fixed, moving, pts)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].startswith("moving_to_fixed_") and {p[-4:] for p in files} == {"json", ".tfm"}
    info = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert info["moving"] == "moving" and info["fixed"] == "fixed" and info["seconds"] > 0
    # another notebook (a new Registrar on the same folder) reads it instead of registering again
    second = Registrar(RegistrationConfig(), tmp_path)
    np.testing.assert_allclose(second.map_points(fixed, moving, pts), a, atol=1e-6)
    assert second.from_cache == {("moving", "fixed")}
    assert second.seconds[("moving", "fixed")] == pytest.approx(info["seconds"])
    # other settings, or another pair direction, are other registrations
    Registrar(RegistrationConfig(transform="rigid"), tmp_path).transform(fixed, moving)
    Registrar(RegistrationConfig(), tmp_path).transform(moving, fixed)
    assert len(list(tmp_path.glob("*.tfm"))) == 3
    # the images of the two subjects were not modified
    assert fixed.data.dtype == np.float32 and fixed.data.flags.writeable


def test_a_transform_optimised_on_top_of_a_moving_initial_transform_composes_as_the_registrar_composes_it():
    """The B-spline stage is optimised with the affine as the moving initial transform and returned as
    ``CompositeTransform([affine, bspline])``. Check that order on a case where it matters: a 30 degree rotation
    as the initial transform and a translation optimised on top (the reverse order is 15 mm off)."""
    import SimpleITK as sitk

    from medssl.evaluate.registration import transform_points

    rot_m, shift = rotation_matrix((0.0, 0.0, 30.0)), np.array([25.0, -15.0, 10.0])
    fixed = phantom_subject("f", shape=(60, 44, 36), spacing_mm=(4.5, 5.0, 5.5), seed=1)
    moving = phantom_subject("m", rot_m, shift, shape=(70, 60, 36), spacing_mm=(4.5, 5.0, 5.5), seed=2)
    rot = sitk.Euler3DTransform()
    rot.SetMatrix(rot_m.ravel().tolist())
    tr = sitk.TranslationTransform(3)
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMeanSquares()
    r.SetInterpolator(sitk.sitkLinear)
    r.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 300, 0.7, 1e-8)
    r.SetMovingInitialTransform(rot)
    r.SetInitialTransform(tr, inPlace=True)
    r.Execute(to_sitk(fixed), to_sitk(moving))
    pts = _body_points(fixed, 100)
    truth = true_map(FIXED, (rot_m, shift), pts)
    ours = transform_points(sitk.CompositeTransform([rot, tr]), pts)
    reverse = transform_points(sitk.CompositeTransform([tr, rot]), pts)
    assert np.median(np.linalg.norm(ours - truth, axis=1)) < 0.5
    assert np.median(np.linalg.norm(reverse - truth, axis=1)) > 10.0


def test_bspline_on_top_of_the_affine_still_recovers_the_known_transform_and_is_cached(tmp_path):
    fixed = phantom_subject("fixed", *FIXED, shape=(60, 44, 36), spacing_mm=(4.5, 5.0, 5.5), seed=1)
    moving = phantom_subject("moving", *MOVING, shape=(60, 44, 36), spacing_mm=(4.5, 5.0, 5.5), seed=2)
    pts = _body_points(fixed, 200)
    truth = true_map(FIXED, MOVING, pts)
    reg = Registrar(RegistrationConfig(transform="bspline", bspline_iterations=5), tmp_path)
    assert reg.name == "registration (affine+bspline)"
    err = np.linalg.norm(reg.map_points(fixed, moving, pts) - truth, axis=1)
    assert np.median(err) < 2.0
    again = Registrar(RegistrationConfig(transform="bspline", bspline_iterations=5), tmp_path)
    np.testing.assert_allclose(again.map_points(fixed, moving, pts), reg.map_points(fixed, moving, pts), atol=1e-6)
    assert again.from_cache == {("moving", "fixed")}


def test_body_mask_registration_is_a_shortcut_row_named_as_such():
    from medssl.evaluate.headlines import kind_of

    body = RegistrationConfig(image="body")
    assert body.name == "aligned-identity (body affine)" and kind_of(body.name) == "baseline"
    assert kind_of(RegistrationConfig().name) == "control"
    assert kind_of(RegistrationConfig(transform="bspline").name) == "control"
    with pytest.raises(ValueError, match="transform"):
        RegistrationConfig(transform="elastic")


def test_world_to_vox_roundtrip_of_the_phantom_grid():
    """The phantom's grid is centred on its body: a sanity check of the helper the tests rely on."""
    v = phantom_subject("a", shape=(20, 16, 12))
    centre = world_to_vox(v.affine, np.zeros(3))[0]
    np.testing.assert_allclose(centre, (np.asarray(v.shape_vox) - 1) / 2.0, atol=1e-9)


def test_a_seeded_registration_repeats_bit_for_bit_whatever_the_threads_and_the_seed_matters():
    """Issue 22: SimpleITK reads a sampling seed of 0 as the wall clock, and its threaded Mattes histogram
    sums in thread-timing order; both made the demo's registration rows change between runs."""
    import SimpleITK as sitk

    fixed = phantom_subject("fixed", *FIXED, shape=(60, 44, 36), spacing_mm=(4.5, 5.0, 5.5), seed=1)
    moving = phantom_subject("moving", *MOVING, shape=(60, 44, 36), spacing_mm=(4.5, 5.0, 5.5), seed=2)
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(4)  # more threads than cores: timing varies
    try:
        runs = [np.array(Registrar(RegistrationConfig(seed=0)).transform(fixed, moving).GetParameters())
                for _ in range(3)]
        other_seed = np.array(Registrar(RegistrationConfig(seed=1)).transform(fixed, moving).GetParameters())
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 4  # the caller's setting is restored
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
    assert all(np.array_equal(runs[0], r) for r in runs[1:])
    assert not np.array_equal(runs[0], other_seed)  # the seed reaches the sampler (not read as "wall clock")
    assert RegistrationConfig(seed=0).key() != RegistrationConfig(seed=1).key()
