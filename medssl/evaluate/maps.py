"""Latent coordinate maps: the first 3 principal components of dense embeddings as RGB.

The PCA and the per-component colour scaling are
fitted on TRAINING subjects only and then applied to a held-out subject, so a
colour means the same latent position in every subject.

**Grid choice.** The map is computed on the dense (strided) grid and then
resampled (trilinear, borders clamped) onto the image's own voxel grid, so the
saved NIfTI has exactly the image's shape and affine and any viewer overlays it
without resampling. The resampling is done in voxel-index space: the dense grid
is an axis-aligned sub-grid of the image grid (centre of grid point ``g`` along an
axis is ``c0 + g * stride`` voxels), which stays exact for oblique, anisotropic
affines because both grids share the image affine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from medssl._files import atomic_path
from medssl.data.volume import Volume
from medssl.evaluate.dense import DenseEmbedding, dense_embeddings
from medssl.geometry import vox_to_world, world_to_vox

__all__ = [
    "LatentMap",
    "LatentMapSet",
    "LatentRGBFrame",
    "fit_latent_rgb",
    "latent_map",
    "load_latent_map",
    "point_query",
    "save_latent_map",
    "upsample_to_image",
    "write_latent_maps",
]

_RGB24 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])


@dataclass(frozen=True)
class LatentRGBFrame:
    """PCA(3) of training embeddings plus a robust per-component scaling to [0, 1].

    Attributes:
        mean: ``(D,)`` training mean.
        components: ``(3, D)`` principal axes (sign-oriented, see :func:`fit_latent_rgb`).
        lo, hi: ``(3,)`` percentiles of the training scores mapped to 0 and 1.
        explained_variance_ratio: ``(3,)``.
    """

    mean: np.ndarray
    components: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    explained_variance_ratio: np.ndarray

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """``(..., D) -> (..., 3)`` PC scores."""
        e = np.asarray(embeddings, dtype=np.float64)
        return (e - self.mean) @ self.components.T

    def to_rgb(self, embeddings: np.ndarray) -> np.ndarray:
        """``(..., D) -> (..., 3)`` float32 RGB in ``[0, 1]`` (clipped outside the percentiles)."""
        s = self.scores(embeddings)
        span = np.where(self.hi > self.lo, self.hi - self.lo, 1.0)
        return np.clip((s - self.lo) / span, 0.0, 1.0).astype(np.float32)


def _as_training_matrix(train: np.ndarray | Sequence[DenseEmbedding]) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(train, np.ndarray):
        return np.asarray(train, dtype=np.float64).reshape(-1, train.shape[-1]), None
    emb = np.concatenate([d.flat_embeddings[d.flat_foreground] for d in train])
    mm = np.concatenate([d.flat_centres_mm[d.flat_foreground] for d in train])
    return emb.astype(np.float64), mm


def fit_latent_rgb(
    train: np.ndarray | Sequence[DenseEmbedding],
    centres_mm: np.ndarray | None = None,
    percentiles: tuple[float, float] = (1.0, 99.0),
    seed: int = 0,
) -> LatentRGBFrame:
    """Fit the PCA(3) colour frame on training embeddings.

    Args:
        train: ``(N, D)`` training embeddings, or dense embeddings of training
            subjects (their foreground grid points are used).
        centres_mm: ``(N, 3)`` world mm of the training embeddings (taken from the
            dense embeddings when those are given). If known, each component's sign
            is chosen so it correlates positively with the axis it correlates with
            most, so colours point the same way for every method.
        percentiles: training-score percentiles mapped to 0 and 1 (robust to outliers).
        seed: PCA solver seed.
    """
    emb, mm = _as_training_matrix(train)
    mm = mm if centres_mm is None else np.asarray(centres_mm, dtype=np.float64).reshape(-1, 3)
    if emb.shape[0] < 3:
        raise ValueError(f"need at least 3 training embeddings for PCA(3), got {emb.shape[0]}")
    n_comp = min(3, emb.shape[1], emb.shape[0])
    pca = PCA(n_components=n_comp, random_state=seed).fit(emb)
    components = np.zeros((3, emb.shape[1]))
    components[:n_comp] = pca.components_
    scores = (emb - pca.mean_) @ components.T
    if mm is not None and len(mm) == len(emb):
        for k in range(n_comp):
            if np.std(scores[:, k]) == 0:
                continue  # a component with no variance has no direction to orient
            corr = [np.corrcoef(scores[:, k], mm[:, a])[0, 1] if np.std(mm[:, a]) > 0 else 0.0 for a in range(3)]
            corr = np.nan_to_num(corr)
            if corr[int(np.argmax(np.abs(corr)))] < 0:
                components[k] *= -1
                scores[:, k] *= -1
    lo, hi = np.percentile(scores, percentiles, axis=0)
    evr = np.zeros(3)
    evr[:n_comp] = pca.explained_variance_ratio_
    return LatentRGBFrame(pca.mean_, components, lo, hi, evr)


def upsample_to_image(grid_values: np.ndarray, dense: DenseEmbedding, order: int = 1) -> np.ndarray:
    """Resample values on the dense grid onto the image's voxel grid.

    Args:
        grid_values: ``(Gx, Gy, Gz, K)`` on ``dense``'s grid.
        dense: gives the grid geometry.
        order: spline order (1 = trilinear, 0 = nearest).

    Returns:
        ``(X, Y, Z, K)`` float32, voxel ``i`` holding the value interpolated at grid
        coordinate ``(i - c0) / stride``; clamped to the border grid values outside.
    """
    values = np.asarray(grid_values, dtype=np.float32)
    if values.shape[:3] != dense.grid_shape:
        raise ValueError(f"grid_values has grid shape {values.shape[:3]}, the dense grid is {dense.grid_shape}")
    origin = dense.centres_vox[0, 0, 0]
    axes = [(np.arange(n) - origin[a]) / dense.stride_vox[a] for a, n in enumerate(dense.image_shape_vox)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))  # (3, X, Y, Z) fractional grid indices
    out = np.empty((*dense.image_shape_vox, values.shape[3]), dtype=np.float32)
    for k in range(values.shape[3]):
        out[..., k] = ndimage.map_coordinates(values[..., k], coords, order=order, mode="nearest")
    return out


@dataclass(frozen=True)
class LatentMap:
    """An RGB latent coordinate map on an image's voxel grid.

    Attributes:
        rgb: ``(X, Y, Z, 3)`` float32 in ``[0, 1]``.
        affine: ``(4, 4)`` voxel -> world mm, the image's own affine.
        case_id: the subject.
        method: the method whose embeddings made it.
    """

    rgb: np.ndarray
    affine: np.ndarray
    case_id: str = ""
    method: str = ""


def latent_map(dense: DenseEmbedding, frame: LatentRGBFrame, method: str = "") -> LatentMap:
    """Colour a subject's dense grid with ``frame`` and resample it onto its image grid."""
    rgb_grid = frame.to_rgb(dense.embeddings)  # (Gx, Gy, Gz, 3)
    rgb = np.clip(upsample_to_image(rgb_grid, dense), 0.0, 1.0)
    return LatentMap(
        rgb=rgb, affine=np.asarray(dense.image_affine, dtype=np.float64), case_id=dense.case_id, method=method
    )


def save_latent_map(path: str | os.PathLike, rgb: np.ndarray | LatentMap, image_volume: Volume) -> Path:
    """Write an RGB map as an RGB24 NIfTI with ``image_volume``'s affine (atomically).

    RGB24 (NIfTI datatype 128) is shown in colour by NiiVue, 3D Slicer and
    ITK-SNAP. ``rgb``: ``(X, Y, Z, 3)`` in ``[0, 1]`` on the image's voxel grid.
    """
    path = Path(path)
    values = rgb.rgb if isinstance(rgb, LatentMap) else np.asarray(rgb)
    if values.shape != (*image_volume.shape_vox, 3):
        raise ValueError(
            f"{path}: the map has shape {values.shape}, expected {(*image_volume.shape_vox, 3)} "
            f"(the voxel grid of {image_volume.source or image_volume.case_id}); upsample with upsample_to_image first"
        )
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{path}: the map has non-finite values")
    u8 = np.round(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)
    packed = np.empty(image_volume.shape_vox, dtype=_RGB24)
    packed["R"], packed["G"], packed["B"] = u8[..., 0], u8[..., 1], u8[..., 2]
    affine = np.asarray(image_volume.affine, dtype=np.float64)
    img = nib.Nifti1Image(packed, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path, "".join(path.suffixes) or ".nii.gz") as tmp:  # nibabel picks the format from the suffix
        nib.save(img, tmp)
    return path


def load_latent_map(path: str | os.PathLike) -> LatentMap:
    """Read a map written by :func:`save_latent_map` -> ``LatentMap`` (rgb in [0, 1])."""
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.dtype.names is None or set(data.dtype.names) != {"R", "G", "B"}:
        raise ValueError(f"{path}: not an RGB24 NIfTI (dtype {data.dtype})")
    rgb = np.stack([data["R"], data["G"], data["B"]], axis=-1).astype(np.float32) / 255.0
    return LatentMap(rgb=rgb, affine=np.asarray(img.affine, dtype=np.float64), case_id=Path(path).name)


def _point_query_dense(a: DenseEmbedding, b: DenseEmbedding, pts: np.ndarray) -> np.ndarray:
    # The query patch is the A grid point nearest (in mm) to the asked point.
    ia = NearestNeighbors(n_neighbors=1).fit(a.flat_centres_mm).kneighbors(pts)[1][:, 0]
    ib = NearestNeighbors(n_neighbors=1).fit(b.flat_embeddings).kneighbors(a.flat_embeddings[ia])[1][:, 0]
    return b.flat_centres_mm[ib]


def _point_query_map(a: LatentMap, b: LatentMap, pts: np.ndarray) -> np.ndarray:
    ijk = np.rint(world_to_vox(a.affine, pts)).astype(int)
    ijk = np.clip(ijk, 0, np.asarray(a.rgb.shape[:3]) - 1)
    colours = a.rgb[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
    hit = NearestNeighbors(n_neighbors=1).fit(b.rgb.reshape(-1, 3)).kneighbors(colours)[1][:, 0]
    vox_b = np.stack(np.unravel_index(hit, b.rgb.shape[:3]), axis=1)
    return vox_to_world(b.affine, vox_b)


def point_query(a: DenseEmbedding | LatentMap, b: DenseEmbedding | LatentMap, point_mm_a: np.ndarray) -> np.ndarray:
    """Answer "where in subject B is this point of subject A?".

    With dense embeddings, the full embedding at the A grid point nearest to the
    point is matched to B's grid (exact kNN). With latent maps (only 3 PCs, so
    coarser), the RGB colour at A's voxel is matched to B's voxels.

    Args:
        a, b: both :class:`DenseEmbedding` or both :class:`LatentMap`.
        point_mm_a: ``(3,)`` or ``(N, 3)`` world mm in A.

    Returns:
        ``(3,)`` or ``(N, 3)`` world mm in B (a grid centre or voxel centre of B).
    """
    pts = np.asarray(point_mm_a, dtype=np.float64)
    single = pts.ndim == 1
    pts = pts.reshape(-1, 3)
    if isinstance(a, DenseEmbedding) and isinstance(b, DenseEmbedding):
        out = _point_query_dense(a, b, pts)
    elif isinstance(a, LatentMap) and isinstance(b, LatentMap):
        out = _point_query_map(a, b, pts)
    else:
        raise TypeError(
            f"a and b must both be DenseEmbedding or both LatentMap, got {type(a).__name__}, {type(b).__name__}"
        )
    return out[0] if single else out


@dataclass(frozen=True)
class LatentMapSet:
    """What :func:`write_latent_maps` made.

    Attributes:
        frames: ``{method: LatentRGBFrame}`` fitted on the training subjects.
        maps: ``{(method, case_id): LatentMap}``.
        map_paths: ``{(method, case_id): path}`` of the RGB NIfTIs.
        image_paths: ``{case_id: path}`` of the images, same grid and affine.
    """

    frames: dict[str, LatentRGBFrame]
    maps: dict[tuple[str, str], LatentMap]
    map_paths: dict[tuple[str, str], Path]
    image_paths: dict[str, Path]

    def overlays(self, case_id: str) -> dict[str, Path]:
        """``{method: map path}`` of one subject, for :func:`medssl.viz.viewers.niivue_viewer`."""
        return {m: p for (m, c), p in self.map_paths.items() if c == case_id}

    def table(self) -> Any:
        """One row per map: method, case, file, PCA explained variance of the 3 colours."""
        import pandas as pd

        rows = [
            {"method": m, "case_id": c, "map": str(p), "image": str(self.image_paths[c]),
             **{f"evr_pc{k + 1}": float(self.frames[m].explained_variance_ratio[k]) for k in range(3)}}
            for (m, c), p in self.map_paths.items()
        ]  # fmt: skip
        return pd.DataFrame(rows)


def write_latent_maps(
    methods: Mapping[str, Any],
    train_volumes: Sequence[Volume],
    volumes: Sequence[Volume],
    out_dir: str | os.PathLike,
    stride_vox: int | Sequence[int] = 4,
    dense: dict[tuple[str, str], DenseEmbedding] | None = None,
    **dense_kwargs: Any,
) -> LatentMapSet:
    """Latent coordinate maps of ``volumes`` for every method, written as NIfTI into ``out_dir``.

    Per method: dense embeddings of ``train_volumes`` fit the PCA(3) colour frame
    (:func:`fit_latent_rgb`); each of ``volumes`` (held out) is coloured with it and
    saved as ``<case>_<method>.nii.gz`` (RGB24, the image's affine) beside its image
    ``<case>_image.nii.gz``.

    Args:
        dense: ``{(method, case_id): DenseEmbedding}`` store shared with the
            correspondence evaluation (reused and filled).
        dense_kwargs: passed to :func:`medssl.evaluate.dense.dense_embeddings`.
    """
    from medssl.data.io import write_nifti

    out = Path(out_dir)
    store: dict[tuple[str, str], DenseEmbedding] = {} if dense is None else dense

    def _dense(name: str, vol: Volume) -> DenseEmbedding:
        key = (name, str(vol.case_id))
        if key not in store:
            store[key] = dense_embeddings(methods[name], vol, stride_vox=stride_vox, **dense_kwargs)
        return store[key]

    image_paths = {str(v.case_id): write_nifti(out / f"{v.case_id}_image.nii.gz", np.asarray(v.data[0]), v.affine)
                   for v in volumes}  # fmt: skip
    frames, made, paths = {}, {}, {}
    for name in methods:
        frames[name] = fit_latent_rgb([_dense(name, v) for v in train_volumes])
        for v in volumes:
            key = (name, str(v.case_id))
            made[key] = latent_map(_dense(name, v), frames[name], method=name)
            paths[key] = save_latent_map(out / f"{v.case_id}_{name}.nii.gz", made[key], v)
    return LatentMapSet(frames=frames, maps=made, map_paths=paths, image_paths=image_paths)
