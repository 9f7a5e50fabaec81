"""The thesis's per-view augmentations for IoU-based SimSiam, from MONAI transforms.

Konieczkowicz (AGH MSc thesis 2023, sec. 4.5), applied to every crop independently, in this order:

===========================  ===========================================================  =====
transform                    MONAI (random / deterministic with the drawn parameter)      p
===========================  ===========================================================  =====
zoom 0.8-1.2, same size      ``RandZoom(min_zoom=0.8, max_zoom=1.2)`` / ``Zoom``           0.75
flip along X                 ``RandFlip(spatial_axis=0)`` / ``Flip``                       0.5
rot90 by 90/180/270 deg      ``RandRotate90(max_k=3, spatial_axes=(0, 1))`` / ``Rotate90`` 0.5
intensity scale x(1 + a)     ``RandScaleIntensity(factors=0.1)`` / ``ScaleIntensity``      0.75
Gaussian blur sigma .25-1.5  ``RandGaussianSmooth`` / ``GaussianSmooth``                   0.25
Gaussian noise sigma 0.01    ``RandGaussianNoise(std=0.01, sample_std=False)``             0.25
===========================  ===========================================================  =====

Notes on the mapping:

- The thesis's **pretraining** list (sec. 4.5) names an intensity *scaling* ``x (1 + a)``, ``a`` in
  [-0.1, 0.1] (p 0.75), and **no intensity shift**: the shift ``x + b`` belongs to its fine-tuning
  augmentations. So ``shift`` is 0 by default (no shift is drawn and MONAI's pipeline has no
  ``RandShiftIntensity``); ``shift=0.1`` gives the fine-tuning variant with p = ``intensity_prob``.
  (medssl applied the shift in pretraining with p 0.75 until issue 16.) medssl scales intensities to
  [-1, 1] (the ISImed percentile scaling), the thesis to [0, 1], so a 0.1 shift would be half as strong
  here.
- Zoom keeps the crop size (crop centrally when zooming in, edge padding when zooming out), one
  factor for all axes, with trilinear interpolation. MONAI's ``RandZoom`` default is "area", which
  upsamples blockily when zooming in; the thesis does not say.
- The rotation is in the axial (x, y) plane, so 3D crops must be square in x and y.
- Noise: a fixed sigma = 0.01 (MONAI's default would draw sigma in [0, 0.01] per call).
- Blur: sigma drawn per axis in [0.25, 1.5] (the thesis gives x and y in 2D; in 3D z too), MONAI's
  ``gaussian_1d`` kernels (erf approximation, truncated at 4 sigma), zero padding as MONAI.

**Why batched, not MONAI per crop.** MONAI's random transforms take one image: a demo step of 192
crops through them would cost many times the step itself on the CPU. :meth:`ThesisViewAugment.apply`
does the same operations on the whole batch at once (zoom as one ``grid_sample``, the blur as weighted
shifted copies with MONAI's kernels, flips and rotations on index subsets). The test suite
checks it against MONAI's deterministic transforms with identical parameters
(:meth:`ThesisViewAugment.apply_monai`), and ``monai_transform()`` is the random MONAI pipeline.

Parameters are drawn from the sampling ``rng``, so the same ``rng`` state gives the same views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ThesisViewAugment", "ViewParams"]

_BLUR_TRUNCATED = 4.0  # MONAI GaussianFilter's default truncation (in sigmas)


@dataclass
class ViewParams:
    """Per-crop random parameters of one call; a transform not applied to a crop has its neutral value.

    ``zoom (N,)`` factor (1 = none), ``flip (N,)`` bool, ``rot90_k (N,)`` in 0..3, ``scale (N,)`` the ``a``
    of ``x (1 + a)`` (0 = none), ``shift (N,)`` (0 = none), ``blur_sigma (N, d)`` voxels (0 = none),
    ``noise (N,)`` bool, ``noise_seed`` seeds the noise tensor.
    """

    zoom: np.ndarray
    flip: np.ndarray
    rot90_k: np.ndarray
    scale: np.ndarray
    shift: np.ndarray
    blur_sigma: np.ndarray
    noise: np.ndarray
    noise_seed: int


class ThesisViewAugment:
    """Independent thesis augmentations of every crop: ``aug(crops (N, C, *S), rng) -> (N, C, *S)``.

    Args:
        spatial_dims: 2 or 3 (the crops' spatial axes).
        zoom: ``(min, max)`` zoom factor, applied with ``zoom_prob``.
        flip_prob: probability of a flip along the first spatial axis (X).
        rot90_prob: probability of a rotation by 90, 180 or 270 degrees (equally likely) in the (x, y) plane.
        intensity: scale factor ``a`` uniform in ``+-intensity``, applied with ``intensity_prob``.
        shift: offset uniform in ``+-shift``, applied with ``intensity_prob``; 0 (the thesis's pretraining, the
            default): never drawn. The thesis shifts intensities only when fine-tuning.
        blur_sigma: ``(min, max)`` Gaussian blur sigma in voxels, per axis, applied with ``blur_prob``.
        noise_std: Gaussian noise sigma, applied with ``noise_prob``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        zoom: tuple[float, float] = (0.8, 1.2),
        zoom_prob: float = 0.75,
        flip_prob: float = 0.5,
        rot90_prob: float = 0.5,
        intensity: float = 0.1,
        shift: float = 0.0,
        intensity_prob: float = 0.75,
        blur_sigma: tuple[float, float] = (0.25, 1.5),
        blur_prob: float = 0.25,
        noise_std: float = 0.01,
        noise_prob: float = 0.25,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        probs = {"zoom_prob": zoom_prob, "flip_prob": flip_prob, "rot90_prob": rot90_prob,
                 "intensity_prob": intensity_prob, "blur_prob": blur_prob, "noise_prob": noise_prob}
        for name, p in probs.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if not (0 < zoom[0] <= zoom[1] and 0 < blur_sigma[0] <= blur_sigma[1]):
            raise ValueError(f"zoom and blur_sigma must be (min, max) with 0 < min <= max, got {zoom} and {blur_sigma}")
        if intensity < 0 or shift < 0 or noise_std < 0:
            raise ValueError(f"intensity, shift and noise_std must be >= 0, got {intensity}, {shift}, {noise_std}")
        self.spatial_dims = int(spatial_dims)
        self.zoom, self.zoom_prob = (float(zoom[0]), float(zoom[1])), float(zoom_prob)
        self.flip_prob, self.rot90_prob = float(flip_prob), float(rot90_prob)
        self.intensity, self.shift, self.intensity_prob = float(intensity), float(shift), float(intensity_prob)
        self.blur_sigma, self.blur_prob = (float(blur_sigma[0]), float(blur_sigma[1])), float(blur_prob)
        self.noise_std, self.noise_prob = float(noise_std), float(noise_prob)

    # ------------------------------------------------------------------ parameters

    def draw(self, n: int, rng: np.random.Generator) -> ViewParams:
        """Random parameters for ``n`` crops, from ``rng``."""
        def coin(p: float) -> np.ndarray:
            return rng.random(n) < p

        zoom = np.where(coin(self.zoom_prob), rng.uniform(*self.zoom, size=n), 1.0)
        flip = coin(self.flip_prob)
        rot90_k = np.where(coin(self.rot90_prob), rng.integers(1, 4, size=n), 0)
        scale = np.where(coin(self.intensity_prob), rng.uniform(-self.intensity, self.intensity, size=n), 0.0)
        shift = (np.where(coin(self.intensity_prob), rng.uniform(-self.shift, self.shift, size=n), 0.0)
                 if self.shift > 0 else np.zeros(n))  # pretraining: no shift, and no draws for it
        blur = coin(self.blur_prob)[:, None] * rng.uniform(*self.blur_sigma, size=(n, self.spatial_dims))
        noise = coin(self.noise_prob)
        return ViewParams(zoom, flip, rot90_k, scale, shift, blur, noise, int(rng.integers(0, 2**63 - 1)))

    def __call__(self, crops: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """``crops (N, C, *S)`` -> augmented ``(N, C, *S)`` float32 (the input is unchanged)."""
        self._check(crops)
        return self.apply(crops, self.draw(len(crops), rng))

    # ------------------------------------------------------------------ batched (the training path)

    def apply(self, crops: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """The augmentations with the given parameters, on the whole batch at once."""
        self._check(crops)
        x = crops.float().clone()
        x = self._zoom(x, params.zoom)
        for k in np.flatnonzero(params.flip):  # a handful of index ops, not worth batching further
            x[k] = torch.flip(x[k], dims=(1,))
        for r in (1, 2, 3):
            idx = torch.from_numpy(np.flatnonzero(params.rot90_k == r))
            if len(idx):
                x[idx] = torch.rot90(x[idx], r, dims=(2, 3))
        x = x * _per_crop(1.0 + params.scale, x) + _per_crop(params.shift, x)
        x = self._blur(x, params.blur_sigma)
        noisy = torch.from_numpy(np.flatnonzero(params.noise))
        if len(noisy):
            x[noisy] += self._noise((len(noisy), *x.shape[1:]), params.noise_seed)
        return x

    def _zoom(self, x: torch.Tensor, zoom: np.ndarray) -> torch.Tensor:
        """Each zoomed crop resampled where MONAI ``Zoom(keep_size=True)`` samples it, in one ``grid_sample``."""
        idx = np.flatnonzero(zoom != 1.0)
        if len(idx) == 0:
            return x
        size = np.asarray(x.shape[2:])
        theta = np.zeros((len(idx), self.spatial_dims, self.spatial_dims + 1))
        bound = np.zeros((len(idx), self.spatial_dims))
        for row, k in enumerate(idx):
            # MONAI interpolates to out = floor(S * f) voxels and centre-crops (zoom in) or edge-pads
            # (zoom out) back to S, so output voxel j samples input (clip(j + o, 0, out - 1) + 0.5) * S / out
            # - 0.5. In grid_sample's normalised coordinates (align_corners=False): u_in = (S / out) u_out +
            # (S + 2 o) / out - 1, clipped to +-(1 - 1 / out) (the edge voxel MONAI pads with).
            out = np.floor(size * zoom[k] + 1e-6)
            o = np.where(out >= size, out // 2 - size // 2, -((size - out) // 2))
            theta[row, :, :-1] = np.diag((size / out)[::-1])  # grid coordinates run (W, H, D): reversed axes
            theta[row, :, -1] = ((size + 2 * o) / out - 1.0)[::-1]
            bound[row] = (1.0 - 1.0 / out)[::-1]
        sel = torch.from_numpy(idx)
        sub = x[sel]
        x[sel] = F.grid_sample(sub, _separable_grid(theta, bound, sub.shape[2:], x.dtype), mode="bilinear",
                               padding_mode="border", align_corners=False)
        return x

    def _blur(self, x: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
        """Separable Gaussian blur with per-crop sigmas and MONAI's kernels, zero padding as MONAI.

        Per axis a sum over the (at most 13) kernel taps of shifted copies, each weighted per crop:
        exact, and far faster on CPU than a grouped convolution with one group per crop.
        """
        from monai.networks.layers import gaussian_1d

        idx = np.flatnonzero(sigma.max(axis=1) > 0)
        if len(idx) == 0:
            return x
        sel = torch.from_numpy(idx)
        sub = x[sel]  # (n, C, *S)
        for axis in range(self.spatial_dims):
            kernels = [gaussian_1d(torch.tensor(float(s)), truncated=_BLUR_TRUNCATED, approx="erf").to(x.dtype)
                       for s in sigma[idx, axis]]
            radius = max(len(k) for k in kernels) // 2
            weight = torch.zeros(len(idx), 2 * radius + 1, dtype=x.dtype)
            for row, k in enumerate(kernels):  # zero-padded to one length: the same sums as MONAI's
                weight[row, radius - len(k) // 2 : radius + len(k) // 2 + 1] = k
            dim = 2 + axis
            pad = [0] * (2 * self.spatial_dims)
            pad[2 * (self.spatial_dims - 1 - axis)] = pad[2 * (self.spatial_dims - 1 - axis) + 1] = radius
            padded = F.pad(sub, pad)  # zeros, as MONAI's separable_filtering
            length = sub.shape[dim]
            out = torch.zeros_like(sub)
            for t in range(2 * radius + 1):
                out += _per_crop(weight[:, t].numpy(), sub) * padded.narrow(dim, t, length)
            sub = out
        x[sel] = sub
        return x

    def _noise(self, shape: tuple[int, ...], seed: int) -> torch.Tensor:
        """``noise_std`` x standard normal noise for the noisy crops only (row i: the i-th crop with noise)."""
        gen = torch.Generator().manual_seed(seed)
        return self.noise_std * torch.randn(shape, generator=gen)

    # ------------------------------------------------------------------ MONAI reference

    def apply_monai(self, crops: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """The same augmentations with MONAI's deterministic transforms, crop by crop (the reference)."""
        from monai.transforms import Flip, GaussianSmooth, Rotate90, ScaleIntensity, ShiftIntensity, Zoom

        self._check(crops)
        noise = self._noise((int(params.noise.sum()), *crops.shape[1:]), params.noise_seed)
        noise_row = np.cumsum(params.noise) - 1  # crop k's row in `noise`
        out = []
        for k, c in enumerate(crops.float()):
            y = torch.as_tensor(c)
            if params.zoom[k] != 1.0:
                y = Zoom(float(params.zoom[k]), mode="trilinear" if self.spatial_dims == 3 else "bilinear",
                         padding_mode="edge", keep_size=True, align_corners=False)(y)
            if params.flip[k]:
                y = Flip(spatial_axis=0)(y)
            if params.rot90_k[k]:
                y = Rotate90(k=int(params.rot90_k[k]), spatial_axes=(0, 1))(y)
            y = ScaleIntensity(minv=None, maxv=None, factor=float(params.scale[k]))(y)
            if params.shift[k]:
                y = ShiftIntensity(offset=float(params.shift[k]))(y)
            if params.blur_sigma[k].max() > 0:
                y = GaussianSmooth(sigma=[float(s) for s in params.blur_sigma[k]])(y)
            if params.noise[k]:
                y = y + noise[noise_row[k]]
            out.append(torch.as_tensor(y).float())
        return torch.stack(out)

    def monai_transform(self):
        """The random MONAI pipeline for ONE crop ``(C, *S)`` that this class reproduces on batches."""
        from monai.transforms import (
            Compose,
            RandFlip,
            RandGaussianNoise,
            RandGaussianSmooth,
            RandRotate90,
            RandScaleIntensity,
            RandShiftIntensity,
            RandZoom,
        )

        mode = "trilinear" if self.spatial_dims == 3 else "bilinear"
        shift = [RandShiftIntensity(offsets=self.shift, prob=self.intensity_prob)] if self.shift > 0 else []
        return Compose([
            RandZoom(prob=self.zoom_prob, min_zoom=self.zoom[0], max_zoom=self.zoom[1], mode=mode, keep_size=True),
            RandFlip(prob=self.flip_prob, spatial_axis=0),
            RandRotate90(prob=self.rot90_prob, max_k=3, spatial_axes=(0, 1)),
            RandScaleIntensity(factors=self.intensity, prob=self.intensity_prob),
            *shift,
            RandGaussianSmooth(sigma_x=self.blur_sigma, sigma_y=self.blur_sigma, sigma_z=self.blur_sigma,
                               prob=self.blur_prob),
            RandGaussianNoise(prob=self.noise_prob, mean=0.0, std=self.noise_std, sample_std=False),
        ])

    def _check(self, crops: torch.Tensor) -> None:
        if crops.ndim != 2 + self.spatial_dims:
            raise ValueError(f"crops must be (N, C, *S) with {self.spatial_dims} spatial dims, got {tuple(crops.shape)}")
        if crops.shape[2] != crops.shape[3]:
            raise ValueError(f"rot90 in the (x, y) plane needs crops square in x and y, got {tuple(crops.shape[2:])}")


def _per_crop(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``(N,)`` values as a tensor broadcasting over ``like (N, C, *S)``."""
    return torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))


def _separable_grid(theta: np.ndarray, bound: np.ndarray, size: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """``F.affine_grid`` (align_corners=False) of diagonal ``theta (N, d, d + 1)``, clipped to ``+-bound (N, d)``.

    Each grid coordinate depends on one output axis only, so it is a clipped 1D ramp per crop and axis,
    broadcast to the grid: the same values as ``affine_grid`` followed by the clip (to float rounding),
    without its ``(N, *S, d) x (d + 1)`` matrix product, which took ~60 % of SimSiam's view making.
    """
    n, d = bound.shape
    out = torch.empty((n, *size, d), dtype=dtype)
    for c in range(d):  # grid coordinate c runs along array axis d - 1 - c (grid order is (W, H, D))
        axis = d - 1 - c
        steps = int(size[axis])
        u = (2.0 * np.arange(steps) + 1.0) / steps - 1.0  # pixel centres in normalised coordinates
        ramp = np.clip(theta[:, c, c, None] * u[None, :] + theta[:, c, -1, None], -bound[:, c, None], bound[:, c, None])
        shape = [n] + [1] * d
        shape[1 + axis] = steps
        out[..., c] = torch.from_numpy(ramp.reshape(shape)).to(dtype)
    return out
