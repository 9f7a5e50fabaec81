"""Matched twins: one untrained random-init row per distinct architecture, and each method's verdict against its own."""

from __future__ import annotations

import numpy as np
import torch

from medssl.evaluate.runs import architecture_key, load_run_methods, matched_twins


def _save(run_dir, name: str, seed: int = 0, **overrides):
    from medssl.methods import create_method
    from medssl.train.checkpoint import CHECKPOINT_FORMAT, config_to_json, save_checkpoint

    torch.manual_seed(seed)
    method = create_method(name, **overrides)
    state = {"format": CHECKPOINT_FORMAT, "method": name, "method_config": config_to_json(method.config),
             "model": method.state_dict(), "step": 1, "epoch": 1}
    save_checkpoint(state, run_dir / name / "checkpoints" / "last.pt")
    return method


SMALL = dict(backbone="smallcnn", patch_size_vox=16, volumes_per_batch=2, patches_per_volume=4)


def _run(tmp_path):
    _save(tmp_path, "isimed", 1, **SMALL)
    _save(tmp_path, "simclr", 2, **SMALL)
    _save(tmp_path, "doersch", 3, backbone="smallcnn", patch_size_vox=12, embed_dim=32)  # same backbone, other input
    _save(tmp_path, "reg2d", 4, patch_size_vox=20)
    _save(tmp_path, "heatmap", 5, patch_size_vox=20)
    _save(tmp_path, "xavier", 6, patch_size_vox=20)  # the untrained start of Reg2D and Heatmap
    _save(tmp_path, "gvdiff", 7)  # untrained descriptor: a shortcut, nobody's twin
    return load_run_methods(tmp_path, ["isimed", "simclr", "doersch", "reg2d", "heatmap", "xavier", "gvdiff"], seed=0)


def test_one_random_init_per_distinct_architecture_and_xavier_is_the_twin_of_the_2d_context_methods(tmp_path):
    models = _run(tmp_path)
    added = [m for m in models if m.startswith("random-init")]
    assert added == ["random-init[smallcnn]", "random-init[smallcnn,12]"]  # no random-init[d2d]: xavier is loaded
    twins = matched_twins(models)
    assert twins == {"isimed": "random-init[smallcnn]", "simclr": "random-init[smallcnn]",
                     "doersch": "random-init[smallcnn,12]", "reg2d": "xavier", "heatmap": "xavier"}
    for method, twin in twins.items():  # same architecture, other (untrained) weights
        assert architecture_key(models[method]) == architecture_key(models[twin])
        a, b = models[method].backbone.state_dict(), models[twin].backbone.state_dict()
        assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    assert architecture_key(models["isimed"]) != architecture_key(models["doersch"])
    assert models["random-init[smallcnn,12]"].config.patch_size_vox == 12
    assert models["random-init[smallcnn]"].random_init


def test_without_xavier_the_context_methods_get_their_own_random_init(tmp_path):
    _save(tmp_path, "reg2d", 4, patch_size_vox=20)
    models = load_run_methods(tmp_path, ["reg2d"], seed=0)
    assert list(models) == ["reg2d", "random-init[d2d]"]
    assert matched_twins(models) == {"reg2d": "random-init[d2d]"}


def test_every_methods_verdict_names_its_own_twin(tmp_path):
    from medssl.evaluate.headlines import kind_of
    from medssl.evaluate.stats import compare_to_baselines

    models = _run(tmp_path)
    twins = matched_twins(models)
    rows = [*models, "identity", "registration (affine)"]
    kinds = {r: kind_of(r) for r in rows}
    assert {r for r, k in kinds.items() if k == "method"} == set(twins)
    rng = np.random.default_rng(0)
    units = {r: rng.normal(0.5, 0.05, 8) for r in rows}
    v = compare_to_baselines(units, kinds, twins, metric="Dice")
    for method, twin in twins.items():
        mine = v[v["method"] == method]
        untrained = [b for b in mine["baseline"] if b.startswith("random-init") or b == "xavier"]
        assert untrained == [twin]  # its own twin, and no other method's twin
        assert mine["verdict"].str.contains(twin, regex=False).any()
        assert set(mine["baseline"]) == {twin, "gvdiff", "identity", "registration (affine)"}
    assert (v["family_size"] == len(twins) * 4).all()  # methods x (twin, 2 shortcuts, control)
