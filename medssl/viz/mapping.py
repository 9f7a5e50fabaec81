"""``medssl map``: a checkpoint and any scan in, a latent coordinate map on the scan's own grid out.

One call in a notebook, one command in a shell::

    from medssl.viz.mapping import map_scan
    result = map_scan("runs/demo/isimed/checkpoints/last.pt", "ct.nii.gz", "ct_isimed_map.nii.gz")

    medssl map runs/demo/isimed/checkpoints/last.pt ct.nii.gz -o ct_isimed_map.nii.gz

Steps: read the scan (:func:`medssl.data.io.read_volume`: NIfTI, NRRD, MetaImage or a
DICOM series folder), preprocess it exactly like the checkpoint's training data (RAS,
resampling, intensity scaling, body crop: the checkpoint's preprocessing record,
:mod:`medssl.train.preprocessing`; a setting given that disagrees with it is an error unless
forced; an older checkpoint without a record is used with a warning listing what was
assumed), embed a patch at every ``stride_vox``-th voxel
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
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
        preprocess: the :class:`~medssl.data.preprocess.PreprocessConfig` applied to the scan.
        preprocess_recorded: True when it came from the checkpoint's record (False: assumed,
            for a checkpoint without one).
    """

    map_path: Path
    png_path: Path | None
    frame_path: Path
    latent_map: Any
    scan: Any
    dense: Any
    preprocess: Any = None
    preprocess_recorded: bool = False


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
    force_preprocessing: bool = False,
) -> ScanMap:
    """Latent coordinate map of one scan, written as an RGB NIfTI on the scan's own grid.

    Args:
        checkpoint: a ``.pt`` checkpoint written by training (``runs/<run>/<method>/checkpoints/last.pt``).
        scan: a NIfTI/NRRD/MetaImage file or a DICOM series folder.
        out_path: the map (``.nii.gz``/``.nii``), RGB24 with the scan's affine.
        png_path: the preview PNG; True: beside the map (``<name>.png``); None/False: none.
        preprocess: None (default): the checkpoint's preprocessing record, i.e. exactly how
            its training volumes were prepared. A dict of settings (``{"intensity":
            "ct_window"}``: only those are compared and applied) or a whole
            :class:`medssl.data.preprocess.PreprocessConfig` (every setting compared). A
            setting that disagrees with the record raises
            :class:`~medssl.train.preprocessing.PreprocessingMismatchError` naming both values.
            A checkpoint without a record (written before records existed) is used with a
            warning listing what was assumed (:data:`~medssl.train.preprocessing.LEGACY_ASSUMPTION`
            overlaid with the settings given).
        stride_vox: dense grid step on the preprocessed grid.
        frame: colour frame: None (fit PCA(3) on this scan's foreground embeddings), a
            ``LatentRGBFrame``, or the ``.frame.npz`` path of an earlier map (same colours).
        progress: progress bars (embedding and resampling).
        force_preprocessing: apply the settings given even where they disagree with the record
            (a warning lists the differences).

    Returns:
        A :class:`ScanMap`; ``<map name>.frame.npz`` holds the frame used.
    """
    from medssl.data.io import read_volume
    from medssl.data.preprocess import preprocess as run_preprocess
    from medssl.evaluate.dense import dense_embeddings
    from medssl.evaluate.maps import LatentMap, LatentRGBFrame, fit_latent_rgb, save_latent_map
    from medssl.train.checkpoint import load_method
    from medssl.train.preprocessing import config_from_record, resolve_preprocessing

    out_path = Path(out_path)
    if not out_path.name.endswith((".nii.gz", ".nii")):
        raise ValueError(f"{out_path}: the map is written as NIfTI; name it .nii.gz or .nii")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint (expected runs/<run>/<method>/checkpoints/last.pt)")
    method = load_method(checkpoint).eval()
    record = method.preprocessing
    config = resolve_preprocessing(record, preprocess, force=force_preprocessing, where=str(checkpoint),
                                   force_hint="Leave the setting out to use the checkpoint's, or force it "
                                   "(force_preprocessing=True; medssl map --force-preprocessing).")
    method.preprocessing = None  # checked here, forced settings included: dense_embeddings need not check again
    volume = read_volume(scan)
    prepared = run_preprocess(volume, config)
    seen = (record or {}).get("modalities") or {}
    if seen and prepared.meta.get("modality") not in seen:
        warnings.warn(f"{scan}: looks like modality {prepared.meta.get('modality')!r}; {checkpoint} was trained "
                      f"on {', '.join(f'{k} ({n} volumes)' for k, n in seen.items())}", stacklevel=2)
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

        from medssl.rundir import method_dir_of
        from medssl.viz.map_figures import plot_latent_map_slices

        method_dir = method_dir_of(checkpoint)
        source = f"run {method_dir.parent.name}" if method_dir is not None else checkpoint.name
        fig = plot_latent_map_slices(volume, latent, title=f"{volume.case_id}: latent map of {method.name} ({source})")
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=100)
        plt.close(fig)
    return ScanMap(out_path, png, frame_path, latent, volume, dense, config, config_from_record(record) is not None)


# --------------------------------------------------------------------------- medssl map ...


def add_cli_parser(sub: "argparse._SubParsersAction") -> None:
    """Add ``medssl map`` to the ``medssl`` command's subparsers (:mod:`medssl.cli`)."""
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
    pre = p.add_argument_group(
        "preprocessing", "Default: the checkpoint's record of how its training volumes were prepared. A flag that "
        "disagrees with it is an error unless --force-preprocessing is given. For a checkpoint without a record "
        "(older runs) the flags replace the assumed defaults (3 mm, RAS, percentile 5-95, the modality's body rule).")
    pre.add_argument("--target-spacing-mm", type=float, nargs="+", default=None, metavar="MM",
                     help="voxel size: one value (isotropic) or three")
    pre.add_argument("--orientation", default=None, help="axis codes of the grid, e.g. RAS")
    pre.add_argument("--intensity", default=None, choices=["auto", "percentile", "ct_window", "none"],
                     help="intensity rule (auto: CT window for CT, percentiles otherwise)")
    pre.add_argument("--percentiles", type=float, nargs=2, default=None, metavar=("LO", "HI"))
    pre.add_argument("--ct-window-hu", type=float, nargs=2, default=None, metavar=("LO", "HI"))
    pre.add_argument("--modality", default=None, choices=["auto", "ct", "mr", "pet", "other"],
                     help="chooses the body-mask rule (-500 HU for CT, Otsu otherwise)")
    pre.add_argument("--foreground-threshold", type=float, default=None,
                     help="body = image > this (raw units, e.g. -500 HU for CT) instead of the modality's rule")
    pre.add_argument("--crop-margin-vox", type=int, default=None, help="voxels kept around the body's box")
    pre.add_argument("--force-preprocessing", action="store_true",
                     help="apply the flags even where they disagree with the checkpoint's record")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_map)


def _preprocessing_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The preprocessing settings given on the command line (only those)."""
    given: dict[str, Any] = {}
    if args.target_spacing_mm is not None:
        spacing = args.target_spacing_mm
        if len(spacing) not in (1, 3):
            raise ValueError(f"--target-spacing-mm takes one value or three, got {len(spacing)}")
        given["target_spacing_mm"] = tuple(spacing) * (3 if len(spacing) == 1 else 1)
    for name in ("orientation", "intensity", "modality", "foreground_threshold", "crop_margin_vox"):
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
    for name in ("percentiles", "ct_window_hu"):
        if getattr(args, name) is not None:
            given[name] = tuple(getattr(args, name))
    return given


def _run_map(args: argparse.Namespace) -> int:
    import matplotlib

    from medssl.train.preprocessing import describe_config

    matplotlib.use("Agg")  # the CLI never opens windows
    out = args.out
    if out is None:
        from medssl.rundir import method_dir_of

        method_dir = method_dir_of(args.checkpoint)
        method = method_dir.name if method_dir is not None else "latent"
        out = Path.cwd() / f"{_stem(args.scan)}_{method}_map.nii.gz"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = map_scan(args.checkpoint, args.scan, out, png_path=False if args.no_png else (args.png or True),
                          preprocess=_preprocessing_flags(args), stride_vox=args.stride_vox, frame=args.frame,
                          batch_size=args.batch_size, device=args.device, progress=not args.quiet,
                          force_preprocessing=args.force_preprocessing)  # fmt: skip
    for w in caught:  # one line each (the assumed preprocessing of an older checkpoint, a modality mismatch)
        if issubclass(w.category, UserWarning):
            print(f"medssl map: warning: {w.message}", file=sys.stderr)
    origin = "the checkpoint's record" if result.preprocess_recorded else "ASSUMED: the checkpoint has no record"
    print(f"preprocessing ({origin}): {describe_config(result.preprocess)}")
    print(f"map:     {result.map_path}  (shape {result.scan.shape_vox}, the affine of {args.scan})")
    if result.png_path is not None:
        print(f"preview: {result.png_path}")
    print(f"frame:   {result.frame_path}  (reuse with --frame for the same colours on other scans)")
    return 0
