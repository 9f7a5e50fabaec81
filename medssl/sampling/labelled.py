"""Seeded labelled crops for supervised training (segmentation fine-tuning): image and label crops of one size.

A crop is centred on a labelled voxel with probability ``labelled_fraction``, else on a body voxel
(:func:`medssl.sampling.regions.foreground_mask`); outside the image the image is padded with its
per-channel minimum and the labels with background (0), both by :func:`medssl.sampling.patches.extract_patches`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medssl.data.volume import Volume
from medssl.geometry import as_size
from medssl.sampling.patches import extract_patches
from medssl.sampling.regions import foreground_mask

__all__ = ["LabelledCropSampler"]


class LabelledCropSampler:
    """``sampler() -> (images (B, C, *S) float32, codes (B, 1, *S) int64)``, seeded.

    Args:
        volumes: the labelled subjects.
        codes: one integer label map ``(X, Y, Z)`` per volume, 0 = background (e.g. ``OrganSet.encode``).
        crop_size_vox: the crops' edge (cubes).
        batch_size: crops per call.
        labelled_fraction: probability that a crop is centred on a labelled voxel (else on the body).
        seed: the draw's seed (the same seed, volumes and settings give the same crops).
    """

    def __init__(self, volumes: Sequence[Volume], codes: Sequence[np.ndarray], crop_size_vox: int, batch_size: int,
                 labelled_fraction: float, seed: int) -> None:
        if len(codes) != len(volumes):
            raise ValueError(f"{len(volumes)} volumes but {len(codes)} label maps")
        self.images = [np.asarray(v.data, dtype=np.float32) for v in volumes]
        self.codes = [np.asarray(c).astype(np.float32)[None] for c in codes]
        self.labelled_vox = [np.argwhere(c[0] > 0) for c in self.codes]
        self.body_vox = [np.argwhere(foreground_mask(v)) for v in volumes]
        self.size = as_size(crop_size_vox, "crop_size_vox")
        self.batch_size, self.labelled_fraction = int(batch_size), float(labelled_fraction)
        self.rng = np.random.default_rng([int(seed), 11])

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for _ in range(self.batch_size):
            v = int(self.rng.integers(len(self.images)))
            use_labelled = self.rng.random() < self.labelled_fraction and len(self.labelled_vox[v])
            pool = self.labelled_vox[v] if use_labelled else self.body_vox[v]
            centre = pool[int(self.rng.integers(len(pool)))][None]
            xs.append(extract_patches(self.images[v], centre, self.size))
            ys.append(_crop_codes(self.codes[v], centre, self.size))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)).long()


def _crop_codes(codes: np.ndarray, centre: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """Label crops padded with background (``extract_patches`` pads with the map's minimum, which must be 0)."""
    if codes.min() > 0:  # no background voxel at all: extract_patches would pad with the smallest organ code
        raise ValueError("a label map without background voxels cannot be cropped with background padding")
    return extract_patches(codes, centre, size)
