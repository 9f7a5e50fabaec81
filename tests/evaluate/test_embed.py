"""Frozen embedding extraction: eval mode, no BatchNorm drift, modes restored, cached by weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medssl.evaluate.embed import EmbeddingCache, embed_patches, model_fingerprint
from medssl.evaluate.patchsets import PatchSet


class BNNet(nn.Module):
    """A tiny Conv + BatchNorm + Dropout backbone wrapped Method-like (``embed``)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Dropout(0.5),
            nn.AdaptiveAvgPool3d(1), nn.Flatten(),
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _patch_set(n: int = 10, seed: int = 0) -> PatchSet:
    rng = np.random.default_rng(seed)
    return PatchSet(
        patches=rng.standard_normal((n, 1, 6, 6, 6)).astype(np.float32) * 3 + 2,
        centres_mm=rng.standard_normal((n, 3)),
        boxes_vox=np.zeros((n, 6), np.int64),
        case_ids=[f"c{i % 2}" for i in range(n)],
        groups=[f"c{i % 2}" for i in range(n)],
        seed=seed,
    )


@pytest.fixture
def bn_net() -> BNNet:
    torch.manual_seed(0)
    net = BNNet()
    with torch.no_grad():  # non-trivial running statistics, so eval-mode outputs differ from batch statistics
        net.backbone[1].running_mean.fill_(0.7)
        net.backbone[1].running_var.fill_(2.5)
    return net.train()


def test_embedding_leaves_weights_and_batchnorm_buffers_bit_identical_and_restores_train_mode(bn_net):
    before = _snapshot(bn_net)
    emb = embed_patches(bn_net, _patch_set().patches, batch_size=3, progress=False)
    after = bn_net.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # includes running_mean/var and num_batches_tracked
    assert bn_net.training and all(m.training for m in bn_net.modules())
    assert emb.shape == (10, 4) and emb.dtype == np.float32


def test_mixed_train_eval_flags_of_submodules_are_restored_exactly(bn_net):
    bn_net.backbone[1].eval()  # e.g. a user who froze BatchNorm but trains the rest
    flags = [m.training for m in bn_net.modules()]
    embed_patches(bn_net, _patch_set().patches, progress=False)
    assert [m.training for m in bn_net.modules()] == flags


def test_embeddings_use_running_statistics_not_batch_statistics(bn_net):
    x = _patch_set().patches
    emb = embed_patches(bn_net, x, batch_size=4, progress=False)
    bn_net.eval()
    with torch.no_grad():
        expected = bn_net.embed(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-6)
    # batch size does not matter in eval mode (it would with batch statistics)
    np.testing.assert_allclose(embed_patches(bn_net, x, batch_size=1, progress=False), expected, rtol=1e-5, atol=1e-6)


def test_a_bare_backbone_embeds_through_its_forward(bn_net):
    x = _patch_set().patches
    np.testing.assert_allclose(
        embed_patches(bn_net.backbone, x, progress=False), embed_patches(bn_net, x, progress=False), rtol=1e-6
    )


def test_registered_method_embeds_to_its_embed_dim():
    from medssl.methods import create_method

    torch.manual_seed(0)
    method = create_method("isimed", backbone="smallcnn", patch_size_vox=16, volumes_per_batch=2, patches_per_volume=4)
    x = np.random.default_rng(0).standard_normal((5, 1, 16, 16, 16)).astype(np.float32)
    emb = embed_patches(method, x, batch_size=2, progress=False)
    assert emb.shape == (5, method.embed_dim)
    assert method.training


def test_cache_computes_once_and_keys_on_weights_and_patch_set(bn_net, tmp_path, monkeypatch):
    import medssl.evaluate.embed as embed_module

    calls = []
    real = embed_module.embed_patches
    monkeypatch.setattr(embed_module, "embed_patches", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = EmbeddingCache(tmp_path / "emb")
    ps = _patch_set()
    a = cache.embed(bn_net, ps, progress=False)
    b = cache.embed(bn_net, ps, progress=False)
    assert len(calls) == 1
    np.testing.assert_array_equal(a, b)
    cache.embed(bn_net, _patch_set(seed=1), progress=False)  # other patches -> new entry
    assert len(calls) == 2
    with torch.no_grad():
        bn_net.backbone[0].weight.add_(0.1)  # other weights -> new entry
    cache.embed(bn_net, ps, progress=False)
    assert len(calls) == 3
    assert len(list((tmp_path / "emb").glob("*.npy"))) == 3
    assert not list((tmp_path / "emb").glob("*.tmp"))


def test_fingerprint_uses_the_checkpoint_file_hash_when_given(bn_net, tmp_path):
    p = tmp_path / "ckpt.pt"
    torch.save(bn_net.state_dict(), p)
    fp = model_fingerprint(bn_net, p)
    assert fp.startswith("file-") and fp == model_fingerprint(BNNet(), p)
    assert model_fingerprint(bn_net) != model_fingerprint(BNNet())
    twin = BNNet()
    twin.load_state_dict(bn_net.state_dict())
    assert model_fingerprint(twin) == model_fingerprint(bn_net)


def _save_tiny_checkpoint(run_dir, name: str, seed: int):
    from medssl.methods import create_method
    from medssl.train.checkpoint import CHECKPOINT_FORMAT, config_to_json, save_checkpoint

    torch.manual_seed(seed)
    method = create_method(name, backbone="smallcnn", patch_size_vox=16, volumes_per_batch=2, patches_per_volume=4)
    state = {"format": CHECKPOINT_FORMAT, "method": name, "method_config": config_to_json(method.config),
             "model": method.state_dict(), "step": 1, "epoch": 1}
    save_checkpoint(state, run_dir / name / "checkpoints" / "last.pt")
    return method


def test_load_run_methods_skips_untrained_methods_and_adds_a_seeded_random_init(tmp_path, capsys):
    from medssl.evaluate.runs import load_run_methods
    from medssl.rundir import RunDir

    TWIN = "random-init[smallcnn]"  # the untrained twin of the SmallCNN methods
    trained = _save_tiny_checkpoint(tmp_path, "isimed", seed=1)
    assert RunDir(tmp_path).checkpoints(["isimed", "simclr"])["simclr"] is None
    rng_state = torch.get_rng_state()
    models = load_run_methods(tmp_path, ["isimed", "simclr"], seed=7)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is not consumed
    assert list(models) == ["isimed", TWIN]
    assert "simclr: no checkpoint" in capsys.readouterr().out
    for k, v in trained.state_dict().items():
        assert torch.equal(models["isimed"].state_dict()[k], v)
    assert models[TWIN].config == models["isimed"].config
    assert model_fingerprint(models[TWIN]) != model_fingerprint(models["isimed"])
    again = load_run_methods(tmp_path, ["isimed"], seed=7)[TWIN]
    assert model_fingerprint(again) == model_fingerprint(models[TWIN])  # seeded
    assert not models["isimed"].training
    assert models[TWIN].random_init and not getattr(models["isimed"], "random_init", False)
    assert list(load_run_methods(tmp_path, [], seed=7)) == ["isimed", TWIN]  # [] = every trained method
