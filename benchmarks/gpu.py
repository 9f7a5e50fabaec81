"""One command for a GPU machine: the CUDA tests, one training step per method, dense descriptors.

``python benchmarks/gpu.py`` (under 8 minutes on one GPU; needs no network and no demo data):

1. **CUDA tests**: ``pytest -m cuda tests`` in a subprocess (device and precision choice, fp16 with its
   gradient scaler, bf16, the CUDA RNG restored on resume, a one-rank NCCL group; ``tests/train/test_cuda.py``).
2. **One training step per registered method at its ``paper`` preset**: ``fit`` for ``--steps`` + 1 steps
   on synthetic volumes (64 of 128^3 with a ball as the body mask, enough for every paper batch), the
   first step dropped as warm-up; per method the median step time, the peak GPU memory
   (``torch.cuda.max_memory_allocated``), and the share of the step spent waiting for data (the
   training records' ``sample_share``). A method that does not fit in memory is reported, not fatal.
3. **Dense descriptors of a 128^3 scan** at stride 4 with the paper ISImed network (DenseNet121, 32^3)
   against the bare network on pre-made batches on the GPU, in fp32 and the GPU's autocast precision
   (``benchmarks/dense.py``'s comparison).

Without a CUDA GPU it runs what it can on the CPU and says what it skipped: the CUDA tests are collected
and skip themselves, the step harness runs at the ``tiny`` preset (a check that it works, not a timing of
the paper settings), and the dense comparison uses the demo network on a 64^3 volume.

The exit status is 1 when a CUDA test fails or a method's step fails (the rest still runs and prints).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS in fit (medssl.train.determinism)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # benchmarks/dense.py: spinning OpenMP threads distort timings

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/dense.py


def run_cuda_tests(timeout_s: int) -> tuple[str, bool]:
    """The summary line of ``pytest -m cuda tests`` and whether it passed (no failure or error)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"TIMEOUT after {timeout_s} s", False
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    detail = [ln for ln in lines if ln.startswith(("FAILED", "ERROR", "SKIPPED"))]
    summary = lines[-1] if lines else proc.stderr.strip()[-300:]
    print("\n".join(f"    {ln}" for ln in detail[:40]))
    return f"{summary} (exit {proc.returncode}, {time.perf_counter() - t0:.0f} s)", proc.returncode == 0


def synthetic_volumes(n: int, size: int, seed: int = 0) -> list:
    """``n`` smooth-ish random volumes of ``size^3`` at 1.5 mm with a ball as the body mask."""
    from medssl.data.volume import Volume

    rng = np.random.default_rng(seed)
    ijk = np.indices((size,) * 3, dtype=np.float32) / (size - 1) * 2 - 1
    body = ((ijk**2).sum(0) <= 0.85).astype(np.uint8)
    base = np.cos(3 * ijk[0]) * np.sin(2 * ijk[1]) + ijk[2]  # some structure, so crops differ
    out = []
    for i in range(n):
        data = (base + 0.3 * rng.standard_normal((size,) * 3, dtype=np.float32)) * body
        out.append(Volume(data[None].astype(np.float32), np.diag([1.5, 1.5, 1.5, 1.0]), f"syn{i:03d}",
                          aux={"body": body}))
    return out


def time_steps(names: list[str], preset: str, device: str, steps: int, volumes: list) -> list[dict]:
    """Per method: median step time (first step dropped), peak GPU memory, share of the step waiting for data."""
    from medssl.presets import build_run
    from medssl.train import fit
    from medssl.train.precision import resolve_precision

    cuda = device.startswith("cuda")
    rows = []
    for name in names:
        row: dict = {"method": name}
        try:
            model, cfg = build_run(name, preset, train_overrides={
                "epochs": 1, "steps_per_epoch": steps + 1, "log_every": 1, "device": device, "keep_last": 0})
            row["precision"] = resolve_precision(cfg.precision, torch.device(device))
            if not model.trains:  # an untrained baseline (e.g. random init): fit only saves its initial state
                row["untrained"] = True
                rows.append(row)
                print(_step_line(row), flush=True)
                continue
            stamps: list[tuple[float, dict]] = []
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                fit(model, volumes, cfg, d, progress=False, tensorboard=False,
                    callbacks=[lambda r, s=stamps: s.append((time.perf_counter(), r)) and False])
                row["total_s"] = time.perf_counter() - t0
            train = [(t, r) for t, r in stamps if r.get("split") == "train"]
            gaps = np.diff([t for t, _ in train])  # step i+1 ends gaps[i] after step i: steps 2.. (warm-up dropped)
            row["step_s"] = float(np.median(gaps)) if len(gaps) else float("nan")
            row["data_wait_share"] = float(np.median([r["sample_share"] for _, r in train[1:]])) if len(train) > 1 \
                else float("nan")
            row["patches_per_s"] = float(np.median([r["samples_per_s"] for _, r in train[1:]])) if len(train) > 1 \
                else float("nan")
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = "out of GPU memory: " + str(e).splitlines()[0][:120]
        except Exception as e:  # one method's failure is a finding, not the end of the check
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        finally:
            model = None
            if cuda:
                torch.cuda.empty_cache()
        rows.append(row)
        print(_step_line(row), flush=True)
    return rows


def _step_line(row: dict) -> str:
    if "error" in row:
        return f"    {row['method']:24s} FAILED: {row['error']}"
    if row.get("untrained"):
        return f"    {row['method']:24s} untrained baseline: no training step to time"
    peak = f"{row['peak_gib']:6.2f} GiB" if np.isfinite(row["peak_gib"]) else "   n/a (CPU)"
    return (f"    {row['method']:24s} {row['precision']:5s} step {row['step_s']:7.3f} s  "
            f"{row['patches_per_s']:8.0f} patches/s  peak {peak}  data wait {100 * row['data_wait_share']:5.1f} %")


def main() -> None:
    import medssl

    medssl.tune_malloc()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per method (after one warm-up step)")
    p.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    p.add_argument("--no-tests", action="store_true", help="skip the CUDA tests")
    p.add_argument("--dense-rounds", type=int, default=2)
    args = p.parse_args()

    from medssl.methods import list_methods

    gpu = torch.cuda.is_available()
    skipped: list[str] = []
    t_start = time.perf_counter()
    if gpu:
        props = torch.cuda.get_device_properties(0)
        print(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, torch "
              f"{torch.__version__}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    else:
        print(f"no CUDA GPU (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}): running what the "
              f"CPU can ({torch.get_num_threads()} threads)")

    print("\n1. CUDA-marked tests (pytest -m cuda tests)")
    tests_ok = True
    if args.no_tests:
        skipped.append("CUDA tests (--no-tests)")
    else:
        result, tests_ok = run_cuda_tests(timeout_s=240)
        print(f"    {result}")
        if not gpu:
            skipped.append("CUDA tests: collected, every one skipped itself (no CUDA)")

    names = args.methods or list_methods()
    preset, device, size, n_vol = ("paper", "cuda:0", 128, 64) if gpu else ("tiny", "cpu", 40, 8)
    print(f"\n2. one training step per method at the '{preset}' preset on {device} ({args.steps} timed steps "
          f"after one warm-up, {n_vol} synthetic {size}^3 volumes)")
    if not gpu:
        skipped.append("paper-preset step times, peak GPU memory (no GPU; the tiny preset on the CPU checks the harness)")
    rows = time_steps(names, preset, device, args.steps, synthetic_volumes(n_vol, size))

    import dense as dense_bench

    from medssl.train.precision import resolve_precision

    dev = torch.device("cuda", 0) if gpu else torch.device("cpu")
    auto = resolve_precision("auto", dev)
    precisions = ["fp32"] + ([auto] if auto != "fp32" else [])
    if gpu:
        method, vol_size, what = dense_bench._method("isimed", "paper"), 128, "paper ISImed network (DenseNet121, 32^3)"
    else:
        method, vol_size, what = dense_bench._method("isimed"), 64, "demo ISImed network (SmallCNN, 32^3)"
        skipped.append("dense descriptors of a 128^3 scan on the GPU (no GPU; the demo network on a 64^3 volume on "
                       "the CPU instead)")
    print(f"\n3. dense descriptors: {vol_size}^3 at stride {dense_bench.STRIDE}, {what}, on {dev}, "
          f"{', '.join(precisions)}, median of {args.dense_rounds} rounds")
    res = dense_bench.compare(method, dense_bench.bench_volume(vol_size), precisions, args.dense_rounds, 256, dev)
    dense_bench.print_comparison(res)

    print(f"\ndone in {time.perf_counter() - t_start:.0f} s")
    failed = [r["method"] for r in rows if "error" in r]
    if failed:
        print(f"step timing failed for: {', '.join(failed)}")
    if skipped:
        print("skipped:\n" + "\n".join(f"  - {s}" for s in skipped))
    if failed or not tests_ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
