"""Backbones map (B, C, *S) -> (B, embed_dim); heads are built from (in, out, norm, act) blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medssl.models import DenseNet121Backbone, LinearHead, ProjectionHead, SmallCNN, build_backbone, mlp_blocks


@pytest.mark.parametrize(
    "spatial_dims, size, embed_dim, expected_dim",
    [(3, 32, None, 128), (3, 16, None, 128), (3, 24, 64, 64), (2, 32, None, 128), (2, 20, 256, 256)],
)
def test_small_cnn_maps_patches_to_embed_dim(spatial_dims, size, embed_dim, expected_dim):
    net = build_backbone("smallcnn", in_channels=2, spatial_dims=spatial_dims, embed_dim=embed_dim)
    x = torch.randn(3, 2, *([size] * spatial_dims))
    out = net(x)
    assert out.shape == (3, expected_dim) and net.embed_dim == expected_dim


def test_small_cnn_default_is_the_measured_stride2_first_groupnorm_design():
    net = SmallCNN()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    assert [c.out_channels for c in convs] == [16, 32, 32, 64, 64, 128]
    assert [c.stride[0] for c in convs] == [2, 2, 1, 2, 1, 2]
    assert any(isinstance(m, nn.GroupNorm) for m in net.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    n_params = sum(p.numel() for p in net.parameters())
    assert 0.40e6 < n_params < 0.46e6  # environment.md: 0.43 M


def test_small_cnn_embeds_each_sample_independently_of_the_batch():
    # GroupNorm: a patch's embedding must not depend on its batch mates, even in train mode
    net = SmallCNN().train()
    x = torch.randn(4, 1, 16, 16, 16)
    alone = net(x[:1])
    with_others = net(torch.cat([x[:1], 10 * x[1:]]))[:1]
    torch.testing.assert_close(alone, with_others, rtol=1e-4, atol=1e-5)


def test_densenet121_is_the_papers_1024d_backbone():
    net = build_backbone("densenet121")
    assert isinstance(net, DenseNet121Backbone) and net.embed_dim == 1024
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 1, 32, 32, 32)).shape == (1, 1024)


def test_build_backbone_names_the_registered_backbones_on_a_typo():
    with pytest.raises(KeyError, match="smallcnn"):
        build_backbone("smalcnn")


def test_small_cnn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="spatial_dims"):
        SmallCNN(spatial_dims=1)
    with pytest.raises(ValueError, match="same non-zero length"):
        SmallCNN(channels=(8, 16), strides=(2,))


def test_linear_head_is_one_biased_linear_layer():
    head = LinearHead(1024, 512)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].bias is not None
    assert head(torch.randn(3, 1024)).shape == (3, 512)


def test_mlp_blocks_build_a_simsiam_style_projector():
    head = ProjectionHead(mlp_blocks([64, 128, 128, 128], norm="batch", act="relu", last_norm_affine=False))
    layers = list(head.layers)
    kinds = [type(m).__name__ for m in layers]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert all(m.bias is None for m in layers if isinstance(m, nn.Linear))  # norms follow every linear
    assert layers[-1].affine is False and layers[1].affine is True
    assert head(torch.randn(5, 64)).shape == (5, 128)
    # predictor-like: BN + ReLU only on the bottleneck, plain biased output layer
    pred = ProjectionHead(mlp_blocks([128, 32, 128], last_norm=None))
    assert [type(m).__name__ for m in pred.layers] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert pred.layers[-1].bias is not None


def test_projection_head_rejects_mismatched_blocks():
    with pytest.raises(ValueError, match="does not match"):
        ProjectionHead([(8, 16, None, None), (12, 4, None, None)])
