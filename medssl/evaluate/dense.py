"""Dense embeddings: one patch embedding at every ``stride``-th voxel of a volume.

The grid is a regular sub-grid of the image grid. Grid point ``(i, j, k)`` holds
the embedding of the half-open voxel box ``[c - P//2, c - P//2 + P)`` per axis,
where ``c = start + index * stride`` is an integer voxel index and ``P`` the
patch size. Its centre (what every table, map and query uses) is the box centre
``(x0 + x1 - 1) / 2`` of ``medssl.geometry`` -- ``c`` for odd ``P``, ``c - 0.5``
for even ``P`` -- and its world position comes from the image affine, so the grid
has its own exact affine ``grid_affine`` (grid index -> world mm of the patch
centre).

**Padding.** Boxes near the border reach outside the image. Every grid point
still gets a patch: outside voxels are filled with a constant, the per-channel
minimum of the volume (the background level after intensity scaling, e.g. air
in CT). Edge replication would smear tissue at the border into the outside and
make border patches look like a different anatomy; a constant background reads
as "edge of the field of view", which is what it is.

Used by the cross-subject correspondence evaluation and the latent coordinate
maps (design/evaluation.md sections 5 and 7).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl._files import atomic_save_npy
from medssl.data.volume import Volume
from medssl.evaluate.embed import embed_patches, model_fingerprint
from medssl.methods.base import cuts_cubes
from medssl.sampling.patches import padding_values
from medssl.sampling.regions import foreground_mask
from medssl.geometry import box_start_for_centre, vox_to_world

__all__ = ["DenseEmbedding", "dense_embeddings", "dense_grid"]

PADDING = "constant: per-channel minimum of the volume"


@dataclass(frozen=True)
class DenseEmbedding:
    """Embeddings on a regular sub-grid of a volume.

    Attributes:
        embeddings: ``(Gx, Gy, Gz, D)`` float32.
        centres_vox: ``(Gx, Gy, Gz, 3)`` float64, patch-box centres as (fractional)
            voxel indices of the image grid.
        centres_mm: ``(Gx, Gy, Gz, 3)`` float64, world mm (RAS) of those centres.
        grid_affine: ``(4, 4)`` grid index -> world mm of the patch centre.
        image_affine: ``(4, 4)`` the image's voxel -> world mm affine.
        image_shape_vox: ``(X, Y, Z)`` of the image.
        stride_vox: grid step per array axis, in voxels.
        patch_size_vox: patch size per array axis, in voxels.
        foreground: ``(Gx, Gy, Gz)`` bool, the image's foreground at the grid
            centre voxel (:func:`medssl.sampling.regions.foreground_mask`: the body,
            the training sampler's rule).
        case_id: the volume's case id.
        padding: how border patches were padded.
    """

    embeddings: np.ndarray
    centres_vox: np.ndarray
    centres_mm: np.ndarray
    grid_affine: np.ndarray
    image_affine: np.ndarray
    image_shape_vox: tuple[int, int, int]
    stride_vox: tuple[int, int, int]
    patch_size_vox: tuple[int, int, int]
    foreground: np.ndarray
    case_id: str
    padding: str = PADDING

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.embeddings.shape[:3])  # type: ignore[return-value]

    @property
    def embed_dim(self) -> int:
        return int(self.embeddings.shape[-1])

    @property
    def flat_embeddings(self) -> np.ndarray:
        """``(N, D)`` with ``N = Gx * Gy * Gz`` (C order)."""
        return self.embeddings.reshape(-1, self.embed_dim)

    @property
    def flat_centres_mm(self) -> np.ndarray:
        """``(N, 3)``, same order as :attr:`flat_embeddings`."""
        return self.centres_mm.reshape(-1, 3)

    @property
    def flat_foreground(self) -> np.ndarray:
        return self.foreground.reshape(-1)


def _triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    t = (value,) * 3 if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
    if len(t) != 3 or min(t) < 1:
        raise ValueError(f"{name} must be a positive int or 3 positive ints, got {value!r}")
    return t  # type: ignore[return-value]


def dense_grid(
    shape_vox: Sequence[int], stride_vox: int | Sequence[int], patch_size_vox: int | Sequence[int]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The grid's anchor voxels and patch-box centres per array axis.

    Along an axis of ``n`` voxels with stride ``s`` there are ``(n - 1) // s + 1``
    anchors ``c``, centred in the image; the box is ``[c - P//2, c - P//2 + P)``.

    Returns:
        ``(anchors_vox, centres_vox)``: two lists of three 1D arrays (int64 and
        float64); ``centres = anchors - P//2 + (P - 1) / 2``.
    """
    stride = _triple(stride_vox, "stride_vox")
    patch = _triple(patch_size_vox, "patch_size_vox")
    anchors, centres = [], []
    for n, s, p in zip(shape_vox, stride, patch):
        g = (int(n) - 1) // s + 1
        start = ((int(n) - 1) - (g - 1) * s) // 2
        a = start + s * np.arange(g, dtype=np.int64)
        anchors.append(a)
        centres.append(box_start_for_centre(a, p) + (p - 1) / 2.0)  # the centre-voxel rule of medssl.geometry
    return anchors, centres


def _window_view(volume: Volume, anchors: list[np.ndarray], patch: tuple[int, int, int]) -> np.ndarray:
    """A read-only view ``(C, Gx, Gy, Gz, Px, Py, Pz)`` of all grid patches (no copy of patches).

    The volume is padded once (constant = per-channel minimum); a sliding-window
    view sub-sampled at the anchors then indexes every patch without Python loops.
    """
    data = np.asarray(volume.data, dtype=np.float32)
    lo = [p // 2 for p in patch]
    hi = [p for p in patch]
    fill = padding_values(data)
    padded = np.empty((data.shape[0], *(n + l + h for n, l, h in zip(data.shape[1:], lo, hi))), np.float32)
    padded[...] = fill[:, None, None, None]
    padded[:, lo[0] : lo[0] + data.shape[1], lo[1] : lo[1] + data.shape[2], lo[2] : lo[2] + data.shape[3]] = data
    windows = np.lib.stride_tricks.sliding_window_view(padded, patch, axis=(1, 2, 3))
    # In padded coordinates the box of anchor c starts at c - P//2 + lo = c.
    # Anchors are arithmetic progressions, so basic slicing keeps this a view.
    sl = tuple(slice(int(a[0]), int(a[-1]) + 1, int(a[1] - a[0]) if len(a) > 1 else 1) for a in anchors)
    return windows[:, sl[0], sl[1], sl[2]]


def _cache_key(method: torch.nn.Module, checkpoint, volume: Volume, stride, patch) -> str:
    vol = hashlib.sha256(np.ascontiguousarray(volume.data, dtype=np.float32).tobytes())
    vol.update(np.asarray(volume.affine, dtype=np.float64).tobytes())
    spec = {
        "model": model_fingerprint(method, checkpoint),
        "volume": vol.hexdigest(),
        "case_id": str(volume.case_id),
        "stride_vox": list(stride),
        "patch_size_vox": list(patch),
        "padding": PADDING,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def _cache_load(path: Path) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None  # a damaged cache entry is recomputed, never trusted


def _cache_save(path: Path, array: np.ndarray) -> None:
    atomic_save_npy(path, array)


class _GridPatches:
    """Lazy ``(N, C, *P)`` patch sequence over a window view, for ``embed_patches``.

    Slicing copies only the requested batch, so a 17k-patch grid never exists as
    one 2 GB array.
    """

    def __init__(self, windows: np.ndarray) -> None:
        self.windows = windows  # (C, Gx, Gy, Gz, *P) view
        grid = windows.shape[1:4]
        self.index = np.unravel_index(np.arange(int(np.prod(grid))), grid)
        self.shape = (len(self.index[0]), windows.shape[0], *windows.shape[4:])
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, sl: slice) -> np.ndarray:
        gx, gy, gz = (i[sl] for i in self.index)
        return np.ascontiguousarray(np.moveaxis(self.windows[:, gx, gy, gz], 1, 0))  # (B, C, *P)


class _GridInputs:
    """Lazy inputs cut by a method's own ``cut_inputs`` at the grid's centre voxels (e.g. 2.5D planar patches)."""

    def __init__(self, method: Any, data: np.ndarray, centres_vox: np.ndarray) -> None:
        self.method, self.data, self.centres = method, data, centres_vox
        probe = np.asarray(method.cut_inputs(data, centres_vox[:1]))
        self.shape = (len(centres_vox), *probe.shape[1:])
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, sl: slice) -> np.ndarray:
        return np.asarray(self.method.cut_inputs(self.data, self.centres[sl]), dtype=np.float32)


def dense_embeddings(
    method: Any,
    volume: Volume,
    stride_vox: int | Sequence[int] = 4,
    patch_size_vox: int | Sequence[int] | None = None,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> DenseEmbedding:
    """Embed a patch centred at every ``stride_vox``-th voxel of ``volume``.

    Args:
        method: a :class:`medssl.methods.Method` (an ``nn.Module`` with ``embed(x) -> (B, D)``
            and ``patch_size_vox``). Embedded through ``medssl.evaluate.embed.embed_patches``:
            eval mode, no-grad, every submodule's train/eval flag restored afterwards.
        volume: the image, ``data (C, X, Y, Z)``.
        stride_vox: grid step in voxels, one int or one per array axis.
        patch_size_vox: patch size; default the method's ``input_size_vox`` (its ``patch_size_vox``
            unless the method says otherwise). A method with its own ``cut_inputs`` gets its
            inputs cut by it at every grid centre voxel.
        batch_size: patches per forward pass.
        device: ``"auto"`` (wherever the method's weights are) or a torch device
            (the method is moved there for the call and moved back afterwards).
        progress: show a tqdm bar.
        cache_dir: if given, the embeddings are cached there as ``.npy`` keyed by a
            hash of the method's weights (``medssl.evaluate.embed.model_fingerprint``:
            the checkpoint file's sha256 when ``checkpoint`` is given), the volume's
            voxels and affine, and the grid settings (written atomically). Usually
            ``runs/<run>/eval/dense``.
        checkpoint: the checkpoint file the method was loaded from (cache key only).

    Returns:
        A :class:`DenseEmbedding`; ``embeddings`` has shape ``(Gx, Gy, Gz, D)`` with
        ``G = (n - 1) // stride + 1`` per axis.
    """
    if volume.data.ndim != 4:
        raise ValueError(f"{volume.source or volume.case_id}: data must be (C, X, Y, Z), got shape {volume.data.shape}")
    stride = _triple(stride_vox, "stride_vox")
    default_size = getattr(method, "input_size_vox", None) or method.patch_size_vox
    patch = _triple(default_size if patch_size_vox is None else patch_size_vox, "patch_size_vox")
    anchors, centres_axes = dense_grid(volume.shape_vox, stride, patch)
    mesh = np.stack(np.meshgrid(*centres_axes, indexing="ij"), axis=-1)  # (Gx, Gy, Gz, 3)
    affine = np.asarray(volume.affine, dtype=np.float64)
    centres_mm = vox_to_world(affine, mesh.reshape(-1, 3)).reshape(mesh.shape)
    grid_to_vox = np.eye(4)
    grid_to_vox[:3, :3] = np.diag(stride)
    grid_to_vox[:3, 3] = [c[0] for c in centres_axes]
    fg = foreground_mask(volume)[np.ix_(*anchors)]  # the body: the training sampler's foreground rule

    cache_path = None
    emb = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"{volume.case_id}-{_cache_key(method, checkpoint, volume, stride, patch)}.npy"
        emb = _cache_load(cache_path)
        if emb is not None and emb.shape[:3] != mesh.shape[:3]:
            emb = None
    if emb is None:
        if cuts_cubes(method):
            inputs: Any = _GridPatches(_window_view(volume, anchors, patch))
        else:  # the method cuts its own input (e.g. planar patches) at every grid centre voxel
            grid_vox = np.stack(np.meshgrid(*anchors, indexing="ij"), axis=-1).reshape(-1, 3)
            inputs = _GridInputs(method, np.asarray(volume.data, dtype=np.float32), grid_vox)
        flat = embed_patches(method, inputs, batch_size=batch_size, device=device, progress=progress)
        emb = flat.reshape(*mesh.shape[:3], -1)
        if cache_path is not None:
            _cache_save(cache_path, emb)
    return DenseEmbedding(
        embeddings=emb,
        centres_vox=mesh,
        centres_mm=centres_mm,
        grid_affine=affine @ grid_to_vox,
        image_affine=affine,
        image_shape_vox=volume.shape_vox,
        stride_vox=stride,
        patch_size_vox=patch,
        foreground=fg,
        case_id=str(volume.case_id),
    )
