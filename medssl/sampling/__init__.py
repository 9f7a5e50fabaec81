"""Every patch-drawing rule: training samplers ``sampler(volumes, rng) -> PatchBatch`` and evaluation sets.

- ``base``: :class:`PatchBatch` and the :class:`PatchSampler` contract.
- ``regions``: the one "does a patch fit" check and the one foreground rule (the body).
- ``patches``: cutting patches out (plain copies; constant padding outside the image).
- ``uniform``: :class:`UniformPatchSampler` (ISImed and the two-view methods).
- ``context``: the context-prediction samplers and 2.5D planar patch cutting.
- ``iou_pairs``: pairs of crops whose IoU lies in an interval (IoU-based SimSiam).
- ``sets``: evaluation sets (uniform centres, position-matched labelled sets, pairs).
- ``labelled``: :class:`~medssl.sampling.labelled.LabelledCropSampler`, image and label crops for supervised training.
"""

from medssl.sampling.base import PatchBatch, PatchSampler
from medssl.sampling.uniform import UniformPatchSampler

__all__ = ["PatchBatch", "PatchSampler", "UniformPatchSampler"]
