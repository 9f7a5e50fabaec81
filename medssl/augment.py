"""View recipes for joint-embedding methods.

``CoarseDropoutShuffleViews``: the ISImed paper's SimCLR/BarlowTwins augmentation
(Jabareen et al., arXiv 2410.16947, sec. 2.2) -- random coarse dropout in
"foreground" mode (6 holes of 3^3..10^3 voxels filled) or "background" mode (6 kept
boxes of 3^3..21^3 voxels, everything else filled), then random coarse shuffle with
p = 0.8. Box sides are drawn per axis in the inclusive range the way MONAI
``RandCoarseDropout(spatial_size=lo, max_spatial_size=hi)`` draws them (see
``size_sampling`` for MONAI's ratcheting lower bound, and the option to switch it off).

Fill value: the paper used MONAI with its default ``fill_value=None``, which fills
every dropped voxel with uniform noise in ``[min, max)`` of that patch (all channels).
We keep that default; pass a number or a ``(lo, hi)`` range to change it.

Shuffle boxes: the paper does not give them; the authors' code uses 2 boxes of 6^3
voxels (``holes=2, spatial_size=6``), which we adopt as defaults.

Why not apply MONAI per patch: MONAI's transforms take one patch at a time, and on the CPU
two views of every patch through them cost a sizeable share of a SmallCNN training step. The
vectorised torch version below does the same on the whole batch at once, in less time; most
of its remaining cost is drawing the per-voxel fill noise, which MONAI's default fill requires.
Under heavy CPU contention the advantage shrinks (it uses torch's intra-op threads). Timings
belong in ``benchmarks/`` and the dated README, not here. ``monai_transform()``
builds the MONAI equivalent, which the tests use as the statistical reference.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["CoarseDropoutShuffleViews"]

_MODES = ("foreground", "background", "random")


class CoarseDropoutShuffleViews:
    """Two independent coarse-dropout + coarse-shuffle views of a batch of patches.

    Args:
        mode: "foreground" (drop holes), "background" (keep boxes, drop the rest) or
            "random" (one of the two per sample, 50/50, as the paper's ``OneOf``).
        holes: number of dropout holes / kept boxes per sample.
        fg_hole_size: inclusive (min, max) side in voxels of a foreground-mode hole.
        bg_keep_size: inclusive (min, max) side in voxels of a background-mode kept box.
        shuffle_prob: probability that a sample is coarse-shuffled.
        shuffle_holes, shuffle_size: number and side (voxels) of the shuffled boxes.
        fill_value: None (uniform noise in the patch's [min, max), MONAI's default),
            a number, or a (lo, hi) range for uniform noise.
        n_views: views per call (2 for SimCLR/BarlowTwins).
        size_sampling: "monai" (default) reproduces MONAI ``RandCoarseDropout``, which the
            paper's runs used: each box's side is drawn uniformly between the PREVIOUS
            box's side and the maximum, so later boxes are larger (mean dropped fraction at
            32^3: ~0.45 in background mode vs ~0.75 with independent sides).
            "independent" draws every side uniformly in [min, max], as the paper's text says.
        seed: seeds the fallback generator used when ``__call__`` gets no ``rng``.

    ``views = aug(patches (N, C, *S), rng) -> (n_views, N, C, *S)``; the same ``rng``
    state gives the same views.
    """

    def __init__(
        self,
        mode: str = "random",
        holes: int = 6,
        fg_hole_size: tuple[int, int] = (3, 10),
        bg_keep_size: tuple[int, int] = (3, 21),
        shuffle_prob: float = 0.8,
        shuffle_holes: int = 2,
        shuffle_size: int = 6,
        fill_value: float | tuple[float, float] | None = None,
        n_views: int = 2,
        size_sampling: str = "monai",
        seed: int = 0,
    ) -> None:
        if size_sampling not in ("monai", "independent"):
            raise ValueError(f'size_sampling must be "monai" or "independent", got {size_sampling!r}')
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        for name, (lo, hi) in (("fg_hole_size", fg_hole_size), ("bg_keep_size", bg_keep_size)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be (min, max) with 1 <= min <= max, got {(lo, hi)}")
        if holes < 1 or shuffle_holes < 0 or shuffle_size < 1 or n_views < 1:
            raise ValueError("holes, shuffle_size and n_views must be >= 1 and shuffle_holes >= 0")
        if not 0.0 <= shuffle_prob <= 1.0:
            raise ValueError(f"shuffle_prob must be in [0, 1], got {shuffle_prob}")
        self.mode = mode
        self.holes = int(holes)
        self.fg_hole_size = (int(fg_hole_size[0]), int(fg_hole_size[1]))
        self.bg_keep_size = (int(bg_keep_size[0]), int(bg_keep_size[1]))
        self.shuffle_prob = float(shuffle_prob)
        self.shuffle_holes = int(shuffle_holes)
        self.shuffle_size = int(shuffle_size)
        self.fill_value = fill_value
        self.n_views = int(n_views)
        self.size_sampling = size_sampling
        self._fallback_rng = np.random.default_rng(seed)

    def __call__(self, patches: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        """``patches (N, C, *S)`` -> views ``(n_views, N, C, *S)`` (input unchanged)."""
        if patches.ndim not in (4, 5):
            raise ValueError(f"patches must be (N, C, *S) with 2 or 3 spatial dims, got shape {tuple(patches.shape)}")
        rng = self._fallback_rng if rng is None else rng
        gen = torch.Generator(device=patches.device)
        gen.manual_seed(int(rng.integers(0, 2**63 - 1)))
        return torch.stack([self._one_view(patches, gen) for _ in range(self.n_views)])

    # -- one view -----------------------------------------------------------------

    def _one_view(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        foreground = self._pick_modes(n, x.device, gen)  # (N,) bool
        inside = self._union_of_random_boxes(x.shape[2:], foreground, gen)  # (N, *S) bool
        drop = torch.where(_expand(foreground, inside), inside, ~inside).unsqueeze(1)  # (N, 1, *S)
        out = torch.where(drop, self._fill(x, gen), x)
        return self._coarse_shuffle(out, gen)

    def _pick_modes(self, n: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
        if self.mode == "foreground":
            return torch.ones(n, dtype=torch.bool, device=device)
        if self.mode == "background":
            return torch.zeros(n, dtype=torch.bool, device=device)
        return torch.rand(n, generator=gen, device=device) < 0.5

    def _union_of_random_boxes(
        self, spatial: Sequence[int], foreground: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        n, d, dev = foreground.shape[0], len(spatial), foreground.device
        lo = torch.where(foreground, self.fg_hole_size[0], self.bg_keep_size[0]).view(n, 1, 1)
        hi = torch.where(foreground, self.fg_hole_size[1], self.bg_keep_size[1]).view(n, 1, 1)
        s = torch.tensor(list(spatial), device=dev).view(1, 1, d)
        u = torch.rand(n, self.holes, d, generator=gen, device=dev)
        if self.size_sampling == "independent":
            size = lo + (u * (hi - lo + 1)).long()  # sides uniform in [lo, hi] per axis
        else:
            # MONAI draws box k's side uniformly in [side of box k-1, hi]: the lower bound
            # ratchets up from box to box (RandCoarseTransform.randomize reuses `size`)
            sides, low = [], lo.view(n, 1)
            for h in range(self.holes):
                low = low + (u[:, h] * (hi.view(n, 1) - low + 1)).long()
                sides.append(low)
            size = torch.stack(sides, dim=1)
        size = torch.minimum(size, s)  # clipped to the patch, as MONAI's get_valid_patch_size
        start = (torch.rand(n, self.holes, d, generator=gen, device=dev) * (s - size + 1)).long()
        return _boxes_mask(start, start + size, spatial)

    def _fill(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.fill_value is not None and not isinstance(self.fill_value, (tuple, list)):
            return torch.full_like(x, float(self.fill_value))
        if self.fill_value is None:
            flat = x.flatten(1)
            lo = flat.amin(1).view(-1, *([1] * (x.ndim - 1)))
            hi = flat.amax(1).view(-1, *([1] * (x.ndim - 1)))
        else:
            lo, hi = (torch.tensor(float(v), dtype=x.dtype, device=x.device) for v in self.fill_value)
        # uniform_ in place is ~2x faster than torch.rand on CPU
        noise = torch.empty_like(x).uniform_(generator=gen)
        return torch.addcmul(lo, noise, hi - lo)

    def _coarse_shuffle(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Permute the voxels inside ``shuffle_holes`` boxes, each channel separately."""
        n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
        do = torch.rand(n, generator=gen, device=x.device) < self.shuffle_prob  # (N,)
        if self.shuffle_holes == 0 or not bool(do.any()):
            return x
        out = x.reshape(n, c, -1).clone()  # (N, C, V)
        d = len(spatial)
        s = torch.tensor(list(spatial), device=x.device)
        side = torch.minimum(torch.full_like(s, self.shuffle_size), s)  # (d,)
        strides = torch.tensor([int(np.prod(spatial[k + 1 :])) for k in range(d)], device=x.device)
        # flat offsets of the voxels of a box anchored at the origin, (V_box,)
        grids = torch.meshgrid(*[torch.arange(int(k), device=x.device) for k in side], indexing="ij")
        offsets = sum(g.reshape(-1) * st for g, st in zip(grids, strides))
        for _ in range(self.shuffle_holes):  # sequential, like MONAI: overlapping boxes shuffle twice
            start = (torch.rand(n, d, generator=gen, device=x.device) * (s - side + 1)).long()  # (N, d)
            idx = ((start * strides).sum(1, keepdim=True) + offsets).unsqueeze(1).expand(n, c, -1)  # (N, C, V_box)
            keys = torch.rand(idx.shape, generator=gen, device=x.device)
            perm = torch.argsort(keys, dim=-1)
            perm = torch.where(do.view(n, 1, 1), perm, torch.arange(idx.shape[-1], device=x.device))
            vals = out.gather(-1, idx)
            out.scatter_(-1, idx, vals.gather(-1, perm))
        return out.reshape(x.shape)

    # -- reference ------------------------------------------------------------------

    def monai_transform(self):
        """The MONAI transform that makes ONE view of ONE patch ``(C, *S)``.

        This is the reference the vectorised implementation reproduces (statistically;
        the random streams differ).
        """
        from monai.transforms import Compose, OneOf, RandCoarseDropout, RandCoarseShuffle

        fg = RandCoarseDropout(
            holes=self.holes,
            spatial_size=self.fg_hole_size[0],
            max_spatial_size=self.fg_hole_size[1],
            dropout_holes=True,
            fill_value=self.fill_value,
            prob=1.0,
        )
        bg = RandCoarseDropout(
            holes=self.holes,
            spatial_size=self.bg_keep_size[0],
            max_spatial_size=self.bg_keep_size[1],
            dropout_holes=False,
            fill_value=self.fill_value,
            prob=1.0,
        )
        dropout = {"foreground": fg, "background": bg}.get(self.mode) or OneOf([fg, bg])
        steps = [dropout]
        if self.shuffle_holes > 0:
            steps.append(
                RandCoarseShuffle(holes=self.shuffle_holes, spatial_size=self.shuffle_size, prob=self.shuffle_prob)
            )
        return Compose(steps)


def _expand(per_sample: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return per_sample.view(-1, *([1] * (like.ndim - 1)))


def _boxes_mask(start: torch.Tensor, end: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """Union of half-open boxes. ``start, end (N, H, d)`` -> ``(N, *spatial)`` bool.

    Each axis gets a bit field with bit ``h`` set where box ``h`` covers that index;
    a voxel is inside some box iff the AND of its axes' bit fields is non-zero. That is
    two passes over the full grid instead of two per box.
    """
    n, holes, d = start.shape
    mask = None
    for h0 in range(0, holes, 8):  # uint8 holds 8 boxes' bits
        field = None
        for k in range(d):
            ar = torch.arange(int(spatial[k]), device=start.device)
            s_k, e_k = start[:, h0 : h0 + 8, k, None], end[:, h0 : h0 + 8, k, None]
            inside = ((ar >= s_k) & (ar < e_k)).to(torch.uint8)  # (N, h, S_k)
            bits = torch.tensor([1 << b for b in range(inside.shape[1])], dtype=torch.uint8, device=start.device)
            bits_k = (inside * bits.view(1, -1, 1)).sum(1, dtype=torch.uint8)  # (N, S_k), distinct bits: sum == OR
            bits_k = bits_k.view(n, *[int(spatial[k]) if j == k else 1 for j in range(d)])
            field = bits_k if field is None else field & bits_k
        part = field != 0
        mask = part if mask is None else mask | part
    return mask
