"""The lesion task can be passed, and position cannot pass it (issue 16).

A small demo-like cohort built with the real synthesis (3 mm, 10-30 mm lesions with CT contrast, 24
subjects: 14 train / 4 val / 6 test), lesion positives centred on a lesion in 16^3 patches (48 mm),
negatives at corresponding points of other subjects: the supervised positive control, trained on the
train subjects and chosen on the validation subjects, finds the lesions of the test subjects (AUC >= 0.9)
while the patch centre in mm does not (<= 0.65). The numbers are pooled over the test subjects' patches and
averaged over the 6 test subjects.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medssl.evaluate import (
    CONTROL,
    auc_by_stratum,
    control_verdict,
    draw_by_split,
    draw_labelled_patch_set,
    position_features,
    probe_methods,
    share_bin_names,
    share_strata,
    supervised_control,
    target_patches,
)

pytestmark = [pytest.mark.network, pytest.mark.slow]

BINS = (1.0, 3.0, 10.0)


@pytest.fixture(scope="module")
def lesion_probe(notebook_data_dir, tmp_path_factory):
    from medssl.data.demo import build_demo_cohort, fetch_totalseg_examples

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDSSL_DATA", str(notebook_data_dir))
        mp.delenv("MEDSSL_CACHE", raising=False)
        cohort = build_demo_cohort(n_subjects=24, split_counts=(14, 4, 6), seed=0, spacing_mm=3.0,
                                   out_dir=tmp_path_factory.mktemp("lesions") / "cohort", progress=False,
                                   examples_dir=fetch_totalseg_examples(progress=False))  # fmt: skip
        vols = {s: cohort.volumes(s, progress=False) for s in ("train", "val", "test")}
    ps = draw_by_split({"val": vols["val"], "test": vols["test"]}, draw_labelled_patch_set, seed=0, target="lesion",
                       n_per_class=60, patch_size_vox=16, correspondence=cohort.correspondence)
    train = draw_labelled_patch_set(vols["train"], "lesion", 150, 16, seed=1, correspondence=cohort.correspondence)
    feats = {"position-linear": position_features(ps, 1), "position-cubic": position_features(ps, 3)}
    comp = probe_methods(feats, ps.labels, ps.groups, ps.splits, inner_splits=2, seed=0, progress=False)
    control = supervised_control(train, ps, train_masks=target_patches(train, vols["train"], "lesion"), seed=0)
    return {"cohort": cohort, "ps": ps, "comparison": comp.with_result(CONTROL, control), "control": control}


def test_supervised_control_passes_the_lesion_task_and_position_alone_does_not(lesion_probe):
    ps, comp, control = lesion_probe["ps"], lesion_probe["comparison"], lesion_probe["control"]
    assert {m["positives"] for m in ps.meta["splits"].values()} == {"centred"}
    assert {m["negatives"] for m in ps.meta["splits"].values()} == {"corresponding"}
    table = comp.table[comp.table.metric == "auc"].set_index("method")
    assert table.loc[CONTROL, "n"] == 6
    assert table.loc[CONTROL, "mean"] >= 0.9 and table.loc[CONTROL, "pooled"] >= 0.9, table
    for row in ("position-linear", "position-cubic"):
        assert table.loc[row, "mean"] <= 0.65 and table.loc[row, "pooled"] <= 0.65, table
    assert "can be passed" in control_verdict(comp.table)
    # the control learned the lesions of other subjects: its training subjects are neither chosen on nor scored
    assert control.info["train_subjects"] == 14 and control.info["chosen_on"] == "val"


def test_auc_by_lesion_share_has_a_row_per_row_and_bin_and_recomputes_from_the_predictions(lesion_probe):
    ps, comp = lesion_probe["ps"], lesion_probe["comparison"]
    strata = share_strata(ps.target_share, ps.labels, BINS)
    t = auc_by_stratum(comp, strata, order=share_bin_names(BINS))
    assert len(t) == len(comp.results) * (len(BINS) + 1)  # 4 bins for 3 edges, for every row
    for _, g in t.groupby("method"):
        assert g.stratum.tolist() == share_bin_names(BINS)
    assert set(t.method) == set(comp.results)
    test = ps.splits == "test"
    for _, g in t.groupby("method"):  # every scored positive in exactly one bin; every stratum against all negatives
        assert g.n_positives.sum() == int(np.sum(ps.labels[test] == 1))
        assert (g.n_negatives == int(np.sum(ps.labels[test] == 0))).all()
    pred = comp.results[CONTROL].predictions
    s = strata[pred["index"]]
    big = share_bin_names(BINS)[2]
    sel = (s == big) | (pred.y.to_numpy() == 0)
    expected = roc_auc_score(pred.y[sel], pred.prob[sel])
    assert t.set_index(["method", "stratum"]).loc[(CONTROL, big), "auc"] == pytest.approx(expected)
    # lesions 10-30 mm in a 48 mm box: shares from about 0.4 % to 13 %
    share = 100 * ps.target_share[ps.labels == 1]
    assert share.min() > 0.2 and share.max() < 20
