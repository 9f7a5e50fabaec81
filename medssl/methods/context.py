"""Context prediction (Blendowski, Nickisch, Heinrich, MICCAI 2019): 2.5D Reg2D and Heatmap, 3D Doersch.

- ``reg2d``: per orientation, a D2D-CNN embeds an anchor planar patch and a partner moved by ``Delta0``
  along the normal and ``(Delta1, Delta2)`` in-plane; the 2-Param CNN regresses ``(Delta1, Delta2)``
  from both descriptors (L1).
- ``heatmap``: the same pairs; the Heatmap CNN predicts a 19 x 19 heatmap of the offset (MSE).
- ``doersch``: a D3D-CNN on 25^3 cubes; the 6-Neighbour CNN tells which face neighbour the partner is
  (cross-entropy).

The 2.5D descriptor at a point is the concatenation of the three orientations' D2D outputs (3 x 64 =
192, the length of Doersch's). Geometry, units and the curriculum are in :mod:`medssl.sampling.context`;
the networks in :mod:`medssl.models.context_nets`. The untrained baselines (``xavier``, ``gvdiff``)
are in :mod:`medssl.methods.context_baselines`.

The pretext task is the paper's in both the ``paper`` and the ``demo`` preset (the demo differs in
budget only): offsets in the paper's units converted to patch half-widths (curriculum ``+-[0.625, 0.75]``
to ``+-[0, 1.75]``, normal displacement 0.3125-0.625, heatmap grid ``+-2.5``), anchors uniform in the
central half of each axis, partners padded where they leave the image (:mod:`medssl.sampling.context`).

Validation measures (``split="val"`` records of ``metrics.jsonl``, drawn from the full offset range):
Reg2D/Heatmap ``offset_err_hw`` (mean Euclidean error of ``(Delta1, Delta2)`` in half-widths),
``offset_err_mm`` (the same in mm) and ``offset_err_zero_hw`` (the error of always answering 0, the
reference to beat); Doersch ``accuracy`` (chance 1/6). Every record (train and val) also carries
``anchor_eligible_share`` (the share of each batch volume that the anchor rule allows, about 0.125) and
``anchor_fallback_rate`` (the share of anchors from volumes whose central half held no body voxel).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from medssl.data.volume import Volume
from medssl.losses.context import (
    HEATMAP_EXTENT_HW,
    HeatmapMSELoss,
    NeighbourCrossEntropy,
    OffsetL1Loss,
    heatmap_offsets,
)
from medssl.methods.base import Method, MethodConfig, StepOutput, backbone_from_config, register_method
from medssl.models.backbones import build_backbone
from medssl.models.context_nets import HeatmapHead, SixNeighbourHead, TriplanarDescriptor, TwoParamHead, xavier_init_
from medssl.sampling.base import PatchBatch
from medssl.sampling.context import (
    NORMAL_GAP_HW,
    OFFSET_END_HW,
    OFFSET_START_HW,
    ORIENTATIONS,
    ContextPairSampler,
    NeighbourPairSampler,
    curriculum_range,
    triplanar_patches,
)
from medssl.train.config import TrainConfig

__all__ = ["PAPER", "DoerschConfig", "PlanarContextConfig", "PlanarContextMethod", "paper_adam"]

PAPER = ("Blendowski, Nickisch, Heinrich: How to learn from unlabeled volume data: self-supervised 3D "
         "context feature learning, MICCAI 2019")
# The paper trains every method on 800,000 batches of 8 (sec. 3); its curriculum spans the whole run.
PAPER_STEPS = 800_000


def _tuples(config: Any) -> None:
    """Lists (e.g. from JSON) back to tuples in a frozen config, so equality and hashing hold."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, list):
            object.__setattr__(config, f.name, tuple(value))


def paper_adam(method: nn.Module, config: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """Adam at ``config.lr`` (paper: 5e-5), without weight decay, at a constant rate (the paper states no
    schedule); ``TrainConfig.weight_decay`` and ``lr_decay_per_epoch`` are not used."""
    optimizer = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=config.lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


# ---------------------------------------------------------------------------- 2.5D (Reg2D, Heatmap, Xavier)


@dataclass(frozen=True)
class PlanarContextConfig(MethodConfig):
    """Blendowski et al.'s 2.5D setting, their units converted to patch half-widths (:mod:`medssl.sampling.context`).

    ``patch_size_vox``: in-plane side S of each planar patch, in voxels of the cached grid (paper: 42).
    ``embed_dim``: width of each orientation's network (None: the D2D-CNN's 64); the descriptor is 3x it.
    ``normal_gap_hw``: range of ``Delta0``, the partner's move along the normal, in half-widths (paper:
    0.125-0.25 image units = 0.3125-0.625 half-widths; 7-13 voxels = 21-39 mm on the demo grid; never less
    than ``n_slices`` voxels). ``offset_start``/``offset_end``: in-plane offset magnitudes at the start and
    end of the curriculum, in half-widths (paper: +-[0.625, 0.75] and +-[0, 1.75]); at most the heatmap's
    extent, 2.5. ``curriculum_steps``: training steps over which the range widens (the run's length; the
    presets set it).
    """

    backbone: str = "d2d"
    patch_size_vox: int = 42
    volumes_per_batch: int = 8  # batch 8 (paper), one anchor from each of 8 volumes
    patches_per_volume: int = 1
    foreground_only: bool = True  # anchor centres on the body (and in the central half of each axis)
    n_slices: int = 3
    normal_gap_hw: tuple[float, float] = NORMAL_GAP_HW
    offset_start: tuple[float, float] = OFFSET_START_HW
    offset_end: tuple[float, float] = OFFSET_END_HW
    curriculum_steps: int = PAPER_STEPS

    def __post_init__(self) -> None:
        _tuples(self)
        if self.curriculum_steps < 1:
            raise ValueError(f"curriculum_steps must be >= 1, got {self.curriculum_steps}")
        for name in ("offset_start", "offset_end"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi <= HEATMAP_EXTENT_HW:
                raise ValueError(f"{name} must be (lo, hi) with 0 <= lo <= hi <= {HEATMAP_EXTENT_HW} half-widths "
                                 f"(the heatmap's extent), got {(lo, hi)}")
        lo, hi = self.normal_gap_hw
        if not 0 < lo <= hi:
            raise ValueError(f"normal_gap_hw must be (lo, hi) with 0 < lo <= hi half-widths, got {(lo, hi)}")


class PlanarContextMethod(Method):
    """Shared 2.5D machinery: three D2D-CNNs, planar inputs, the curriculum counter, Adam.

    **Training progress for the curriculum.** ``steps_done`` is a buffer counting training steps: it is
    incremented by ``training_step`` in train mode with gradients (the trainer calls it exactly once
    per optimiser step, also when a non-finite gradient skips the update, like the trainer's own step
    counter), and it is in the state dict, so the checkpoint carries it and a resumed run draws exactly
    the batches an uninterrupted one would. Progress is ``steps_done / curriculum_steps``. The
    alternatives were worse: a counter in the sampler is lost on resume, and the number of epochs is
    not known to the method. In **eval mode** the sampler draws from the final (widest) range: the
    trainer draws its fixed validation set in eval mode, so every val record, before and after a
    resume, measures the same full-range task. (With ``TrainConfig.prefetch`` the next batch is drawn after
    the step's forward pass, which counts the step, so a prefetching run draws exactly the batches of an
    inline one: ``medssl.train.loop._BatchSource``, tested in ``tests/train/test_determinism.py``.)
    """

    Config = PlanarContextConfig
    family = "context prediction"
    paper = PAPER
    planes_per_anchor = 6  # 3 orientations x (anchor, partner): distinct planar patches per anchor in a step

    def __init__(self, config: PlanarContextConfig) -> None:
        super().__init__(config)
        nets = [build_backbone(config.backbone, in_channels=config.in_channels * config.n_slices, spatial_dims=2,
                               embed_dim=config.embed_dim) for _ in ORIENTATIONS]
        self.backbone = xavier_init_(TriplanarDescriptor(nets))  # first, so Xavier and Reg2D/Heatmap start alike
        self.sampler = ContextPairSampler(config.patch_size_vox, config.n_slices, config.volumes_per_batch,
                                          config.patches_per_volume, config.normal_gap_hw, config.offset_start,
                                          config.offset_end, config.foreground_only)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ inputs

    @property
    def patches_per_step(self) -> int:
        """Distinct planar ``S x S x n_slices`` patches per step: ``planes_per_anchor`` per anchor (2.5D patches,
        not cubes: the count can equal the cube methods', their content cannot; the pretraining table says so)."""
        return self.planes_per_anchor * int(self.config.volumes_per_batch) * int(self.config.patches_per_volume)

    @property
    def input_size_vox(self) -> tuple[int, int, int]:
        """The bounding cube of the three planar patches (S in-plane on every axis)."""
        s = int(self.config.patch_size_vox)
        return (s, s, s)

    def cut_inputs(self, data: np.ndarray, centres_vox: np.ndarray) -> np.ndarray:
        """``(N, 3, C * n_slices, S, S)``: the three orthogonal planar patches at each centre voxel (batched)."""
        return triplanar_patches(data, centres_vox, self.config.patch_size_vox, self.config.n_slices)

    # ------------------------------------------------------------------ training

    def configure_optimizers(self, config: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
        return paper_adam(self, config)

    def curriculum_progress(self) -> float:
        """Training progress in ``[0, 1]`` that sets the in-plane offset range (class docstring)."""
        return min(1.0, int(self.steps_done) / self.config.curriculum_steps)

    def offset_range(self) -> tuple[float, float]:
        """``(lo, hi)`` offset magnitudes (half-widths) the next training batch is drawn from."""
        return curriculum_range(self.curriculum_progress() if self.training else 1.0, self.config.offset_start,
                                self.config.offset_end)

    def sample(self, volumes: Sequence[Volume], rng: np.random.Generator) -> PatchBatch:
        return self.sampler(volumes, rng, progress=self.curriculum_progress() if self.training else 1.0)

    def _count_step(self) -> None:
        if self.training and torch.is_grad_enabled():
            self.steps_done += 1


class _OffsetPrediction(PlanarContextMethod):
    """Reg2D and Heatmap: a head per orientation on (anchor, partner) descriptors predicts ``(Delta1, Delta2)``."""

    val_measure = ("offset_err_hw", "min")  # the pretext task: offset error in patch half-widths, val pairs

    def __init__(self, config: PlanarContextConfig) -> None:
        super().__init__(config)
        self.heads = xavier_init_(nn.ModuleList([self._head(2 * self.backbone.orientation_dim) for _ in ORIENTATIONS]))

    def _head(self, in_features: int) -> nn.Module:
        raise NotImplementedError

    def _loss(self, raw: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, raw: torch.Tensor) -> torch.Tensor:
        """``(B, 2)`` offsets from the head's output."""
        raise NotImplementedError

    def training_step(self, batch: PatchBatch) -> StepOutput:
        anchors, partners = batch.patches, batch.extras["partners"]  # (N, 3, C', S, S) each
        target = batch.extras["offsets"].float()  # (N, 3, 2) half-widths
        n = anchors.shape[0]
        losses, predicted = [], []
        for o, (net, head) in enumerate(zip(self.backbone.nets, self.heads)):
            f = net(torch.cat([anchors[:, o], partners[:, o]]))  # (2N, D): one pass for both patches
            raw = head(torch.cat([f[:n], f[n:]], dim=1))  # anchor first, partner second: Delta = partner - anchor
            losses.append(self._loss(raw, target[:, o]))
            predicted.append(self._decode(raw))
        loss = torch.stack(losses).mean()
        lo, hi = self.offset_range()
        self._count_step()
        logs = {"loss": float(loss.detach()), "offset_lo": lo, "offset_hi": hi, **anchor_logs(batch),
                **offset_error_logs(torch.stack(predicted, 1), target, batch.extras["half_width_mm"].float())}
        return StepOutput(loss=loss, logs=logs)


def anchor_logs(batch: PatchBatch) -> dict[str, float]:
    """The anchor rule's eligible share of the batch's volumes (mean over anchors) and its fallback rate."""
    share, fallback = batch.extras["anchor_eligible_share"], batch.extras["anchor_fallback"]
    return {"anchor_eligible_share": float(share.float().mean()), "anchor_fallback_rate": float(fallback.float().mean())}


def offset_error_logs(predicted: torch.Tensor, target: torch.Tensor, half_width_mm: torch.Tensor) -> dict[str, float]:
    """Pretext-task errors of ``(N, 3, 2)`` predicted vs true offsets (half-widths), overall and per orientation.

    ``offset_err_hw``: mean Euclidean error in half-widths; ``offset_err_mm``: the same in mm;
    ``offset_err_zero_hw``: the error of always predicting 0 (what a network that learned nothing scores
    at best, give or take the offset distribution's mean).
    """
    err = (predicted.detach().float() - target).norm(dim=-1)  # (N, 3)
    err_mm = ((predicted.detach().float() - target) * half_width_mm).norm(dim=-1)
    logs = {"offset_err_hw": float(err.mean()), "offset_err_mm": float(err_mm.mean()),
            "offset_err_zero_hw": float(target.norm(dim=-1).mean())}
    logs.update({f"offset_err_hw_{name}": float(err[:, o].mean()) for o, name in enumerate(ORIENTATIONS)})
    return logs


_PLANAR_DEMO_STEPS = 30 * 7  # the whole run; see the demo preset below
# LR_SWEEP: the demo's Adam learning rate, chosen with `medssl sweep --param lr` on the validation pretext measure
# at the demo budget (8 val subjects; 192 pairs; the last of 7 evaluations, step 210; issue 16). Lower is better
# for the offset error in half-widths (always answering 0 scores 1.309), higher for Doersch's 6-class accuracy:
#   lr        5e-5 (paper)  2e-4    1e-3    3e-3
#   reg2d     0.985         0.820   0.733   0.821
#   heatmap   1.128         0.999   0.862   1.072
#   doersch   0.664         0.781   0.789   0.656   (val loss 1.024 / 0.664 / 0.595 / 0.803)
# 1e-3 for all three (20x the paper's rate, for 1/3800 of its 800,000 steps).
DEMO_LR = 1e-3
PLANAR_PRESETS: dict[str, dict[str, Any]] = {
    # Blendowski et al. sec. 3: D2D-CNN, 42 x 42 x 3, batch 8, Adam 5e-5, 800,000 batches; the pretext task's
    # geometry is the config's default (the paper's, in half-widths).
    "paper": {
        "method": {"backbone": "d2d", "patch_size_vox": 42, "volumes_per_batch": 8, "patches_per_volume": 1,
                   "foreground_only": True, "curriculum_steps": PAPER_STEPS},
        "train": {"epochs": 800, "steps_per_epoch": 1000, "lr": 5e-5},
    },
    # 2-core CPU: the paper's pretext task, D2D-CNN and patches (126 x 126 x 9 mm on the demo's 3 mm grid); the
    # budget of the cube methods: 210 steps (30 x 7) with the whole curriculum, and 32 anchors per step (one from
    # each of 32 volumes) = 192 distinct planar patches (3 orientations x anchor and partner), the cube methods'
    # count of distinct patches (each 42 x 42 x 3 = 5,292 voxels against a 32^3 cube's 32,768: 2.5D planes cannot
    # match cubes in content; the pretraining table says so). Adam's lr was chosen on validation (LR_SWEEP).
    "demo": {
        "method": {"backbone": "d2d", "patch_size_vox": 42, "volumes_per_batch": 32, "patches_per_volume": 1,
                   "foreground_only": True, "curriculum_steps": _PLANAR_DEMO_STEPS},
        "train": {"epochs": 30, "steps_per_epoch": 7, "lr": DEMO_LR, "val_batches": 2},  # val: 64 anchors = 192 pairs
    },
}
@register_method("reg2d")
class Reg2D(_OffsetPrediction):
    """Reg2D: 2.5D planar context pairs, the 2-Param CNN regresses the in-plane offset (L1)."""

    presets = PLANAR_PRESETS

    def __init__(self, config: PlanarContextConfig) -> None:
        super().__init__(config)
        self.loss_fn = OffsetL1Loss()

    def _head(self, in_features: int) -> nn.Module:
        return TwoParamHead(in_features)

    def _loss(self, raw: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(raw, offsets)

    def _decode(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.detach().float()


@register_method("heatmap")
class Heatmap(_OffsetPrediction):
    """Heatmap: 2.5D planar context pairs, the Heatmap CNN regresses a 19 x 19 offset heatmap (MSE)."""

    presets = PLANAR_PRESETS

    def __init__(self, config: PlanarContextConfig) -> None:
        super().__init__(config)
        self.loss_fn = HeatmapMSELoss()

    def _head(self, in_features: int) -> nn.Module:
        return HeatmapHead(in_features)

    def _loss(self, raw: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(raw, offsets)

    def _decode(self, raw: torch.Tensor) -> torch.Tensor:
        return heatmap_offsets(raw)


# ---------------------------------------------------------------------------- 3D Doersch


@dataclass(frozen=True)
class DoerschConfig(MethodConfig):
    """Blendowski et al.'s 3D Doersch baseline: 25^3 cubes, batch 8; gap and jitter in mm (not given in the paper).

    ``patches_per_volume`` counts pairs (anchor and partner: two distinct cubes each).

    ``gap_mm``: extra distance between the anchor and its neighbour cube (>= the jitter, so they never
    overlap); ``jitter_mm``: uniform jitter of the partner's centre on every axis.
    """

    backbone: str = "d3d"
    patch_size_vox: int = 25
    volumes_per_batch: int = 8
    patches_per_volume: int = 1
    foreground_only: bool = True
    gap_mm: float = 6.0
    jitter_mm: float = 6.0


@register_method("doersch")
class Doersch(Method):
    """3D Doersch: which of the 6 face neighbours is the partner cube? (D3D-CNN + 6-Neighbour CNN, cross-entropy)."""

    Config = DoerschConfig
    family = "context prediction"
    paper = PAPER
    val_measure = ("accuracy", "max")  # the pretext task: which of the 6 neighbours, val pairs
    presets = {
        "paper": {
            "method": {"backbone": "d3d", "patch_size_vox": 25, "volumes_per_batch": 8, "patches_per_volume": 1,
                       "foreground_only": True},
            "train": {"epochs": 800, "steps_per_epoch": 1000, "lr": 5e-5},
        },
        # 2-core CPU: the D3D-CNN costs ~360 MFLOP per cube, which makes dense evaluation grids (tens of
        # thousands of points per volume) take minutes per volume here. The demo uses the SmallCNN at 25^3
        # with a 192-d output instead (0.45 M parameters, like the paper's ~0.4 M per descriptor network;
        # the ISImed demo swaps DenseNet121 for it the same way). The cube methods' budget: 210 steps of
        # 96 pairs (8 from each of 12 volumes) = 192 distinct cubes. Adam's lr was chosen on validation (LR_SWEEP).
        "demo": {
            "method": {"backbone": "smallcnn", "embed_dim": 192, "patch_size_vox": 25, "volumes_per_batch": 12,
                       "patches_per_volume": 8, "foreground_only": True},
            "train": {"epochs": 30, "steps_per_epoch": 7, "lr": DEMO_LR, "val_batches": 2},  # val: 192 pairs
        },
    }

    def __init__(self, config: DoerschConfig) -> None:
        super().__init__(config)
        self.backbone = backbone_from_config(config)
        self.head = SixNeighbourHead(2 * self.backbone.embed_dim)
        self.loss_fn = NeighbourCrossEntropy()
        self.sampler = NeighbourPairSampler(config.patch_size_vox, config.volumes_per_batch, config.patches_per_volume,
                                            config.gap_mm, config.jitter_mm, config.foreground_only)
        xavier_init_(self)

    @property
    def patches_per_step(self) -> int:
        """Distinct cubes per step: every pair's anchor and partner."""
        return self.sampler.cubes_per_pair * int(self.config.volumes_per_batch) * int(self.config.patches_per_volume)

    def configure_optimizers(self, config: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
        return paper_adam(self, config)

    def training_step(self, batch: PatchBatch) -> StepOutput:
        n = len(batch)
        f = self.backbone(torch.cat([batch.patches, batch.extras["partners"]]))  # (2N, D)
        logits = self.head(torch.cat([f[:n], f[n:]], dim=1))  # anchor first
        labels = batch.extras["labels"]
        loss = self.loss_fn(logits, labels)
        accuracy = float((logits.detach().argmax(1) == labels).float().mean())
        return StepOutput(loss=loss, logs={"loss": float(loss.detach()), "accuracy": accuracy, **anchor_logs(batch)})
