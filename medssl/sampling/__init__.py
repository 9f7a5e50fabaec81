"""Patch samplers: ``sampler(volumes, rng) -> PatchBatch``."""

from medssl.sampling.base import PatchBatch, PatchSampler

__all__ = ["PatchBatch", "PatchSampler"]
