"""SimSiam on crop pairs whose IoU lies in an interval (Konieczkowicz, AGH MSc thesis 2023), in 3D.

The thesis pretrains SimSiam (Chen & He, CVPR 2021) on positive pairs of crops whose IoU lies in
``[iou_min, iou_max]`` and finds [0.3, 0.6] best and random cropping ([0, 1]) worst, on 2D slices
only. Here: the IoU-pair sampler (:class:`medssl.sampling.iou_pairs.IoUPairSampler`, Algorithm 1,
3D by default, ``spatial_dims=2`` for the thesis setting), the thesis's per-crop augmentations
(:class:`medssl.augment_thesis.ThesisViewAugment`), SimSiam's projector and predictor, the
symmetric negative-cosine loss with stop-gradient, SGD with the thesis's schedule, and the
collapse coefficients (below) logged with the realised IoU histogram and the sampler's fallback rate.

**Collapse coefficients** (:func:`medssl.capacity.collapse_coefficient`, 0 = spread, 1 = one direction):

- ``collapse_p`` on the predictor output p (the thesis's measure), every step;
- ``collapse_h`` on the backbone output h (the representation every evaluation uses), every step: the
  only one of the three that no BatchNorm stands between, so a rank-1 backbone reads 1 here;
- ``collapse_z`` on the projection z (the SimSiam paper's measure), **on validation only** and taken
  **before** the projector's final non-affine BatchNorm. In training mode that BatchNorm standardises every
  channel over the batch, so z's coefficient read 0.02-0.04 whatever the backbone did (a rank-1 backbone
  gave 0.015); taking it before that BatchNorm does not help in training mode either (0.30 for a rank-1
  backbone: the projector's hidden BatchNorms re-spread it), so the training-mode z curve is dropped. On
  validation (eval mode, running statistics) the pre-BatchNorm z shows a projector whose last layer collapsed.

**What a "patch" is.** Each pair is two crops at different places; each crop is one distinct
patch and is embedded once (``views_per_patch = 1``). ``patches_per_volume`` counts crops (two
per pair, so it must be even): the demo's 12 volumes x 16 patches are 96 pairs = 192 patches per
step, the shared demo budget, with 192 forward passes (the two-view methods make 384).

Variants for the interval study (``medssl pipeline --plan iou_study``): ``simsiam`` is [0.3, 0.6];
``simsiam-iou-0-0``, ``simsiam-iou-0.0001-0.3``, ``simsiam-iou-0.6-1`` and ``simsiam-iou-0-1``
(random cropping) are the thesis's other intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medssl.augment_thesis import ThesisViewAugment
from medssl.capacity import collapse_coefficient
from medssl.data.volume import Volume
from medssl.distributed import world_size
from medssl.losses.simsiam import SimSiamLoss
from medssl.methods.base import (
    Method,
    MethodConfig,
    OptimizerSettings,
    StepOutput,
    backbone_from_config,
    register_method,
    register_variant,
)
from medssl.models.heads import ProjectionHead, mlp_blocks
from medssl.sampling.base import PatchBatch
from medssl.sampling.iou_pairs import IoUPairSampler, iou_histogram_logs
from medssl.sampling.patches import extract_patches

__all__ = ["SimSiam", "SimSiamConfig", "IOU_STUDY", "simsiam_param_groups"]

# The interval study: registry name -> (iou_min, iou_max), in the thesis's order (Table 4.2).
IOU_STUDY: dict[str, tuple[float, float]] = {
    "simsiam-iou-0-0": (0.0, 0.0),
    "simsiam-iou-0.0001-0.3": (0.0001, 0.3),
    "simsiam": (0.3, 0.6),
    "simsiam-iou-0.6-1": (0.6, 1.0),
    "simsiam-iou-0-1": (0.0, 1.0),
}

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True)
class SimSiamConfig(MethodConfig):
    """MethodConfig (``patches_per_volume`` counts crops, two per pair) plus the thesis's SimSiam.

    ``foreground_only`` puts crop 1's centre voxel on the body (crop 2 only has to fit in the volume);
    ``patch_size_vox`` is the size both crops are resized to (the network input).
    """

    iou_min: float = 0.3
    iou_max: float = 0.6
    crop_size_vox: int | None = None  # crop 1's edge before resizing (None: patch_size_vox)
    crop2_size_vox: int | None = None  # crop 2's edge (None: crop 1's); unequal sizes are an option
    crop2_draw: str = "analytic"  # "analytic" (offsets inside the interval) or "rejection" (Algorithm 1 verbatim)
    max_crop2_draws: int = 30  # r1
    max_crop1_draws: int = 4  # r2
    spatial_dims: int = 3  # 2: both crops on one axial slice, 2D networks (the thesis setting)
    augment: bool = True  # the thesis's per-crop augmentations
    projector_dim: int = 2048  # 3 layers of this width, BN (+ ReLU but the last; last BN non-affine)
    predictor_hidden_dim: int = 512  # bottleneck of the predictor projector_dim -> this -> projector_dim
    lr_reference_batch: int = 128  # lr = TrainConfig.lr * pairs per step (all ranks) / this
    final_lr_fraction: float = 4e-5  # cosine decay down to this fraction of the lr (thesis: 0.025 -> 1e-6)
    fixed_predictor_lr: bool = True  # the predictor keeps the initial lr (SimSiam sec. 4.4; thesis sec. 4.5)


@register_method("simsiam")
class SimSiam(Method):
    """SimSiam on crop pairs with IoU in [0.3, 0.6] (the thesis's best interval), collapse tracked on h, z and p.

    ``training_step`` logs ``loss``, ``collapse_h`` and ``collapse_p`` (over both views), ``collapse_z`` (eval mode
    only, before the final BatchNorm; module docstring), ``view_cosine`` (z1 vs z2), ``iou_mean``,
    ``fallback_rate`` and the realised IoU histogram ``iou_hist_*`` (:func:`medssl.sampling.iou_pairs.iou_histogram_logs`).
    """

    Config = SimSiamConfig
    family = "positive-pair selection"
    in_finetune_demo = True  # the demo's fine-tuning (variants too, when in the demo)
    paper = ("Konieczkowicz, Self-supervised learning for medical diagnosis and imaging, MSc thesis, AGH 2023 "
             "(IoU-interval positives); SimSiam: Chen & He, CVPR 2021")
    views_per_patch = 1
    presets = {
        # Thesis Table 4.1 (batch 128 pairs, SGD 0.025, cosine, wd 1e-5, 100 epochs) in 3D on the SwinUNETR
        # encoder. The crop size is ours: the thesis states only its 96 x 96 inference window.
        "paper": {"method": {"backbone": "swin", "patch_size_vox": 96, "volumes_per_batch": 64,
                             "patches_per_volume": 4},
                  "train": {"epochs": 100, "lr": 0.025, "weight_decay": 1e-5, "grad_clip_norm": None}},
        # 2-core CPU: the shared demo budget, equal in steps and distinct patches: 210 steps (30 x 7, as every
        # other demo method) of 12 volumes x 16 crops = 96 pairs = 192 distinct patches; narrow heads, the
        # thesis's optimiser (lr 0.025 at 128 pairs). Until issue 16 it ran 168 steps (24 x 7) to match the
        # two-view methods' wall time instead; the pretraining table now reports the wall time of each.
        "demo": {"method": {"projector_dim": 256, "predictor_hidden_dim": 64},
                 "train": {"epochs": 30, "steps_per_epoch": 7, "lr": 0.025, "weight_decay": 1e-5,
                           "grad_clip_norm": None}},
        "tiny": {"method": {"projector_dim": 32, "predictor_hidden_dim": 8},
                 "train": {"lr": 0.025, "weight_decay": 1e-5}},
    }

    def __init__(self, config: SimSiamConfig) -> None:
        super().__init__(config)
        if int(config.patches_per_volume) % 2:
            raise ValueError(f"simsiam: patches_per_volume counts crops (two per pair) and must be even, "
                             f"got {config.patches_per_volume}")
        if config.spatial_dims not in (2, 3):
            raise ValueError(f"simsiam: spatial_dims must be 2 or 3, got {config.spatial_dims}")
        self.backbone = backbone_from_config(config, spatial_dims=config.spatial_dims)
        w = int(config.projector_dim)
        self.projector = ProjectionHead(mlp_blocks([self.backbone.embed_dim, w, w, w], last_norm_affine=False))
        assert isinstance(self.projector.layers[-1], nn.BatchNorm1d)  # _project reads z before it
        self.predictor = ProjectionHead(mlp_blocks([w, int(config.predictor_hidden_dim), w], last_norm=None))
        self.loss_fn = SimSiamLoss()
        p = int(config.patch_size_vox)
        self.sampler = IoUPairSampler(
            p if config.crop_size_vox is None else int(config.crop_size_vox),
            config.iou_min,
            config.iou_max,
            volumes_per_batch=config.volumes_per_batch,
            pairs_per_volume=int(config.patches_per_volume) // 2,
            crop2_size_vox=config.crop2_size_vox,
            output_size_vox=p,
            crop1_on_body=config.foreground_only,
            max_crop2_draws=config.max_crop2_draws,
            max_crop1_draws=config.max_crop1_draws,
            crop2_draw=config.crop2_draw,
            spatial_dims=config.spatial_dims,
        )
        self.views = ThesisViewAugment(spatial_dims=config.spatial_dims) if config.augment else None

    # ------------------------------------------------------------------ geometry of the input

    @property
    def patch_size_vox(self) -> tuple[int, int, int]:
        p = int(self.config.patch_size_vox)
        return (p, p, 1) if self.config.spatial_dims == 2 else (p, p, p)

    def cut_inputs(self, data: np.ndarray, centres_vox: np.ndarray) -> np.ndarray:
        """Cubes (3D) or axial squares ``(N, C, S, S)`` (2D) around the centre voxels."""
        cut = extract_patches(data, centres_vox, self.input_size_vox)
        return cut[..., 0] if self.config.spatial_dims == 2 else cut

    @property
    def pairs_per_step(self) -> int:
        return self.patches_per_step // 2

    # ------------------------------------------------------------------ training

    def sample(self, volumes: Sequence[Volume], rng: np.random.Generator) -> PatchBatch:
        batch = self.sampler(volumes, rng)
        if self.views is not None:
            batch.extras["views"] = self.views(batch.patches, rng)  # (N, C, *S), row k augments patches[k]
        return batch

    def training_step(self, batch: PatchBatch) -> StepOutput:
        x = batch.extras.get("views", batch.patches)
        (h1, y1, z1), (h2, y2, z2) = self._project(x[0::2]), self._project(x[1::2])  # crop 1 / crop 2 of every pair
        p1, p2 = self._predict(z1), self._predict(z2)
        loss = self.loss_fn(p1, p2, z1, z2)
        z_before_bn = None if self.training else torch.cat([y1, y2])  # module docstring: blind in train mode
        logs = {"loss": float(loss.detach()), **collapse_logs(torch.cat([h1, h2]), torch.cat([p1, p2]), z_before_bn),
                "view_cosine": float(F.cosine_similarity(z1.detach(), z2.detach(), dim=1).mean()), **pair_logs(batch)}
        return StepOutput(loss=loss, logs=logs)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(h, z before the final BatchNorm, z)`` of inputs ``x``: the projector run in two parts."""
        h = self.backbone(x)  # (P, D), fp32 tail
        with torch.autocast(device_type=h.device.type, enabled=False):  # heads (BatchNorm, cosine) in fp32
            layers = self.projector.layers
            y = layers[:-1](h.float())  # layers[-1] is the final non-affine BatchNorm (mlp_blocks)
            return h, y, layers[-1](y)

    def _predict(self, z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self.predictor(z.float())

    def configure_optimizers(self, config: OptimizerSettings) -> tuple[torch.optim.Optimizer, Any]:
        """SGD (momentum 0.9), lr = ``config.lr`` x pairs per step (all ranks) / ``lr_reference_batch``.

        Cosine decay per epoch to ``final_lr_fraction`` of that lr, except the predictor, whose lr stays
        fixed; weight decay ``config.weight_decay`` on weights only, never on biases and normalisation
        parameters (thesis sec. 4.5). Group 0 is the decayed backbone/projector group (the lr ``fit`` logs).
        """
        lr = config.lr * self.pairs_per_step * world_size() / self.config.lr_reference_batch
        groups = simsiam_param_groups(self, config.weight_decay, self.config.fixed_predictor_lr)
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9)
        cosine = CosineFactor(config.epochs, self.config.final_lr_fraction)
        factors = [ConstantFactor() if g["fixed_lr"] else cosine for g in groups]
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def simsiam_param_groups(model: SimSiam, weight_decay: float, fixed_predictor_lr: bool) -> list[dict[str, Any]]:
    """SGD parameter groups: (backbone + projector | predictor) x (weights | biases and norms).

    Every group carries ``fixed_lr`` (the predictor's, when ``fixed_predictor_lr``) and ``name``.
    """
    predictor = {id(p) for p in model.predictor.parameters()}
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {(a, b): [] for a in (False, True) for b in (True, False)}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                decays = not (isinstance(module, _NORMS) or name == "bias")
                buckets[(id(p) in predictor, decays)].append(p)
    groups = []
    for (is_pred, decays), params in buckets.items():
        if params:
            groups.append({"params": params, "weight_decay": weight_decay if decays else 0.0,
                           "fixed_lr": bool(is_pred and fixed_predictor_lr),
                           "name": f"{'predictor' if is_pred else 'encoder'}_{'weights' if decays else 'no_decay'}"})
    return groups


class CosineFactor:
    """lr factor after ``epoch`` epochs: ``f + (1 - f) (1 + cos(pi e / E)) / 2`` (picklable scheduler state)."""

    def __init__(self, epochs: int, final_fraction: float) -> None:
        self.epochs, self.final_fraction = int(epochs), float(final_fraction)

    def __call__(self, epoch: int) -> float:
        t = min(epoch, self.epochs) / max(self.epochs, 1)
        return self.final_fraction + (1.0 - self.final_fraction) * 0.5 * (1.0 + math.cos(math.pi * t))


class ConstantFactor:
    """lr factor 1 at every epoch (SimSiam's fixed predictor lr)."""

    def __call__(self, epoch: int) -> float:
        return 1.0


def collapse_logs(h: torch.Tensor, p: torch.Tensor, z_before_bn: torch.Tensor | None = None) -> dict[str, float]:
    """Collapse coefficients of the backbone output h and the predictor output p (both views stacked), and of z
    before the projector's final BatchNorm when given (eval mode only; :class:`SimSiam`'s module docstring)."""
    named = {"collapse_h": h, "collapse_p": p, **({} if z_before_bn is None else {"collapse_z": z_before_bn})}
    out = {}
    for key, value in named.items():
        value = value.detach()
        out[key] = collapse_coefficient(value) if bool(torch.isfinite(value).all()) else float("nan")
    return out


def pair_logs(batch: PatchBatch) -> dict[str, float]:
    """Realised IoU (mean and histogram) and the share of pairs that fell back, from the sampler's extras."""
    iou = batch.extras["pair_iou"].detach().cpu().numpy()
    fallback = batch.extras["pair_fallback"].detach().cpu().numpy()
    return {"iou_mean": float(iou.mean()), "fallback_rate": float(fallback.mean()), **iou_histogram_logs(iou)}


for _name, (_lo, _hi) in IOU_STUDY.items():
    if _name != "simsiam":
        register_variant(_name, "simsiam", f"SimSiam with IoU in [{_lo:g}, {_hi:g}]"
                         + (" (random cropping)" if (_lo, _hi) == (0.0, 1.0) else ""),
                         in_demo=(_lo, _hi) == (0.0, 1.0), iou_min=_lo, iou_max=_hi)
