"""Dense descriptors against the bare network, in the same precision (fp32 and bf16).

For each precision, one round times

- **bare network**: the method's ``embed`` frozen (eval mode, no-grad) under that precision's
  autocast (``medssl.train.precision.autocast``), on pre-made batches of ``--batch`` patches
  (one batch tensor made before the clock starts, reused), as many patches as the grid has;
- **dense_embeddings**: ``medssl.evaluate.dense.dense_embeddings`` of a ``size^3`` volume at
  stride 4 with the same batch size and ``precision=`` that precision (no cache): padding,
  gathering the patches, the network, and writing the ``(Gx, Gy, Gz, D)`` grid.

Rounds alternate the four timings so that other load on the machine hits them alike; the
median round is reported, with the ratio ``dense / bare`` per precision (the target: <= 1.1x).
bf16 runs only where ``resolve_precision("auto")`` picks it for the CPU (native AVX512-BF16 or
AMX); elsewhere it is emulated and slower than fp32, and the script says it skipped it
(``--bf16`` forces it).

The volume carries its body mask in ``aux["body"]``, as every cohort volume does (computed once while
caching), so ``dense_embeddings`` reads it instead of computing it from intensity.

**OpenMP waiting.** Unless ``OMP_WAIT_POLICY`` is already set, the script sets it to ``PASSIVE`` for
itself. With libgomp's default (spin before sleeping), on a loaded machine the bare network's two
threads spin against other processes and took 2-2.5x longer per batch than with one thread, while
``dense_embeddings``'s helper thread makes libgomp throttle its spinning (more threads than cores), so
dense looked *faster* than the bare network (0.49x at 64^3 under load 7). Passive waiting removes
that artefact from both sides; ``OMP_WAIT_POLICY=ACTIVE python benchmarks/dense.py`` shows it.

Run: ``python benchmarks/dense.py [--size 128] [--rounds 3] [--method isimed]`` (a few minutes on 2 cores
at 128^3; ``--size 64`` for a quick look).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read by libgomp when torch loads it (see the docstring)

import numpy as np
import torch

from medssl.data.volume import Volume
from medssl.evaluate.dense import dense_embeddings, dense_grid
from medssl.evaluate.embed import frozen
from medssl.methods import create_method
from medssl.methods.base import cuts_cubes
from medssl.train.precision import autocast, resolve_precision

STRIDE = 4


def _method(name: str, preset: str = "demo") -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "isimed" and preset == "demo":
        return create_method("isimed", backbone="smallcnn", patch_size_vox=32).eval()  # the demo ISImed network
    from medssl.presets import build_run

    model, _ = build_run(name, preset)
    return model.eval()


def bench_volume(size: int, seed: int = 1) -> Volume:
    """A ``size^3`` random volume with a ball as its cached body mask (as cohort volumes carry one)."""
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(1, size, size, size)).astype(np.float32)
    ijk = np.indices(data.shape[1:]) / (size - 1) * 2 - 1
    body = ((ijk**2).sum(0) <= 0.9).astype(np.uint8)
    return Volume(data=data, affine=np.eye(4), case_id="bench", aux={"body": body})


def compare(method: torch.nn.Module, vol: Volume, precisions: list[str], rounds: int = 3, batch: int = 256,
            device: torch.device | None = None) -> dict[str, dict[str, float]]:
    """Median seconds of the bare network and of ``dense_embeddings`` per precision, rounds alternating.

    ``device``: where both run (the method is moved there; the bare network's pre-made batch lives there,
    ``dense_embeddings`` gathers on the CPU and moves each batch, as it does in use). Returns
    ``{precision: {"bare": s, "dense": s, "ratio": dense / bare, "n": patches}}``.
    """
    dev = torch.device(device or "cpu")
    method = method.to(dev).eval()
    patch = getattr(method, "input_size_vox", None) or method.patch_size_vox
    n = int(np.prod([len(a) for a in dense_grid(vol.shape_vox, STRIDE, patch)[0]]))
    rng = np.random.default_rng(2)
    if cuts_cubes(method):
        item = (vol.data.shape[0], *tuple(np.broadcast_to(patch, 3)))
        x = torch.from_numpy(rng.normal(size=(batch, *item)).astype(np.float32))
    else:  # the method's own inputs (e.g. 2.5D planes), cut once at random anchors
        vox = rng.integers(0, min(vol.shape_vox), size=(batch, 3))
        x = torch.from_numpy(np.asarray(method.cut_inputs(vol.data, vox), dtype=np.float32))
    x = x.to(dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def bare(precision: str) -> float:
        sync()
        t0 = time.perf_counter()
        with frozen(method), autocast(dev, precision):
            for s in range(0, n, batch):
                method.embed(x[: min(batch, n - s)]).float().cpu()  # the result leaves the device, as in dense
        sync()
        return time.perf_counter() - t0

    def dense(precision: str) -> float:
        sync()
        t0 = time.perf_counter()
        dense_embeddings(method, vol, STRIDE, batch_size=batch, precision=precision, progress=False)
        sync()
        return time.perf_counter() - t0

    bare(precisions[-1])  # warm-up (oneDNN / cuDNN primitive caches, allocator)
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for prec in precisions:
            times.setdefault(("bare", prec), []).append(bare(prec))
            times.setdefault(("dense", prec), []).append(dense(prec))
    out = {}
    for prec in precisions:
        b, d = float(np.median(times[("bare", prec)])), float(np.median(times[("dense", prec)]))
        out[prec] = {"bare": b, "dense": d, "ratio": d / b, "n": n}
    return out


def print_comparison(result: dict[str, dict[str, float]]) -> None:
    for prec, r in result.items():
        n = r["n"]
        print(f"  {prec}: bare network {r['bare']:6.2f} s ({n / r['bare']:6.0f}/s)   dense_embeddings "
              f"{r['dense']:6.2f} s ({n / r['dense']:6.0f}/s)   ratio {r['ratio']:4.2f}x (target <= 1.10x)")


def main() -> None:
    import medssl

    medssl.tune_malloc()  # as the CLI and the notebooks' kernels (Makefile) do
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128, help="volume edge in voxels")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    p.add_argument("--batch", type=int, default=256, help="patches per forward pass (both sides)")
    p.add_argument("--method", default="isimed", help="a registered method at its demo preset (default: demo ISImed)")
    p.add_argument("--bf16", action="store_true", help="time bf16 even where the CPU emulates it")
    args = p.parse_args()
    dev = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; "
          "timings on a shared machine vary by 10-30 % or more")
    precisions = ["fp32"]
    if resolve_precision("auto", dev) == "bf16" or args.bf16:
        precisions.append("bf16")
    else:
        print("bf16 skipped: this CPU has no native bf16 (resolve_precision('auto') picks fp32); --bf16 forces it")
    result = compare(_method(args.method), bench_volume(args.size), precisions, args.rounds, args.batch, dev)
    n = next(iter(result.values()))["n"]
    print(f"\ndense descriptors: {args.size}^3 volume at stride {STRIDE} = {n} patches, {args.method} "
          f"(demo preset), batches of {args.batch}, median of {args.rounds} alternating rounds")
    print_comparison(result)


if __name__ == "__main__":
    main()
