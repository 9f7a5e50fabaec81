"""Patch sampling throughput, and the share of a demo ISImed step spent sampling.

(a) ``UniformPatchSampler`` (32^3 patches with mm centres, cropped from memory-mapped .npy
    volumes as the cache stores them) against a MONAI ``LoadImaged`` + ``EnsureChannelFirstd``
    + ``RandSpatialCropSamplesd`` pipeline over the same volumes as uncompressed NIfTI (the
    ISImed authors' data path; uncompressed so that gzip does not inflate the ratio).
(b) One ``demo``-preset ISImed training step (sample + forward + backward + AdamW, the
    precision ``fit`` would pick): the fraction of its wall time spent in ``method.sample``.
(c) ``IoUPairSampler`` (SimSiam's crop pairs, 32^3, 8 pairs from each of 12 volumes = the demo's 192
    patches) for the thesis's intervals, against ``UniformPatchSampler`` drawing the same number of
    patches in the same run, and against [0, 1] (random cropping: the thesis's baseline for its 4 %
    overhead at [0.3, 0.6]); with the fallback rate of each setting.
(d) The thesis's per-crop augmentations: medssl's batched version against MONAI's random transforms
    crop by crop, and one ``demo``-preset SimSiam step with its share spent sampling + augmenting.

Run: ``python benchmarks/sampling.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medssl.data.volume import Volume
from medssl.methods import create_method
from medssl.presets import preset
from medssl.sampling import UniformPatchSampler
from medssl.train.precision import autocast, resolve_device, resolve_precision

SHAPE_VOX = (120, 100, 110)  # a typical preprocessed CT crop at ~3 mm
N_VOLUMES = 20
PATCH_VOX = 32
PATCHES_PER_VOLUME = 16
REPEATS = 5


def _write_volumes(folder: Path) -> tuple[list[Volume], list[dict]]:
    rng = np.random.default_rng(0)
    affine = np.array([[0.0, -1.5, 0.1, -90.0], [1.4, 0.0, 0.0, 20.0], [0.0, 0.1, 3.0, -300.0], [0, 0, 0, 1]])
    volumes, nifti_items = [], []
    for i in range(N_VOLUMES):
        data = rng.normal(size=SHAPE_VOX).astype(np.float32)
        np.save(folder / f"v{i}.npy", data[None])
        nib.save(nib.Nifti1Image(data, affine), folder / f"v{i}.nii")
        mm = np.load(folder / f"v{i}.npy", mmap_mode="r")
        volumes.append(Volume(data=mm, affine=affine, case_id=f"v{i}"))
        nifti_items.append({"image": str(folder / f"v{i}.nii")})
    return volumes, nifti_items


def _patches_per_s(fn, n_patches: int) -> float:
    fn()  # warm-up (page cache, imports)
    t0 = time.perf_counter()
    for _ in range(REPEATS):
        fn()
    return REPEATS * n_patches / (time.perf_counter() - t0)


def bench_sampler(volumes: list[Volume], nifti_items: list[dict]) -> tuple[float, float]:
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandSpatialCropSamplesd

    n_patches = N_VOLUMES * PATCHES_PER_VOLUME
    sampler = UniformPatchSampler(PATCH_VOX, volumes_per_batch=N_VOLUMES, patches_per_volume=PATCHES_PER_VOLUME)
    rng = np.random.default_rng(0)
    ours = _patches_per_s(lambda: sampler(volumes, rng), n_patches)

    monai_chain = Compose(
        [
            LoadImaged(keys="image"),
            EnsureChannelFirstd(keys="image"),
            RandSpatialCropSamplesd(keys="image", roi_size=PATCH_VOX, num_samples=PATCHES_PER_VOLUME, random_size=False),
        ]
    )
    monai_chain.set_random_state(0)

    def monai_batch():
        crops = [c["image"] for item in nifti_items for c in monai_chain(item)]
        return torch.stack([torch.as_tensor(c) for c in crops])

    baseline = _patches_per_s(monai_batch, n_patches)
    return ours, baseline


def bench_demo_step(volumes: list[Volume], name: str = "isimed", **method_overrides) -> dict[str, float]:
    overrides, train_cfg = preset(name, "demo")
    torch.manual_seed(0)
    method = create_method(name, **{**overrides, **method_overrides})
    device = resolve_device(train_cfg.device)
    precision = resolve_precision(train_cfg.precision, device)
    method.to(device).train()
    optimizer, _ = method.configure_optimizers(train_cfg)
    rng = np.random.default_rng(0)
    sample_s = total_s = 0.0
    for i in range(2 + REPEATS):  # 2 warm-up steps
        t0 = time.perf_counter()
        batch = method.sample(volumes, rng).to(device)
        t1 = time.perf_counter()
        with autocast(device, precision):
            loss = method.training_step(batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        t2 = time.perf_counter()
        if i >= 2:
            sample_s += t1 - t0
            total_s += t2 - t0
    return {
        "precision": precision,
        "patches_per_step": len(batch),
        "step_s": total_s / REPEATS,
        "sample_s": sample_s / REPEATS,
        "sample_share": sample_s / total_s,
    }


def bench_iou_sampler(volumes: list[Volume]) -> list[dict]:
    from medssl.sampling.iou_pairs import IoUPairSampler

    vols = volumes[:12]
    pairs = 8
    n_patches = len(vols) * 2 * pairs
    uniform = UniformPatchSampler(PATCH_VOX, volumes_per_batch=len(vols), patches_per_volume=2 * pairs)
    rng = np.random.default_rng(0)
    rows = [{"sampler": "UniformPatchSampler", "patches_per_s": _patches_per_s(lambda: uniform(vols, rng), n_patches),
             "fallback_rate": float("nan")}]
    for interval, draw in [((0.0, 1.0), "rejection"), ((0.3, 0.6), "rejection"), ((0.3, 0.6), "analytic"),
                           ((0.6, 1.0), "rejection"), ((0.6, 1.0), "analytic"), ((0.0, 0.0), "rejection")]:
        s = IoUPairSampler(PATCH_VOX, *interval, volumes_per_batch=len(vols), pairs_per_volume=pairs, crop2_draw=draw)
        rates = []
        speed = _patches_per_s(
            lambda s=s, rates=rates: rates.append(float(s(vols, rng).extras["pair_fallback"].float().mean())), n_patches)
        rows.append({"sampler": f"IoUPairSampler [{interval[0]:g}, {interval[1]:g}] {draw}", "patches_per_s": speed,
                     "fallback_rate": float(np.mean(rates))})
    return rows


def bench_thesis_views() -> dict[str, float]:
    from medssl.augment_thesis import ThesisViewAugment

    aug = ThesisViewAugment()
    crops = torch.randn(192, 1, PATCH_VOX, PATCH_VOX, PATCH_VOX)
    rng = np.random.default_rng(0)
    batched = _patches_per_s(lambda: aug(crops, rng), len(crops))
    monai = aug.monai_transform()
    monai.set_random_state(0)
    few = crops[:48]
    per_crop = _patches_per_s(lambda: [monai(c) for c in few], len(few))
    return {"batched": batched, "monai": per_crop}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        volumes, nifti_items = _write_volumes(Path(tmp))
        ours, baseline = bench_sampler(volumes, nifti_items)
        print(f"(a) {PATCH_VOX}^3 patches from {N_VOLUMES} volumes {SHAPE_VOX} x {PATCHES_PER_VOLUME} patches:")
        print(f"    UniformPatchSampler (memmapped .npy, with centres_mm): {ours:10.0f} patches/s")
        print(f"    MONAI LoadImaged+EnsureChannelFirstd+RandSpatialCropSamplesd (.nii): {baseline:10.0f} patches/s")
        print(f"    ratio: {ours / baseline:.1f}x")
        step = bench_demo_step(volumes)
        print(
            f"(b) demo ISImed step ({step['patches_per_step']} patches, {step['precision']}): "
            f"{step['step_s'] * 1e3:.0f} ms/step, sampling {step['sample_s'] * 1e3:.1f} ms "
            f"= {100 * step['sample_share']:.1f} % of the step"
        )
        rows = bench_iou_sampler(volumes)
        uniform = rows[0]["patches_per_s"]
        random_crop = rows[1]["patches_per_s"]
        print(f"(c) SimSiam crop pairs, {PATCH_VOX}^3, 12 volumes x 8 pairs (192 patches), same run:")
        for r in rows:
            print(f"    {r['sampler']:42s} {r['patches_per_s']:9.0f} patches/s  {uniform / r['patches_per_s']:5.2f}x "
                  f"uniform's time  {random_crop / r['patches_per_s']:5.2f}x [0, 1]'s  fallback {r['fallback_rate']:.3f}")
        views = bench_thesis_views()
        print(f"(d) thesis augmentations, {PATCH_VOX}^3 crops: batched {views['batched']:.0f} crops/s, MONAI per crop "
              f"{views['monai']:.0f} crops/s ({views['batched'] / views['monai']:.0f}x)")
        ss = bench_demo_step(volumes, "simsiam")
        print(f"    demo SimSiam step ({ss['patches_per_step']} patches, {ss['precision']}): {ss['step_s'] * 1e3:.0f} "
              f"ms/step, sampling + augmenting {ss['sample_s'] * 1e3:.0f} ms = {100 * ss['sample_share']:.1f} %")


if __name__ == "__main__":
    main()
