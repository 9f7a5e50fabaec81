"""Click-to-query and brushing logic of the linked viewers, free of widgets (unit-testable).

- :class:`NiiVueGrid`: how NiiVue addresses a NIfTI volume. Its crosshair position
  (``scene.crosshair_pos``, the ``frac`` of a ``location_change`` event) is a fraction
  of the volume's RAS-reoriented voxel grid: ``frac = (v_ras + 0.5) / dims_ras``.
  NiiVue reports ``mm`` too, but in its default (non-``is_slice_mm``) mode that is an
  "orthogonal" mm which drops the rotation of an oblique grid; going through ``frac``
  and the NIfTI affine gives true world mm for every grid.
- :class:`LatentPointQuery`: a click in subject A -> the matched point in subject B
  (nearest latent neighbour, :func:`medssl.evaluate.maps.point_query`), the latent
  distance, and, where the truth is known, the true point and the error in mm.
- :func:`latent_neighbours`, :func:`selection_mask`, :func:`grid_point_table`: the
  scatter <-> image brushing of the latent-space explorer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import nibabel as nib
import numpy as np
import pandas as pd

from medssl.evaluate.dense import DenseEmbedding
from medssl.evaluate.maps import point_query, upsample_to_image
from medssl.geometry import vox_to_world, world_to_vox

__all__ = [
    "LatentPointQuery",
    "NiiVueGrid",
    "PointMatch",
    "grid_point_table",
    "latent_neighbours",
    "body_masked_rgba",
    "nifti_bytes",
    "selection_mask",
]


def _niivue_ras_permutation(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NiiVue's ``calculateRAS`` rule: which array axis runs along world x, y, z, and flips.

    Returns ``(perm, flip)``: ``perm[w]`` is the array axis shown along world axis
    ``w``; ``flip[w]`` is True where that array axis runs towards -w. The tie-breaks
    follow NiiVue's (strict ``>``), so a 45-degree grid is reoriented the same way.
    """
    r = np.abs(np.asarray(affine, dtype=np.float64)[:3, :3])  # r[world, array]
    world_of = [0, 0, 0]  # world axis of each array axis
    if r[1, 0] > r[0, 0]:
        world_of[0] = 1
    if r[2, 0] > r[0, 0] and r[2, 0] > r[1, 0]:
        world_of[0] = 2
    if world_of[0] == 0:
        world_of[1] = 1 if r[1, 1] > r[2, 1] else 2
    elif world_of[0] == 1:
        world_of[1] = 0 if r[0, 1] > r[2, 1] else 2
    else:
        world_of[1] = 0 if r[0, 1] > r[1, 1] else 1
    world_of[2] = 3 - world_of[0] - world_of[1]
    perm = np.empty(3, dtype=int)
    for array_axis, world_axis in enumerate(world_of):
        perm[world_axis] = array_axis
    a = np.asarray(affine, dtype=np.float64)
    flip = np.array([a[w, perm[w]] < 0 for w in range(3)])
    return perm, flip


@dataclass(frozen=True)
class NiiVueGrid:
    """A volume's grid as NiiVue sees it: ``frac`` <-> voxel index <-> world mm.

    Attributes:
        affine: ``(4, 4)`` voxel -> world mm of the NIfTI NiiVue loaded (``nib.load(p).affine``).
        shape_vox: ``(X, Y, Z)``.
    """

    affine: np.ndarray
    shape_vox: tuple[int, int, int]

    @classmethod
    def from_nifti(cls, path: str | os.PathLike) -> "NiiVueGrid":
        """The grid of a NIfTI file, with the affine exactly as stored (float32 sform/qform)."""
        img = nib.load(str(path))
        if len(img.shape) < 3:
            raise ValueError(f"{path}: NiiVue needs a 3D volume, got shape {img.shape}")
        return cls(np.asarray(img.affine, dtype=np.float64), tuple(int(s) for s in img.shape[:3]))

    def _ras(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        perm, flip = _niivue_ras_permutation(self.affine)
        dims_ras = np.asarray(self.shape_vox, dtype=np.float64)[perm]
        return perm, flip, dims_ras

    def vox_to_frac(self, vox: np.ndarray) -> np.ndarray:
        """``(3,)`` or ``(N, 3)`` voxel indices (fractional allowed) -> NiiVue ``frac``, same shape."""
        v = np.asarray(vox, dtype=np.float64)
        perm, flip, dims = self._ras()
        v_ras = v[..., perm]
        v_ras = np.where(flip, dims - 1.0 - v_ras, v_ras)
        return (v_ras + 0.5) / dims

    def frac_to_vox(self, frac: np.ndarray) -> np.ndarray:
        """NiiVue ``frac`` -> voxel indices of the NIfTI's own array (fractional), same shape."""
        f = np.asarray(frac, dtype=np.float64)
        perm, flip, dims = self._ras()
        v_ras = f * dims - 0.5
        v_ras = np.where(flip, dims - 1.0 - v_ras, v_ras)
        out = np.empty_like(v_ras)
        out[..., perm] = v_ras
        return out

    def frac_to_mm(self, frac: np.ndarray) -> np.ndarray:
        """NiiVue ``frac`` ``(3,)`` or ``(N, 3)`` -> world mm (true world, also for oblique grids)."""
        f = np.asarray(frac, dtype=np.float64)
        mm = vox_to_world(self.affine, self.frac_to_vox(f).reshape(-1, 3))
        return mm.reshape(f.shape)

    def mm_to_frac(self, point_mm: np.ndarray) -> np.ndarray:
        """World mm ``(3,)`` or ``(N, 3)`` -> NiiVue ``frac`` (for ``scene.crosshair_pos``)."""
        p = np.asarray(point_mm, dtype=np.float64)
        return self.vox_to_frac(world_to_vox(self.affine, p.reshape(-1, 3))).reshape(p.shape)

    def mm_to_vox(self, point_mm: np.ndarray) -> np.ndarray:
        p = np.asarray(point_mm, dtype=np.float64)
        return world_to_vox(self.affine, p.reshape(-1, 3)).reshape(p.shape)


@dataclass(frozen=True)
class PointMatch:
    """One click-to-query answer. All points are world mm (RAS), voxels index the NIfTI arrays.

    Attributes:
        query_mm_a: the clicked point in A.
        query_vox_a: its (fractional) voxel index in A's image.
        patch_mm_a: centre of A's dense-grid patch used as the query (nearest to the click).
        matched_mm_b: the B grid point whose embedding is nearest to that patch's.
        matched_vox_b: its voxel index in B's image (a patch centre; half-integers for even patches).
        frac_b: NiiVue crosshair position of the match in B's viewer.
        latent_distance: L2 distance between the two embeddings (latent units).
        true_mm_b: the true corresponding point in B (None when unknown).
        error_mm: ``|matched - true|`` in mm (None when unknown).
    """

    query_mm_a: np.ndarray
    query_vox_a: np.ndarray
    patch_mm_a: np.ndarray
    matched_mm_b: np.ndarray
    matched_vox_b: np.ndarray
    frac_b: np.ndarray
    latent_distance: float
    true_mm_b: np.ndarray | None = None
    error_mm: float | None = None

    def summary(self, case_a: str = "A", case_b: str = "B") -> str:
        """One line of plain text, e.g. for a status label."""
        fmt = lambda p: "(" + ", ".join(f"{v:.1f}" for v in p) + ") mm"  # noqa: E731
        text = (
            f"{case_a} {fmt(self.query_mm_a)} -> {case_b} {fmt(self.matched_mm_b)}; "
            f"latent distance {self.latent_distance:.3g}"
        )
        if self.true_mm_b is not None:
            text += f"; true point {fmt(self.true_mm_b)}, error {self.error_mm:.1f} mm"
        return text

    def as_dict(self) -> dict:
        """JSON-friendly: arrays as lists."""
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items()}


class LatentPointQuery:
    """Answer clicks in subject A with the matched point of subject B.

    The match is :func:`medssl.evaluate.maps.point_query` on the dense embeddings
    (the patch of A nearest to the click, then its nearest latent neighbour in B);
    this class adds what a viewer shows: the latent distance, B's NiiVue crosshair
    position and, with ``true_map_fn``, the true point and the error.

    Args:
        dense_a, dense_b: dense embeddings of the two subjects (same method).
        grid_a, grid_b: the NiiVue grids of the volumes shown for A and B (their
            images; the maps share their grids).
        true_map_fn: optional ``(N, 3) mm in A -> (N, 3) mm in B``, e.g.
            ``functools.partial(cohort.correspondence, case_a, case_b)``.
    """

    def __init__(
        self,
        dense_a: DenseEmbedding,
        dense_b: DenseEmbedding,
        grid_a: NiiVueGrid,
        grid_b: NiiVueGrid,
        true_map_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        if dense_a.embed_dim != dense_b.embed_dim:
            raise ValueError(
                f"dense embeddings of {dense_a.case_id} ({dense_a.embed_dim}-D) and {dense_b.case_id} "
                f"({dense_b.embed_dim}-D) come from different methods"
            )
        self.dense_a, self.dense_b = dense_a, dense_b
        self.grid_a, self.grid_b = grid_a, grid_b
        self.true_map_fn = true_map_fn

    def from_mm(self, point_mm_a: np.ndarray) -> PointMatch:
        """Query a world point of A ``(3,)``."""
        p = np.asarray(point_mm_a, dtype=np.float64).reshape(3)
        a, b = self.dense_a, self.dense_b
        matched = np.asarray(point_query(a, b, p), dtype=np.float64).reshape(3)
        # point_query answers with grid centres; find their indices for the latent distance
        ia = int(np.argmin(np.sum((a.flat_centres_mm - p) ** 2, axis=1)))
        ib = int(np.argmin(np.sum((b.flat_centres_mm - matched) ** 2, axis=1)))
        latent = float(np.linalg.norm(a.flat_embeddings[ia].astype(np.float64) - b.flat_embeddings[ib]))
        truth = error = None
        if self.true_map_fn is not None:
            truth = np.asarray(self.true_map_fn(p[None]), dtype=np.float64).reshape(3)
            error = float(np.linalg.norm(matched - truth))
        return PointMatch(
            query_mm_a=p,
            query_vox_a=self.grid_a.mm_to_vox(p),
            patch_mm_a=a.flat_centres_mm[ia].astype(np.float64),
            matched_mm_b=matched,
            matched_vox_b=self.grid_b.mm_to_vox(matched),
            frac_b=self.grid_b.mm_to_frac(matched),
            latent_distance=latent,
            true_mm_b=truth,
            error_mm=error,
        )

    def from_frac(self, frac_a: Sequence[float]) -> PointMatch:
        """Query NiiVue's crosshair position in A's viewer (a ``location_change`` event's ``frac``)."""
        return self.from_mm(self.grid_a.frac_to_mm(np.asarray(frac_a, dtype=np.float64).reshape(3)))

    def from_vox(self, vox_a: Sequence[float]) -> PointMatch:
        """Query a voxel index of A's image."""
        return self.from_mm(vox_to_world(self.grid_a.affine, np.asarray(vox_a, dtype=np.float64))[0])


def latent_neighbours(dense: DenseEmbedding, point_mm: np.ndarray, k: int = 50,
                      candidates: np.ndarray | None = None) -> tuple[int, np.ndarray]:  # fmt: skip
    """The grid point nearest (in mm) to ``point_mm`` and its ``k`` nearest latent neighbours.

    Args:
        dense: one subject's dense embeddings.
        point_mm: ``(3,)`` world mm, e.g. a click in the image.
        k: neighbours to return (the point itself excluded).
        candidates: flat grid indices the neighbours may come from (e.g. the
            points drawn in a scatter); default all.

    Returns:
        ``(index, neighbours)``: flat grid index of the clicked point and ``(k,)`` flat
        indices, nearest first.
    """
    p = np.asarray(point_mm, dtype=np.float64).reshape(3)
    index = int(np.argmin(np.sum((dense.flat_centres_mm - p) ** 2, axis=1)))
    pool = np.arange(len(dense.flat_embeddings)) if candidates is None else np.asarray(candidates, dtype=int)
    pool = pool[pool != index]
    d = np.linalg.norm(dense.flat_embeddings[pool].astype(np.float64) - dense.flat_embeddings[index], axis=1)
    order = np.argsort(d, kind="stable")[: max(0, int(k))]
    return index, pool[order]


def selection_mask(dense: DenseEmbedding, flat_indices: Sequence[int]) -> np.ndarray:
    """``(X, Y, Z)`` uint8 on the image grid: 1 in the voxels nearest to the chosen grid points.

    Each grid point owns the stride-sized block of voxels around it (nearest-neighbour
    upsampling), so a selection in the scatter shows as blocks in the image.
    """
    grid = np.zeros(dense.grid_shape, dtype=np.float32)
    idx = np.asarray(flat_indices, dtype=int)
    if idx.size:
        if idx.min() < 0 or idx.max() >= grid.size:
            raise IndexError(f"grid index out of range [0, {grid.size}) for {dense.case_id}")
        grid.reshape(-1)[idx] = 1.0
    return (upsample_to_image(grid[..., None], dense, order=0)[..., 0] > 0.5).astype(np.uint8)


def nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """An uncompressed NIfTI-1 file in memory (for ``ipyniivue.Volume(data=...)``), qform = sform = affine."""
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    return img.to_bytes()


def body_masked_rgba(rgb: np.ndarray, image: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """An RGBA32 copy of an RGB map that is transparent outside the body, for a 3D render.

    A latent map colours every voxel of the field of view, air included, so a volume
    render shows a coloured box. This display-only mask keeps voxels whose image
    intensity is above ``threshold`` (default: halfway between the image's 1st
    percentile, air, and its median, tissue when the body fills most of the crop).

    Args:
        rgb: ``(X, Y, Z, 3)`` floats in [0, 1] or uint8.
        image: ``(X, Y, Z)`` on the same grid.

    Returns:
        ``(X, Y, Z)`` structured ``R, G, B, A`` uint8 (NIfTI RGBA32), alpha 255 inside, 0 outside.
    """
    rgb = np.asarray(rgb)
    image = np.asarray(image, dtype=np.float32)
    if rgb.shape != (*image.shape, 3):
        raise ValueError(f"RGB map shape {rgb.shape} does not match the image grid {image.shape}")
    if threshold is None:
        lo, mid = np.percentile(image, [1.0, 50.0])
        threshold = float(lo + mid) / 2.0
    u8 = rgb if rgb.dtype == np.uint8 else np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)
    out = np.zeros(image.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1"), ("A", "u1")])
    out["R"], out["G"], out["B"] = u8[..., 0], u8[..., 1], u8[..., 2]
    out["A"] = np.where(image > threshold, 255, 0).astype(np.uint8)
    return out


def grid_point_table(
    dense: DenseEmbedding,
    label: np.ndarray | None = None,
    label_names: Mapping[int, str] | None = None,
    foreground_only: bool = True,
) -> pd.DataFrame:
    """One row per dense grid point: ``index`` (flat grid index), ``x_mm, y_mm, z_mm`` and ``organ``.

    ``organ`` is the label at the voxel nearest to the patch centre, named through
    ``label_names`` (``"background"`` for 0, ``"label <id>"`` for unnamed ids, ``"unknown"``
    without a label map). ``label`` must be on the image grid of ``dense``.
    """
    index = np.flatnonzero(dense.flat_foreground) if foreground_only and dense.flat_foreground.any() else \
        np.arange(len(dense.flat_embeddings))  # fmt: skip
    mm = dense.flat_centres_mm[index]
    table = pd.DataFrame({"index": index, "x_mm": mm[:, 0], "y_mm": mm[:, 1], "z_mm": mm[:, 2]})
    if label is None:
        table["organ"] = "unknown"
        return table
    if tuple(label.shape) != tuple(dense.image_shape_vox):
        raise ValueError(f"label map shape {label.shape} differs from the image grid {dense.image_shape_vox}")
    vox = np.clip(np.rint(dense.centres_vox.reshape(-1, 3)[index]).astype(int), 0, np.asarray(label.shape) - 1)
    ids = np.asarray(label)[vox[:, 0], vox[:, 1], vox[:, 2]].astype(int)
    names = dict(label_names or {})
    table["organ"] = [("background" if i == 0 else names.get(i, f"label {i}")) for i in ids]
    return table

