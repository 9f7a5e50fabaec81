"""kNN label transfer: exact neighbours per atlas, votes, the image grid, identity rows, no atlas/query overlap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medssl.data.volume import Volume
from medssl.evaluate import knn_seg
from medssl.evaluate.dense import dense_embeddings
from medssl.evaluate.segmetrics import OrganSet
from tests.helpers import oblique_affine

ORGANS = OrganSet(names=("a", "b", "c"), label_ids=(1, 2, 3))
AFFINE = oblique_affine(spacing_mm=(1.5, 2.0, 2.5), angles_deg=(10.0, -5.0, 20.0), origin_mm=(-30.0, 10.0, 5.0))
SHAPE = (22, 19, 17)


def labelled_volume(case_id: str, seed: int, affine=AFFINE, group: str | None = None) -> Volume:
    """Random image, three box organs, the whole grid is body."""
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, np.int16)
    for code, (x, y, z) in zip((1, 2, 3), [(3, 3, 3), (10, 8, 4), (5, 11, 9)]):
        label[x : x + 7, y : y + 6, z : z + 6] = code
    data = rng.normal(size=(1, *SHAPE)).astype(np.float32) + label[None] * 2.0
    return Volume(data, np.asarray(affine, float), case_id, group=group, label=label,
                  aux={"body": np.ones(SHAPE, np.uint8)})


class LabelCode(nn.Module):
    """Descriptor = one-hot organ code of the grid point's own voxel, read from a label channel via cut_inputs."""

    patch_size_vox = (1, 1, 1)
    input_size_vox = (1, 1, 1)

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def cut_inputs(self, data, centres_vox):
        c = np.asarray(centres_vox)
        return np.asarray(data)[1, c[:, 0], c[:, 1], c[:, 2]][:, None]  # (N, 1): the code channel

    def embed(self, x):
        return nn.functional.one_hot(x[:, 0].round().long(), 4).float() * self.w


def with_code_channel(v: Volume) -> Volume:
    return v.with_(data=np.concatenate([v.data, ORGANS.encode(v.label)[None].astype(np.float32)]))


def codes_at_anchors(dense, vol) -> np.ndarray:
    return ORGANS.encode(vol.label)[np.ix_(*dense.anchors_vox)]


def test_one_hot_label_code_descriptors_transfer_the_labels_exactly():
    atlases = [with_code_channel(labelled_volume(f"a{i}", i)) for i in range(3)]
    query = with_code_channel(labelled_volume("q", 9))
    m = LabelCode()
    da = [dense_embeddings(m, v, stride_vox=2, foreground_only=True, progress=False) for v in atlases]
    dq = dense_embeddings(m, query, stride_vox=2, foreground_only=True, progress=False)
    neigh = knn_seg.atlas_neighbours(dq, da, [ORGANS.encode(v.label) for v in atlases], k=5)
    frac = knn_seg.vote_fractions(neigh, [0, 1, 2], 5, ORGANS.n_classes)
    assert np.all(frac.max(axis=1) == 1.0)  # unanimous votes
    grid = knn_seg._to_grid(dq, frac, neigh.query_index)
    np.testing.assert_array_equal(grid.argmax(-1), codes_at_anchors(dq, query))
    labels = knn_seg.labels_on_image(dq, grid)
    np.testing.assert_array_equal(labels[np.ix_(*dq.anchors_vox)], codes_at_anchors(dq, query))


def test_k1_with_a_query_equal_to_an_atlas_returns_the_atlas_labels():
    atlas = labelled_volume("atlas", 1)
    twin = atlas.with_(case_id="twin", group="twin")
    other = labelled_volume("other", 2)
    m = knn_seg.RawIntensityDescriptor(patch_size_vox=3, pooled_size_vox=3)  # 27 raw voxels: unique per point
    da = [dense_embeddings(m, v, stride_vox=3, foreground_only=True, progress=False) for v in (other, atlas)]
    dq = dense_embeddings(m, twin, stride_vox=3, foreground_only=True, progress=False)
    neigh = knn_seg.atlas_neighbours(dq, da, [ORGANS.encode(v.label) for v in (other, atlas)], k=1)
    assert np.all(neigh.sqdist[1, :, 0] < 1e-6)  # each query point finds its twin (up to rounding)
    frac = knn_seg.vote_fractions(neigh, [0, 1], 1, ORGANS.n_classes)
    grid = knn_seg._to_grid(dq, frac, neigh.query_index)
    np.testing.assert_array_equal(grid.argmax(-1), codes_at_anchors(dq, atlas))


def test_merging_per_atlas_neighbour_lists_equals_brute_force_knn_over_the_union():
    rng = np.random.default_rng(0)

    class Emb:
        pass

    atlases = [rng.normal(size=(60 + 7 * i, 5)).astype(np.float32) for i in range(4)]
    labels = [rng.integers(0, 4, size=len(a)) for a in atlases]
    q = rng.normal(size=(30, 5)).astype(np.float32)
    k = 7
    sq, lab = [], []
    for a, la in zip(atlases, labels):
        d, i = knn_seg.knn_search(a, q, k)
        sq.append(d)
        lab.append(la[i].astype(np.uint8))
    neigh = knn_seg.AtlasNeighbours(tuple("abcd"), np.stack(sq), np.stack(lab), np.arange(len(q)))
    for subset in ([2], [0, 3], [0, 1, 2, 3]):
        ours = knn_seg.vote_fractions(neigh, subset, k, 4)
        db = np.concatenate([atlases[s] for s in subset])
        la = np.concatenate([labels[s] for s in subset])
        nearest = np.argsort(((q[:, None] - db[None]) ** 2).sum(-1), axis=1)[:, :k]
        expected = np.stack([np.bincount(la[row], minlength=4) for row in nearest]) / k
        np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_exact_search_matches_brute_force_pads_small_atlases_and_faiss_agrees():
    rng = np.random.default_rng(1)
    db, q = rng.normal(size=(200, 8)).astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32)
    d1, i1 = knn_seg.knn_search(db, q, 5, backend="sklearn")
    brute = ((q[:, None] - db[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(i1, np.argsort(brute, axis=1)[:, :5])
    np.testing.assert_allclose(d1, np.sort(brute, axis=1)[:, :5], rtol=1e-4, atol=1e-4)
    d, i = knn_seg.knn_search(db[:3], q, 5)
    assert np.all(i[:, 3:] == -1) and np.all(np.isinf(d[:, 3:]))
    assert knn_seg._faiss() is not None, "faiss-cpu is in requirements.txt: install it (pip install -r requirements.txt)"
    d2, i2 = knn_seg.knn_search(db, q, 5, backend="faiss")
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-4, atol=1e-4)


def test_labels_on_image_interpolate_fractions_between_anchors_exactly_at_the_anchors():
    vol = labelled_volume("g", 0)
    grid = knn_seg._label_grid(vol, 4)
    codes = codes_at_anchors(grid, vol)
    onehot = np.eye(4, dtype=np.float32)[codes]
    labels = knn_seg.labels_on_image(grid, onehot)
    assert labels.shape == SHAPE
    np.testing.assert_array_equal(labels[np.ix_(*grid.anchors_vox)], codes)
    # against torch's trilinear interpolation between the first and last anchors
    a = grid.anchors_vox
    t = torch.from_numpy(np.moveaxis(onehot, -1, 0).copy())[None]
    ref = nn.functional.interpolate(t, size=[int(x[-1] - x[0]) + 1 for x in a], mode="trilinear", align_corners=True)
    inner = labels[a[0][0] : a[0][-1] + 1, a[1][0] : a[1][-1] + 1, a[2][0] : a[2][-1] + 1]
    assert (ref[0].argmax(0).numpy() == inner).mean() > 0.999


def test_identity_is_exact_for_the_same_grid_and_aligned_identity_undoes_a_body_shift():
    query = labelled_volume("q", 0)
    same = labelled_volume("same", 0)
    moved_affine = AFFINE.copy()
    moved_affine[:3, 3] += [14.0, -9.0, 6.0]  # the same anatomy, 14/-9/6 mm elsewhere in the world
    moved = labelled_volume("moved", 0, affine=moved_affine)
    grid = knn_seg._label_grid(query, 2)
    truth = codes_at_anchors(grid, query)
    codes = [ORGANS.encode(v.label) for v in (same, moved)]
    ident = knn_seg.identity_fractions(grid, [same], codes[:1], n_classes=4)
    np.testing.assert_array_equal(ident.argmax(-1), truth)
    shifted = knn_seg.identity_fractions(grid, [moved], codes[1:], n_classes=4)
    assert (shifted.argmax(-1) == truth).mean() < 0.95  # plain identity misses the shifted anatomy
    body_q = knn_seg.body_points_mm(query, 1)
    body_m = knn_seg.body_points_mm(moved, 1)
    aligned = knn_seg.identity_fractions(grid, [moved], codes[1:], aligned=True, query_body_mm=body_q,
                                         atlas_body_mm=[body_m], n_classes=4)
    np.testing.assert_array_equal(aligned.argmax(-1), truth)


def test_atlas_and_query_subjects_never_overlap():
    a, b, c = (labelled_volume(n, i) for i, n in enumerate("abc"))
    with pytest.raises(ValueError, match="overlap"):
        knn_seg.check_disjoint([a, b], [b, c])
    same_patient = labelled_volume("c2", 5, group="a")
    with pytest.raises(ValueError, match="patient groups"):
        knn_seg.check_disjoint([a, b], [same_patient])
    with pytest.raises(ValueError, match="overlap"):
        knn_seg.evaluate_knn_segmentation({}, [a, b], [b], ORGANS, n_atlases=[1])
    draws = knn_seg.atlas_draws(["a", "b", "d", "e"], [1, 2, 4], n_draws=3, seed=0)
    for d in draws:
        assert set(d.atlases) <= {"a", "b", "d", "e"} and len(set(d.atlases)) == d.n
    assert len({d.atlases for d in draws if d.n == 2}) == 3  # distinct subsets
    assert [d.atlases for d in draws if d.n == 4] == [("a", "b", "d", "e")]  # only one exists
    assert draws == knn_seg.atlas_draws(["a", "b", "d", "e"], [1, 2, 4], n_draws=3, seed=0)  # same for every row


def test_the_evaluation_scores_methods_and_baselines_on_the_same_draws_and_marks_the_baselines():
    atlases = [labelled_volume(f"a{i}", i) for i in range(3)]
    queries = [labelled_volume(f"q{i}", 10 + i) for i in range(2)]
    rows = {"raw": knn_seg.RawIntensityDescriptor(3, 1)}
    res = knn_seg.evaluate_knn_segmentation(rows, atlases, queries, ORGANS, n_atlases=[1, 3], n_draws=2, k=3,
                                            stride_vox=3, surface_tolerance_mm=2.0, kinds={"raw": "method"},
                                            progress=False)
    curve = res.curve()
    assert set(curve["method"]) == {"raw", "identity", "aligned-identity (scale+shift)"}
    assert set(curve.loc[curve["method"] != "raw", "kind"]) == {"baseline"}
    draws = res.scores.groupby("method")["atlases"].apply(lambda s: tuple(sorted(set(s))))
    assert draws["raw"] == draws["identity"] == draws["aligned-identity (scale+shift)"]
    assert res.scores.loc[res.scores["n_atlases"] == 3, "nsd"].notna().all()
    assert res.scores.loc[res.scores["n_atlases"] == 1, "nsd"].isna().all()
    # identical labels in the same world frame: the identity rows are as good as the stride-3 grid allows
    ident = curve.query("n_atlases == 3").set_index("method")["mean"]
    assert ident["identity"] == pytest.approx(ident["aligned-identity (scale+shift)"]) and ident["identity"] > 0.6
    head = res.headline()
    assert {"knn_dice_n1", "knn_dice_n3", "knn_nsd_n3"} <= set(head["metric"])
    assert set(head["split"]) == {"test"}


def test_multi_atlas_registration_is_a_control_row_that_labels_phantom_subjects_well(tmp_path):
    """Atlases and queries are one phantom under known affines: registering each atlas onto the query transfers
    its organs (the control), while the same world coordinate (identity) does not."""
    from medssl.evaluate.registration import Registrar, RegistrationConfig
    from tests.evaluate.test_registration import phantom_subject
    from tests.helpers import rotation_matrix

    organs = OrganSet(names=("liver", "spleen", "kidney_r", "kidney_l"), label_ids=(1, 2, 3, 4))
    geo = dict(shape=(60, 44, 36), spacing_mm=(4.5, 5.0, 5.5))
    frames = [(rotation_matrix((7.0, -5.0, 9.0)) @ np.diag([1.08, 0.93, 1.04]), (12.0, -9.0, 15.0)),
              (rotation_matrix((-6.0, 4.0, -8.0)) @ np.diag([0.95, 1.05, 0.97]), (-10.0, 6.0, -5.0)),
              (rotation_matrix((4.0, 8.0, -5.0)) @ np.diag([1.02, 0.96, 1.06]), (8.0, 12.0, -12.0)),
              (rotation_matrix((-8.0, -3.0, 6.0)) @ np.diag([0.97, 1.04, 0.94]), (-14.0, -8.0, 9.0))]
    vols = [phantom_subject(f"p{i}", m, t, seed=i, **geo) for i, (m, t) in enumerate(frames)]
    atlases, queries = vols[:2], vols[2:]
    reg = Registrar(RegistrationConfig(), tmp_path)
    res = knn_seg.evaluate_knn_segmentation({"raw": knn_seg.RawIntensityDescriptor(3, 1)}, atlases, queries, organs,
                                            n_atlases=[1, 2], n_draws=2, k=3, stride_vox=2,
                                            surface_tolerance_mm=None, kinds={"raw": "method"}, registrars=[reg],
                                            progress=False)
    curve = res.curve().query("n_atlases == 2").set_index("method")
    assert curve.loc["registration (affine)", "kind"] == "control"
    dice = curve["mean"]
    assert dice["registration (affine)"] > 0.7
    assert dice["registration (affine)"] > dice["identity"] + 0.1
    assert dice["registration (affine)"] > dice["aligned-identity (scale+shift)"]
    # every atlas registered onto every query once (cached), and the note says how long one took
    assert len(list(tmp_path.glob("*.tfm"))) == 4
    assert "multi-atlas (linear label vote)" in res.notes["registration (affine)"]
    assert "s per pair (4 pairs" in res.notes["registration (affine)"]
    head = res.headline()
    reg_rows = head[head["method"] == "registration (affine)"]
    assert {"knn_dice_n1", "knn_dice_n2", "knn_fp_ml_n2"} <= set(reg_rows["metric"])
    assert reg_rows.loc[reg_rows["metric"].str.startswith("knn_dice"), "note"].str.contains("s per pair").all()
    assert set(reg_rows["kind"]) == {"control"}
    fp = res.false_positives()
    assert (fp["fp_ml"] >= fp["absent_fp_ml"]).all() and (fp["n_queries"] == 2).all()
    # the kNN verdicts test the method against the control and the shortcuts (2 queries: not testable)
    v = res.verdicts({})
    assert set(v["baseline"]) == {"identity", "aligned-identity (scale+shift)", "registration (affine)"}
    assert v["verdict"].str.contains("not testable").all()


def _brute_force_knn(db: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 distances from differences, nearest first, ties by the smaller index."""
    d = ((q.astype(np.float64)[:, None] - db.astype(np.float64)[None]) ** 2).sum(-1)
    order = np.lexsort((np.broadcast_to(np.arange(len(db)), d.shape), d), axis=-1)[:, :k]
    return np.take_along_axis(d, order, 1), order


# 700 points: torch's one-stage selection; 3000: its two-stage (grouped) selection. "exact" takes faiss's candidates.
@pytest.mark.parametrize("backend", ["exact", "torch"])
@pytest.mark.parametrize("n_db", [700, 3000])
@pytest.mark.parametrize("offset, scale", [(0.0, 1.0), (300.0, 1.0), (-5.0, 1e-3), (0.0, 1e3)])
def test_default_search_is_exact_with_duplicates_ties_and_far_from_the_origin(offset, scale, n_db, backend):
    rng = np.random.default_rng(int(abs(offset)) + 7)
    db = (rng.normal(size=(n_db, 24)) * scale + offset).astype(np.float32)
    db[rng.integers(0, n_db, 200)] = db[3]  # 200 exact duplicates of one point: ties broken by the smaller index
    q = (rng.normal(size=(90, 24)) * scale + offset).astype(np.float32)
    q[:10] = db[3]  # queries sitting on the duplicated point
    d, i = knn_seg.knn_search(db, q, 21, backend=backend)
    d_ref, i_ref = _brute_force_knn(db, q, 21)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_allclose(d, d_ref, rtol=1e-5, atol=1e-6 * scale**2)


@pytest.mark.parametrize("backend", ["exact", "torch"])
def test_descriptors_whose_float32_distances_would_overflow_are_searched_in_float64(backend):
    # norms ~3e19: every squared distance exceeds float32's 3.4e38, so float32 candidates would all be inf
    rng = np.random.default_rng(4)
    db = (rng.normal(size=(300, 8)) * 1e19).astype(np.float32)
    q = (rng.normal(size=(20, 8)) * 1e19).astype(np.float32)
    d, i = knn_seg.knn_search(db, q, 5, backend=backend)
    d_ref, i_ref = _brute_force_knn(db, q, 5)
    np.testing.assert_array_equal(i, i_ref)
    with np.errstate(over="ignore"):
        expected = d_ref.astype(np.float32)  # float32 holds some of them: the rest are inf, in the right order
    assert np.isinf(expected).any() and np.isfinite(expected).any()
    np.testing.assert_allclose(d, expected, rtol=1e-6)


def test_grouped_selection_finds_neighbours_packed_into_few_groups():
    # torch's two-stage selection keeps the c groups with the smallest minima; here the 48 nearest points
    # share 3 groups (16 columns each, one per slice of the padded database), so 26 of the 29 groups it keeps
    # hold nothing near, and the 29 nearest must all come from the first three
    rng = np.random.default_rng(3)
    n_db, k = 4000, 21
    g = knn_seg._KNN_GROUP
    p = -(-n_db // g)
    db = rng.normal(size=(n_db, 32)).astype(np.float32) * 10
    q = np.zeros((5, 32), np.float32)
    near = np.array([j + t * p for j in range(3) for t in range(g) if j + t * p < n_db])
    db[near] = 0.01 * rng.normal(size=(len(near), 32)).astype(np.float32)
    d, i = knn_seg.knn_search(db, q, k, backend="torch")
    d_ref, i_ref = _brute_force_knn(db, q, k)
    np.testing.assert_array_equal(i, i_ref)
    assert set(i.ravel()) <= set(near)


def test_exact_search_gives_the_same_answer_with_or_without_faiss(monkeypatch):
    rng = np.random.default_rng(12)
    centres = rng.normal(size=(4, 48)).astype(np.float32)
    db = centres[rng.integers(0, 4, 2500)] + 0.3 * rng.normal(size=(2500, 48)).astype(np.float32)
    db[100:160] = db[7]  # exact ties
    q = centres[rng.integers(0, 4, 300)] + 0.3 * rng.normal(size=(300, 48)).astype(np.float32)
    q[:5] = db[7]
    assert knn_seg._faiss() is not None, "faiss-cpu is in requirements.txt: install it (pip install -r requirements.txt)"
    with_faiss = knn_seg.knn_search(db, q, 21)
    monkeypatch.setattr(knn_seg, "_faiss", lambda: None)
    without = knn_seg.knn_search(db, q, 21)
    np.testing.assert_array_equal(with_faiss[1], without[1])
    np.testing.assert_array_equal(with_faiss[0], without[0])  # the same float64 distances, bit for bit


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_search_refuses_descriptors_that_are_not_finite(bad):
    db = np.ones((50, 4), np.float32)
    db[7, 2] = bad
    with pytest.raises(ValueError, match=r"database hold NaN or inf descriptors \(1 of 50 rows\)"):
        knn_seg.knn_search(db, np.zeros((3, 4), np.float32), 5)


def test_search_rows_that_float32_cannot_separate_are_searched_exactly(monkeypatch):
    # 300 points on a sphere around the query whose squared distances differ by ~1e-9 relative, far below
    # float32's resolution: the float32 screening cannot certify these rows, the float64 fallback must answer
    rng = np.random.default_rng(5)
    centre = rng.normal(size=16) * 50
    dirs = rng.normal(size=(300, 16))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    radii = 10.0 * (1.0 + 1e-9 * rng.permutation(300))
    db64 = centre + dirs * radii[:, None]
    db = db64.astype(np.float32)
    q = np.repeat(centre[None].astype(np.float32), 3, axis=0)
    calls = []
    exact_row = knn_seg._exact_row
    monkeypatch.setattr(knn_seg, "_exact_row", lambda *a: calls.append(1) or exact_row(*a))
    for backend in ("exact", "torch"):
        calls.clear()
        d, i = knn_seg.knn_search(db, q, 5, backend=backend)
        d_ref, i_ref = _brute_force_knn(db, q, 5)
        np.testing.assert_array_equal(i, i_ref)
        assert len(calls) == 3, backend  # every row fell back to the exhaustive float64 search


def test_default_search_agrees_with_scikit_learn_on_clustered_descriptors():
    rng = np.random.default_rng(11)
    centres = rng.normal(size=(5, 64)).astype(np.float32)
    db = centres[rng.integers(0, 5, 3000)] + 0.8 * rng.normal(size=(3000, 64)).astype(np.float32)
    q = centres[rng.integers(0, 5, 400)] + 0.8 * rng.normal(size=(400, 64)).astype(np.float32)
    d, i = knn_seg.knn_search(db, q, 21)
    d_sk, i_sk = knn_seg.knn_search(db, q, 21, backend="sklearn")
    np.testing.assert_array_equal(i, i_sk)
    np.testing.assert_allclose(d, d_sk, rtol=1e-4, atol=1e-3)


def test_vote_fractions_count_each_code_and_skip_padded_neighbours():
    sq = np.array([[[0.1, 0.2, 0.3, np.inf]], [[0.05, 0.25, np.inf, np.inf]]], np.float32)  # 2 atlases, 1 query, k=4
    lab = np.array([[[2, 2, 1, 0]], [[1, 3, 0, 0]]], np.uint8)
    neigh = knn_seg.AtlasNeighbours(("a", "b"), sq, lab, np.array([0]))
    np.testing.assert_allclose(knn_seg.vote_fractions(neigh, [0], 4, 4), [[0, 1 / 3, 2 / 3, 0]])
    # merged: the 4 nearest of {0.1, 0.2, 0.3, 0.05, 0.25} are 0.05 (1), 0.1 (2), 0.2 (2), 0.25 (3)
    np.testing.assert_allclose(knn_seg.vote_fractions(neigh, [0, 1], 4, 4), [[0, 0.25, 0.5, 0.25]])


def test_atlas_neighbours_names_the_atlas_whose_descriptors_are_not_finite():
    import dataclasses

    rng = np.random.default_rng(2)
    vols = {name: labelled_volume(name, seed) for name, seed in (("query_case", 1), ("atlas_ok", 2), ("atlas_bad", 3))}
    grids = {}
    for name, vol in vols.items():
        g = knn_seg._label_grid(vol, 4)
        emb = rng.normal(size=(*g.grid_shape, 6)).astype(np.float32)
        if name == "atlas_bad":
            emb[(*np.argwhere(g.foreground)[0], 3)] = np.inf  # one channel of one body point (NaN in channel 0
            # marks a point that was not embedded, and is skipped)
        grids[name] = dataclasses.replace(g, embeddings=emb)
    codes = [np.asarray(vols[n].label) for n in ("atlas_ok", "atlas_bad")]
    with pytest.raises(ValueError, match=r"query query_case .* in atlas atlas_bad .*database hold NaN or inf"):
        knn_seg.atlas_neighbours(grids["query_case"], [grids["atlas_ok"], grids["atlas_bad"]], codes, k=3)
