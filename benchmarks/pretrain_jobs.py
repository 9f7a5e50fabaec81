"""Concurrent single-threaded pretraining (the pipeline's default on a CPU) against one after another.

The pipeline runs its per-method notebooks ``jobs`` at a time on a CPU, each with one torch thread
(``medssl.pipeline``, "Concurrent pretraining"). This script measures that choice on the demo's data:

- **baseline, one after another**: each method trained in its own process with torch's default threads
  (every core), the pipeline's behaviour before;
- **concurrent, one thread each**: the same trainings started together, ``--jobs`` at a time, each
  process with ``OMP_NUM_THREADS=1``.

Both sides are whole processes (interpreter, imports, data, training, checkpoint), as in the pipeline,
timed by the wall clock; the ratio ``baseline / concurrent`` is the speed-up. Both run in the same
invocation on the same machine, baseline first. Each training writes a fresh run folder under a
temporary directory (deleted at the end), on the run's demo data (``MEDSSL_DATA`` as for ``make demo``).

Run: ``MEDSSL_DATA=... python benchmarks/pretrain_jobs.py [--methods regisimed simsiam] [--epochs 6] [--jobs 2]``
(about 2 minutes on 2 cores at the defaults).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# one training, in a child process: the pipeline's notebook minus the kernel
_CHILD = """
import sys, time, torch
import medssl
medssl.tune_malloc()
from medssl.pretraining import Pretraining
job = Pretraining(sys.argv[1], sys.argv[2], "demo", train_overrides={"epochs": int(sys.argv[3])}, progress=False)
job.run(resume=False, figures=False)
print(torch.get_num_threads(), flush=True)
"""


def _start(runs: Path, method: str, epochs: int, one_thread: bool, tag: str) -> subprocess.Popen:
    env = dict(os.environ, MEDSSL_RUNS=str(runs))
    if one_thread:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", _CHILD, f"{tag}-{method}", method, str(epochs)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen, method: str) -> int:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"training {method} failed:\n{err[-3000:]}")
    return int(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["regisimed", "simsiam"])
    ap.add_argument("--epochs", type=int, default=6, help="epochs of the demo preset (7 steps each)")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="medssl-jobs-") as tmp:
        runs = Path(tmp)
        t0 = time.perf_counter()
        threads_seq = [_wait(_start(runs, m, args.epochs, False, "seq"), m) for m in args.methods]
        seq = time.perf_counter() - t0

        t0 = time.perf_counter()
        pending, running, threads_par = list(args.methods), [], []
        while pending or running:
            while pending and len(running) < args.jobs:
                m = pending.pop(0)
                running.append((m, _start(runs, m, args.epochs, True, "par")))
            m, proc = running.pop(0)
            threads_par.append(_wait(proc, m))
        par = time.perf_counter() - t0
    print(f"{len(args.methods)} trainings ({', '.join(args.methods)}), {args.epochs} epochs of the demo preset each, "
          f"{os.cpu_count()} cores")
    print(f"  baseline, one after another (torch threads {threads_seq}): {seq:7.1f} s")
    print(f"  concurrent, {args.jobs} at a time (torch threads {threads_par}):   {par:7.1f} s")
    print(f"  speed-up: {seq / par:.2f}x")


if __name__ == "__main__":
    main()
