"""``medssl map``: a checkpoint and any scan in, a latent coordinate map on the scan's own grid out.

One call in a notebook, one command in a shell::

    from medssl.viz.mapping import map_scan
    result = map_scan("runs/demo/isimed/checkpoints/last.pt", "ct.nii.gz", "ct_isimed_map.nii.gz")

    medssl map runs/demo/isimed/checkpoints/last.pt ct.nii.gz -o ct_isimed_map.nii.gz

Steps: read the scan (:func:`medssl.data.io.read_volume`: NIfTI, NRRD, MetaImage or a
DICOM series folder), preprocess it like training data (RAS, resampling, intensity
scaling, foreground crop), embed a patch at every ``stride_vox``-th voxel
(:func:`medssl.evaluate.dense.dense_embeddings`), colour the embeddings with a PCA(3)
frame (:class:`medssl.evaluate.maps.LatentRGBFrame`; fitted on this scan, or reused
from an earlier map so colours agree across scans), and resample the colours from the
dense grid **back onto the scan's original voxel grid**.

Why back onto the original grid: the network sees a reoriented, resampled, cropped
copy of the scan, whose affine is not the file's. A map on that grid would overlay
the scan only in viewers that resample. Resampled through world millimetres onto
the scan's own grid, the map has the scan's shape and affine, so any viewer shows it
voxel-for-voxel on the scan. Voxels outside the cropped field of view (air around the
body) have no embedding and are black.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from medssl.cli import register_command

__all__ = ["ScanMap", "load_frame", "map_scan", "resample_grid_to_scan", "save_frame"]

# Voxels per resampling chunk: bounds the memory of the coordinate arrays on large scans.
_CHUNK_VOXELS = 4_000_000


@dataclass(frozen=True)
class ScanMap:
    """What :func:`map_scan` made.

    Attributes:
        map_path: the RGB24 NIfTI on the scan's grid (the scan's affine).
        png_path: the static preview (orthogonal slices), or None.
        frame_path: the colour frame (``.npz``) to reuse for other scans.
        latent_map: the map, ``rgb (X, Y, Z, 3)`` on the scan's grid.
        scan: the scan as read (original grid).
        dense: the dense embeddings on the preprocessed grid.
    """

    map_path: Path
    png_path: Path | None
    frame_path: Path
    latent_map: Any
    scan: Any
    dense: Any


def save_frame(path: str | os.PathLike, frame) -> Path:
    """Write a :class:`~medssl.evaluate.maps.LatentRGBFrame` as ``.npz`` (arrays only, no pickle)."""
    from medssl._files import atomic_path

    path = Path(path)
    with atomic_path(path, ".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mean=frame.mean, components=frame.components, lo=frame.lo, hi=frame.hi,
                     explained_variance_ratio=frame.explained_variance_ratio)  # fmt: skip
    return path


def load_frame(path: str | os.PathLike):
    """Read a frame written by :func:`save_frame`; the error names the file and the missing arrays."""
    from medssl.evaluate.maps import LatentRGBFrame

    keys = ("mean", "components", "lo", "hi", "explained_variance_ratio")
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise ValueError(f"{path}: not a latent colour frame (missing arrays {missing})")
            return LatentRGBFrame(*(np.asarray(z[k], dtype=np.float64) for k in keys))
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot read the latent colour frame ({err})") from err


def resample_grid_to_scan(
    grid_values: np.ndarray,
    grid_affine: np.ndarray,
    inside_affine: np.ndarray,
    inside_shape_vox: tuple[int, int, int],
    scan_affine: np.ndarray,
    scan_shape_vox: tuple[int, int, int],
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Trilinearly resample values on a dense grid onto another voxel grid, through world mm.

    Args:
        grid_values: ``(Gx, Gy, Gz, K)`` on the dense grid.
        grid_affine: ``(4, 4)`` grid index -> world mm (``DenseEmbedding.grid_affine``).
        inside_affine, inside_shape_vox: the grid the dense grid covers (the preprocessed
            image); scan voxels whose centre falls outside it (by more than half a voxel)
            get 0.
        scan_affine, scan_shape_vox: the target grid (the scan as read).

    Returns:
        ``(values (X, Y, Z, K) float32, inside (X, Y, Z) bool)`` on the scan grid. Inside,
        values between the outermost grid centres are clamped to them (as
        :func:`medssl.evaluate.maps.upsample_to_image`).
    """
    from scipy import ndimage
    from tqdm.auto import tqdm

    values = np.asarray(grid_values, dtype=np.float32)
    shape = tuple(int(s) for s in scan_shape_vox)
    to_grid = np.linalg.inv(np.asarray(grid_affine, dtype=np.float64)) @ np.asarray(scan_affine, dtype=np.float64)
    to_inside = np.linalg.inv(np.asarray(inside_affine, dtype=np.float64)) @ np.asarray(scan_affine, dtype=np.float64)
    out = np.zeros((*shape, values.shape[3]), dtype=np.float32)
    inside = np.zeros(shape, dtype=bool)
    ij = np.stack(np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij"), -1).reshape(-1, 2)
    step = max(1, _CHUNK_VOXELS // max(1, len(ij)))
    limit = np.asarray(inside_shape_vox, dtype=np.float64) - 0.5
    for k0 in tqdm(range(0, shape[2], step), desc="resample onto the scan grid", disable=not progress, leave=False):
        ks = np.arange(k0, min(shape[2], k0 + step))
        vox = np.concatenate([ij.repeat(len(ks), 0), np.tile(ks, len(ij))[:, None]], axis=1).astype(np.float64)
        g = vox @ to_grid[:3, :3].T + to_grid[:3, 3]  # (N, 3) fractional grid indices
        v_in = vox @ to_inside[:3, :3].T + to_inside[:3, 3]
        ok = np.all((v_in >= -0.5) & (v_in <= limit), axis=1)
        block = np.zeros((len(vox), values.shape[3]), dtype=np.float32)
        for c in range(values.shape[3]):
            block[ok, c] = ndimage.map_coordinates(values[..., c], g[ok].T, order=1, mode="nearest")
        out[:, :, k0 : k0 + len(ks)] = block.reshape(shape[0], shape[1], len(ks), -1)
        inside[:, :, k0 : k0 + len(ks)] = ok.reshape(shape[0], shape[1], len(ks))
    return out, inside


_SCAN_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _stem(path: Path) -> str:
    """File name without its (double) image suffix; a DICOM folder's name as it is."""
    name = Path(path).name
    return next((name[: -len(s)] for s in _SCAN_SUFFIXES if name.lower().endswith(s)), name)


def map_scan(
    checkpoint: str | os.PathLike,
    scan: str | os.PathLike,
    out_path: str | os.PathLike,
    png_path: str | os.PathLike | None | bool = True,
    preprocess=None,
    stride_vox: int = 4,
    frame: Any = None,
    batch_size: int = 256,
    device: str = "auto",
    progress: bool = True,
) -> ScanMap:
    """Latent coordinate map of one scan, written as an RGB NIfTI on the scan's own grid.

    Args:
        checkpoint: a ``.pt`` checkpoint written by training (``runs/<run>/<method>/checkpoints/last.pt``).
        scan: a NIfTI/NRRD/MetaImage file or a DICOM series folder.
        out_path: the map (``.nii.gz``/``.nii``), RGB24 with the scan's affine.
        png_path: the preview PNG; True: beside the map (``<name>.png``); None/False: none.
        preprocess: a :class:`medssl.data.preprocess.PreprocessConfig` as used for the
            training data; default 3 mm isotropic, percentile intensity scaling.
        stride_vox: dense grid step on the preprocessed grid.
        frame: colour frame: None (fit PCA(3) on this scan's foreground embeddings), a
            ``LatentRGBFrame``, or the ``.frame.npz`` path of an earlier map (same colours).
        progress: progress bars (embedding and resampling).

    Returns:
        A :class:`ScanMap`; ``<map name>.frame.npz`` holds the frame used.
    """
    from medssl.data.io import read_volume
    from medssl.data.preprocess import PreprocessConfig
    from medssl.data.preprocess import preprocess as run_preprocess
    from medssl.evaluate.dense import dense_embeddings
    from medssl.evaluate.maps import LatentMap, LatentRGBFrame, fit_latent_rgb, save_latent_map
    from medssl.train.checkpoint import load_method

    out_path = Path(out_path)
    if not out_path.name.endswith((".nii.gz", ".nii")):
        raise ValueError(f"{out_path}: the map is written as NIfTI; name it .nii.gz or .nii")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint (expected runs/<run>/<method>/checkpoints/last.pt)")
    method = load_method(checkpoint).eval()
    volume = read_volume(scan)
    config = PreprocessConfig() if preprocess is None else preprocess
    prepared = run_preprocess(volume, config)
    dense = dense_embeddings(method, prepared, stride_vox=stride_vox, batch_size=batch_size, device=device,
                             progress=progress, checkpoint=checkpoint)  # fmt: skip
    if frame is None:
        frame = fit_latent_rgb([dense])
    elif not isinstance(frame, LatentRGBFrame):
        frame = load_frame(frame)
    if frame.mean.shape != (dense.embed_dim,):
        raise ValueError(f"colour frame is for {frame.mean.shape[0]}-D embeddings; {checkpoint} gives {dense.embed_dim}-D")
    rgb, _ = resample_grid_to_scan(frame.to_rgb(dense.embeddings), dense.grid_affine, prepared.affine,
                                   prepared.shape_vox, volume.affine, volume.shape_vox, progress=progress)  # fmt: skip
    latent = LatentMap(np.clip(rgb, 0.0, 1.0), np.asarray(volume.affine, dtype=np.float64),
                       case_id=str(volume.case_id), method=method.name)  # fmt: skip
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_latent_map(out_path, latent, volume)
    frame_path = save_frame(out_path.with_name(_stem(out_path) + ".frame.npz"), frame)
    png = None
    if png_path:
        png = out_path.with_name(_stem(out_path) + ".png") if png_path is True else Path(png_path)
        import matplotlib.pyplot as plt

        from medssl.viz.maps import plot_latent_map_slices

        source = f"run {checkpoint.parents[2].name}" if checkpoint.parent.name == "checkpoints" else checkpoint.name
        fig = plot_latent_map_slices(volume, latent, title=f"{volume.case_id}: latent map of {method.name} ({source})")
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=100)
        plt.close(fig)
    return ScanMap(out_path, png, frame_path, latent, volume, dense)


# --------------------------------------------------------------------------- medssl map ...


@register_command("map")
def _add_map_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "map",
        help="latent coordinate map of any scan (NIfTI/NRRD/DICOM) with a trained checkpoint",
        description="Read a scan, preprocess it like training data, embed it densely with a checkpoint and "
        "write its latent coordinate map (PC1-3 as RGB) as a NIfTI on the scan's own grid and affine, "
        "plus a PNG preview and the colour frame (.frame.npz, reusable with --frame).",
    )
    p.add_argument("checkpoint", type=Path, help="runs/<run>/<method>/checkpoints/last.pt")
    p.add_argument("scan", type=Path, help="a NIfTI/NRRD/MetaImage file or a DICOM series folder")
    p.add_argument("-o", "--out", type=Path, default=None, help="map NIfTI (default <scan name>_<method>_map.nii.gz)")
    p.add_argument("--png", type=Path, default=None, help="preview PNG (default beside the map)")
    p.add_argument("--no-png", action="store_true", help="write no preview")
    p.add_argument("--frame", type=Path, default=None, help="colour frame (.frame.npz) of an earlier map")
    p.add_argument("--stride-vox", type=int, default=4, help="dense grid step in voxels (default 4)")
    p.add_argument("--target-spacing-mm", type=float, default=3.0, help="isotropic spacing of training (default 3)")
    p.add_argument("--foreground-threshold", type=float, default=None,
                   help="foreground = image > this (raw units, e.g. -500 HU for CT); default: > minimum")
    p.add_argument("--intensity", default="percentile", choices=["percentile", "ct_window", "none"],
                   help="intensity scaling as in training (default percentile 5-95 -> [-1, 1])")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_map)


def _run_map(args: argparse.Namespace) -> int:
    import matplotlib

    from medssl.data.preprocess import PreprocessConfig

    matplotlib.use("Agg")  # the CLI never opens windows
    config = replace(PreprocessConfig(), target_spacing_mm=(args.target_spacing_mm,) * 3,
                     foreground_threshold=args.foreground_threshold, intensity=args.intensity)  # fmt: skip
    out = args.out
    if out is None:
        method = args.checkpoint.parent.parent.name if args.checkpoint.parent.name == "checkpoints" else "latent"
        out = Path.cwd() / f"{_stem(args.scan)}_{method}_map.nii.gz"
    result = map_scan(args.checkpoint, args.scan, out, png_path=False if args.no_png else (args.png or True),
                      preprocess=config, stride_vox=args.stride_vox, frame=args.frame, batch_size=args.batch_size,
                      device=args.device, progress=not args.quiet)  # fmt: skip
    print(f"map:     {result.map_path}  (shape {result.scan.shape_vox}, the affine of {args.scan})")
    if result.png_path is not None:
        print(f"preview: {result.png_path}")
    print(f"frame:   {result.frame_path}  (reuse with --frame for the same colours on other scans)")
    return 0
