"""Time to get one preprocessed volume into RAM: medssl cache vs a plain MONAI pipeline.

Baseline: MONAI ``LoadImaged`` + ``EnsureChannelFirstd`` + ``Orientationd("RAS")``
+ ``Spacingd`` + ``ScaleIntensityRangePercentilesd`` + ``CropForegroundd`` on the
NIfTI, i.e. what a training loop without a cache does for every volume it visits.
Cache: ``VolumeCache.load`` (memmap) + materialising the array in RAM
(``np.array`` + a sum, so every byte is really read). Both run in the same process
over the same file with the same settings; the file and the cache entry are read
once before timing, so both are measured with a warm OS page cache.

Usage::

    python benchmarks/cache_read.py                 # synthetic CT, 256 x 256 x 120 at 0.8 x 0.8 x 2.5 mm
    python benchmarks/cache_read.py --image ct.nii.gz --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from medssl.data.cache import VolumeCache
from medssl.data.preprocess import PreprocessConfig


def synthetic_ct(path: Path, shape=(256, 256, 120), spacing_mm=(0.8, 0.8, 2.5), seed: int = 0) -> Path:
    """A CT-like int16 volume in HU: air outside an elliptic body, soft tissue, lungs, a bony ring."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    r_body = (x / 0.85) ** 2 + (y / 0.65) ** 2
    body = r_body <= 1.0
    bone = body & (r_body >= 0.85)
    lungs = ((((x - 0.35) / 0.25) ** 2 + (y / 0.35) ** 2) <= 1) | ((((x + 0.35) / 0.25) ** 2 + (y / 0.35) ** 2) <= 1)
    slice_hu = np.where(body, 40.0, -1000.0)
    slice_hu[bone] = 700.0
    volume = np.repeat(slice_hu[:, :, None], shape[2], axis=2).astype(np.float32)
    z_lungs = np.arange(shape[2]) > shape[2] // 2  # lungs in the upper half
    volume[:, :, z_lungs] = np.where(lungs[:, :, None], -800.0, volume[:, :, z_lungs])
    volume += rng.normal(0.0, 20.0, size=shape).astype(np.float32)
    affine = np.diag([*spacing_mm, 1.0])
    img = nib.Nifti1Image(np.clip(volume, -1024, 3000).astype(np.int16), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def monai_pipeline(config: PreprocessConfig):
    """The plain MONAI chain with the same settings as ``config``."""
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRangePercentilesd,
        Spacingd,
    )

    lo, hi = config.percentiles
    b_min, b_max = config.out_range
    return Compose([
        LoadImaged(keys="image", image_only=True),
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes=config.orientation),
        Spacingd(keys="image", pixdim=config.target_spacing_mm, mode="bilinear"),
        ScaleIntensityRangePercentilesd(keys="image", lower=lo, upper=hi, b_min=b_min, b_max=b_max, clip=False),
        CropForegroundd(keys="image", source_key="image", select_fn=lambda x: x > x.min(), allow_smaller=True),
    ])


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=None, help="a NIfTI to use instead of the synthetic CT")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each reader")
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.5, 1.5, 2.5), help="target spacing in mm")
    args = parser.parse_args(argv)
    # MONAI's optional-decoder and deprecated-default notices are not about this measurement.
    warnings.filterwarnings("ignore", module=r"monai\..*")

    with tempfile.TemporaryDirectory(prefix="medssl-bench-") as tmp:
        tmp = Path(tmp)
        image = args.image or synthetic_ct(tmp / "ct.nii.gz")
        config = PreprocessConfig(target_spacing_mm=tuple(args.spacing))
        header = nib.load(str(image))
        print(f"input: {image} shape {header.shape} spacing {np.round(header.header.get_zooms()[:3], 3).tolist()} mm")

        manifest = pd.DataFrame([{"case_id": "bench", "image": str(image), "label": "", "group": "", "split": ""}])
        cache = VolumeCache(tmp / "cache", config)
        t0 = time.perf_counter()
        cache.build(manifest, progress=False)
        build_s = time.perf_counter() - t0

        def read_cache() -> float:
            vol = cache.load("bench")  # read-only memmap
            return float(np.array(vol.data).sum())  # materialise in RAM

        pipeline = monai_pipeline(config)

        def read_monai() -> float:
            return float(pipeline({"image": str(image)})["image"].sum())

        read_cache(), read_monai()  # warm the page cache and imports for both
        cache_s = _time(read_cache, args.repeats)
        monai_s = _time(read_monai, args.repeats)
        shape = cache.load("bench").data.shape
        monai_shape = tuple(pipeline({"image": str(image)})["image"].shape)

    cache_med, monai_med = statistics.median(cache_s), statistics.median(monai_s)
    print(f"preprocessed shape: cache {shape}, MONAI {monai_shape}")
    print(f"one-time cache build (read + preprocess + write): {build_s:.3f} s")
    print(f"cache read  (memmap + materialise), median of {args.repeats}: {cache_med * 1e3:8.2f} ms "
          f"(min {min(cache_s) * 1e3:.2f})")
    print(f"MONAI load + preprocess,           median of {args.repeats}: {monai_med * 1e3:8.2f} ms "
          f"(min {min(monai_s) * 1e3:.2f})")
    ratio = monai_med / cache_med
    print(f"speed-up: {ratio:.1f}x  (target >= 10x: {'met' if ratio >= 10 else 'NOT met'})")
    return {"cache_s": cache_med, "monai_s": monai_med, "ratio": ratio, "build_s": build_s}


if __name__ == "__main__":
    main()
