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

**Speed.** The padded volume is held once as a torch tensor; ``Tensor.unfold`` along
the three axes at the grid stride gives a strided *view* ``(C, Gx, Gy, Gz, Px, Py, Pz)`` of
every grid patch (nothing copied). A batch is gathered run by run: a run is a stretch of
consecutive grid points along z in one ``(x, y)`` row, whose patches are one basic slice of
the view, copied into a preallocated ``(B, C, *P)`` buffer with one ``copy_`` (torch's
multi-threaded copy kernel; no per-patch Python loop and no fancy-index gather). The next
batch is gathered in a helper thread while the network runs on the current one (two
buffers, alternating). The network runs frozen (:func:`medssl.evaluate.embed.frozen`)
under the training loop's precision rule (:func:`medssl.train.precision.resolve_precision`:
bf16 autocast on CPUs with native bf16, where the backbones keep their tails in fp32),
unless ``precision="fp32"`` is asked for. ``benchmarks/segmentation.py`` measures the
result against the bare network.

Used by the cross-subject correspondence evaluation, the latent coordinate maps and the
kNN label transfer.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl._files import atomic_save_npy
from medssl.data.volume import Volume
from medssl.evaluate.embed import frozen, model_fingerprint
from medssl.geometry import box_start_for_centre, vox_to_world
from medssl.methods.base import cuts_cubes
from medssl.sampling.patches import padding_values
from medssl.sampling.regions import foreground_mask
from medssl.train.precision import autocast, resolve_precision

__all__ = ["DenseEmbedding", "dense_embeddings", "dense_grid"]

PADDING = "constant: per-channel minimum of the volume"


@dataclass(frozen=True)
class DenseEmbedding:
    """Embeddings on a regular sub-grid of a volume.

    Attributes:
        embeddings: ``(Gx, Gy, Gz, D)`` float32 (NaN at grid points off the foreground when
            only the foreground was embedded, see :attr:`computed`).
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

    @property
    def computed(self) -> np.ndarray:
        """``(Gx, Gy, Gz)`` bool: grid points that hold an embedding (all, unless ``foreground_only``)."""
        return ~np.isnan(self.embeddings[..., 0])

    @property
    def anchors_vox(self) -> list[np.ndarray]:
        """The grid's anchor voxels per array axis (int64): grid index ``i`` cuts its patch at voxel ``anchors[i]``."""
        return dense_grid(self.image_shape_vox, self.stride_vox, self.patch_size_vox)[0]


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


def _padded_windows(data: np.ndarray, anchors: list[np.ndarray], patch: tuple[int, int, int]) -> torch.Tensor:
    """A strided view ``(C, Gx, Gy, Gz, Px, Py, Pz)`` of every grid patch (no patch is copied).

    The volume is padded once (constant = per-channel minimum, ``P//2`` before and ``P``
    after each axis) into one float32 tensor; ``unfold`` at the grid stride, starting at the
    first anchor, then indexes every patch.
    """
    lo = [p // 2 for p in patch]
    fill = torch.from_numpy(padding_values(data))
    padded = fill[:, None, None, None].expand(data.shape[0], *(n + l + p for n, l, p in zip(data.shape[1:], lo, patch)))
    padded = padded.contiguous()
    padded[:, lo[0] : lo[0] + data.shape[1], lo[1] : lo[1] + data.shape[2], lo[2] : lo[2] + data.shape[3]] = \
        torch.from_numpy(np.array(data, dtype=np.float32))  # a copy: cached volumes are read-only memmaps
    # In padded coordinates the box of anchor c starts at c - P//2 + lo = c.
    view = padded[:, int(anchors[0][0]) :, int(anchors[1][0]) :, int(anchors[2][0]) :]
    for axis, (a, p) in enumerate(zip(anchors, patch), start=1):
        step = int(a[1] - a[0]) if len(a) > 1 else 1
        view = view.unfold(axis, p, step)
    return view[:, : len(anchors[0]), : len(anchors[1]), : len(anchors[2])]


def _cache_key(method: torch.nn.Module, checkpoint, volume: Volume, stride, patch, precision: str,
               foreground_only: bool) -> str:
    vol = hashlib.sha256(np.ascontiguousarray(volume.data, dtype=np.float32).tobytes())
    vol.update(np.asarray(volume.affine, dtype=np.float64).tobytes())
    spec = {
        "model": model_fingerprint(method, checkpoint),
        "volume": vol.hexdigest(),
        "case_id": str(volume.case_id),
        "stride_vox": list(stride),
        "patch_size_vox": list(patch),
        "padding": PADDING,
        "precision": precision,
        "foreground_only": bool(foreground_only),
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


def _row_runs(flat_index: np.ndarray, grid_shape: tuple[int, int, int]) -> np.ndarray:
    """``(R, 4)`` int64 runs ``(gx, gy, gz0, length)`` covering the sorted flat grid indices.

    A run is a stretch of consecutive grid points along z within one ``(x, y)`` row, so its
    patches are one basic slice of the window view.
    """
    if flat_index.size == 0:
        return np.zeros((0, 4), np.int64)
    gz_n = grid_shape[2]
    breaks = np.flatnonzero((np.diff(flat_index) != 1) | (np.diff(flat_index // gz_n) != 0)) + 1
    starts = np.concatenate([[0], breaks])
    lengths = np.diff(np.concatenate([starts, [flat_index.size]]))
    first = flat_index[starts]
    gx, rest = np.divmod(first, grid_shape[1] * gz_n)
    gy, gz = np.divmod(rest, gz_n)
    return np.stack([gx, gy, gz, lengths], axis=1).astype(np.int64)


def _batches(runs: np.ndarray, batch_size: int) -> list[list[tuple[int, int, int, int]]]:
    """Runs split and grouped so that each batch holds at most ``batch_size`` grid points, in order."""
    out: list[list[tuple[int, int, int, int]]] = [[]]
    room = batch_size
    for gx, gy, gz, length in runs.tolist():
        while length > 0:
            take = min(length, room)
            out[-1].append((gx, gy, gz, take))
            gz, length, room = gz + take, length - take, room - take
            if room == 0:
                out.append([])
                room = batch_size
    return [b for b in out if b]


class _CubeGather:
    """Fills a ``(B, C, *P)`` buffer with the grid patches of a batch of runs (one ``copy_`` per run)."""

    def __init__(self, data: np.ndarray, anchors: list[np.ndarray], patch: tuple[int, int, int]) -> None:
        self.windows = _padded_windows(data, anchors, patch)  # (C, Gx, Gy, Gz, *P) view
        self.item_shape = (data.shape[0], *patch)

    def __call__(self, batch: list[tuple[int, int, int, int]], out: torch.Tensor) -> int:
        o = 0
        for gx, gy, gz, length in batch:
            out[o : o + length].copy_(self.windows[:, gx, gy, gz : gz + length].movedim(0, 1))
            o += length
        return o


class _MethodGather:
    """A method's own inputs (``cut_inputs``, e.g. 2.5D planar patches) at the grid's anchor voxels."""

    def __init__(self, method: Any, data: np.ndarray, anchors: list[np.ndarray]) -> None:
        self.method, self.data, self.anchors = method, data, anchors
        probe = np.asarray(method.cut_inputs(data, np.array([[int(a[0]) for a in anchors]])))
        self.item_shape = tuple(probe.shape[1:])

    def __call__(self, batch: list[tuple[int, int, int, int]], out: torch.Tensor) -> int:
        ax, ay, az = self.anchors
        vox = np.concatenate([
            np.stack([np.full(n, ax[gx]), np.full(n, ay[gy]), az[gz : gz + n]], axis=1) for gx, gy, gz, n in batch
        ])  # (b, 3) anchor voxels in run order
        cut = np.asarray(self.method.cut_inputs(self.data, vox), dtype=np.float32)
        out[: len(vox)].copy_(torch.from_numpy(cut))
        return len(vox)


def _prefetched(gather: Any, batches: list, buffers: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Yield each batch's filled buffer; the next batch is gathered in a helper thread meanwhile.

    Two buffers alternate: batch ``i + 1`` is written into the buffer the network is not
    reading. The consumer must be done with a yielded tensor before asking for the next one.
    """
    if not batches:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(gather, batches[0], buffers[0])
        for i in range(len(batches)):
            n = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(gather, batches[i + 1], buffers[(i + 1) % 2])
            yield buffers[i % 2][:n]


def _embed_grid(
    method: Any,
    gather: Any,
    flat_index: np.ndarray,
    grid_shape: tuple[int, int, int],
    batch_size: int,
    device: str | torch.device,
    precision: str,
    progress: bool,
) -> tuple[np.ndarray, str]:
    """``(Gx * Gy * Gz, D)`` embeddings (NaN where not in ``flat_index``) and the precision (resolved) used."""
    from tqdm.auto import tqdm

    from medssl.evaluate.embed import _forward, _module_device

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    home = _module_device(method)
    target = home if str(device) == "auto" else torch.device(device)
    batches = _batches(_row_runs(flat_index, grid_shape), batch_size)
    size = min(batch_size, max(int(flat_index.size), 1))
    buffers = [torch.empty((size, *gather.item_shape), dtype=torch.float32) for _ in range(2)]
    out: np.ndarray | None = None
    o = 0
    if target != home:
        method.to(target)
    try:
        with frozen(method), autocast(target, precision):
            fn = _forward(method)
            for xb in tqdm(_prefetched(gather, batches, buffers), total=len(batches), desc="dense grid",
                           disable=not progress, leave=False):
                z = fn(xb.to(target))  # (b, D)
                if z.ndim != 2:
                    raise ValueError(f"the model returned shape {tuple(z.shape)}; expected (B, D) embeddings")
                if out is None:
                    out = np.full((int(np.prod(grid_shape)), z.shape[1]), np.nan, dtype=np.float32)
                out[flat_index[o : o + len(z)]] = z.detach().float().cpu().numpy()
                o += len(z)
    finally:
        if target != home:
            method.to(home)
    if out is None:
        raise ValueError("no grid points to embed (the foreground is empty)")
    return out, precision


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
    precision: str = "auto",
    foreground_only: bool = False,
) -> DenseEmbedding:
    """Embed a patch centred at every ``stride_vox``-th voxel of ``volume``.

    Args:
        method: a :class:`medssl.methods.Method` (an ``nn.Module`` with ``embed(x) -> (B, D)``
            and ``patch_size_vox``), run frozen (:func:`medssl.evaluate.embed.frozen`: eval
            mode, no-grad, every submodule's train/eval flag restored afterwards).
        volume: the image, ``data (C, X, Y, Z)``.
        stride_vox: grid step in voxels, one int or one per array axis.
        patch_size_vox: patch size; default the method's ``input_size_vox`` (its ``patch_size_vox``
            unless the method says otherwise). A method with its own ``cut_inputs`` gets its
            inputs cut by it at every grid anchor voxel.
        batch_size: patches per forward pass.
        device: ``"auto"`` (wherever the method's weights are) or a torch device
            (the method is moved there for the call and moved back afterwards).
        progress: show a tqdm bar.
        cache_dir: if given, the embeddings are cached there as ``.npy`` keyed by a
            hash of the method's weights (``medssl.evaluate.embed.model_fingerprint``:
            the checkpoint file's sha256 when ``checkpoint`` is given), the volume's
            voxels and affine, the grid settings and the precision (written atomically).
            Usually ``runs/<run>/eval/dense``.
        checkpoint: the checkpoint file the method was loaded from (cache key only).
        precision: ``"auto"`` (bf16 autocast where the CPU or GPU supports it, as in
            training; fp32 otherwise), ``"fp32"`` or ``"bf16"``.
        foreground_only: embed only grid points on the foreground (the body,
            :func:`medssl.sampling.regions.foreground_mask`); the others hold NaN.

    Returns:
        A :class:`DenseEmbedding`; ``embeddings`` has shape ``(Gx, Gy, Gz, D)`` with
        ``G = (n - 1) // stride + 1`` per axis.

    Raises:
        PreprocessingMismatchError: ``method`` was loaded from a checkpoint whose training
            volumes were preprocessed otherwise than ``volume`` (:mod:`medssl.train.preprocessing`).
    """
    if volume.data.ndim != 4:
        raise ValueError(f"{volume.source or volume.case_id}: data must be (C, X, Y, Z), got shape {volume.data.shape}")
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be 'auto', 'fp32', 'bf16' or 'fp16', got {precision!r}")
    from medssl.train.preprocessing import check_volume_preprocessing

    check_volume_preprocessing(method, volume)  # a checkpoint's encoder on volumes prepared otherwise: an error
    stride = _triple(stride_vox, "stride_vox")
    default_size = getattr(method, "input_size_vox", None) or method.patch_size_vox
    patch = _triple(default_size if patch_size_vox is None else patch_size_vox, "patch_size_vox")
    anchors, centres_axes = dense_grid(volume.shape_vox, stride, patch)
    mesh = np.stack(np.meshgrid(*centres_axes, indexing="ij"), axis=-1)  # (Gx, Gy, Gz, 3)
    grid_shape = tuple(int(n) for n in mesh.shape[:3])
    affine = np.asarray(volume.affine, dtype=np.float64)
    centres_mm = vox_to_world(affine, mesh.reshape(-1, 3)).reshape(mesh.shape)
    grid_to_vox = np.eye(4)
    grid_to_vox[:3, :3] = np.diag(stride)
    grid_to_vox[:3, 3] = [c[0] for c in centres_axes]
    fg = foreground_mask(volume)[np.ix_(*anchors)]  # the body: the training sampler's foreground rule

    home = _device_of(method)
    used = resolve_precision(precision, home if str(device) == "auto" else torch.device(device))
    cache_path = None
    emb = None
    if cache_dir is not None:
        key = _cache_key(method, checkpoint, volume, stride, patch, used, foreground_only)
        cache_path = Path(cache_dir) / f"{volume.case_id}-{key}.npy"
        emb = _cache_load(cache_path)
        if emb is not None and emb.shape[:3] != grid_shape:
            emb = None
    if emb is None:
        data = np.asarray(volume.data, dtype=np.float32)
        if cuts_cubes(method):
            gather: Any = _CubeGather(data, anchors, patch)
        else:  # the method cuts its own input (e.g. planar patches) at every grid anchor voxel
            gather = _MethodGather(method, data, anchors)
        flat_index = np.flatnonzero(fg.reshape(-1)) if foreground_only else np.arange(int(np.prod(grid_shape)))
        flat, _ = _embed_grid(method, gather, flat_index, grid_shape, batch_size, device, used, progress)
        emb = flat.reshape(*grid_shape, -1)
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


def _device_of(method: Any) -> torch.device:
    from medssl.evaluate.embed import _module_device

    return _module_device(method)
