"""The SwinUNETR encoder backbone: interface, and its weights load into a MONAI SwinUNETR."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SwinUNETR

from medssl.models import build_backbone
from medssl.models.swin import SWIN_THESIS, SwinEncoder


@pytest.mark.parametrize("spatial_dims, size, embed_dim, expected", [(3, 16, None, 192), (3, 32, 64, 64),
                                                                    (2, 32, None, 192), (2, 24, 10, 10)])
def test_swin_tiny_maps_patches_to_embed_dim(spatial_dims, size, embed_dim, expected):
    net = build_backbone("swin-tiny", in_channels=2, spatial_dims=spatial_dims, embed_dim=embed_dim)
    out = net(torch.randn(3, 2, *([size] * spatial_dims)))
    assert out.shape == (3, expected) and net.embed_dim == expected and out.dtype == torch.float32


def test_swin_is_the_thesis_swinunetr_encoder():
    net = build_backbone("swin")
    assert isinstance(net, SwinEncoder) and net.embed_dim == 16 * 48
    kw = net.swinunetr_kwargs()
    assert (kw["feature_size"], kw["depths"], kw["num_heads"]) == (48, (2, 2, 2, 2), (3, 6, 12, 24))
    assert kw["dropout_path_rate"] == SWIN_THESIS["drop_path_rate"] == 0.1


@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_encoder_weights_load_into_a_monai_swinunetr_with_no_missing_or_unexpected_keys(spatial_dims):
    torch.manual_seed(0)
    enc = build_backbone("swin-tiny", spatial_dims=spatial_dims, embed_dim=32)
    unetr = SwinUNETR(out_channels=3, **enc.swinunetr_kwargs())
    # the encoder's state dict is exactly SwinUNETR's swinViT (strict load: no missing, no unexpected keys)
    unetr.swinViT.load_state_dict(enc.swinViT.state_dict(), strict=True)
    result = unetr.load_state_dict(enc.swinunetr_state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and not any(k.startswith("swinViT.") for k in result.missing_keys)  # the decoder only
    assert set(enc.swinunetr_state_dict()) == {k for k in unetr.state_dict() if k.startswith("swinViT.")}
    x = torch.randn(1, 1, *([64] * spatial_dims))  # SwinUNETR needs multiples of 32; 32 leaves 1 voxel for its norms
    enc.eval(), unetr.eval()
    with torch.no_grad():
        pooled = unetr.swinViT(x, True)[-1].flatten(2).mean(-1)
        torch.testing.assert_close(enc.fc(pooled), enc(x))
        assert unetr(x).shape == (1, 3, *([64] * spatial_dims))  # the loaded SwinUNETR runs
