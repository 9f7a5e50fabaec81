"""Context-prediction networks: Table 1 of Blendowski et al. (2019), shapes, Xavier init, the GVDiff pattern."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medssl.models.backbones import build_backbone
from medssl.models.context_nets import (
    D2DCNN,
    D3DCNN,
    GreyValueDifferences,
    HeatmapHead,
    SixNeighbourHead,
    TriplanarDescriptor,
    TwoParamHead,
    gvdiff_pattern,
    xavier_init_,
)


def _table1_count(module: nn.Module) -> int:
    """Convolution weights and biases plus one GroupNorm parameter per channel (how Table 1 counts)."""
    n = 0
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
            n += sum(p.numel() for p in m.parameters())
        elif isinstance(m, nn.GroupNorm):
            n += m.num_channels
    return n


@pytest.mark.parametrize(("factory", "published"), [
    (D2DCNN, 139_744), (TwoParamHead, 27_138), (D3DCNN, 393_392), (SixNeighbourHead, 31_238),
])
def test_networks_have_table_1s_parameter_counts(factory, published):
    assert _table1_count(factory()) == published


def test_networks_map_the_papers_input_sizes_to_table_1s_outputs():
    assert D2DCNN()(torch.randn(2, 3, 42, 42)).shape == (2, 64)
    assert TwoParamHead()(torch.randn(2, 128)).shape == (2, 2)
    assert HeatmapHead()(torch.randn(2, 128)).shape == (2, 19, 19)
    assert D3DCNN()(torch.randn(2, 1, 25, 25, 25)).shape == (2, 192)
    assert SixNeighbourHead()(torch.randn(2, 384)).shape == (2, 6)
    assert build_backbone("d2d", in_channels=3, spatial_dims=2).embed_dim == 64
    assert build_backbone("d3d", in_channels=1, spatial_dims=3).embed_dim == 192


def test_d2d_reduces_42_to_one_pixel_averages_larger_inputs_and_refuses_smaller_ones():
    net = D2DCNN().eval()
    x = torch.randn(1, 3, 50, 50)
    with torch.no_grad():
        whole = net(x)
        corners = torch.stack([net.features(x[..., i:i + 42, j:j + 42]).flatten() for i in (0, 8) for j in (0, 8)])
    assert torch.allclose(whole[0], net.features(x).flatten(2).mean(-1)[0], atol=1e-5)
    assert corners.shape == (4, 64)  # every 42 x 42 window gives exactly one 64-d vector
    with pytest.raises(ValueError, match="S >= 42"):
        net(torch.randn(1, 3, 41, 41))


def test_triplanar_descriptor_concatenates_one_network_per_orientation():
    torch.manual_seed(0)
    desc = TriplanarDescriptor([D2DCNN() for _ in range(3)]).eval()
    x = torch.randn(2, 3, 3, 42, 42)
    with torch.no_grad():
        out = desc(x)
        parts = [net(x[:, o]) for o, net in enumerate(desc.nets)]
    assert out.shape == (2, 192) and desc.embed_dim == 192
    assert torch.equal(out, torch.cat(parts, 1))
    assert not torch.allclose(parts[0], parts[1])  # three separate networks
    with pytest.raises(ValueError, match="orientations"):
        desc(torch.randn(2, 3, 42, 42))


def test_xavier_init_gives_glorot_uniform_weights_and_zero_biases():
    torch.manual_seed(0)
    net = xavier_init_(D2DCNN())
    conv = next(m for m in net.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 64)
    fan_in, fan_out = 64 * 9, 64 * 9
    bound = (6 / (fan_in + fan_out)) ** 0.5
    w = conv.weight.detach()
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.95 * bound
    assert float(w.std()) == pytest.approx(bound / 3 ** 0.5, rel=0.05)  # std of U(-b, b)
    assert all(float(m.bias.detach().abs().max()) == 0 for m in net.modules() if isinstance(m, nn.Conv2d))


def test_gvdiff_pattern_is_deterministic_for_a_seed_and_a_true_untruncated_gaussian():
    a, b, c = gvdiff_pattern(192, 21.0, seed=3), gvdiff_pattern(192, 21.0, seed=3), gvdiff_pattern(192, 21.0, seed=4)
    assert a.shape == (2, 192, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.all(a[0] == a[1], axis=1).any()  # no pair compares a voxel with itself
    wide = gvdiff_pattern(20_000, 21.0, seed=0).reshape(-1, 3)
    # per-axis std of the rounded Gaussian: sqrt(sigma^2 + 1/12); medssl's old truncated pattern gave about 11
    np.testing.assert_allclose(wide.std(0), np.sqrt(21.0 ** 2 + 1 / 12), rtol=0.02)
    assert np.abs(wide.mean(0)).max() < 0.5
    # not cut at the patch: rounded |x| > 21 where |x| >= 21.5, P = erfc(21.5 / (21 sqrt 2)) = 0.306
    assert np.mean(np.abs(wide) > 21) == pytest.approx(math.erfc(21.5 / 21 / math.sqrt(2)), abs=0.01)
    with pytest.raises(ValueError, match="sigma_vox > 0"):
        gvdiff_pattern(4, 0.0)


def test_grey_value_differences_subtract_the_second_points_from_the_first():
    gv = GreyValueDifferences(gvdiff_pattern(4, 4.0, seed=0), in_channels=2)
    values = torch.arange(2 * 8, dtype=torch.float32).reshape(1, 2, 8)  # channel-major, first points then second
    assert gv(values).tolist() == [[-4.0] * 8] and gv.embed_dim == 8
    with pytest.raises(ValueError, match="pattern intensities"):
        gv(torch.zeros(1, 2, 7))
