"""The untrained baselines of Blendowski et al. (MICCAI 2019): Xavier and GVDiff.

- ``xavier``: the three D2D-CNNs with Xavier initialisation and no training (the 2.5D descriptor of
  Reg2D/Heatmap before their first step): does training help at all?
- ``gvdiff``: grey-value differences between 192 point pairs of a fixed random 3D pattern, a handcrafted
  descriptor in the spirit of BRIEF. The pattern is a true Gaussian with the paper's standard deviation,
  0.4 in its image units (axes in ``[-1, 1]``, patch side 0.8), i.e. **one patch half-width**: 21 voxels =
  63 mm for the 42-voxel patch on the demo grid. The grey values are read from the volume smoothed with a
  small Gaussian (sigma 2 voxels, BRIEF's pre-smoothing), not from single noisy voxels.

Both have ``trains = False``: ``fit`` writes their initial state as ``last.pt`` and evaluations load
them like any method. Their ``training_step`` (run by ``fit`` only to log the validation record)
returns a zero loss and the descriptor's spread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medssl.methods.base import Method, MethodConfig, StepOutput, register_method
from medssl.methods.context import PAPER, PLANAR_PRESETS, PlanarContextMethod
from medssl.models.context_nets import GreyValueDifferences, gvdiff_pattern
from medssl.sampling.base import PatchBatch
from medssl.sampling.context import PointInputSampler, point_values
from medssl.sampling.patches import padding_values


def _descriptor_logs(method: Method, batch: PatchBatch) -> StepOutput:
    """Zero loss (nothing is optimised) and the mean per-dimension standard deviation of the descriptors."""
    with torch.no_grad():
        z = method.embed(batch.patches).float()  # (N, D)
    std = float(z.std(0).mean()) if len(z) > 1 else 0.0
    return StepOutput(loss=torch.zeros((), device=z.device), logs={"loss": 0.0, "descriptor_std": std})


@register_method("xavier")
class Xavier(PlanarContextMethod):
    """Xavier: the 2.5D descriptor of three Xavier-initialised, untrained D2D-CNNs."""

    family = "untrained baseline"
    trains = False
    planes_per_anchor = 3  # its (validation) batches hold the anchors' three planes, no partners
    presets = {name: {"method": dict(spec["method"])} for name, spec in PLANAR_PRESETS.items() if "method" in spec}

    def __init__(self, config: Any) -> None:
        super().__init__(config)  # the D2D-CNNs, Xavier-initialised (PlanarContextMethod)
        # validation batches only need the anchors' inputs (no partners)
        self.sampler = PointInputSampler(self.cut_inputs, self.input_size_vox, config.volumes_per_batch,
                                         config.patches_per_volume, config.foreground_only)

    def sample(self, volumes, rng: np.random.Generator) -> PatchBatch:
        return self.sampler(volumes, rng)

    def training_step(self, batch: PatchBatch) -> StepOutput:
        return _descriptor_logs(self, batch)


@dataclass(frozen=True)
class GVDiffConfig(MethodConfig):
    """GVDiff: ``n_pairs`` point pairs from a Gaussian of ``sigma_hw`` half-widths of ``patch_size_vox`` (the paper's
    0.4 image units = 1 half-width; ``sigma_hw * patch_size_vox / 2`` voxels), drawn once from ``pattern_seed``,
    on grey values smoothed with a Gaussian of ``smooth_sigma_vox`` voxels (0: single voxels). ``backbone`` must be
    "gvdiff" (no network); ``patch_size_vox`` is the receptive field it is compared with (42, the 2.5D patch)."""

    backbone: str = "gvdiff"
    patch_size_vox: int = 42
    volumes_per_batch: int = 8
    patches_per_volume: int = 1
    foreground_only: bool = True
    n_pairs: int = 192
    sigma_hw: float = 1.0
    smooth_sigma_vox: float = 2.0  # BRIEF (Calonder et al. 2010, the paper's ref. 1) smooths with sigma 2 pixels
    pattern_seed: int = 0

    def __post_init__(self) -> None:
        if not self.sigma_hw > 0 or self.smooth_sigma_vox < 0:
            raise ValueError(f"gvdiff needs sigma_hw > 0 and smooth_sigma_vox >= 0, got {self.sigma_hw} and "
                             f"{self.smooth_sigma_vox}")


class _SmoothedVolumes:
    """The last few volumes smoothed per channel (``scipy.ndimage.gaussian_filter``), keyed by the data object.

    An entry holds a reference to its data, so the ``id`` cannot be reused while it is cached; a lock makes it
    safe for the dense evaluation's prefetch thread. Smoothing a demo volume takes tens of milliseconds, and a
    dense grid cuts one volume in many chunks, so caching the last volumes avoids smoothing it per chunk.
    """

    def __init__(self, sigma_vox: float, keep: int = 2) -> None:
        self.sigma_vox, self.keep = float(sigma_vox), int(keep)
        self._cache: OrderedDict[int, tuple[Any, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, data: Any) -> np.ndarray:
        from scipy.ndimage import gaussian_filter

        with self._lock:
            hit = self._cache.get(id(data))
            if hit is not None and hit[0] is data:
                self._cache.move_to_end(id(data))
                return hit[1]
        arr = np.asarray(data, dtype=np.float32)
        smoothed = np.stack([gaussian_filter(c, self.sigma_vox, mode="nearest", truncate=4.0) for c in arr])
        with self._lock:
            self._cache[id(data)] = (data, smoothed)
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        return smoothed


@register_method("gvdiff")
class GVDiff(Method):
    """GVDiff: grey-value differences over a fixed random 3D pattern of 192 point pairs (handcrafted)."""

    Config = GVDiffConfig
    family = "untrained baseline"
    paper = PAPER
    trains = False
    # paper and demo: the config's defaults (42, batch 8, on the body); the shared tiny preset's SmallCNN means nothing here
    presets = {"tiny": {"method": {"backbone": "gvdiff"}}}

    def __init__(self, config: GVDiffConfig) -> None:
        super().__init__(config)
        if config.backbone != "gvdiff":
            raise ValueError(f"GVDiff is a handcrafted descriptor: backbone must be 'gvdiff', got {config.backbone!r}")
        pattern = gvdiff_pattern(config.n_pairs, config.sigma_hw * config.patch_size_vox / 2, config.pattern_seed)
        self.backbone = GreyValueDifferences(pattern, config.in_channels)
        self.sampler = PointInputSampler(self.cut_inputs, self.input_size_vox, config.volumes_per_batch,
                                         config.patches_per_volume, config.foreground_only)
        self._smoothed = _SmoothedVolumes(config.smooth_sigma_vox) if config.smooth_sigma_vox > 0 else None

    def cut_inputs(self, data: np.ndarray, centres_vox: np.ndarray) -> np.ndarray:
        """``(N, C, 2 * n_pairs)``: smoothed intensities at the pattern's points around each centre voxel (batched;
        points outside the image read the volume's background, its per-channel minimum)."""
        values = data if self._smoothed is None else self._smoothed(data)
        return point_values(values, centres_vox, self.backbone.pattern_vox.cpu().numpy().reshape(-1, 3),
                            fill=padding_values(data))

    def training_step(self, batch: PatchBatch) -> StepOutput:
        return _descriptor_logs(self, batch)
