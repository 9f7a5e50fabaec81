"""The evaluation protocol adapts to small and unregistered collections, and says what it gave up."""

from __future__ import annotations

import numpy as np
import pytest

from medssl.data.volume import Volume
from medssl.evaluate.latent import decode_coordinates, z_slab_groups
from medssl.evaluate.probe import linear_probe_cv
from medssl.evaluate.protocol import body_centred_mm, evaluation_subjects
from tests.helpers import oblique_affine


class _Data:
    def __init__(self, splits: dict[str, list[Volume]], registered: bool):
        self._splits, self.registered = splits, registered

    @property
    def splits(self):
        return [s for s, v in self._splits.items() if v]

    def volumes(self, split=None):
        return self._splits[split] if split else [v for vs in self._splits.values() for v in vs]


def _vol(k: int, origin=(0.0, 0.0, 0.0)) -> Volume:
    body = np.zeros((20, 18, 16), np.uint8)
    body[4:16, 3:15, 2:14] = 1
    affine = oblique_affine((1.5, 2.0, 2.5), (10.0, 5.0, -20.0), origin)
    return Volume(np.zeros((1, 20, 18, 16), np.float32), affine, f"c{k}", aux={"body": body})


def test_full_protocol_when_both_splits_exist_and_fallbacks_say_what_they_gave_up():
    full = evaluation_subjects(_Data({"train": [_vol(0)], "val": [_vol(1)], "test": [_vol(2)]}, True))
    assert (full.fit_split, full.score_split, len(full.fit), len(full.score)) == ("val", "test", 1, 1)
    assert full.notes == []
    only_val = evaluation_subjects(_Data({"train": [_vol(0)], "val": [_vol(1), _vol(2)]}, False))
    assert only_val.fit == [] and only_val.score_split == "val" and len(only_val.score) == 2
    assert any("no 'test' subjects" in n for n in only_val.notes) and any("body" in n for n in only_val.notes)
    nothing = evaluation_subjects(_Data({"train": [_vol(0), _vol(1)]}, False))
    assert nothing.score_split == "train" and "optimistic" in nothing.describe()


def test_body_centred_positions_remove_the_scanner_offset_of_unregistered_subjects():
    a, b = _vol(0), _vol(1, origin=(0.0, 0.0, 683.0))  # same anatomy, another scanner frame
    c_vox = np.array([[10, 9, 8]])
    pts = np.concatenate([a.affine[:3, :3] @ c_vox.T + a.affine[:3, 3:], b.affine[:3, :3] @ c_vox.T + b.affine[:3, 3:]], 1).T
    centred = body_centred_mm(pts, ["c0", "c1"], [a, b])
    assert abs(pts[1, 2] - pts[0, 2]) == pytest.approx(683.0)
    np.testing.assert_allclose(centred[0], centred[1], atol=1e-9)


def _assert_contiguous_disjoint_z_slabs(z: np.ndarray, groups: np.ndarray, slabs: np.ndarray, n_slabs: int) -> None:
    """Per subject: walking up z meets each slab as one run, in slab order; slabs share no z value; sizes ~equal."""
    for subject in np.unique(groups):
        sel = groups == subject
        assert all(s.startswith(f"{subject}|slab") for s in slabs[sel])  # a slab belongs to one subject
        zs, ks = z[sel], np.array([int(s.rsplit("slab", 1)[1]) for s in slabs[sel]])
        order = np.argsort(zs, kind="stable")
        runs = ks[order][np.r_[True, np.diff(ks[order]) != 0]]
        assert runs.tolist() == list(range(n_slabs)), runs  # contiguous: one run per slab, in z order
        for k in range(n_slabs - 1):  # disjoint: each slab ends strictly below the next one's start
            assert zs[ks == k].max() < zs[ks == k + 1].min()
        sizes = np.bincount(ks, minlength=n_slabs)
        assert sizes.max() - sizes.min() <= max(2, 0.2 * sizes.mean()), sizes  # quantile bins


def test_z_slabs_are_contiguous_and_disjoint_z_ranges_per_subject_also_with_tied_z():
    rng = np.random.default_rng(1)
    n = 300
    groups = rng.choice(["a", "b", "c"], size=n)  # interleaved, not sorted by subject
    z = rng.integers(0, 40, size=n).astype(float) * 2.5  # slice positions: many equal z values
    centres = np.column_stack([rng.uniform(-50, 50, n), rng.uniform(-50, 50, n), z])
    slabs = z_slab_groups(centres, groups, n_slabs=4)
    _assert_contiguous_disjoint_z_slabs(z, groups, slabs, n_slabs=4)
    # the helper is not a tautology: a slab holding patches from both ends of z is caught
    broken = slabs.copy()
    broken[np.flatnonzero(groups == "a")[np.argmax(z[groups == "a"])]] = "a|slab0"
    with pytest.raises(AssertionError):
        _assert_contiguous_disjoint_z_slabs(z, groups, broken, n_slabs=4)


def test_with_fewer_than_three_subjects_decoding_and_probes_hold_out_z_slabs():
    rng = np.random.default_rng(0)
    centres = rng.uniform(-100, 100, size=(200, 3))
    groups = np.where(np.arange(200) < 100, "s0", "s1")
    slabs = z_slab_groups(centres, groups, n_slabs=5)
    assert len(np.unique(slabs)) == 10
    _assert_contiguous_disjoint_z_slabs(centres[:, 2], groups, slabs, n_slabs=5)
    emb = centres + rng.normal(0, 1.0, centres.shape)
    with pytest.warns(UserWarning, match="z-slabs"):
        dec = decode_coordinates(emb, centres, groups)
    assert dec.set_index("axis").loc["xyz", "r2"] > 0.9
    y = (centres[:, 0] > 0).astype(int)
    with pytest.warns(UserWarning, match="z-slabs"):
        res = linear_probe_cv(centres, y, groups, n_splits=5, Cs=[1.0], centres_mm=centres)
    assert all("|slab" in t for t in res.per_unit.test_groups)


def test_untrained_registered_methods_are_baselines_in_every_headline_table():
    from medssl.evaluate.headlines import kind_of
    from medssl.methods import list_methods

    untrained = list_methods(trains=False)
    assert untrained and all(kind_of(m) == "baseline" for m in untrained)
    assert all(kind_of(m) == "method" for m in list_methods(trains=True))
    assert kind_of("identity") == kind_of("position-cubic") == "baseline" and kind_of("chance") == "reference"
