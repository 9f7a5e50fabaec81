"""Cross-subject correspondence: a perfect embedding reaches the grid floor, a random one is at chance."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medssl.data.volume import Volume
from medssl.evaluate.correspondence import (
    correspondence_error,
    correspondence_from_dense,
    evaluate_correspondence,
    summarize_correspondence,
)
from medssl.evaluate.dense import dense_embeddings, dense_grid
from medssl.geometry import vox_to_world
from tests.helpers import oblique_affine, rotation_matrix

N_NOISE = 6


class Channels(nn.Module):
    """Embedding = some channels of a 1-voxel patch: ``(B, C, 1, 1, 1) -> (B, len(channels))``."""

    patch_size_vox = (1, 1, 1)

    def __init__(self, channels) -> None:
        super().__init__()
        self.channels = list(channels)
        self.w = nn.Parameter(torch.ones(1))

    def embed(self, x):
        return x[:, self.channels, 0, 0, 0] * self.w


PERFECT = Channels([0, 1, 2])  # the template coordinates themselves
RANDOM = Channels(range(3, 3 + N_NOISE))  # i.i.d. noise


class Subject:
    """A subject whose world frame is the template rotated by ``R`` and shifted by ``o``.

    Channels 0-2 hold the template mm of each voxel, ``R^T (x - o)``; channels 3.. hold noise.
    """

    def __init__(self, case_id, shape, spacing, grid_angles, frame_angles, o, seed):
        self.R = rotation_matrix(frame_angles)
        self.o = np.asarray(o, dtype=float)
        affine = oblique_affine(spacing, grid_angles)
        centre = vox_to_world(affine, (np.asarray(shape) - 1) / 2.0)[0]
        affine[:3, 3] += self.o - centre  # the grid is centred on the subject's frame origin
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
        template = self.to_template(vox_to_world(affine, ijk)).T.reshape(3, *shape)
        noise = np.random.default_rng(seed).normal(size=(N_NOISE, *shape))
        body = np.ones(shape, np.uint8)  # the whole grid is body (coordinates are not intensities)
        self.volume = Volume(np.concatenate([template, noise]).astype(np.float32), affine, case_id, aux={"body": body})

    def to_template(self, x_mm):
        return (np.asarray(x_mm) - self.o) @ self.R

    def from_template(self, t_mm):
        return np.asarray(t_mm) @ self.R.T + self.o


A = Subject("a", (20, 18, 16), (2.0, 2.5, 3.0), (10, 20, -15), (0, 0, 25), (5.0, -3.0, 10.0), seed=1)
B = Subject("b", (22, 16, 18), (2.5, 3.0, 2.0), (-20, 5, 30), (15, -10, 0), (-8.0, 4.0, 0.0), seed=2)
SUBJECTS = {"a": A, "b": B}


def true_map(case_a, case_b, pts):
    return SUBJECTS[case_b].from_template(SUBJECTS[case_a].to_template(pts))


def test_a_perfect_embedding_finds_the_nearest_grid_point_to_the_true_point():
    df = correspondence_error(
        PERFECT,
        A.volume,
        B.volume,
        lambda p: true_map("a", "b", p),
        n_points=150,
        seed=0,
        stride_vox=2,
        method_name="perfect",
        progress=False,
    )
    perfect = df[df.method == "perfect"].reset_index(drop=True)
    floor = df[df.method == "grid_floor"].reset_index(drop=True)
    assert len(perfect) > 50
    # B's frame is a rotation of the template, so the template-space nearest neighbour
    # is the world-space nearest grid point: the error is exactly the grid floor.
    np.testing.assert_allclose(perfect.error_mm, floor.error_mm, atol=1e-3)
    # Bound on the distance to the nearest grid point: half a stride inside the grid,
    # up to the uncovered margin (plus half a voxel) at B's border.
    anchors, _ = dense_grid(B.volume.shape_vox, 2, 1)
    reach_vox = [max(1.0, a[0] + 0.5, n - 0.5 - a[-1]) for a, n in zip(anchors, B.volume.shape_vox)]
    assert perfect.error_mm.max() <= np.linalg.norm(np.multiply(reach_vox, [2.5, 3.0, 2.0])) + 1e-6
    assert perfect.error_mm.median() < 3.0
    # and the query/true columns are consistent with the map
    q = perfect[["query_x_mm", "query_y_mm", "query_z_mm"]].to_numpy()
    np.testing.assert_allclose(perfect[["true_x_mm", "true_y_mm", "true_z_mm"]], true_map("a", "b", q), atol=1e-9)


def test_query_points_whose_true_partner_lies_outside_subject_b_are_dropped():
    far = lambda p: p + 1000.0
    da = dense_embeddings(PERFECT, A.volume, stride_vox=3, progress=False)
    db = dense_embeddings(PERFECT, B.volume, stride_vox=3, progress=False)
    assert correspondence_from_dense(da, db, far, n_points=20).empty
    assert len(correspondence_from_dense(da, db, lambda p: true_map("a", "b", p), n_points=20)) > 0


def test_random_embeddings_score_near_the_chance_baseline_and_far_above_a_perfect_embedding():
    res = evaluate_correspondence(
        {"perfect": PERFECT, "random": RANDOM},
        [A.volume, B.volume],
        [("a", "b"), ("b", "a")],
        true_map,
        n_points=200,
        seed=0,
        stride_vox=2,
        progress=False,
    )
    s = res.summary.set_index("method")
    assert list(res.summary.method) == ["perfect", "random", "identity", "aligned-identity (scale+shift)", "chance", "grid_floor"]
    assert list(res.summary.kind) == ["method", "method", "baseline", "baseline", "reference", "reference"]
    assert set(s.columns) >= {"median_error_mm", "mean_error_mm", "p90_error_mm", "n_points", "n_pairs"}
    assert (s.n_pairs == 2).all()
    chance = s.loc["chance", "median_error_mm"]
    assert 0.7 * chance < s.loc["random", "median_error_mm"] < 1.3 * chance
    assert s.loc["perfect", "median_error_mm"] < 0.2 * chance
    assert np.isclose(s.loc["perfect", "median_error_mm"], s.loc["grid_floor", "median_error_mm"], atol=1e-3)
    # the query points are the same for every method (seeded on the grid, not on the method)
    pts = res.points
    assert set(pts[pts.method == "perfect"].point) == set(pts[pts.method == "random"].point)


def test_summary_statistics_are_the_median_mean_and_90th_percentile_of_the_per_point_errors():
    import pandas as pd

    err = np.arange(1.0, 11.0)
    points = pd.DataFrame({"method": "m", "case_a": "a", "case_b": "b", "point": np.arange(10), "error_mm": err})
    s = summarize_correspondence(points).iloc[0]
    assert s.median_error_mm == 5.5 and s.mean_error_mm == 5.5
    assert s.p90_error_mm == np.quantile(err, 0.9)
    assert s.n_points == 10 and s.n_pairs == 1


def test_identity_rows_expose_a_shared_frame_and_aligned_identity_undoes_a_shift_and_a_scaling():
    """Two grids over the same anatomy whose world frames differ by a translation and per-axis scaling."""
    shape = (20, 18, 16)
    scale_b = np.array([1.1, 0.9, 1.0])
    shift_b = np.array([30.0, -20.0, 12.0])
    aff_a = np.diag([2.0, 2.0, 2.0, 1.0])
    aff_b = np.diag([*(2.0 * scale_b), 1.0])
    aff_b[:3, 3] = shift_b
    vols = {}
    for name, aff in (("a", aff_a), ("b", aff_b)):
        noise = np.random.default_rng(len(vols)).normal(size=(3 + N_NOISE, *shape))
        vols[name] = Volume(noise.astype(np.float32), aff, name, aux={"body": np.ones(shape, np.uint8)})

    def true(a, b, pts):  # the same voxel index in both grids is the same anatomy
        return vox_to_world(vols[b].affine, np.linalg.solve(vols[a].affine[:3, :3], (pts - vols[a].affine[:3, 3]).T).T)

    res = evaluate_correspondence({"random": RANDOM}, list(vols.values()), [("a", "b")], true, n_points=150,
                                  seed=0, stride_vox=2, progress=False)
    s = res.summary.set_index("method").median_error_mm
    assert s["identity"] > 20.0  # the world frames differ by ~38 mm
    assert s["aligned-identity (scale+shift)"] <= s["grid_floor"] + 1e-6  # moments recover shift + scaling exactly


def test_registration_control_and_body_alignment_rows_with_subjects_as_units(tmp_path):
    """On phantom subjects related by known affines, the registration row appears as a control near the grid
    floor, the body-affine alignment as a shortcut; every subject is a query, so the units are the subjects."""
    from medssl.evaluate.correspondence import query_pairs
    from medssl.evaluate.registration import Registrar, RegistrationConfig
    from tests.evaluate.test_registration import phantom_subject, true_map

    frames = {"s0": (np.eye(3), np.zeros(3)),
              "s1": (rotation_matrix((7.0, -5.0, 9.0)) @ np.diag([1.08, 0.93, 1.04]), np.array([12.0, -9.0, 15.0])),
              "s2": (rotation_matrix((-6.0, 4.0, -8.0)) @ np.diag([0.95, 1.05, 0.97]), np.array([-10.0, 6.0, -5.0]))}
    vols = [phantom_subject(c, *f, shape=(60, 44, 36), spacing_mm=(4.5, 5.0, 5.5), seed=i)
            for i, (c, f) in enumerate(frames.items())]
    pairs = query_pairs(list(frames), 0)
    assert pairs == [("s0", "s1"), ("s0", "s2"), ("s1", "s0"), ("s1", "s2"), ("s2", "s0"), ("s2", "s1")]
    assert query_pairs(list(frames), 1, seed=3) == query_pairs(list(frames), 1, seed=3)  # seeded
    assert {a for a, _ in query_pairs(list(frames), 1)} == set(frames)  # every subject is a query

    registrars = [Registrar(RegistrationConfig(image="body"), tmp_path), Registrar(RegistrationConfig(), tmp_path)]
    res = evaluate_correspondence({"intensity": Channels([0])}, vols, pairs,
                                  lambda a, b, p: true_map(frames[a], frames[b], p), n_points=80, seed=0,
                                  stride_vox=2, registrars=registrars, progress=False)
    s = res.summary.set_index("method")
    assert list(res.summary.method) == ["intensity", "identity", "aligned-identity (scale+shift)",
                                        "aligned-identity (body affine)", "registration (affine)", "chance",
                                        "grid_floor"]
    assert s.loc["registration (affine)", "kind"] == "control"
    assert s.loc["aligned-identity (body affine)", "kind"] == "baseline"
    err = s["median_error_mm"]
    assert err["registration (affine)"] < 1.5 * err["grid_floor"] + 1.0  # registration solves it (up to the grid)
    assert err["registration (affine)"] < 0.3 * err["identity"] and err["registration (affine)"] < 0.3 * err["chance"]
    assert "s per pair (6 pairs" in s.loc["registration (affine)", "note"]
    assert res.registration_seconds["registration (affine)"] > 0
    assert (s["n_subjects"] == 3).all() and (s["n_pairs"] == 6).all()
    units = res.units()
    assert set(units) == set(s.index) and all(len(u) == 3 for u in units.values())
    # 3 subjects: the paired tests say "not testable" instead of a p-value
    v = res.verdicts({})
    assert set(v["baseline"]) == {"identity", "aligned-identity (scale+shift)", "aligned-identity (body affine)",
                                  "registration (affine)"}
    assert v["verdict"].str.contains("not testable: 3 units < 5").all()
