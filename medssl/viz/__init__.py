"""Viewers and figures: slice views of volumes, latent-space plots, training curves."""

from medssl.viz.slices import label_colors, orthogonal_slices, slice_viewer

__all__ = ["orthogonal_slices", "slice_viewer", "label_colors"]
