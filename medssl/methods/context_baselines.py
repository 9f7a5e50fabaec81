"""The untrained baselines of Blendowski et al. (MICCAI 2019): Xavier and GVDiff.

- ``xavier``: the three D2D-CNNs with Xavier initialisation and no training (the 2.5D descriptor of
  Reg2D/Heatmap before their first step): does training help at all?
- ``gvdiff``: grey-value differences between 192 point pairs of a fixed random 3D pattern (Gaussian,
  sigma 0.4 of the receptive field), a handcrafted descriptor in the spirit of BRIEF.

Both have ``trains = False``: ``fit`` writes their initial state as ``last.pt`` and evaluations load
them like any method. Their ``training_step`` (run by ``fit`` only to log the validation record)
returns a zero loss and the descriptor's spread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medssl.methods.base import Method, MethodConfig, StepOutput, register_method
from medssl.methods.context import PAPER, PLANAR_PRESETS, PlanarContextMethod
from medssl.models.context_nets import GreyValueDifferences, gvdiff_pattern
from medssl.sampling.base import PatchBatch
from medssl.sampling.context import PointInputSampler, point_values


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
    presets = {name: {"method": dict(spec["method"])} for name, spec in PLANAR_PRESETS.items()}

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
    """GVDiff: ``n_pairs`` point pairs from a Gaussian with ``sigma_fraction * patch_size_vox`` voxels of standard
    deviation, truncated to the cube of side ``patch_size_vox`` (the receptive field: 42, the 2.5D patch's
    in-plane side), drawn once from ``pattern_seed``. ``backbone`` must be "gvdiff" (no network)."""

    backbone: str = "gvdiff"
    patch_size_vox: int = 42
    volumes_per_batch: int = 8
    patches_per_volume: int = 1
    foreground_only: bool = True
    n_pairs: int = 192
    sigma_fraction: float = 0.4
    pattern_seed: int = 0


@register_method("gvdiff")
class GVDiff(Method):
    """GVDiff: grey-value differences over a fixed random 3D pattern of 192 point pairs (handcrafted)."""

    Config = GVDiffConfig
    family = "untrained baseline"
    paper = PAPER
    trains = False
    presets = {
        **{name: {"method": {"backbone": "gvdiff", "patch_size_vox": 42, "volumes_per_batch": 8, "patches_per_volume": 1,
                             "foreground_only": True}} for name in ("paper", "demo")},
        "tiny": {"method": {"backbone": "gvdiff"}},  # the shared tiny preset's SmallCNN means nothing here
    }

    def __init__(self, config: GVDiffConfig) -> None:
        super().__init__(config)
        if config.backbone != "gvdiff":
            raise ValueError(f"GVDiff is a handcrafted descriptor: backbone must be 'gvdiff', got {config.backbone!r}")
        pattern = gvdiff_pattern(config.n_pairs, config.patch_size_vox, config.sigma_fraction, config.pattern_seed)
        self.backbone = GreyValueDifferences(pattern, config.in_channels)
        self.sampler = PointInputSampler(self.cut_inputs, self.input_size_vox, config.volumes_per_batch,
                                         config.patches_per_volume, config.foreground_only)

    def cut_inputs(self, data: np.ndarray, centres_vox: np.ndarray) -> np.ndarray:
        """``(N, C, 2 * n_pairs)``: intensities at the pattern's points around each centre voxel (batched, padded)."""
        return point_values(data, centres_vox, self.backbone.pattern_vox.cpu().numpy().reshape(-1, 3))

    def training_step(self, batch: PatchBatch) -> StepOutput:
        return _descriptor_logs(self, batch)
