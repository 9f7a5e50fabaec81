"""``medssl export``: every registered backbone leaves medssl; MONAI ones load into their MONAI class, same features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medssl.cli import main
from medssl.export import export_encoder, load_exported
from medssl.methods import create_method
from medssl.models import list_backbones
from medssl.train.checkpoint import numpy_rng_state, save_checkpoint, training_state
from medssl.train.config import TrainConfig

# backbone -> (method, config overrides, is there a MONAI network for it)
CASES = {
    "smallcnn": ("isimed", {"backbone": "smallcnn", "patch_size_vox": 16}, False),
    "densenet121": ("isimed", {"backbone": "densenet121", "patch_size_vox": 32}, True),
    "swin": ("simsiam", {"backbone": "swin", "patch_size_vox": 32}, True),
    "swin-tiny": ("isimed", {"backbone": "swin-tiny", "patch_size_vox": 32, "embed_dim": 40}, True),
    "d2d": ("reg2d", {"patch_size_vox": 42}, False),
    "d3d": ("doersch", {"backbone": "d3d", "patch_size_vox": 25}, False),
}
RECORD = {"format": "medssl-preprocessing-v1", "config": {"intensity": "ct_window"}, "patch_size_vox": [32, 32, 32]}


def _checkpoint(tmp_path, method_name, overrides, record=None):
    """A checkpoint in fit's exact format (random weights: equal outputs then say the layout is right)."""
    torch.manual_seed(0)
    method = create_method(method_name, **overrides)
    with torch.no_grad():  # norms start at weight 1 / bias 0: move them so a lost norm layer shows in the outputs
        for name, p in method.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    state = training_state(method, TrainConfig(), None, None, None, 3, 1, 0.0,
                           [numpy_rng_state(np.random.default_rng(0))], [torch.get_rng_state()], None,
                           preprocessing=record)  # fmt: skip
    path = tmp_path / method_name / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    save_checkpoint(state, path)
    return path, method.eval()


def _inputs(method, n=2):
    """The method's own inputs at n points of a random volume (cubes, or the 2.5D methods' planar patches)."""
    rng = np.random.default_rng(1)
    data = rng.normal(size=(1, 50, 48, 46)).astype(np.float32)
    centres = rng.integers(15, 30, size=(n, 3))
    return torch.as_tensor(np.asarray(method.cut_inputs(data, centres)), dtype=torch.float32)


def test_every_registered_backbone_has_an_export_case():
    assert set(CASES) == set(list_backbones())


@pytest.mark.parametrize("backbone", sorted(CASES))
def test_export_loads_into_its_target_with_no_stray_keys_and_gives_medssls_features(tmp_path, backbone):
    name, overrides, has_monai = CASES[backbone]
    ckpt, method = _checkpoint(tmp_path, name, overrides, RECORD)
    res = export_encoder(ckpt, tmp_path / "out")
    info = json.loads((tmp_path / "out" / "encoder.json").read_text())
    assert info == res.info and info["monai"] is has_monai and info["network"].startswith("monai." if has_monai
                                                                                       else "medssl.")
    assert info["preprocessing"] == RECORD and info["source"]["step"] == 3 and info["embed_dim"] == method.embed_dim
    weights = torch.load(tmp_path / "out" / "encoder.pt", weights_only=True)  # tensors only
    assert all(isinstance(v, torch.Tensor) for v in weights.values())
    x = _inputs(method, 1 if has_monai else 2)  # the big networks take seconds per 32^3 patch on this CPU
    seen = {}  # the medssl encoder's own trunk output, captured during the one forward pass of embed
    trunk = {"densenet121": "backbone.net.features"}.get(backbone, "backbone.swinViT" if has_monai else "backbone")
    hook = method.get_submodule(trunk).register_forward_hook(lambda m, i, out: seen.setdefault("trunk", out))
    with torch.no_grad():
        expected = method.embed(x)
    hook.remove()

    if backbone == "densenet121":
        from monai.networks.nets import DenseNet121

        net = DenseNet121(**info["kwargs"]).eval()
        keys = net.load_state_dict(weights, strict=False)
        assert keys.missing_keys == [] and keys.unexpected_keys == []
        hook = net.features.register_forward_hook(lambda m, i, out: seen.setdefault("monai", out))
        with torch.no_grad():
            torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-6)  # features -> class_layers = embedding
        torch.testing.assert_close(seen["monai"], seen["trunk"], rtol=0, atol=0)  # the feature part, bit for bit
        assert "class_layers" in " ".join(info["notes"]) and info["load_strict"]
    elif backbone.startswith("swin"):
        from monai.networks.nets import SwinUNETR

        net = SwinUNETR(out_channels=3, **info["kwargs"]).eval()
        keys = net.load_state_dict(weights, strict=False)
        assert keys.unexpected_keys == []
        assert keys.missing_keys and not any(k.startswith("swinViT.") for k in keys.missing_keys)  # only the decoder
        assert {k for k in net.state_dict() if k.startswith("swinViT.")} == set(weights)
        with torch.no_grad():
            stages = net.swinViT(x, net.normalize)  # SwinUNETR's encoder: every stage equals medssl's
            for ours, theirs in zip(seen["trunk"], stages, strict=True):
                torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
            pooled = stages[-1].flatten(2).mean(-1)  # pooled as medssl pools it
            if backbone == "swin":
                torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-6)
            else:  # embed_dim=40: medssl's projection after the pooled features is said to be left out
                assert info["left_out"] == ["fc.weight", "fc.bias"]
                torch.testing.assert_close(method.backbone.fc(pooled), expected, rtol=1e-5, atol=1e-6)
        assert info["user_kwargs"] == {"out_channels": "your number of output classes (background included)"}
        with pytest.raises(TypeError, match="out_channels"):
            load_exported(tmp_path / "out")
    else:
        assert "No MONAI network matches" in info["notes"][0] and info["load_strict"]
        net = load_exported(tmp_path / "out")
        assert type(net) is type(method.backbone) and info["network"].endswith(type(net).__qualname__)
        with torch.no_grad():
            torch.testing.assert_close(net(x), expected, rtol=0, atol=0)

    if has_monai:  # load_exported builds the class the JSON names, with these weights
        again = load_exported(tmp_path / "out", **{k: 3 for k in info["user_kwargs"]})
        assert type(again) is type(net)
        for k, v in weights.items():
            torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0)


def test_gvdiff_and_to_medssl_write_medssls_own_module(tmp_path):
    ckpt, method = _checkpoint(tmp_path, "gvdiff", {})
    res = export_encoder(ckpt, tmp_path / "g")
    assert not res.monai and "no usable preprocessing record" in " ".join(res.info["notes"])
    x = _inputs(method)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(tmp_path / "g")(x), method.embed(x), rtol=0, atol=0)
    ckpt, method = _checkpoint(tmp_path, "isimed", {"backbone": "densenet121", "patch_size_vox": 32})
    plain = export_encoder(ckpt, tmp_path / "d", to="medssl")
    assert plain.network == "medssl.models.backbones.DenseNet121Backbone" and not plain.monai
    x = _inputs(method, 1)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(tmp_path / "d")(x), method.embed(x), rtol=0, atol=0)


def test_medssl_export_says_when_no_monai_network_matches_and_never_overwrites_unasked(tmp_path, capsys):
    ckpt, _ = _checkpoint(tmp_path, "isimed", {"backbone": "smallcnn", "patch_size_vox": 16})
    out = tmp_path / "enc"
    assert main(["export", str(ckpt), "--to", "monai", "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert "medssl.models.backbones.SmallCNN" in said and "NOT a MONAI network" in said
    before = (out / "encoder.pt").read_bytes()
    assert main(["export", str(ckpt), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(out) in err and "already holds an export" in err and "--overwrite" in err
    assert (out / "encoder.pt").read_bytes() == before
    assert main(["export", str(ckpt), "-o", str(out), "--overwrite"]) == 0

    ckpt, _ = _checkpoint(tmp_path, "barlowtwins", {"backbone": "densenet121", "patch_size_vox": 32})
    assert main(["export", str(ckpt), "-o", str(tmp_path / "dn")]) == 0
    said = capsys.readouterr().out
    assert "monai.networks.nets.DenseNet121  [MONAI network]" in said
    assert "DenseNet121(spatial_dims=3, in_channels=1, out_channels=1024)" in said

    (tmp_path / "broken.pt").write_bytes(b"")
    assert main(["export", str(tmp_path / "broken.pt"), "-o", str(tmp_path / "x")]) == 1
    assert "broken.pt" in capsys.readouterr().err and not (tmp_path / "x").exists()
