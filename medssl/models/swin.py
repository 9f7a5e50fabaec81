"""The SwinUNETR encoder (SwinViT) pooled to a vector: the thesis's backbone behind medssl's interface.

Hatamizadeh et al., "Swin UNETR", BrainLes 2021; used as the backbone by Konieczkowicz (AGH MSc
thesis 2023, sec. 4.2): patch size 2, four stages of Swin blocks (depths 2, 2, 2, 2), heads
3, 6, 12, 24, window 7, feature size 48, drop path 0.1.

The encoder is MONAI's own ``SwinTransformer``, built with exactly the arguments ``SwinUNETR``
gives it, under the attribute name ``swinViT``. Its weights therefore load into a
``monai.networks.nets.SwinUNETR`` of the same sizes (:meth:`SwinEncoder.swinunetr_state_dict`,
:meth:`SwinEncoder.swinunetr_kwargs`), which is how a pretrained encoder reaches segmentation
fine-tuning. The embedding is the last stage's output (``16 * feature_size`` channels, layer-normed
by ``normalize=True`` as SwinUNETR does) averaged over space, optionally mapped by a linear layer
to ``embed_dim``.

Inputs need not be multiples of 32 voxels (MONAI pads odd sizes before each patch merging), but
SwinUNETR itself needs them for its decoder; tiny sizes (16^3) work for the encoder alone.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from monai.networks.nets.swin_unetr import MERGING_MODE, SwinTransformer
from monai.utils import ensure_tuple_rep, look_up_option
from torch import nn

from medssl.models.backbones import fp32

__all__ = ["SwinEncoder", "SWIN_THESIS", "SWIN_TINY"]

# The thesis's (= SwinUNETR's published) encoder, and a CPU-sized one for smoke tests and demos.
SWIN_THESIS: dict[str, Any] = {"feature_size": 48, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24),
                               "window_size": 7, "patch_size": 2, "drop_path_rate": 0.1}
SWIN_TINY: dict[str, Any] = {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (3, 6, 12, 24),
                             "window_size": 7, "patch_size": 2, "drop_path_rate": 0.0}


class SwinEncoder(nn.Module):
    """MONAI SwinUNETR's encoder, global-average pooled: ``(B, C, *S) -> (B, embed_dim)``.

    Args:
        in_channels: image channels.
        spatial_dims: 2 or 3.
        embed_dim: ``None`` keeps the pooled width ``16 * feature_size``; otherwise a final linear layer.
        feature_size: SwinUNETR's ``feature_size`` (a multiple of 12), the first stage's width.
        depths, num_heads, window_size, patch_size, drop_path_rate: as in ``SwinUNETR``
            (``drop_path_rate`` is its ``dropout_path_rate``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        spatial_dims: int = 3,
        embed_dim: int | None = None,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        patch_size: int = 2,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if feature_size % 12 != 0:
            raise ValueError(f"feature_size must be a multiple of 12 (SwinUNETR's rule), got {feature_size}")
        self._kwargs = {"in_channels": int(in_channels), "spatial_dims": int(spatial_dims),
                        "feature_size": int(feature_size), "depths": tuple(depths), "num_heads": tuple(num_heads),
                        "window_size": window_size, "patch_size": int(patch_size),
                        "dropout_path_rate": float(drop_path_rate)}
        # the same call SwinUNETR.__init__ makes, so the state dicts match key for key
        self.swinViT = SwinTransformer(
            in_chans=in_channels,
            embed_dim=feature_size,
            window_size=ensure_tuple_rep(window_size, spatial_dims),
            patch_size=ensure_tuple_rep(patch_size, spatial_dims),
            depths=depths,
            num_heads=num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            drop_rate=0.0,
            attn_drop_rate=0.0,
            drop_path_rate=drop_path_rate,
            norm_layer=nn.LayerNorm,
            patch_norm=False,
            use_checkpoint=False,
            spatial_dims=spatial_dims,
            downsample=look_up_option("merging", MERGING_MODE),
        )
        width = 16 * int(feature_size)  # channels of the last stage
        self.spatial_dims = int(spatial_dims)
        if embed_dim is None or embed_dim == width:
            self.fc: nn.Module = nn.Identity()
            self.embed_dim = width
        else:
            self.fc = nn.Linear(width, embed_dim)
            self.embed_dim = int(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.swinViT(x, True)[-1]  # (B, 16 F, *S / 32), normalised as SwinUNETR's forward does
        with fp32(h):  # pooling and the linear layer in float32 (see backbones.fp32)
            return self.fc(h.float().flatten(2).mean(-1))

    def swinunetr_kwargs(self) -> dict[str, Any]:
        """Arguments for ``monai.networks.nets.SwinUNETR(out_channels=..., **kwargs)`` whose encoder this is."""
        return dict(self._kwargs)

    def swinunetr_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under SwinUNETR's key names (``swinViT.*``).

        ``unetr.load_state_dict(encoder.swinunetr_state_dict(), strict=False)`` loads every
        encoder weight (no unexpected keys; the missing ones are the decoder's).
        """
        return {f"swinViT.{k}": v for k, v in self.swinViT.state_dict().items()}
