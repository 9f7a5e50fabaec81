"""The networks of context prediction (Blendowski, Nickisch, Heinrich, MICCAI 2019, Table 1).

- :class:`D2DCNN`: ``(B, 3, 42, 42) -> (B, 64)``, one per orientation ("Descriptor 2D CNN").
- :class:`TriplanarDescriptor`: the three D2D-CNNs side by side; the 2.5D descriptor at a point is
  the concatenation of their outputs, ``(B, 3, C', S, S) -> (B, 3 * 64)``.
- :class:`TwoParamHead` (Reg2D) and :class:`HeatmapHead` (Heatmap) on a pair's concatenated features.
- :class:`D3DCNN`: ``(B, 1, 25, 25, 25) -> (B, 192)`` and :class:`SixNeighbourHead` (3D Doersch).
- :class:`GreyValueDifferences`: the handcrafted GVDiff baseline (BRIEF-like grey-value differences).

Every block is Table 1's ``Conv -> [MaxPool] -> GroupNorm -> LeakyReLU``, built from MONAI's
``Convolution`` (convolution only) and ``ADN`` (norm and activation). ``Conv(c_in, c_out, kernel,
dilation)`` in Table 1: its fourth number is the **dilation**; the D3D-CNN needs dilation 2 in layers
2-4 to map 25^3 to 1^3 with valid convolutions, and its parameter count then matches the table.

**Reading Table 1.** Counting convolution weights and biases plus one GroupNorm parameter per
channel reproduces the published parameter counts of the D2D-CNN (139,744), 2-Param CNN (27,138),
D3D-CNN (393,392) and 6-Neighbour CNN (31,238) exactly (``tests/models/test_context_nets.py``), with
one exception the numbers themselves settle: the D2D-CNN's table lists seven 3x3 convolutions, but
only **six** fit both its parameter count and its geometry (42 -> 40 -> pool 20 -> 18 -> pool 9 -> 7
-> 5 -> 3 -> 1 with valid convolutions; a seventh would shrink the map below 1x1). medssl builds
the six (Table 1's layer 3, a second ``Conv(32, 32)``, is the extra row). The Heatmap CNN is built
with valid 3x3 convolutions, which is what its ``interp(11x11)`` and ``interp(19x19)`` entries imply
(1 -> TP 5 -> 3 -> 11 -> TP 15 -> 13 -> TP 17 -> 19); it has 28,157 parameters counted this way,
32 fewer than the table's 28,189.

GroupNorm's group count is not given in the paper: medssl uses 4 groups for every width (4 divides
every width in Table 1, down to the Heatmap CNN's 4-channel layer). The LeakyReLU slope (0.01) is
PyTorch's default; the paper does not state one either.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medssl.models.backbones import fp32, register_backbone

__all__ = [
    "D2DCNN",
    "D3DCNN",
    "GreyValueDifferences",
    "HeatmapHead",
    "SixNeighbourHead",
    "TriplanarDescriptor",
    "TwoParamHead",
    "gvdiff_pattern",
    "xavier_init_",
]

GROUPS = 4  # GroupNorm groups (not stated in the paper; divides every width of Table 1)
LEAKY_SLOPE = 0.01


def _norm_act(spatial_dims: int, channels: int) -> nn.Module:
    from monai.networks.blocks import ADN  # imported when a network is built: `import medssl.methods` stays light

    return ADN(ordering="NA", in_channels=channels, norm=("group", {"num_groups": GROUPS}), norm_dim=spatial_dims,
               act=("leakyrelu", {"negative_slope": LEAKY_SLOPE}))


def _conv(spatial_dims: int, c_in: int, c_out: int, kernel: int, dilation: int = 1, transposed: bool = False) -> nn.Module:
    """A valid (unpadded) convolution, or a transposed one (``in + dilation * (kernel - 1)`` outputs)."""
    from monai.networks.blocks import Convolution

    return Convolution(spatial_dims, c_in, c_out, kernel_size=kernel, dilation=dilation, padding=0, conv_only=True,
                       is_transposed=transposed, output_padding=0 if transposed else None)


def _block(spatial_dims: int, c_in: int, c_out: int, kernel: int, dilation: int = 1, pool: bool = False,
           transposed: bool = False) -> nn.Sequential:
    """Table 1's ``Conv(c_in, c_out, kernel, dilation) [MP(2, 2)] GN LR``: pooling before the norm, as listed."""
    layers = [_conv(spatial_dims, c_in, c_out, kernel, dilation, transposed)]
    if pool:
        layers.append((nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d)(2, 2))
    layers.append(_norm_act(spatial_dims, c_out))
    return nn.Sequential(*layers)


def _pool_to_vector(h: torch.Tensor) -> torch.Tensor:
    """``(B, D, *S') -> (B, D)``: the 1x1 map of the paper's input size, averaged when an input was larger."""
    return h.flatten(2).mean(-1)


class D2DCNN(nn.Module):
    """Descriptor 2D CNN (Table 1): ``(B, C, 42, 42) -> (B, 64)``, C = 3 adjacent slices per image channel.

    Six valid 3x3 convolutions with two 2x2 max-pools map 42 x 42 to 1 x 1 (module docstring). Inputs
    larger than 42 give a larger final map, which is averaged; smaller inputs raise.

    Args:
        in_channels: slices x image channels (3 for a CT).
        spatial_dims: must be 2 (the registry passes it).
        embed_dim: 64 or None (Table 1's width).
    """

    MIN_SIZE_VOX = 42

    def __init__(self, in_channels: int = 3, spatial_dims: int = 2, embed_dim: int | None = None) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"D2DCNN is a 2D network (planar patches); got spatial_dims={spatial_dims}")
        if embed_dim not in (None, 64):
            raise ValueError(f"D2DCNN has Table 1's 64 outputs; got embed_dim={embed_dim}")
        self.features = nn.Sequential(
            _block(2, in_channels, 32, 3, pool=True),  # 42 -> 40 -> 20
            _block(2, 32, 32, 3, pool=True),  # 20 -> 18 -> 9
            _block(2, 32, 64, 3),  # 9 -> 7
            _block(2, 64, 64, 3),  # 7 -> 5
            _block(2, 64, 64, 3),  # 5 -> 3
            _block(2, 64, 64, 3),  # 3 -> 1
        )
        self.embed_dim = 64
        self.spatial_dims = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or min(x.shape[-2:]) < self.MIN_SIZE_VOX:
            raise ValueError(f"D2DCNN needs (B, C, S, S) planar patches with S >= {self.MIN_SIZE_VOX}, "
                             f"got shape {tuple(x.shape)}")
        # channels-last: oneDNN's 2D convolutions and pooling run about 1.4x faster on this project's CPUs
        h = self.features[:-1](x.contiguous(memory_format=torch.channels_last))
        with fp32(h):  # the last block in float32 (see backbones.fp32): descriptors feed kNN distances
            return _pool_to_vector(self.features[-1](h.float()))


class D3DCNN(nn.Module):
    """Descriptor 3D CNN (Table 1): ``(B, 1, 25, 25, 25) -> (B, 192)``, valid and dilated convolutions.

    25 -> 21 (5^3) -> 17, 13, 9 (3^3, dilation 2) -> 7 (3^3) -> 3 (5^3) -> 1 (3^3, 192 channels).
    Larger inputs give a larger final map, which is averaged; smaller inputs raise.
    """

    MIN_SIZE_VOX = 25

    def __init__(self, in_channels: int = 1, spatial_dims: int = 3, embed_dim: int | None = None) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"D3DCNN is a 3D network; got spatial_dims={spatial_dims}")
        if embed_dim not in (None, 192):
            raise ValueError(f"D3DCNN has Table 1's 192 outputs; got embed_dim={embed_dim}")
        self.features = nn.Sequential(
            _block(3, in_channels, 16, 5),  # 25 -> 21
            _block(3, 16, 32, 3, dilation=2),  # 21 -> 17
            _block(3, 32, 32, 3, dilation=2),  # 17 -> 13
            _block(3, 32, 32, 3, dilation=2),  # 13 -> 9
            _block(3, 32, 32, 3),  # 9 -> 7
            _block(3, 32, 32, 5),  # 7 -> 3
            _block(3, 32, 192, 3),  # 3 -> 1
        )
        self.embed_dim = 192
        self.spatial_dims = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or min(x.shape[-3:]) < self.MIN_SIZE_VOX:
            raise ValueError(f"D3DCNN needs (B, C, S, S, S) cubes with S >= {self.MIN_SIZE_VOX}, got shape {tuple(x.shape)}")
        h = self.features[:-1](x)
        with fp32(h):
            return _pool_to_vector(self.features[-1](h.float()))


register_backbone("d2d", D2DCNN)
register_backbone("d3d", D3DCNN)


class TriplanarDescriptor(nn.Module):
    """Three 2D networks, one per orientation (normal along array axis 0, 1, 2), outputs concatenated.

    Shapes: ``x (B, 3, C', S, S) -> (B, 3 * D)`` where ``x[:, o]`` is the planar patch whose normal
    is array axis ``o`` (:func:`medssl.sampling.context.triplanar_patches`) and ``D`` each network's
    ``embed_dim``.
    """

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(nets) != 3:
            raise ValueError(f"TriplanarDescriptor needs one network per orientation (3), got {len(nets)}")
        self.nets = nn.ModuleList(nets)
        self.orientation_dim = int(nets[0].embed_dim)
        self.embed_dim = 3 * self.orientation_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError("the 2.5D descriptor takes (B, 3 orientations, channels, S, S) as cut by the method's "
                             f"cut_inputs; got shape {tuple(x.shape)}")
        return torch.cat([net(x[:, o]) for o, net in enumerate(self.nets)], dim=1)


def _pair_stack(in_features: int, widths: Sequence[int], plain_last: bool = True) -> nn.Sequential:
    """1x1 convolutions on a ``(B, in, 1, 1)`` pair feature, each followed by GN + LeakyReLU (but the last
    when ``plain_last``: an output layer)."""
    layers: list[nn.Module] = []
    c_in = in_features
    for k, c_out in enumerate(widths):
        plain = plain_last and k == len(widths) - 1
        layers.append(_conv(2, c_in, c_out, 1) if plain else nn.Sequential(_conv(2, c_in, c_out, 1), _norm_act(2, c_out)))
        c_in = c_out
    return nn.Sequential(*layers)


class TwoParamHead(nn.Module):
    """2-Param CNN (Reg2D): the concatenated anchor and partner descriptors ``(B, 2D)`` -> ``(B, 2)`` offsets.

    Table 1: 1x1 convolutions 128 -> 128 -> 64 -> 32 -> 2 (GN + LeakyReLU except after the last).
    """

    def __init__(self, in_features: int = 128) -> None:
        super().__init__()
        self.layers = _pair_stack(in_features, (128, 64, 32, 2))

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.layers(pair[:, :, None, None]).flatten(1)


class HeatmapHead(nn.Module):
    """Heatmap CNN: ``(B, 2D)`` -> ``(B, 19, 19)`` heatmaps of the in-plane offset (the grid spans +-2.5 half-widths).

    Table 1: 1x1 convolutions 128 -> 64 -> 32 -> 16, then transposed 5x5 convolutions with valid 3x3
    convolutions and bilinear resizing (1 -> 5 -> 3 -> 11 -> 15 -> 13 -> 17 -> 19), and a final 1x1
    convolution to one channel. Row ``i`` (axis -2) and column ``j`` (axis -1) of the map are the
    offsets along the patch's first and second in-plane axes (:func:`medssl.losses.context.heatmap_target`).
    """

    SIZE = 19

    def __init__(self, in_features: int = 128) -> None:
        super().__init__()
        self.reduce = _pair_stack(in_features, (64, 32, 16), plain_last=False)
        self.up1 = nn.Sequential(_block(2, 16, 16, 5, transposed=True), _block(2, 16, 16, 3))  # 1 -> 5 -> 3
        self.up2 = nn.Sequential(_block(2, 16, 16, 5, transposed=True), _block(2, 16, 8, 3))  # 11 -> 15 -> 13
        self.up3 = _block(2, 8, 4, 5, transposed=True)  # 13 -> 17
        self.out = _conv(2, 4, 1, 1)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        h = self.reduce(pair[:, :, None, None])
        h = F.interpolate(self.up1(h), size=(11, 11), mode="bilinear", align_corners=False)
        h = F.interpolate(self.up3(self.up2(h)), size=(self.SIZE, self.SIZE), mode="bilinear", align_corners=False)
        return self.out(h)[:, 0]  # (B, 19, 19)


class SixNeighbourHead(nn.Module):
    """6-Neighbour CNN (3D Doersch): ``(B, 2D)`` -> ``(B, 6)`` logits; Table 1: 384 -> 64 -> 64 -> 32 -> 6."""

    def __init__(self, in_features: int = 384) -> None:
        super().__init__()
        self.layers = _pair_stack(in_features, (64, 64, 32, 6))

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.layers(pair[:, :, None, None]).flatten(1)


def xavier_init_(module: nn.Module) -> nn.Module:
    """Xavier (Glorot) uniform weights and zero biases for every (transposed) convolution and linear layer.

    The paper's "Xavier" baseline is the D2D-CNNs initialised this way and never trained; medssl starts
    the trained context networks from the same initialisation, so that baseline is their exact start.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


# ---------------------------------------------------------------------------- GVDiff


def gvdiff_pattern(n_pairs: int, sigma_vox: float, seed: int = 0) -> np.ndarray:
    """``(2, n_pairs, 3)`` int64 voxel offsets of the GVDiff point pairs, relative to the centre voxel.

    Every coordinate is drawn from a Gaussian with standard deviation ``sigma_vox`` and rounded to voxels: a
    true Gaussian, not truncated to the patch (medssl first redrew points outside the 42-voxel cube, which
    left a near-uniform pattern with a per-axis std of about 11 voxels). Pairs whose two points coincide are
    redrawn (they would always give 0). Points may lie outside the image; they are padded like every cut.
    The same arguments give the same pattern.
    """
    if n_pairs < 1 or not sigma_vox > 0:
        raise ValueError(f"gvdiff_pattern needs n_pairs >= 1 and sigma_vox > 0; got {n_pairs}, {sigma_vox}")
    rng = np.random.default_rng(seed)
    out = np.rint(rng.normal(0.0, sigma_vox, size=(2, n_pairs, 3))).astype(np.int64)
    same = np.all(out[0] == out[1], axis=1)
    while same.any():
        out[:, same] = np.rint(rng.normal(0.0, sigma_vox, size=(2, int(same.sum()), 3))).astype(np.int64)
        same = np.all(out[0] == out[1], axis=1)
    return out


class GreyValueDifferences(nn.Module):
    """GVDiff (Blendowski et al., cf. BRIEF): ``values (B, C, 2 * P) -> (B, C * P)`` grey-value differences.

    ``values`` are the intensities at the pattern's first points followed by its second points (what
    the GVDiff method's ``cut_inputs`` gathers around each centre voxel). The pattern is a buffer, so
    a checkpoint carries it.
    """

    def __init__(self, pattern_vox: np.ndarray, in_channels: int = 1) -> None:
        super().__init__()
        pattern = torch.as_tensor(np.asarray(pattern_vox), dtype=torch.long)
        if pattern.ndim != 3 or pattern.shape[0] != 2 or pattern.shape[2] != 3:
            raise ValueError(f"pattern_vox must have shape (2, n_pairs, 3), got {tuple(pattern.shape)}")
        self.register_buffer("pattern_vox", pattern)
        self.n_pairs = int(pattern.shape[1])
        self.embed_dim = self.n_pairs * int(in_channels)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if values.ndim != 3 or values.shape[-1] != 2 * self.n_pairs:
            raise ValueError(f"GVDiff takes (B, C, {2 * self.n_pairs}) pattern intensities, got shape {tuple(values.shape)}")
        return (values[..., : self.n_pairs] - values[..., self.n_pairs :]).flatten(1)
