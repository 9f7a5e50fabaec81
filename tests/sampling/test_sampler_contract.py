"""What ``PatchSampler.__call__`` checks for every sampler: the methods' own samplers refuse a pool whose
volumes have different channel counts, naming the odd volume, before drawing anything."""

from __future__ import annotations

import numpy as np
import pytest

from medssl.methods import create_method, list_methods
from medssl.sampling.base import PatchSampler
from tests.helpers import coordinate_volume, oblique_affine


def _samplers():
    seen = {}
    for name in list_methods():
        sampler = getattr(create_method(name), "sampler", None)
        if isinstance(sampler, PatchSampler):
            seen.setdefault(type(sampler).__name__, sampler)
    return seen


SAMPLERS = _samplers()


def test_every_sampler_class_of_the_methods_is_covered():
    assert {"UniformPatchSampler", "IoUPairSampler", "ContextPairSampler", "NeighbourPairSampler",
            "PointInputSampler"} <= set(SAMPLERS)


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
def test_a_pool_with_mixed_channel_counts_is_refused_by_name(kind):
    affine = oblique_affine((1.0, 1.5, 2.5), (10, -20, 30), (5.0, -3.0, 12.0))
    one = coordinate_volume("one", (96, 96, 80), affine, channels="x")
    two = coordinate_volume("two", (96, 96, 80), affine, channels="xy")
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    with pytest.raises(ValueError, match=r"two: has 2 channels but one has 1"):
        SAMPLERS[kind]([one, two], rng)
    assert rng.bit_generator.state == state  # refused before drawing anything
    SAMPLERS[kind]([one, one], rng)  # the same channels: drawn
