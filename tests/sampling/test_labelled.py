"""The labelled crop sampler: crops centred on labels at the asked rate, background padding, seeded draws."""

from __future__ import annotations

import numpy as np
import pytest

from medssl.data.volume import Volume
from medssl.sampling.labelled import LabelledCropSampler
from tests.helpers import oblique_affine

SHAPE = (20, 18, 16)


def _volume(seed: int) -> tuple[Volume, np.ndarray]:
    rng = np.random.default_rng(seed)
    codes = np.zeros(SHAPE, np.int16)
    codes[2:5, 3:6, 2:4] = 1  # a small organ near a corner: its crops reach outside the image
    data = rng.normal(size=(1, *SHAPE)).astype(np.float32) + 10.0
    return Volume(data, oblique_affine((1.2, 0.8, 2.5)), f"s{seed}", label=codes,
                  aux={"body": np.ones(SHAPE, np.uint8)}), codes


def test_crops_centred_on_labels_hold_the_label_at_their_centre_and_pad_with_background():
    vol, codes = _volume(0)
    s = LabelledCropSampler([vol], [codes], crop_size_vox=12, batch_size=6, labelled_fraction=1.0, seed=3)
    x, y = s()
    assert x.shape == (6, 1, 12, 12, 12) and y.shape == (6, 1, 12, 12, 12) and str(y.dtype) == "torch.int64"
    assert (y[:, 0, 6, 6, 6] == 1).all()  # every centre is a labelled voxel
    # the organ lies within 6 voxels of the x=0 face, so every crop reaches outside: background there
    assert (y[:, 0, 0] == 0).all() and float(x[:, 0, 0].min()) == pytest.approx(float(vol.data.min()))


def test_the_same_seed_gives_the_same_crops_and_another_seed_others():
    pairs = [_volume(0), _volume(1)]
    vols, codes = [p[0] for p in pairs], [p[1] for p in pairs]
    a = LabelledCropSampler(vols, codes, 8, 4, 0.5, seed=0)()
    b = LabelledCropSampler(vols, codes, 8, 4, 0.5, seed=0)()
    c = LabelledCropSampler(vols, codes, 8, 4, 0.5, seed=1)()
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_a_label_map_without_background_is_refused_and_counts_must_match():
    vol, _ = _volume(0)
    with pytest.raises(ValueError, match="without background"):
        LabelledCropSampler([vol], [np.ones(SHAPE, np.int16)], 8, 1, 1.0, seed=0)()
    with pytest.raises(ValueError, match="1 volumes but 2 label maps"):
        LabelledCropSampler([vol], [np.zeros(SHAPE), np.zeros(SHAPE)], 8, 1, 1.0, seed=0)
