"""Networks: every ``nn.Module`` a method or an evaluation builds.

- ``backbones``: ``(B, C, *S) -> (B, D)`` encoders and their registry (:func:`build_backbone`).
- ``swin``: the SwinUNETR encoder pooled to a vector (a backbone).
- ``heads``: projection and prediction heads.
- ``context_nets``: the 2.5D networks of context prediction.
- ``segmentation``: segmentation networks over a pretrained backbone and their adapter registry
  (:func:`~medssl.models.segmentation.segmentation_net`; fine-tuning uses them).
"""

from medssl.models.backbones import DenseNet121Backbone, SmallCNN, build_backbone, list_backbones, register_backbone
from medssl.models.heads import LinearHead, ProjectionHead, mlp_blocks

__all__ = [
    "DenseNet121Backbone",
    "LinearHead",
    "ProjectionHead",
    "SmallCNN",
    "build_backbone",
    "list_backbones",
    "mlp_blocks",
    "register_backbone",
]
