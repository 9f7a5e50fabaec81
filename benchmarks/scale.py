"""Scale: a cohort of 2,000 small volumes through the scan/cache build and the patch sampler.

1. **Scan + cache build** (``VolumeCache.build``: read, check, preprocess, write) with 1
   and more worker processes on the same cases. Baseline: 1 worker (in-process).
   Also the warm re-scan (every entry up to date, nothing rebuilt), i.e. the cost of
   ``open_data`` on a cohort that is already cached.
2. **Sampling from all of them** at 20, 200 and 2,000 volumes: each size runs in a fresh
   process that loads the cohort's volumes (the index) and draws batches until every
   volume was visited, printing memory (anonymous RSS of the index, anonymous RSS growth
   while sampling, file-backed RSS), the open file handles and patches/s. Baseline:
   the same loads as read-only ``np.memmap`` arrays (``lazy=False``), which hold one
   handle and one mapping per array.

Usage::

    python benchmarks/scale.py                          # 2,000 volumes in a temporary folder
    python benchmarks/scale.py --n 500 --sizes 20 200 500 --build-cases 200
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

SHAPE_VOX = (40, 36, 28)
SPACING_MM = (1.5, 1.5, 2.0)
TARGET_MM = (2.0, 2.0, 2.0)
PATCH_VOX = 16
VOLUMES_PER_BATCH = 20
PATCHES_PER_VOLUME = 8


def write_cohort(folder: Path, n: int) -> pd.DataFrame:
    """``n`` small CT-like volumes with a body label, as uncompressed NIfTI; returns their manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*SPACING_MM, 1.0])
    ijk = np.indices(SHAPE_VOX, dtype=np.float32)
    centre = (np.asarray(SHAPE_VOX, dtype=np.float32) - 1) / 2
    rows = []
    for i in range(n):
        rng = np.random.default_rng(i)
        radii = np.asarray(SHAPE_VOX) * rng.uniform(0.3, 0.45, 3)
        body = sum(((ijk[a] - centre[a]) / radii[a]) ** 2 for a in range(3)) <= 1.0
        image = np.where(body, rng.normal(40.0, 20.0, SHAPE_VOX), -1000.0).astype(np.int16)
        paths = {}
        for key, arr in (("image", image), ("label", body.astype(np.uint8))):
            img = nib.Nifti1Image(arr, affine)
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            paths[key] = folder / f"case{i:05d}{'' if key == 'image' else '_seg'}.nii"
            nib.save(img, str(paths[key]))
        rows.append({"case_id": f"case{i:05d}", "image": str(paths["image"]), "label": str(paths["label"]),
                     "group": "", "split": "train"})  # fmt: skip
    return pd.DataFrame(rows)


def _config():
    from medssl.data.preprocess import PreprocessConfig

    return PreprocessConfig(target_spacing_mm=TARGET_MM, foreground_threshold=-500.0)


def build_rates(manifest: pd.DataFrame, root: Path, workers: list[int]) -> list[dict]:
    from medssl.data.cache import VolumeCache

    rows = []
    for w in workers:
        cache = VolumeCache(root / f"workers{w}", _config())
        t0 = time.perf_counter()
        report = cache.build(manifest, progress=False, workers=w)
        seconds = time.perf_counter() - t0
        assert len(report.built_case_ids) == len(manifest), report.summary()
        rows.append({"what": f"build, {w} worker(s)", "workers": w, "cases": len(manifest), "seconds": seconds})
    t0 = time.perf_counter()
    report = VolumeCache(root / f"workers{workers[0]}", _config()).build(manifest, progress=False)
    assert len(report.reused_case_ids) == len(manifest)
    rows.append({"what": "warm re-scan (all up to date)", "workers": 1, "cases": len(manifest),
                 "seconds": time.perf_counter() - t0})  # fmt: skip
    return rows


def _memory_mb() -> dict[str, float]:
    fields = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) / 1024.0
    return fields


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def measure_sampling(cache_root: str, manifest_csv: str, n: int, lazy: bool, foreground: bool) -> dict:
    """In a fresh process: load ``n`` volumes, then sample until each was visited twice on average."""
    from medssl.data.cache import VolumeCache
    from medssl.sampling.uniform import UniformPatchSampler

    manifest = pd.read_csv(manifest_csv, dtype=str, keep_default_na=False).iloc[:n]
    cache = VolumeCache(cache_root, _config())
    before = _memory_mb()
    volumes = cache.load_all(manifest, lazy=lazy)
    index = _memory_mb()
    fds_index = _open_fds()
    sampler = UniformPatchSampler(PATCH_VOX, VOLUMES_PER_BATCH, PATCHES_PER_VOLUME, foreground_only=foreground)
    rng = np.random.default_rng(0)
    batches = max(20, math.ceil(2 * n / VOLUMES_PER_BATCH))
    sampler(volumes, rng)  # warm-up (imports, first maps)
    t0 = time.perf_counter()
    patches = 0
    for _ in range(batches):
        patches += len(sampler(volumes, rng))
    seconds = time.perf_counter() - t0
    after = _memory_mb()
    return {
        "volumes": n,
        "arrays": "lazy" if lazy else "memmap (baseline)",
        "centres": "foreground" if foreground else "uniform",
        "index_anon_mb": index["RssAnon"] - before["RssAnon"],
        "sampling_anon_growth_mb": after["RssAnon"] - index["RssAnon"],
        "file_rss_mb": after["RssFile"],
        "open_fds": _open_fds(),
        "open_fds_after_load": fds_index,
        "patches_per_s": patches / seconds,
    }


def sampling_table(cache_root: Path, manifest_csv: Path, sizes: list[int]) -> pd.DataFrame:
    rows = []
    for foreground in (False, True):
        for n in sizes:
            for lazy in (True, False):
                cmd = [sys.executable, __file__, "--measure", str(cache_root), str(manifest_csv), str(n),
                       "lazy" if lazy else "mmap", "fg" if foreground else "uniform"]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
    df = pd.DataFrame(rows)
    base = df[df["arrays"] != "lazy"].set_index(["centres", "volumes"])["patches_per_s"]
    df["speed_vs_memmap"] = [r.patches_per_s / base[(r.centres, r.volumes)] for r in df.itertuples()]
    return df


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="cohort size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 200, 2000], help="sampling pool sizes")
    parser.add_argument("--build-cases", type=int, default=400, help="cases for the worker comparison")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        manifest = write_cohort(tmp / "raw", args.n)
        manifest_csv = tmp / "manifest.csv"
        manifest.to_csv(manifest_csv, index=False)
        print(f"wrote {args.n} volumes of {SHAPE_VOX} voxels in {time.perf_counter() - t0:.1f} s; "
              f"{os.cpu_count()} CPU cores", flush=True)  # fmt: skip

        build = pd.DataFrame(build_rates(manifest.iloc[: args.build_cases], tmp / "bench", args.workers))
        build["cases_per_s"] = build["cases"] / build["seconds"]
        build["ratio_vs_1_worker"] = build["cases_per_s"] / build.loc[0, "cases_per_s"]
        print("\nscan + cache build (baseline: 1 worker, in-process)")
        print(build.to_string(index=False, float_format=lambda v: f"{v:.2f}"), flush=True)

        from medssl.data.cache import VolumeCache

        best = max(args.workers)
        t0 = time.perf_counter()
        VolumeCache(tmp / "cache", _config()).build(manifest, progress=False, workers=best)
        full = time.perf_counter() - t0
        print(f"\nfull cohort: {args.n} cases built with {best} worker(s) in {full:.1f} s "
              f"({args.n / full:.1f} cases/s)", flush=True)  # fmt: skip

        table = sampling_table(tmp / "cache", manifest_csv, [s for s in args.sizes if s <= args.n])
        print(f"\nsampling {PATCH_VOX}^3 patches, {VOLUMES_PER_BATCH} volumes x {PATCHES_PER_VOLUME} per batch "
              "(baseline: np.memmap volumes); memory in MB")  # fmt: skip
        print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        root, csv, n, mode, centres = sys.argv[2:7]
        print(json.dumps(measure_sampling(root, csv, int(n), mode == "lazy", centres == "fg")))
    else:
        main()
