"""Backbones and heads."""

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
