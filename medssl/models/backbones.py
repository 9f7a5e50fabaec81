"""Backbones: ``(B, C, *spatial) -> (B, D)`` with an ``embed_dim`` attribute.

``build_backbone(name, in_channels=1, spatial_dims=3, **kw)`` is the one entry
point the methods use; the registry below names every backbone. MONAI is imported when a network is
built, not with this module, so that the method registry (``import medssl.methods``) loads without it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["SmallCNN", "DenseNet121Backbone", "build_backbone", "fp32", "list_backbones", "register_backbone"]


def fp32(x: torch.Tensor):
    """Autocast off for the block: the last layers of a backbone and metric heads run in float32.

    ISImed compares latent distances with physical ones in mm; computed from bf16 outputs
    they would be quantised to ~1-2 mm steps at raw-mm scale, which no later ``.float()``
    can undo. The tail (last block, pooling, final linear) is a small share of the compute.
    """
    return torch.autocast(device_type=x.device.type, enabled=False)


class SmallCNN(nn.Module):
    """A small conv net for CPU-sized SSL experiments.

    ``len(channels)`` blocks of conv3 -> GroupNorm -> LeakyReLU (MONAI ``Convolution``
    blocks), global average pooling, and an optional final linear layer.

    The default strides ``(2, 2, 1, 2, 1, 2)`` downsample in the FIRST conv: on the CPU
    that trains several times faster than strides ``(1, 2, 1, 2, 1, 2)``, because the
    full-resolution 16-channel activations dominate the cost. GroupNorm rather than BatchNorm because
    batches are built from few volumes (16 patches per volume), so batch statistics are
    strongly correlated and behave differently in train and eval mode.

    Args:
        in_channels: image channels ``C``.
        spatial_dims: 2 or 3.
        channels: output channels of each conv block.
        strides: stride of each conv block (same length as ``channels``).
        embed_dim: if given and different from ``channels[-1]``, a final linear layer
            maps the pooled features to ``embed_dim``; otherwise ``embed_dim = channels[-1]``.
        num_groups: GroupNorm groups (capped at each block's channel count).

    Shapes: ``x (B, C, *S) -> (B, embed_dim)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        spatial_dims: int = 3,
        channels: Sequence[int] = (16, 32, 32, 64, 64, 128),
        strides: Sequence[int] = (2, 2, 1, 2, 1, 2),
        embed_dim: int | None = None,
        num_groups: int = 8,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(channels) != len(strides) or not channels:
            raise ValueError(f"channels {tuple(channels)} and strides {tuple(strides)} need the same non-zero length")
        from monai.networks.blocks import Convolution

        blocks = []
        c_in = in_channels
        for c_out, s in zip(channels, strides):
            blocks.append(
                Convolution(
                    spatial_dims,
                    c_in,
                    c_out,
                    strides=s,
                    kernel_size=3,
                    act=("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
                    norm=("group", {"num_groups": min(num_groups, c_out)}),
                    bias=False,  # GroupNorm's shift makes a conv bias redundant
                )
            )
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.spatial_dims = spatial_dims
        if embed_dim is None or embed_dim == channels[-1]:
            self.fc: nn.Module = nn.Identity()
            self.embed_dim = int(channels[-1])
        else:
            self.fc = nn.Linear(channels[-1], embed_dim)
            self.embed_dim = int(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for block in self.features[:-1]:
            h = block(h)
        with fp32(h):  # the last block, pooling and fc in float32 (see fp32)
            h = self.features[-1](h.float())  # (B, channels[-1], *S')
            h = h.flatten(2).mean(-1)  # global average pool -> (B, channels[-1])
            return self.fc(h)


class DenseNet121Backbone(nn.Module):
    """MONAI DenseNet121 whose classifier output is the embedding (ISImed paper, sec. 2.2).

    As in the paper, the network's final linear layer (``out_channels=1024``) gives the
    1024-d representation used both for the ISImed loss and for transfer. The minimum
    patch size is 32 per axis (five 2x downsamplings).

    Shapes: ``x (B, C, *S) -> (B, embed_dim)``.
    """

    def __init__(self, in_channels: int = 1, spatial_dims: int = 3, embed_dim: int | None = None, **kw) -> None:
        from monai.networks.nets import DenseNet121

        super().__init__()
        self.embed_dim = int(embed_dim or 1024)
        self.net = DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=self.embed_dim, **kw)
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net.features(x)
        with fp32(h):  # the classifier layers (ReLU, pooling, the 1024-d linear) in float32 (see fp32)
            return self.net.class_layers(h.float())


_BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str, factory: Callable[..., nn.Module]) -> None:
    """Add a backbone factory ``factory(in_channels=, spatial_dims=, embed_dim=, **kw)``."""
    if name in _BACKBONES and _BACKBONES[name] is not factory:
        raise ValueError(f"backbone {name!r} is already registered")
    _BACKBONES[name] = factory


def _swin(**kw) -> nn.Module:
    """The SwinUNETR encoder with the thesis's sizes (:mod:`medssl.models.swin`; imported when built)."""
    from medssl.models.swin import SWIN_THESIS, SwinEncoder

    return SwinEncoder(**{**SWIN_THESIS, **kw})


def _swin_tiny(**kw) -> nn.Module:
    """A CPU-sized SwinUNETR encoder (feature size 12, one block per stage) for smoke tests and demos."""
    from medssl.models.swin import SWIN_TINY, SwinEncoder

    return SwinEncoder(**{**SWIN_TINY, **kw})


register_backbone("smallcnn", SmallCNN)
register_backbone("densenet121", DenseNet121Backbone)
register_backbone("swin", _swin)
register_backbone("swin-tiny", _swin_tiny)


def list_backbones() -> list[str]:
    return sorted(_BACKBONES)


def build_backbone(name: str, in_channels: int = 1, spatial_dims: int = 3, **kw) -> nn.Module:
    """Build a registered backbone. ``embed_dim=None`` (or absent) keeps its default width.

    Returns a module mapping ``(B, in_channels, *S) -> (B, module.embed_dim)``.
    """
    key = name.lower()
    if key not in _BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; registered: {', '.join(list_backbones())}")
    if kw.get("embed_dim", 0) is None:
        kw.pop("embed_dim")
    return _BACKBONES[key](in_channels=in_channels, spatial_dims=spatial_dims, **kw)
