"""Patch samplers: ``sampler(volumes, rng) -> PatchBatch``."""

from medssl.sampling.base import PatchBatch, PatchSampler
from medssl.sampling.uniform import UniformPatchSampler

__all__ = ["PatchBatch", "PatchSampler", "UniformPatchSampler"]
