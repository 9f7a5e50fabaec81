"""On the demo cohort, position-matched negatives make a position-only probe useless for lesions.

Without matching (negatives anywhere on the body) a linear probe on the patch centre in mm
detects "lesions" well, because lesions live in a few organs: that is the confound this
guards against. Organ presence stays positional; there the probe is only reported.
"""

from __future__ import annotations

import numpy as np
import pytest

from medssl.evaluate import draw_by_split, draw_labelled_patch_set, position_features, probe_methods

pytestmark = [pytest.mark.network, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, notebook_data_dir):
    import os

    os.environ["MEDSSL_DATA"] = str(notebook_data_dir)
    os.environ.pop("MEDSSL_CACHE", None)
    from medssl.data.source import open_data

    data = open_data("demo", n_subjects=16, target_spacing_mm=6.0, progress=False)
    vols = data.volumes(None)
    vols = [v for v in vols if v.case_id in set(data.cohort.case_ids())]  # the synthetic subjects only
    return data, {"val": vols[:8], "test": vols[8:16]}


def _position_auc(ps) -> dict[str, float]:
    feats = {"linear": position_features(ps, 1), "cubic": position_features(ps, 3)}
    comp = probe_methods(feats, ps.labels, ps.groups, ps.splits, inner_splits=2, seed=0, progress=False)
    return comp.table[comp.table.metric == "auc"].set_index("method")["mean"].to_dict()


def test_position_only_probe_cannot_find_lesions_when_negatives_are_corresponding_points(demo):
    data, by_split = demo
    # the lesion task's box: 48 mm (8 voxels at 6 mm), positives centred on a lesion
    matched = draw_by_split(by_split, draw_labelled_patch_set, seed=0, target="lesion", n_per_class=60,
                            patch_size_vox=8, correspondence=data.cohort.correspondence)
    assert {m["negatives"] for m in matched.meta["splits"].values()} == {"corresponding"}
    assert {m["positives"] for m in matched.meta["splits"].values()} == {"centred"}
    auc = _position_auc(matched)
    assert auc["linear"] <= 0.65 and auc["cubic"] <= 0.65, auc
    # the same task with negatives anywhere on the body: position alone "detects lesions"
    confounded = draw_by_split(by_split, draw_labelled_patch_set, seed=0, target="lesion", n_per_class=60,
                               patch_size_vox=8, negatives="body")
    auc_body = _position_auc(confounded)
    assert auc_body["cubic"] > 0.75 and auc_body["cubic"] > auc["cubic"] + 0.15, (auc_body, auc)


def test_organ_negatives_come_from_the_neighbourhood_and_position_is_reported(demo):
    _, by_split = demo
    ps = draw_by_split(by_split, draw_labelled_patch_set, seed=0, target="liver", n_per_class=40, patch_size_vox=16)
    assert {m["negatives"] for m in ps.meta["splits"].values()} == {"shell"}
    auc = _position_auc(ps)
    assert np.isfinite(auc["cubic"]) and 0.0 <= auc["cubic"] <= 1.0  # positional by nature: reported, not bounded
