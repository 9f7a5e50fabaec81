"""Segmentation networks whose encoder is a pretrained backbone, and the adapter registry that builds them.

For each backbone family, a segmentation network whose encoder *is* the backbone (the same module
class, the checkpoint's weights loaded into it):

- **SmallCNN** and **DenseNet121** (any backbone whose convolutional trunk is an
  ``nn.Sequential``): :class:`CnnUNet`, a small U-Net-style decoder over the trunk's stages.
  The last stage output at every resolution is a skip connection (SmallCNN: /2, /4, /8,
  /16; DenseNet121: relu0 /2, denseblock1 /4, denseblock2 /8, denseblock3 /16, norm5 /32);
  the decoder upsamples (trilinear), concatenates the skip, and applies a
  conv3-GroupNorm-LeakyReLU block per level; a 1x1 convolution gives the organ logits at the
  shallowest stage's resolution (/2), upsampled trilinearly to the input. The trunk's pooling
  and final linear layer (the embedding head) are not used. Crops must be multiples of the
  trunk's total stride (16 for SmallCNN, 32 for DenseNet121).
- **Swin** (a backbone holding a MONAI ``SwinTransformer``, as the Swin backbone of the
  SimSiam work does): MONAI ``SwinUNETR`` with the same depths, heads, feature size, window
  and patch size, whose ``swinViT`` receives the backbone's transformer weights (strict load).

:func:`segmentation_net` picks the adapter; :func:`register_segmentation_adapter` adds a family.
Fine-tuning itself is :func:`medssl.evaluate.finetune.finetune`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "CnnUNet",
    "SegmentationNet",
    "SwinSegmenter",
    "UnsupportedBackboneError",
    "register_segmentation_adapter",
    "segmentation_net",
]


class UnsupportedBackboneError(TypeError):
    """No segmentation network is known for this backbone (e.g. 2D planar descriptors)."""


class SegmentationNet(nn.Module):
    """Base of the segmentation networks: ``forward (B, C, *S) -> (B, n_classes, *S)`` logits.

    ``encoder`` is the backbone's own module (its weights loaded from the method);
    ``encoder_key_prefix`` is where that module sits in the backbone's ``state_dict``
    (so a checkpoint's ``backbone.<prefix>...`` tensors can be compared with it).
    """

    encoder: nn.Module
    encoder_key_prefix: str = ""
    encoder_frozen: bool = False

    def freeze_encoder(self) -> None:
        """No gradients for the encoder, which stays in eval mode (BatchNorm statistics untouched)."""
        self.encoder_frozen = True
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True) -> "SegmentationNet":
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self


def _conv_block(c_in: int, c_out: int, kernel_size: int = 3) -> nn.Module:
    from monai.networks.blocks import Convolution

    return Convolution(3, c_in, c_out, kernel_size=kernel_size, act=("leakyrelu", {"negative_slope": 0.01}),
                       norm=("group", {"num_groups": min(8, c_out)}), bias=False)


class CnnUNet(SegmentationNet):
    """A U-Net-style decoder over the stages of a convolutional trunk (``nn.Sequential``).

    Args:
        trunk: the backbone's convolutional trunk (its modules run in order).
        in_channels: image channels.
        n_classes: organs + background.
        decoder_channels: the decoder's width at a level is ``min(skip channels, 8 * decoder_channels)``.
        probe_size_vox: size of the dummy input that measures each stage's scale.
        encoder_key_prefix: the trunk's key prefix in the backbone's ``state_dict``.
    """

    def __init__(self, trunk: nn.Sequential, in_channels: int, n_classes: int, decoder_channels: int = 16,
                 probe_size_vox: int = 64, encoder_key_prefix: str = "features.") -> None:
        # probe_size_vox: a power of two at least the trunk's total stride, so that sizes divide exactly
        super().__init__()
        self.encoder = trunk
        self.encoder_key_prefix = encoder_key_prefix
        self.taps, channels, self.total_stride = _stage_taps(trunk, in_channels, probe_size_vox)
        widths = [min(c, 8 * decoder_channels) for c in channels[:-1]]  # decoder width at each skip level
        self.up_blocks = nn.ModuleList()
        c_deep = channels[-1]
        for c_skip, w in zip(reversed(channels[:-1]), reversed(widths)):
            self.up_blocks.append(_conv_block(c_deep + c_skip, w))
            c_deep = w
        self.head = nn.Conv3d(c_deep, n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        h = x
        for i, module in enumerate(self.encoder):
            h = module(h)
            if i in self.taps:
                feats.append(h)
        h = feats[-1]
        for block, skip in zip(self.up_blocks, reversed(feats[:-1])):
            h = nn.functional.interpolate(h, size=skip.shape[2:], mode="trilinear", align_corners=False)
            h = block(torch.cat([h, skip.to(h.dtype)], dim=1))
        # Logits at the shallowest stage's resolution (/2 for SmallCNN and DenseNet121), upsampled
        # trilinearly: a full-resolution conv block cost ~5x the rest of a training step on the CPU.
        return nn.functional.interpolate(self.head(h), size=x.shape[2:], mode="trilinear", align_corners=False)


def _stage_taps(trunk: nn.Sequential, in_channels: int, size: int) -> tuple[list[int], list[int], int]:
    """Indices of the last module at each resolution of ``trunk``, their channels, and the total stride."""
    x = torch.zeros(1, in_channels, size, size, size)
    shapes = []
    was_training = [m.training for m in trunk.modules()]
    trunk.eval()
    with torch.no_grad():
        for module in trunk:
            x = module(x)
            if x.ndim != 5:
                raise UnsupportedBackboneError(f"a trunk stage returned shape {tuple(x.shape)}, not (B, C, X, Y, Z)")
            shapes.append((int(x.shape[1]), tuple(int(s) for s in x.shape[2:])))
    for m, t in zip(trunk.modules(), was_training):
        m.training = t
    taps = [i for i in range(len(shapes)) if i == len(shapes) - 1 or shapes[i + 1][1] != shapes[i][1]]
    total_stride = int(round(size / shapes[-1][1][0])) if shapes[-1][1][0] else size
    return taps, [shapes[i][0] for i in taps], total_stride


class SwinSegmenter(SegmentationNet):
    """MONAI ``SwinUNETR`` whose ``swinViT`` is the backbone's ``SwinTransformer`` (weights copied, strict)."""

    def __init__(self, swin: nn.Module, n_classes: int, encoder_key_prefix: str) -> None:
        super().__init__()
        from monai.networks.nets import SwinUNETR

        layers = [getattr(swin, f"layers{i}")[0] for i in range(1, swin.num_layers + 1)]
        spatial_dims = len(tuple(swin.window_size))
        self.net = SwinUNETR(
            in_channels=int(swin.patch_embed.proj.in_channels), out_channels=n_classes,
            patch_size=int(tuple(swin.patch_size)[0]), depths=[len(b.blocks) for b in layers],
            num_heads=[int(b.blocks[0].attn.num_heads) for b in layers], window_size=tuple(swin.window_size),
            feature_size=int(swin.embed_dim), spatial_dims=spatial_dims, use_v2=bool(getattr(swin, "use_v2", False)),
        )  # fmt: skip
        self.net.swinViT.load_state_dict(swin.state_dict(), strict=True)
        self.encoder = self.net.swinViT
        self.encoder_key_prefix = encoder_key_prefix
        self.total_stride = int(tuple(swin.patch_size)[0]) * 2 ** swin.num_layers
        # SwinUNETR's bottleneck block instance-normalises the /32 map, which needs more than one voxel
        self.min_crop_vox = 2 * self.total_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# Adapters: (name, finds the encoder in a backbone -> (module, key prefix) or None, builds the net).
_ADAPTERS: list[tuple[str, Callable[[nn.Module], Any], Callable[..., SegmentationNet]]] = []


def register_segmentation_adapter(name: str, find: Callable[[nn.Module], Any],
                                  build: Callable[..., SegmentationNet]) -> None:
    """Teach :func:`segmentation_net` a new backbone family.

    ``find(backbone) -> (encoder module, key prefix in the backbone's state_dict) | None``;
    ``build(encoder, key_prefix, in_channels=, n_classes=, decoder_channels=, crop_size_vox=)
    -> SegmentationNet``. Adapters are tried in registration order, newest first.
    """
    _ADAPTERS.insert(0, (name, find, build))


def _find_swin(backbone: nn.Module) -> Any:
    from monai.networks.nets.swin_unetr import SwinTransformer

    for path, module in backbone.named_modules():
        if isinstance(module, SwinTransformer):
            return module, (path + "." if path else "")
    return None


def _find_trunk(backbone: nn.Module) -> Any:
    for path in ("features", "net.features"):
        module = backbone.get_submodule(path) if _has_submodule(backbone, path) else None
        if isinstance(module, nn.Sequential) and len(module) > 0:
            return module, path + "."
    return None


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


register_segmentation_adapter(
    "cnn", _find_trunk,
    lambda enc, prefix, in_channels, n_classes, decoder_channels, crop_size_vox: CnnUNet(
        enc, in_channels, n_classes, decoder_channels, probe_size_vox=64, encoder_key_prefix=prefix),
)
register_segmentation_adapter(
    "swin", _find_swin,
    lambda enc, prefix, in_channels, n_classes, decoder_channels, crop_size_vox: SwinSegmenter(enc, n_classes, prefix),
)


def segmentation_net(method: nn.Module, n_classes: int, decoder_channels: int = 16,
                     crop_size_vox: int = 64) -> SegmentationNet:
    """A segmentation network whose encoder is a deep copy of ``method.backbone`` (weights included).

    Raises:
        UnsupportedBackboneError: no adapter knows the backbone (e.g. 2.5D planar networks).
    """
    backbone = getattr(method, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise UnsupportedBackboneError(f"{type(method).__name__} has no `backbone` module to fine-tune")
    backbone = copy.deepcopy(backbone).float()
    in_channels = int(getattr(getattr(method, "config", None), "in_channels", 1))
    for name, find, build in _ADAPTERS:
        found = find(backbone)
        if found is not None:
            net = build(found[0], found[1], in_channels=in_channels, n_classes=n_classes,
                        decoder_channels=decoder_channels, crop_size_vox=crop_size_vox)
            net.adapter = name
            if crop_size_vox < getattr(net, "min_crop_vox", 0):
                raise ValueError(f"crop_size_vox={crop_size_vox} is too small for {type(net).__name__}: "
                                 f"at least {net.min_crop_vox}")
            if crop_size_vox % net.total_stride:
                raise ValueError(f"crop_size_vox={crop_size_vox} must be a multiple of the encoder's total stride "
                                 f"{net.total_stride} ({type(backbone).__name__})")
            return net
    raise UnsupportedBackboneError(
        f"no segmentation network for backbone {type(backbone).__name__} of {getattr(method, 'name', method)}: "
        "known are convolutional trunks (`features` nn.Sequential: SmallCNN, DenseNet121) and MONAI Swin transformers")
