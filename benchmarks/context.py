"""Context prediction: 2.5D sampler throughput and dense 2.5D descriptors, each against a plain loop.

(a) ``ContextPairSampler`` (demo settings: 42 x 42 x 3 planar patches, an anchor and a partner for each of
    the three orientations) end to end, and its cutting alone (``triplanar_patches``: batched numpy
    indexing) against a plain loop that cuts every planar patch on its own with the core's
    ``extract_patches`` (slicing, padded outside the image) and transposes it to the planar layout.
(b) Dense descriptors of a 128^3 volume at stride 4 (32^3 = 32,768 points) through
    ``medssl.evaluate.dense.dense_embeddings`` (which cuts inputs with the method's ``cut_inputs``), for
    the demo Reg2D (three D2D-CNNs), against a plain loop that cuts each point's three planar patches
    one by one and embeds them in batches of the same size. The network dominates both; the loop is timed
    on the first 4,096 points (a rate, descriptors per second). For scale, the other context methods'
    descriptor rates on a 64^3 volume at stride 4.

Run: ``python benchmarks/context.py`` (a few minutes on an idle 2-core CPU; timings on a shared machine vary).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from medssl.data.volume import Volume
from medssl.evaluate.dense import dense_embeddings, dense_grid
from medssl.geometry import plane_axes
from medssl.presets import build_run
from medssl.sampling.context import ContextPairSampler, triplanar_patches
from medssl.sampling.patches import extract_patches

SHAPE_VOX = (120, 100, 110)  # a typical preprocessed CT crop at 3 mm
N_VOLUMES = 16
ANCHORS_PER_VOLUME = 4
S, NS = 42, 3
DENSE_SHAPE = (128, 128, 128)
STRIDE = 4
BATCH = 256
LOOP_POINTS = 4096
REPEATS = 3


def _volume(shape, seed: int, case: str) -> Volume:
    rng = np.random.default_rng(seed)
    data = rng.normal(size=shape).astype(np.float32)
    for axis in range(3):  # some smooth structure
        data += np.cumsum(rng.normal(size=shape), axis=axis).astype(np.float32) * 0.05
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    return Volume(data=data[None], affine=affine, case_id=case, aux={"body": np.ones(shape, np.uint8)})


def planar_loop(data: np.ndarray, centres_vox: np.ndarray, normal: int) -> np.ndarray:
    """The baseline: each planar patch cut on its own (the core's padded slicing), then put in the planar layout."""
    (a, b), n = plane_axes(normal)
    size = [S, S, S]
    size[n] = NS
    out = []
    for c in centres_vox:
        box = extract_patches(data, c[None], size)[0]  # (C, X', Y', Z')
        out.append(np.transpose(box, (0, 1 + n, 1 + a, 1 + b)).reshape(-1, S, S))
    return np.stack(out)


def triplanar_loop(data: np.ndarray, centres_vox: np.ndarray) -> np.ndarray:
    return np.stack([planar_loop(data, centres_vox, o) for o in range(3)], axis=1)


def _rate(fn, n: int, repeats: int = REPEATS) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return repeats * n / (time.perf_counter() - t0)


def bench_sampler() -> None:
    volumes = [_volume(SHAPE_VOX, k, f"v{k}") for k in range(N_VOLUMES)]
    sampler = ContextPairSampler(S, NS, volumes_per_batch=N_VOLUMES, patches_per_volume=ANCHORS_PER_VOLUME)
    rng = np.random.default_rng(0)
    n_anchors = N_VOLUMES * ANCHORS_PER_VOLUME
    anchors_s = _rate(lambda: sampler(volumes, rng, progress=0.5), n_anchors)
    batch = sampler(volumes, rng)
    assert batch.patches.shape == (n_anchors, 3, NS, S, S)
    centres = np.random.default_rng(1).integers(0, SHAPE_VOX, size=(n_anchors, 3))
    data = volumes[0].data
    assert np.array_equal(triplanar_patches(data, centres, S, NS), triplanar_loop(data, centres))
    batched = _rate(lambda: triplanar_patches(data, centres, S, NS), 3 * n_anchors)
    loop = _rate(lambda: triplanar_loop(data, centres), 3 * n_anchors)
    print(f"(a) 2.5D context pairs, {S} x {S} x {NS} planar patches, "
          f"{N_VOLUMES} volumes {SHAPE_VOX} x {ANCHORS_PER_VOLUME} anchors:")
    print(f"    ContextPairSampler end to end: {anchors_s:8.0f} anchors/s = {6 * anchors_s:8.0f} planar patches/s "
          "(anchor + partner for 3 orientations)")
    print(f"    cutting planar patches, triplanar_patches (batched indexing): {batched:8.0f} patches/s")
    print(f"    cutting planar patches, plain loop (extract_patches per patch): {loop:8.0f} patches/s")
    print(f"    ratio: {batched / loop:.1f}x")


def bench_dense() -> None:
    torch.manual_seed(0)
    method, _ = build_run("reg2d", "demo")
    method.eval()
    vol = _volume(DENSE_SHAPE, 7, "dense")
    n_points = int(np.prod([(n - 1) // STRIDE + 1 for n in DENSE_SHAPE]))
    t0 = time.perf_counter()
    dense = dense_embeddings(method, vol, stride_vox=STRIDE, batch_size=BATCH, progress=False)
    dense_s = n_points / (time.perf_counter() - t0)
    assert dense.flat_embeddings.shape == (n_points, 192)

    anchors, _ = dense_grid(DENSE_SHAPE, STRIDE, method.input_size_vox)  # the grid dense_embeddings cuts at
    grid = np.stack(np.meshgrid(*anchors, indexing="ij"), -1).reshape(-1, 3)[:LOOP_POINTS]
    data = np.asarray(vol.data)

    def loop() -> np.ndarray:
        out = []
        for s in range(0, len(grid), BATCH):
            inputs = triplanar_loop(data, grid[s : s + BATCH])
            with torch.no_grad():
                out.append(method.embed(torch.from_numpy(inputs)).numpy())
        return np.concatenate(out)

    t0 = time.perf_counter()
    loop()
    loop_s = len(grid) / (time.perf_counter() - t0)
    cut_batched = _rate(lambda: [method.cut_inputs(data, grid[s : s + BATCH]) for s in range(0, len(grid), BATCH)], len(grid), 1)
    cut_loop = _rate(lambda: [triplanar_loop(data, grid[s : s + BATCH]) for s in range(0, len(grid), BATCH)], len(grid), 1)
    print(f"(b) dense 2.5D descriptors (demo reg2d: 3 D2D-CNNs, 192-d), {DENSE_SHAPE} volume at stride {STRIDE} "
          f"({n_points} points):")
    print(f"    dense_embeddings (cut_inputs, batched): {dense_s:8.0f} descriptors/s ({n_points / dense_s:.1f} s for the volume)")
    print(f"    plain loop (per-point cutting + the same embedding, {len(grid)} points): {loop_s:8.0f} descriptors/s")
    print(f"    ratio: {dense_s / loop_s:.2f}x; cutting alone: cut_inputs {cut_batched:.0f} vs loop {cut_loop:.0f} "
          f"points/s ({cut_batched / cut_loop:.1f}x)")


def bench_other_methods() -> None:
    vol = _volume((64, 64, 64), 8, "small")
    print(f"    for scale, other methods on a 64^3 volume at stride {STRIDE} (4,096 points):")
    for name, preset_name in (("heatmap", "demo"), ("doersch", "demo"), ("doersch", "paper"), ("gvdiff", "demo"),
                              ("isimed", "demo")):
        torch.manual_seed(0)
        method, _ = build_run(name, preset_name)
        method.eval()
        t0 = time.perf_counter()
        dense = dense_embeddings(method, vol, stride_vox=STRIDE, batch_size=BATCH, progress=False)
        rate = dense.flat_embeddings.shape[0] / (time.perf_counter() - t0)
        print(f"      {name} ({preset_name} preset, {method.config.backbone}): {rate:8.0f} descriptors/s")


if __name__ == "__main__":
    torch.set_num_threads(2)
    bench_sampler()
    bench_dense()
    bench_other_methods()
