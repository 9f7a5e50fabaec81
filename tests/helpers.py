"""Test helpers: oblique affines and tiny synthetic volumes written to disk.

Importable from any test as ``from tests.helpers import ...``; ``tests/conftest.py``
wraps :func:`make_volume_file` as a fixture bound to ``tmp_path``.

Affines follow medssl's convention: voxel index (i, j, k) -> world RAS mm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """``(3, 3)`` rotation: about world x by a, then y by b, then z by c degrees (``Rz @ Ry @ Rx``)."""
    a, b, c = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_affine(
    spacing_mm: Sequence[float] = (0.8, 1.5, 3.5),
    angles_deg: Sequence[float] = (0.0, 0.0, 0.0),
    origin_mm: Sequence[float] = (0.0, 0.0, 0.0),
    flip_axes: Sequence[int] = (),
) -> np.ndarray:
    """A ``(4, 4)`` voxel -> world RAS affine with the given voxel size, rotation and origin.

    Array axis k runs along column k of ``rotation_matrix(angles_deg)``, reversed
    for the axes in ``flip_axes``; ``flip_axes=(0, 1)`` gives an LPS-stored grid
    (as DICOM and ITK write them), a single flipped axis a left-handed grid.
    Voxel (0, 0, 0) sits at ``origin_mm``.
    """
    signs = np.ones(3)
    signs[list(flip_axes)] = -1.0
    affine = np.eye(4)
    affine[:3, :3] = rotation_matrix(angles_deg) @ np.diag(signs * np.asarray(spacing_mm, dtype=np.float64))
    affine[:3, 3] = origin_mm
    return affine


def world_grid_mm(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """``(X, Y, Z, 3)`` world mm of every voxel centre."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def gaussian_blob(shape: Sequence[int], affine: np.ndarray, centre_mm: Sequence[float], sigma_mm: float) -> np.ndarray:
    """``(X, Y, Z)`` float32 isotropic Gaussian in *world* mm (peak 1) centred at ``centre_mm``."""
    d2 = np.sum((world_grid_mm(shape, affine) - np.asarray(centre_mm)) ** 2, axis=-1)
    return np.exp(-d2 / (2.0 * sigma_mm**2)).astype(np.float32)


def ball_mask(shape: Sequence[int], affine: np.ndarray, centre_mm: Sequence[float], radius_mm: float) -> np.ndarray:
    """``(X, Y, Z)`` bool: voxels whose centre lies within ``radius_mm`` of ``centre_mm`` (world)."""
    return np.linalg.norm(world_grid_mm(shape, affine) - np.asarray(centre_mm), axis=-1) <= radius_mm


def grid_centre_mm(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World mm of the grid's centre (voxel index ``(n - 1) / 2`` on each axis), shape ``(3,)``."""
    centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    return affine[:3, :3] @ centre + affine[:3, 3]


def write_nifti_file(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Plain (non-atomic) NIfTI write with qform and sform both set to ``affine``."""
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return Path(path)


def sitk_image_from_ras(array_xyz: np.ndarray, affine_ras: np.ndarray) -> sitk.Image:
    """SimpleITK image of an ``(X, Y, Z)`` array on a RAS affine (converted to ITK's LPS geometry)."""
    affine_ras = np.asarray(affine_ras, dtype=np.float64)
    spacing = np.linalg.norm(affine_ras[:3, :3], axis=0)
    direction_lps = _LPS_TO_RAS @ affine_ras[:3, :3] / spacing
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_xyz, (2, 1, 0))))
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction_lps.ravel().tolist())
    image.SetOrigin((_LPS_TO_RAS @ affine_ras[:3, 3]).tolist())
    return image


def write_sitk_file(path: Path, array_xyz: np.ndarray, affine_ras: np.ndarray) -> Path:
    """Write an ``(X, Y, Z)`` array on a RAS affine as NRRD/MetaImage (by suffix) with SimpleITK."""
    sitk.WriteImage(sitk_image_from_ras(array_xyz, affine_ras), str(path))
    return Path(path)


def write_dicom_series(
    folder: Path,
    array_xyz: np.ndarray,
    affine_ras: np.ndarray,
    *,
    series_uid: str = "1.2.826.0.1.3680043.2.1125.1",
    slice_offsets_mm: Sequence[float] | None = None,
    position_shift_lps_mm: Sequence[Sequence[float]] | None = None,
) -> Path:
    """Write an int16 ``(X, Y, Z)`` array as a DICOM CT series, one file per z slice.

    The geometry goes into the standard tags: Image Orientation (Patient) holds
    the LPS row/column directions, Image Position (Patient) each slice's LPS
    origin, Pixel Spacing the in-plane voxel size. DICOM orders slices along
    row x column, so the affine's third axis must point along that cross product
    (a right-handed grid); use ``flip_axes=(0, 1)`` rather than a single flip.

    ``slice_offsets_mm[k]`` moves slice k's position along the slice axis (as scanner
    rounding does); ``position_shift_lps_mm[k]`` adds any LPS vector to it (e.g. a drift).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk_image_from_ras(np.asarray(array_xyz, dtype=np.int16), affine_ras)
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    if np.dot(np.cross(d[:, 0], d[:, 1]), d[:, 2]) < 0:
        raise ValueError("write_dicom_series needs a right-handed grid (slice axis = row x column)")
    sp = image.GetSpacing()
    fmt = lambda vals: "\\".join(f"{v:.6f}" for v in vals)  # noqa: E731 (DICOM DS strings: <= 16 chars)
    common = {
        "0008|0060": "CT",
        "0010|0010": "Synthetic^Phantom",
        "0010|0020": "PHANTOM01",
        "0020|000d": series_uid + ".0",
        "0020|000e": series_uid,
        "0020|0052": series_uid + ".9",
        "0020|0037": fmt(list(d[:, 0]) + list(d[:, 1])),
        "0028|0030": fmt([sp[1], sp[0]]),  # row spacing (between rows = along y), column spacing
        "0018|0050": f"{sp[2]:.6f}",
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetSize()[2]):
        slice_k = image[:, :, k]
        for tag, value in common.items():
            slice_k.SetMetaData(tag, value)
        position = np.asarray(image.TransformIndexToPhysicalPoint((0, 0, k)))
        if slice_offsets_mm is not None:
            position = position + slice_offsets_mm[k] * d[:, 2]
        if position_shift_lps_mm is not None:
            position = position + np.asarray(position_shift_lps_mm[k], dtype=np.float64)
        slice_k.SetMetaData("0020|0032", fmt(position))
        slice_k.SetMetaData("0020|0013", str(k + 1))
        slice_k.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        writer.Execute(slice_k)
    return folder


@dataclass
class SyntheticVolume:
    """A synthetic volume written to disk, with the truth the tests check against.

    Attributes:
        image_path, label_path: the files (``label_path`` None if not written).
        data: ``(X, Y, Z)`` float32 image as written.
        label: ``(X, Y, Z)`` int16 label map as written, or None.
        affine: ``(4, 4)`` voxel -> world RAS mm.
        landmark_mm: ``(3,)`` world mm of the bright blob's centre (and of label 1's ball).
    """

    image_path: Path
    label_path: Path | None
    data: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    landmark_mm: np.ndarray


DEFAULT_AFFINE = oblique_affine((0.8, 1.5, 3.5), (25.0, 20.0, 0.0), (-12.0, 30.0, -40.0))


def make_volume_file(
    directory: Path,
    shape: Sequence[int] = (20, 18, 16),
    affine: np.ndarray | None = None,
    *,
    label: bool = True,
    name: str = "case",
    suffix: str = ".nii.gz",
    landmark_mm: Sequence[float] | None = None,
    blob_sigma_mm: float | None = None,
    seed: int = 0,
) -> SyntheticVolume:
    """Write a small synthetic body phantom (image + optional label) and return it with its truth.

    The image is 0 outside an ellipsoidal "body" (so foreground cropping has
    something to do), ~100 +- noise inside, plus a Gaussian blob of +400 at
    ``landmark_mm`` (default: the grid centre) with standard deviation
    ``blob_sigma_mm`` (default: twice the largest voxel size), cut off at 3 sigma.
    The label map is 1 in a ball of radius 1.5 sigma around the landmark, 2 in
    the rest of the body, 0 outside.

    Args:
        directory: folder to write into (e.g. ``tmp_path``).
        shape: ``(X, Y, Z)`` voxels.
        affine: voxel -> world RAS mm; default an oblique (25, 20 deg), anisotropic
            (0.8 x 1.5 x 3.5 mm) grid.
        suffix: ``.nii.gz``/``.nii`` (nibabel) or ``.nrrd``/``.mha``/``.mhd`` (SimpleITK).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    affine = DEFAULT_AFFINE.copy() if affine is None else np.asarray(affine, dtype=np.float64)
    shape = tuple(int(s) for s in shape)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    landmark = grid_centre_mm(shape, affine) if landmark_mm is None else np.asarray(landmark_mm, dtype=np.float64)

    # Body: ellipsoid in voxel space filling ~80% of each axis.
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    half = (np.asarray(shape) - 1) / 2.0
    body = np.sum(((ijk - half) / (0.4 * np.asarray(shape))) ** 2, axis=-1) <= 1.0
    rng = np.random.default_rng(seed)
    sigma_mm = 2.0 * float(spacing.max()) if blob_sigma_mm is None else float(blob_sigma_mm)
    data = np.where(body, 100.0 + 5.0 * rng.standard_normal(shape), 0.0)
    # Truncated at 3 sigma so the background stays exactly 0 away from the body.
    blob = gaussian_blob(shape, affine, landmark, sigma_mm) * ball_mask(shape, affine, landmark, 3.0 * sigma_mm)
    data = (data + 400.0 * blob).astype(np.float32)

    label_map = None
    if label:
        label_map = np.where(body, 2, 0).astype(np.int16)
        label_map[ball_mask(shape, affine, landmark, 1.5 * sigma_mm)] = 1

    write = write_nifti_file if suffix in (".nii", ".nii.gz") else write_sitk_file
    image_path = write(directory / f"{name}{suffix}", data, affine)
    label_path = write(directory / f"{name}_seg{suffix}", label_map, affine) if label else None
    return SyntheticVolume(image_path, label_path, data, label_map, affine, landmark)


def coordinate_volume(case_id: str, shape: Sequence[int], affine: np.ndarray, channels: str = "xyz"):
    """A Volume whose channels hold each voxel's world mm coordinate (``"0"`` for a zero channel).

    Patch embeddings of such a volume reveal exactly where a patch was cut. The whole
    grid is "body" (``aux["body"]``): coordinate values are not intensities a body mask
    could be computed from.
    """
    from medssl.data.volume import Volume

    mm = world_grid_mm(shape, affine)  # (X, Y, Z, 3)
    data = np.stack([mm[..., "xyz".index(c)] if c != "0" else np.zeros(tuple(shape)) for c in channels])
    body = np.ones(tuple(int(s) for s in shape), np.uint8)
    return Volume(data.astype(np.float32), np.asarray(affine, dtype=np.float64), case_id, aux={"body": body})


def centre_channels():
    """A tiny module whose ``embed`` returns the channels of a 1-voxel patch (times a parameter of 1)."""
    import torch
    from torch import nn

    class _CentreChannels(nn.Module):
        patch_size_vox = (1, 1, 1)

        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def embed(self, x):
            return x[:, :, 0, 0, 0] * self.w

    return _CentreChannels()


def nifti_bytes(data: np.ndarray, affine: np.ndarray, **fields) -> bytes:
    """An uncompressed NIfTI-1 file's bytes with header ``fields`` set raw (nibabel does not fix them).

    ``fields`` are NIfTI-1 header fields, e.g. ``pixdim=[1, 1e6, 1, 1, 1, 0, 0, 0]``,
    ``dim=[3, 2048, 2048, 2048, 1, 1, 1, 1]`` or ``datatype=128``; the voxel bytes stay
    those of ``data``, so a header may promise more (or other) voxels than the file holds.
    """
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    header = img.header
    header.set_data_offset(352)
    for name, value in fields.items():
        header[name] = value
    return header.binaryblock + b"\0" * 4 + np.asarray(data).tobytes(order="F")


def write_raw_nifti(path: Path, data: np.ndarray, affine: np.ndarray, **fields) -> Path:
    """Write :func:`nifti_bytes` to ``path`` (gzip-compressed if it ends in ``.gz``)."""
    import gzip

    raw = nifti_bytes(data, affine, **fields)
    Path(path).write_bytes(gzip.compress(raw) if str(path).endswith(".gz") else raw)
    return Path(path)


def tiny_checkpoints(run_dir: Path, methods: Sequence[str], patch_size_vox: int = 16) -> dict[str, Path]:
    """Real checkpoints in the run layout (``<run_dir>/<method>/checkpoints/last.pt``), in seconds.

    One optimiser step per method (SmallCNN) on two random 24^3 volumes at 6 mm. Returns
    ``{method: checkpoint path}``.
    """
    import torch

    from medssl.data.volume import Volume
    from medssl.methods import create_method
    from medssl.train.config import TrainConfig
    from medssl.train.loop import fit

    rng = np.random.default_rng(0)
    body = np.ones((24, 24, 24), np.uint8)  # random values are no intensities: the whole grid is the body
    vols = [Volume(rng.normal(size=(1, 24, 24, 24)).astype(np.float32), np.diag([6.0, 6.0, 6.0, 1.0]), f"t{i}",
                   aux={"body": body})
            for i in range(2)]  # fmt: skip
    config = TrainConfig(epochs=1, steps_per_epoch=1, device="cpu", precision="fp32", log_every=1, eval_every_epochs=100)
    for name in methods:
        torch.manual_seed(0)
        method = create_method(name, backbone="smallcnn", patch_size_vox=patch_size_vox, volumes_per_batch=2,
                               patches_per_volume=4)  # fmt: skip
        fit(method, vols, config, Path(run_dir) / name, progress=False)
    return {name: Path(run_dir) / name / "checkpoints" / "last.pt" for name in methods}
