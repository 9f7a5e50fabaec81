"""Evaluation rows side by side (``medssl.evaluate.rows``) against one row at a time.

The demo's evaluation tables have one row per method; ``20_latent_space`` and ``50_segmentation``
compute ``workers`` rows at once, each on one thread (``workers="auto"``). This script measures that on
the demo cohort with the demo's networks (untrained: the cost does not depend on the weights):

- **baseline, one row at a time**: kNN segmentation (``evaluate_knn_segmentation``: dense descriptors
  of the atlases and the test subjects, exact search, scores) of every row in turn, with torch's
  default threads (every core), as the notebooks did before;
- **rows side by side**: the same call with ``workers=--workers``, each worker on one thread.

Both sides run in this process on the same data, baseline first, each with an empty descriptor cache;
the tables must be identical (the script checks it), and the ratio ``baseline / side by side`` is the
speed-up.

Run: ``MEDSSL_DATA=... python benchmarks/eval_rows.py [--rows 6] [--queries 4] [--workers 2]``
(about 3 minutes on 2 cores at the defaults).
"""

from __future__ import annotations

import argparse
import time

import torch

from medssl.data.source import open_data
from medssl.evaluate import knn_seg
from medssl.evaluate.segmetrics import organ_set
from medssl.methods import list_methods
from medssl.presets import build_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=6, help="the first N demo methods (11 in the demo)")
    ap.add_argument("--queries", type=int, default=4, help="test subjects labelled (8 in the demo)")
    ap.add_argument("--atlases", type=int, default=5)
    ap.add_argument("--stride", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    data = open_data("demo", n_subjects=48, cohort_seed=0, target_spacing_mm=3.0, progress=False)
    queries = data.volumes("test")[: args.queries]
    atlases = knn_seg.choose_atlas_pool(data.volumes("train"), args.atlases, 0)
    organs = organ_set(data.label_names)
    models = {}
    for name in list_methods(demo=True)[: args.rows]:
        torch.manual_seed(0)
        models[name] = build_run(name, "demo")[0].eval()
    kw = dict(n_atlases=[1, 3, args.atlases], n_draws=3, k=21, stride_vox=args.stride, surface_tolerance_mm=3.0,
              baselines=False, query_full_grid=True, batch_size=256, progress=False)

    results, seconds = {}, {}
    for label, workers in (("baseline, one row at a time", 1), (f"{args.workers} rows side by side", args.workers)):
        t0 = time.perf_counter()
        results[label] = knn_seg.evaluate_knn_segmentation(models, atlases, queries, organs, workers=workers, **kw)
        seconds[label] = time.perf_counter() - t0
    base, side = seconds.values()
    same = all(r.scores.equals(next(iter(results.values())).scores) for r in results.values())
    print(f"kNN segmentation: {len(models)} rows ({', '.join(models)}), {len(atlases)} atlases, {len(queries)} "
          f"test subjects, stride {args.stride}; torch threads {torch.get_num_threads()}")
    for label, s in seconds.items():
        print(f"  {label:32s} {s:7.1f} s  ({s / len(models):.1f} s per row)")
    print(f"  speed-up: {base / side:.2f}x; tables identical: {same}")
    if not same:
        raise SystemExit("the tables differ: rows side by side must give the same numbers")


if __name__ == "__main__":
    main()
