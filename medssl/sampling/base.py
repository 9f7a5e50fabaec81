"""Patch batches and the sampler contract.

A sampler is a callable ``sampler(volumes, rng) -> PatchBatch``. The public
``__call__`` validates its inputs; each subclass writes only ``_sample``. The
geometry of every patch travels with it: centres in world millimetres, voxel
boxes, and the index of the volume it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence

import numpy as np
import torch

from medssl.data.volume import Volume
from medssl.geometry import as_size
from medssl.sampling.regions import check_fits


@dataclass
class PatchBatch:
    """Patches plus their geometry.

    Attributes:
        patches: ``(N, C, *S)`` float32.
        centres_mm: ``(N, 3)`` float32, world (RAS) millimetres of each patch centre.
        boxes_vox: ``(N, 6)`` int64, ``[x0, y0, z0, x1, y1, z1)`` half-open voxel boxes.
        volume_index: ``(N,)`` int64, index into ``case_ids``.
        case_ids: the case id of each volume the batch was drawn from.
        extras: method-specific tensors with a leading batch axis where it makes
            sense, e.g. ``views`` ``(2, N, C, *S)`` for two-view methods, or pair
            targets for context prediction.
    """

    patches: torch.Tensor
    centres_mm: torch.Tensor
    boxes_vox: torch.Tensor
    volume_index: torch.Tensor
    case_ids: list[str] = field(default_factory=list)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.patches.shape[0])

    @staticmethod
    def concat(batches: Sequence["PatchBatch"]) -> "PatchBatch":
        """One batch from several (e.g. the shards of DDP ranks): rows in order, volume indices offset.

        Only batches without ``extras`` (whose batch axis differs between methods) can be joined.
        """
        if any(b.extras for b in batches):
            raise ValueError("PatchBatch.concat cannot join batches with extras")
        offsets = np.cumsum([0] + [len(b.case_ids) for b in batches[:-1]])
        return PatchBatch(
            patches=torch.cat([b.patches for b in batches]),
            centres_mm=torch.cat([b.centres_mm for b in batches]),
            boxes_vox=torch.cat([b.boxes_vox for b in batches]),
            volume_index=torch.cat([b.volume_index + int(o) for b, o in zip(batches, offsets)]),
            case_ids=[c for b in batches for c in b.case_ids],
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PatchBatch":
        """Move every tensor to ``device`` (a new batch; this one is unchanged)."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=non_blocking)
            elif isinstance(v, dict):
                v = {k: t.to(device, non_blocking=non_blocking) if isinstance(t, torch.Tensor) else t for k, t in v.items()}
            moved[f.name] = v
        return PatchBatch(**moved)


class PatchSampler:
    """Base class. Subclasses implement ``_sample``; ``__call__`` validates first: at least one volume, every
    volume fits a patch, and all have the same number of channels (a batch is one array)."""

    def __init__(self, patch_size_vox: int | Sequence[int]) -> None:
        self.patch_size_vox: tuple[int, int, int] = as_size(patch_size_vox)

    def __call__(self, volumes: Sequence[Volume], rng: np.random.Generator) -> PatchBatch:
        if len(volumes) == 0:
            raise ValueError("sampler got no volumes")
        for v in volumes:
            check_fits(v, self.patch_size_vox)
        for v in volumes:
            if v.n_channels != volumes[0].n_channels:
                raise ValueError(f"{v.source or v.case_id}: has {v.n_channels} channels but {volumes[0].case_id} has "
                                 f"{volumes[0].n_channels}; all volumes in a pool need the same channels")
        return self._sample(volumes, rng)

    def _sample(self, volumes: Sequence[Volume], rng: np.random.Generator) -> PatchBatch:
        raise NotImplementedError
