"""The Volume: voxels plus where they are in the world."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np


@dataclass
class Volume:
    """A 3D image with its geometry.

    Attributes:
        data: image, shape ``(C, X, Y, Z)``, float32 (may be a read-only memmap, or a
            :class:`~medssl.data.npy.LazyNpy` from ``DataSource.volumes()``: slice it or
            ``np.asarray`` it; slicing returns an in-memory copy).
        affine: ``(4, 4)`` voxel index -> world millimetres, RAS+ convention
            (nibabel's convention; DICOM/ITK LPS readers are converted).
        case_id: unique id of this case within a manifest.
        group: patient id used for grouped splits (defaults to ``case_id``).
        label: optional integer label map, shape ``(X, Y, Z)``, same grid.
        aux: further label maps on the same grid, by name (e.g. ``{"lesion": ...}``).
        label_names: optional ``{label id: structure name}``.
        source: where the image came from (path), for error messages and provenance.
        meta: free-form provenance (original spacing, preprocessing hash, ...).
    """

    data: np.ndarray
    affine: np.ndarray
    case_id: str
    group: str | None = None
    label: np.ndarray | None = None
    aux: dict[str, np.ndarray] = field(default_factory=dict)
    label_names: dict[int, str] | None = None
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.group is None:
            self.group = self.case_id

    @property
    def shape_vox(self) -> tuple[int, int, int]:
        """Spatial shape ``(X, Y, Z)``."""
        return tuple(int(s) for s in self.data.shape[1:4])  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> np.ndarray:
        """Voxel size along each array axis in mm, from the affine's column norms. Shape (3,)."""
        return np.linalg.norm(np.asarray(self.affine, dtype=np.float64)[:3, :3], axis=0)

    @property
    def n_channels(self) -> int:
        return int(self.data.shape[0])

    def with_(self, **changes: Any) -> "Volume":
        """A copy with some fields replaced (arrays are not copied)."""
        return replace(self, **changes)
