"""Extra demo cost of issue 16's evaluation changes: all 8 test subjects, registration rows, one more twin.

Measured on the demo cohort with one method row (an untrained demo SmallCNN: the cost does not
depend on the weights) plus the baselines, and extrapolated to the demo's rows:

- ``20_latent_space`` correspondence: before, 4 subject pairs (``subject_pairs``); now every test
  subject as the query against ``--partners`` others (0: all 7, 56 pairs). Per method row: dense
  embeddings of the subjects those pairs use (full grid, stride 6) and the nearest-neighbour search.
- ``50_segmentation`` kNN: before, 3 test queries embedded on the body only; now 8 queries whose
  full-grid embeddings ``20`` already cached (``query_full_grid``), so only the kNN votes and Dice
  scores of every draw are added; the identity rows once.
- The registration rows (``aligned-identity (body affine)`` and ``registration (affine)``): the
  ordered test pairs of 20 and 5 atlases x 8 queries (50), each registered once (cached after).
- One more untrained twin row (``random-init[smallcnn,25]``, Doersch's architecture) in every step.

The "before" numbers are measured in the same run (baseline = the old protocol). Dense
embeddings are cached in a temporary folder, so each subject is embedded once, as in the demo.

Run: ``MEDSSL_DATA=... python benchmarks/demo_cost.py [--rows 13] [--partners 3] [--n-atlases 1 3 5]``
(about 8 minutes on 2 loaded cores).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from medssl.data.source import open_data
from medssl.evaluate import knn_seg
from medssl.evaluate.correspondence import correspondence_from_dense, query_pairs, subject_pairs
from medssl.evaluate.dense import dense_embeddings
from medssl.evaluate.registration import Registrar, RegistrationConfig
from medssl.evaluate.runs import random_init_like
from medssl.evaluate.segmetrics import organ_set
from medssl.methods import create_method
from medssl.presets import preset


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=13, help="method rows of the demo (11 demo methods + 2 twins)")
    ap.add_argument("--stride", type=int, default=6)
    ap.add_argument("--partners", type=int, default=3, help="correspondence partners per query (0: all others)")
    ap.add_argument("--n-atlases", type=int, nargs="+", default=[1, 3, 5])
    args = ap.parse_args()

    data = open_data("demo", n_subjects=48, cohort_seed=0, target_spacing_mm=3.0, progress=False)
    test = data.volumes("test")
    by_id = {str(v.case_id): v for v in test}
    atlases = knn_seg.choose_atlas_pool(data.volumes("train"), 5, 0)
    organs = organ_set(data.label_names)
    model = random_init_like(create_method("isimed", **preset("isimed", "demo")[0]))
    cache = tempfile.mkdtemp(prefix="medssl-cost-")
    kw = dict(stride_vox=args.stride, batch_size=256, cache_dir=cache, progress=False)

    # ---- 20: correspondence
    old_pairs = subject_pairs(list(by_id), 4, 0)
    new_pairs = query_pairs(list(by_id), args.partners, 0)
    old_subjects = sorted({c for p in old_pairs for c in p})
    dense, t_dense = {}, {}
    for c in by_id:
        dense[c], t_dense[c] = _timed(lambda c=c: dense_embeddings(model, by_id[c], **kw))
    full_s = float(np.mean(list(t_dense.values())))

    def corr(pairs):
        for p, (a, b) in enumerate(pairs):
            correspondence_from_dense(dense[a], dense[b], lambda x, a=a, b=b: data.cohort.correspondence(a, b, x),
                                      n_points=200, seed=p)

    _, t_corr_old = _timed(lambda: corr(old_pairs))
    _, t_corr_new = _timed(lambda: corr(new_pairs))
    corr_old = len(old_subjects) * full_s + t_corr_old
    corr_new = len(by_id) * full_s + t_corr_new

    # ---- 50: kNN (one row + the identity rows), dense body embeddings (before: 3 test queries; now: reused)
    body_t = []
    for v in [*atlases, *test[:3]]:
        _, t = _timed(lambda v=v: dense_embeddings(model, v, foreground_only=True, **kw))
        body_t.append(t)
    body_s = float(np.mean(body_t))
    common = dict(n_draws=3, k=21, stride_vox=args.stride, surface_tolerance_mm=3.0,
                  kinds={"m": "method"}, batch_size=256, cache_dir=cache, progress=False)
    r_old, t_knn_old = _timed(lambda: knn_seg.evaluate_knn_segmentation(
        {"m": model}, atlases, test[:3], organs, n_atlases=[1, 3, 5], **common))
    r_new, t_knn_new = _timed(lambda: knn_seg.evaluate_knn_segmentation(
        {"m": model}, atlases, test, organs, n_atlases=args.n_atlases, query_full_grid=True, **common))
    row_old, row_new = r_old.seconds["m"], r_new.seconds["m"]
    ident_old, ident_new = r_old.seconds["identity"], r_new.seconds["identity"]

    # ---- registrations (fresh, uncached)
    reg_dir = tempfile.mkdtemp(prefix="medssl-cost-reg-")
    regs = [Registrar(RegistrationConfig(image="body"), reg_dir), Registrar(RegistrationConfig(), reg_dir)]
    reg_t = {}
    for r in regs:
        _, t20 = _timed(lambda r=r: [r.transform(by_id[a], by_id[b]) for a, b in new_pairs])
        _, t50 = _timed(lambda r=r: [r.transform(q, a) for q in test for a in atlases])
        reg_t[r.name] = (t20, t50, r.seconds_per_pair())

    print(f"\ndemo cohort, stride {args.stride} vox; one SmallCNN row; shared 2-core machine under load")
    print(f"dense embedding per subject: full grid {full_s:.1f} s, body only {body_s:.1f} s")
    print(f"20 correspondence per method row: before {len(old_pairs)} pairs / {len(old_subjects)} subjects "
          f"{corr_old:.1f} s; now {len(new_pairs)} pairs / {len(by_id)} subjects {corr_new:.1f} s "
          f"(ratio {corr_new / corr_old:.2f}; of which search {t_corr_old:.1f} -> {t_corr_new:.1f} s)")
    print(f"50 kNN per row (descriptors cached): before 3 queries, n = 1, 3, 5: {row_old:.1f} s (+ their body "
          f"embeddings {3 * body_s:.1f} s, now reused from 20); now 8 queries, n = {args.n_atlases}: {row_new:.1f} s "
          f"(ratio {row_new / (row_old + 3 * body_s):.2f}); identity rows {ident_old:.1f} -> {ident_new:.1f} s")
    for name, (t20, t50, per) in reg_t.items():
        print(f"{name}: 20: {len(new_pairs)} pairs {t20:.0f} s, 50: {len(atlases) * len(test)} pairs {t50:.0f} s "
              f"({per:.2f} s per pair)")
    extra_row = corr_new - corr_old + row_new - row_old - 3 * body_s
    extra = args.rows * extra_row + (ident_new - ident_old) + sum(t20 + t50 for t20, t50, _ in reg_t.values())
    one_twin = corr_new + row_new + 5 * body_s
    print(f"\nextra per method row: {extra_row:.0f} s; demo ({args.rows} rows): {extra / 60:.1f} min extra "
          f"(+ one more twin row: about {one_twin / 60:.1f} min in 20 and 50, plus its probe in 30)")


if __name__ == "__main__":
    main()
