"""Linear probe: metrics agree with scikit-learn, folds never leak subjects, nothing accumulates,
the backbone stays frozen."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, recall_score, roc_auc_score
from torch import nn

import medssl.evaluate.probe as probe
from medssl.evaluate.patchsets import PatchSet
from medssl.evaluate.probe import (
    binary_metrics,
    linear_probe_cv,
    probe_frozen_backbone,
    probe_methods,
    raw_intensity_features,
)

# a short C grid keeps these tests fast; the default grid is np.logspace(-4, 2, 7)
FEW_CS = [0.01, 0.1, 1.0]


def _task(n_subjects: int = 8, n_per: int = 20, signal: float = 1.5, n_features: int = 6, seed: int = 0):
    """Balanced labels per subject; feature 0 carries the label with strength ``signal``, plus a subject offset."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"pat{k:02d}" for k in range(n_subjects)], n_per)
    y = np.tile(np.r_[np.ones(n_per // 2), np.zeros(n_per // 2)], n_subjects).astype(int)
    x = rng.standard_normal((len(y), n_features))
    x[:, 0] += signal * y
    x += np.repeat(rng.normal(0, 0.5, (n_subjects, n_features)), n_per, axis=0)
    return x, y, groups


def test_metrics_agree_with_scikit_learn_on_fixed_inputs():
    y = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 0, 0, 1])
    prob = np.array([0.9, 0.2, 0.4, 0.7, 0.6, 0.1, 0.5, 0.49, 0.8, 0.3, 0.55, 0.35])
    pred = (prob >= 0.5).astype(int)
    m = binary_metrics(y, prob)
    assert m["auc"] == pytest.approx(roc_auc_score(y, prob))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred, pos_label=1))
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    # hand count: TP = 4 of 6 positives (0.9, 0.7, 0.5, 0.8), TN = 4 of 6 negatives
    assert m["sensitivity"] == pytest.approx(4 / 6) and m["specificity"] == pytest.approx(4 / 6)


def test_single_class_fold_gives_nan_auc_instead_of_crashing():
    m = binary_metrics(np.ones(4, int), np.array([0.2, 0.6, 0.7, 0.9]))
    assert np.isnan(m["auc"]) and np.isnan(m["specificity"]) and m["sensitivity"] == pytest.approx(0.75)


def test_no_subject_is_on_both_sides_of_any_fold_and_inner_splits_use_train_subjects_only():
    x, y, g = _task()
    r = linear_probe_cv(x, y, g, n_splits=4, inner_splits=3, Cs=[0.01, 1.0], seed=0)
    assert len(r.folds) == 4
    tested = np.concatenate([te for _, te in r.folds])
    assert sorted(tested) == list(range(len(y)))  # every patch is tested exactly once
    for (tr, te), inner in zip(r.folds, r.inner_folds):
        assert set(g[tr]).isdisjoint(g[te])
        assert len(inner) == 3
        for itr, iva in inner:
            assert set(itr) <= set(tr) and set(iva) <= set(tr)
            assert set(g[itr]).isdisjoint(g[iva])
            assert set(g[iva]).isdisjoint(g[te])


def test_every_fit_sees_only_train_side_rows(monkeypatch):
    x, y, g = _task()
    x = np.c_[np.arange(len(y), dtype=float), x]  # column 0 = row id, to see which rows each fit used
    seen: list[set[int]] = []
    real = probe._fit_path

    def spy(xf, yf, Cs, seed):
        seen.append(set(xf[:, 0].astype(int)))
        return real(xf, yf, Cs, seed)

    monkeypatch.setattr(probe, "_fit_path", spy)
    r = linear_probe_cv(x, y, g, n_splits=4, inner_splits=2, Cs=[0.1, 1.0], seed=0)
    per_fold_fits = 2 + 1  # one C path per inner fold, plus the refit with the chosen C
    assert len(seen) == 4 * per_fold_fits
    for k, (tr, te) in enumerate(r.folds):
        for rows in seen[k * per_fold_fits : (k + 1) * per_fold_fits]:
            assert rows <= set(tr) and rows.isdisjoint(te)
        assert seen[(k + 1) * per_fold_fits - 1] == set(tr)  # the final fit uses the whole train side


def test_warm_started_path_matches_independent_fits():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y, _ = _task(n_features=30, signal=3.0)
    z = StandardScaler().fit_transform(x)
    for C, model in zip(FEW_CS, probe._fit_path(x, y, FEW_CS, seed=0)):
        ref = LogisticRegression(C=C, max_iter=5000, tol=1e-10).fit(z, y)
        # both stop at lbfgs tolerances, so agree to about 1e-3
        np.testing.assert_allclose(model.predict_proba(x)[:, 1], ref.predict_proba(z)[:, 1], atol=5e-3)


def test_per_fold_metrics_come_from_that_fold_alone_and_are_never_accumulated():
    x, y, g = _task(signal=1.0)
    r = linear_probe_cv(x, y, g, n_splits=4, Cs=[0.01, 1.0], seed=1)
    for _, row in r.per_unit.iterrows():
        fold = r.predictions[r.predictions["unit"] == row["unit"]]
        expected = binary_metrics(fold["y"], fold["prob"])
        for m in probe.METRICS:
            assert row[m] == pytest.approx(expected[m])
    # pooled predictions differ from the per-fold values (so accumulation would be visible)
    pooled = roc_auc_score(r.predictions["y"], r.predictions["prob"])
    assert not np.allclose(r.per_unit["auc"], pooled)


def test_probing_several_methods_carries_nothing_over_and_uses_identical_folds():
    x, y, g = _task(signal=2.0, seed=2)
    noise = np.random.default_rng(5).standard_normal(x.shape)
    alone = linear_probe_cv(noise, y, g, n_splits=4, Cs=FEW_CS, seed=3)
    both = probe_methods({"good": x, "noise": noise}, y, g, n_splits=4, Cs=FEW_CS, seed=3, progress=False)
    assert both.results["noise"].per_unit[list(probe.METRICS)].equals(alone.per_unit[list(probe.METRICS)])
    for (_, te_a), (_, te_b) in zip(both.results["good"].folds, both.results["noise"].folds):
        np.testing.assert_array_equal(te_a, te_b)
    t = both.table.set_index(["method", "metric"])
    assert t.loc[("good", "auc"), "mean"] > 0.8
    assert abs(t.loc[("noise", "auc"), "mean"] - 0.5) < 0.2
    assert set(both.table.columns) == {"method", "metric", "mean", "std", "n", "pooled"}
    assert both.per_unit_metric("auc")["good"].shape == (4,)
    assert list(both.wide().index) == ["good", "noise"] and "±" in both.wide().loc["good", "auc"]


def test_more_folds_than_subjects_falls_back_to_leave_one_subject_out_with_a_warning():
    x, y, g = _task(n_subjects=5)
    with pytest.warns(UserWarning, match="leave-one-subject-out"):
        r = linear_probe_cv(x, y, g, n_splits=10, inner_splits=2, Cs=[1.0], seed=0)
    assert len(r.folds) == 5
    assert all(len(set(g[te])) == 1 for _, te in r.folds)


def test_raw_intensity_features_are_block_means():
    rng = np.random.default_rng(0)
    p = rng.standard_normal((3, 1, 8, 8, 8)).astype(np.float32)
    f = raw_intensity_features(p, size_vox=2)
    assert f.shape == (3, 8)
    np.testing.assert_allclose(f[:, 0], p[:, 0, :4, :4, :4].mean(axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(f[:, -1], p[:, 0, 4:, 4:, 4:].mean(axis=(1, 2, 3)), rtol=1e-5)


class TinyDenseNetMethod(nn.Module):
    """A Method-like wrapper (``embed``) around a tiny MONAI DenseNet, which has BatchNorm everywhere."""

    def __init__(self) -> None:
        super().__init__()
        from monai.networks.nets import DenseNet

        self.backbone = DenseNet(spatial_dims=3, in_channels=1, out_channels=8, init_features=4, growth_rate=4,
                                 block_config=(1, 1), bn_size=2)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def test_probing_a_frozen_backbone_leaves_parameters_and_batchnorm_buffers_bit_identical():
    torch.manual_seed(0)
    model = TinyDenseNetMethod().train()
    # non-default running statistics, as after pretraining
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert any("running_mean" in k for k in before) and any("num_batches_tracked" in k for k in before)
    x, y, g = _task(n_subjects=6, n_per=8)
    rng = np.random.default_rng(0)
    patches = rng.standard_normal((len(y), 1, 8, 8, 8)).astype(np.float32) + y[:, None, None, None, None]
    ps = PatchSet(patches=patches, centres_mm=np.zeros((len(y), 3)), boxes_vox=np.zeros((len(y), 6)),
                  case_ids=g, groups=g, labels=y, seed=0)
    r = probe_frozen_backbone(model, ps, n_splits=3, inner_splits=2, Cs=[0.1, 1.0], batch_size=7, progress=False)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert model.training and all(m.training for m in model.modules())
    assert len(r.per_unit) == 3 and r.summary().set_index("metric").loc["auc", "mean"] > 0.7


def test_split_protocol_chooses_C_on_validation_subjects_only_and_scores_each_test_subject(monkeypatch):
    x, y, g = _task(signal=1.0)
    splits = np.where(np.isin(g, np.unique(g)[: len(np.unique(g)) // 2]), "val", "test")
    seen = []
    original = probe._fit_path
    monkeypatch.setattr(probe, "_fit_path", lambda xx, yy, Cs, seed: seen.append(np.array(xx)) or original(xx, yy, Cs, seed))
    r = probe.linear_probe(x, y, g, splits, Cs=FEW_CS, seed=0)
    rows = {row.tobytes(): k for k, row in enumerate(x)}  # every feature row is distinct (continuous noise)
    assert len(rows) == len(x)
    fitted = [np.array([rows[row.tobytes()] for row in xx]) for xx in seen]
    assert seen and all(np.all(splits[idx] == "val") for idx in fitted)  # no fit ever sees a test patch, by identity
    assert sorted(fitted[-1]) == list(np.flatnonzero(splits == "val"))  # the final fit: every validation patch once
    assert len(fitted) > 1 and all(len(set(g[idx])) < len(set(g[splits == "val"])) for idx in fitted[:-1])  # inner folds
    assert r.unit == "subject" and sorted(r.per_unit.unit) == sorted(np.unique(g[splits == "test"]))
    for _, row in r.per_unit.iterrows():  # each subject's metrics from that subject's predictions alone
        pred = r.predictions[r.predictions.unit == row.unit]
        assert row.auc == pytest.approx(probe.binary_metrics(pred.y, pred.prob)["auc"])
    assert r.pooled["auc"] == pytest.approx(probe.binary_metrics(r.predictions.y, r.predictions.prob)["auc"])


def test_split_protocol_refuses_a_subject_in_both_splits():
    x, y, g = _task(signal=1.0)
    splits = np.where(np.arange(len(g)) % 2 == 0, "val", "test")  # every subject straddles
    with pytest.raises(ValueError, match="in both"):
        probe.linear_probe(x, y, g, splits, Cs=FEW_CS)


def test_position_features_are_the_centres_or_their_monomials():
    c = np.random.default_rng(0).normal(size=(10, 3)) * 50
    np.testing.assert_array_equal(probe.position_features(c), c)
    cubic = probe.position_features(c, degree=3)
    assert cubic.shape == (10, 19)  # 3 + 6 + 10 monomials of degree 1..3
    np.testing.assert_allclose(cubic[:, 0], c[:, 0])
    np.testing.assert_allclose(cubic[:, -1], c[:, 2] ** 3)


# --------------------------------------------------------------------------- positive control, strata


def _blob_set(n_subjects: int, n_per: int, split: str, seed: int, size: int = 8, contrast: float = -1.0):
    """Patches of noise around a tissue level; positives hold a ball of ``contrast`` somewhere (its mask is returned)."""
    rng = np.random.default_rng(seed)
    n = n_subjects * n_per
    groups = np.repeat([f"{split}{k}" for k in range(n_subjects)], n_per)
    y = np.tile(np.r_[np.ones(n_per // 2), np.zeros(n_per - n_per // 2)], n_subjects).astype(int)
    x = (rng.normal(0.0, 0.4, (n, 1, size, size, size)) + 1.0).astype(np.float32)
    masks = np.zeros(x.shape, np.uint8)
    grid = np.indices((size,) * 3).transpose(1, 2, 3, 0)
    for i in np.flatnonzero(y):
        ball = np.linalg.norm(grid - rng.uniform(1.5, size - 2.5, 3), axis=-1) <= rng.uniform(1.2, 2.0)
        x[i, 0][ball] += contrast
        masks[i, 0][ball] = 1
    ps = PatchSet(patches=x, centres_mm=rng.normal(0, 30, (n, 3)), boxes_vox=np.zeros((n, 6)), case_ids=groups,
                  groups=groups, labels=y, seed=seed, target_share=masks.reshape(n, -1).mean(1))
    return ps, masks


@pytest.fixture(scope="module")
def control_sets():
    from medssl.evaluate.patchsets import concat_patch_sets

    train, masks = _blob_set(6, 20, "tr", 0)
    val, _ = _blob_set(3, 20, "va", 1)
    test, _ = _blob_set(4, 20, "te", 2)
    return train, masks, concat_patch_sets({"val": val, "test": test}, seed=0)


def test_supervised_control_learns_a_visible_target_and_scores_only_the_test_subjects_once(control_sets, monkeypatch):
    train, masks, ps = control_sets
    seen = []
    real = probe._predict
    monkeypatch.setattr(probe, "_predict", lambda model, x, bs: seen.append(len(x)) or real(model, x, bs))
    state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    r = probe.supervised_control(train, ps, train_masks=masks, max_epochs=3, steps_per_epoch=10, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is left alone
    assert torch.get_num_threads() == threads  # and so is the thread count
    n_val, n_test = int(np.sum(ps.splits == "val")), int(np.sum(ps.splits == "test"))
    epochs = len(r.info["history"])
    assert seen == [n_val] * epochs + [n_test]  # selection on validation every epoch, the test split once
    assert r.unit == "subject" and sorted(r.per_unit.unit) == sorted(np.unique(ps.groups[ps.splits == "test"]))
    assert r.pooled["auc"] >= 0.9 and r.per_unit["auc"].mean() >= 0.9, r.per_unit
    assert r.info["best_epoch"] == int(r.info["history"].select_auc.idxmax()) + 1
    for _, row in r.per_unit.iterrows():  # each subject's metrics from that subject's predictions alone
        pred = r.predictions[r.predictions.unit == row.unit]
        assert row.auc == pytest.approx(probe.binary_metrics(pred.y, pred.prob)["auc"])
    again = probe.supervised_control(train, ps, train_masks=masks, max_epochs=3, steps_per_epoch=10, seed=0)
    np.testing.assert_array_equal(again.predictions.prob, r.predictions.prob)  # deterministic for a seed


def test_supervised_control_on_noise_sits_near_chance_and_the_verdict_says_the_task_measures_nothing(control_sets):
    train, masks, ps = control_sets
    rng = np.random.default_rng(9)
    noise = PatchSet(patches=rng.normal(1.0, 0.4, ps.patches.shape).astype(np.float32), centres_mm=ps.centres_mm,
                     boxes_vox=ps.boxes_vox, case_ids=ps.case_ids, groups=ps.groups, labels=ps.labels,
                     splits=ps.splits, seed=0)
    r = probe.supervised_control(train, noise, train_masks=masks, max_epochs=2, steps_per_epoch=10, seed=0)
    assert abs(r.pooled["auc"] - 0.5) < 0.15
    table = pd.DataFrame({"method": [probe.CONTROL, "position-linear"], "metric": "auc",
                          "mean": [r.per_unit.auc.mean(), 0.52]})
    words = probe.control_verdict(table)
    assert "measures nothing" in words and "position does not explain" in words
    passed = probe.control_verdict(table.assign(mean=[0.95, 0.7]))
    assert "can be passed" in passed and "partly positional" in passed
    assert "No positive control" in probe.control_verdict(table[table.method != probe.CONTROL])


def test_supervised_control_refuses_training_subjects_that_are_also_scored(control_sets):
    train, masks, ps = control_sets
    leaky = PatchSet(patches=train.patches, centres_mm=train.centres_mm, boxes_vox=train.boxes_vox,
                     case_ids=train.case_ids, groups=np.where(train.groups == "tr0", "te0", train.groups),
                     labels=train.labels, seed=0)
    with pytest.raises(ValueError, match="te0"):
        probe.supervised_control(leaky, ps, train_masks=masks, max_epochs=1, steps_per_epoch=1)
    with pytest.raises(ValueError, match="train_masks must be"):
        probe.supervised_control(train, ps, train_masks=masks[:, :, :4], max_epochs=1, steps_per_epoch=1)


def test_the_control_joins_the_comparison_on_the_same_units_with_kind_control(control_sets):
    from medssl.evaluate.headlines import kind_of

    train, masks, ps = control_sets
    feats = {"position-linear": probe.position_features(ps.centres_mm)}
    comp = probe_methods(feats, ps.labels, ps.groups, ps.splits, Cs=FEW_CS, seed=0, progress=False)
    r = probe.supervised_control(train, ps, train_masks=masks, max_epochs=1, steps_per_epoch=5, seed=0)
    both = comp.with_result(probe.CONTROL, r)
    assert list(both.results) == ["position-linear", probe.CONTROL] and len(comp.results) == 1  # a new comparison
    assert set(both.per_unit.method) == {"position-linear", probe.CONTROL}
    assert both.table.set_index(["method", "metric"]).loc[(probe.CONTROL, "auc"), "n"] == 4
    assert len(both.paired_tests("auc")) == 1
    assert kind_of(probe.CONTROL) == "control"
    with pytest.raises(ValueError, match="already has"):
        both.with_result(probe.CONTROL, r)
    other = probe.supervised_control(train, ps.subset(np.flatnonzero(ps.groups != "te3")), train_masks=masks,
                                     max_epochs=1, steps_per_epoch=2, seed=0)
    with pytest.raises(RuntimeError, match="differ"):
        comp.with_result("fewer-units", other)


def test_auc_by_share_stratum_scores_each_stratum_against_all_negatives():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    share = np.array([0.004, 0.02, 0.05, 0.2, 0, 0, 0, 0])
    strata = probe.share_strata(share, y, (1, 3, 10))
    assert strata.tolist() == ["< 1 %", "1-3 %", "3-10 %", ">= 10 %", "", "", "", ""]
    assert probe.share_bin_names((1, 3, 10)) == ["< 1 %", "1-3 %", "3-10 %", ">= 10 %"]
    prob = np.array([0.3, 0.6, 0.8, 0.9, 0.1, 0.5, 0.7, 0.2])
    r = probe.ProbeResult(per_unit=pd.DataFrame(), predictions=pd.DataFrame({"index": np.arange(8), "unit": "a", "y": y,
                          "prob": prob}), folds=[], inner_folds=[])  # fmt: skip
    t = probe.auc_by_stratum({"m": r}, strata, order=probe.share_bin_names((1, 3, 10)))
    assert list(t.columns) == ["method", "stratum", "n_positives", "n_negatives", "auc"]
    assert t.stratum.tolist() == ["< 1 %", "1-3 %", "3-10 %", ">= 10 %"] and (t.n_positives == 1).all()
    # one positive against 4 negatives: AUC = share of negatives it outranks
    assert t.auc.tolist() == pytest.approx([2 / 4, 3 / 4, 4 / 4, 4 / 4])
    with pytest.raises(ValueError, match="increasing"):
        probe.share_bin_names((3, 1))
