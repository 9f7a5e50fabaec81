"""Registration as the positive control of cross-subject correspondence: accuracy and seconds per pair.

On the demo cohort's test subjects (each as the query against the others: 56 ordered pairs for
8 subjects), 200 seeded body points of the query (A) are mapped into the other subject (B) by

- ``identity`` (the same world coordinate) and ``moment`` (:func:`medssl.geometry.moment_alignment`
  of the body masks: translation + per-axis scale, the ``aligned-identity (scale+shift)`` row):
  the baselines;
- ``body rigid`` / ``body affine``: SimpleITK registration of the body masks (shape only; the
  rotation-aware alignment the evaluations could add, ``RegistrationConfig(image="body")``);
- ``affine``: SimpleITK intensity registration (rigid then affine, Mattes MI), the control row;
- ``affine+bspline`` (``--bspline``): a B-spline on top (slow: ~10 s per pair).

and compared with the true corresponding point from the cohort's stored deformations: median
error in mm, unsnapped and snapped to an ``--stride``-voxel grid of B as in the evaluations (the
grid floor is printed), seconds per pair, and each row's error and time relative to ``moment``
(the baseline measured in the same run). Registrations are not cached here (a fresh temporary
folder), so the seconds are real.

Run: ``MEDSSL_DATA=... python benchmarks/registration.py [--subjects 8] [--partners 0] [--bspline 4]``
(about 5 minutes on 2 cores for 56 pairs).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from sklearn.neighbors import NearestNeighbors

from medssl.data.source import open_data
from medssl.evaluate.correspondence import query_pairs
from medssl.evaluate.registration import Registrar, RegistrationConfig
from medssl.geometry import apply_affine_mm, moment_alignment, vox_to_world
from medssl.sampling.regions import foreground_mask


def _body_points(volume, stride: int) -> np.ndarray:
    vox = np.argwhere(foreground_mask(volume)[::stride, ::stride, ::stride]).astype(np.float64) * stride
    return vox_to_world(np.asarray(volume.affine, dtype=np.float64), vox)


def _grid_points(volume, stride: int) -> np.ndarray:
    axes = [np.arange(stride // 2, n, stride) for n in volume.shape_vox]
    mesh = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3).astype(np.float64)
    return vox_to_world(np.asarray(volume.affine, dtype=np.float64), mesh)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=8, help="test subjects (each is a query)")
    ap.add_argument("--partners", type=int, default=0, help="partners per query (0: all others)")
    ap.add_argument("--points", type=int, default=200)
    ap.add_argument("--stride", type=int, default=6, help="grid stride in voxels for the snapped errors (demo: 6)")
    ap.add_argument("--bspline", type=int, default=0, help="also affine+B-spline on the first N pairs")
    args = ap.parse_args()

    data = open_data("demo", n_subjects=48, cohort_seed=0, target_spacing_mm=3.0, progress=False)
    vols = {str(v.case_id): v for v in data.volumes("test")[: args.subjects]}
    pairs = query_pairs(list(vols), args.partners, seed=0)
    cache = tempfile.mkdtemp(prefix="medssl-reg-bench-")
    regs = {
        "body rigid": Registrar(RegistrationConfig(transform="rigid", image="body"), cache),
        "body affine": Registrar(RegistrationConfig(transform="affine", image="body"), cache),
        "affine": Registrar(RegistrationConfig(transform="affine"), cache),
    }
    bspline = Registrar(RegistrationConfig(transform="bspline"), cache)
    rows = ["identity", "moment", *regs, *(["affine+bspline"] if args.bspline else [])]
    err = {r: [] for r in rows}
    snapped = {r: [] for r in rows}
    floor: list[np.ndarray] = []
    secs = {r: [] for r in rows}
    body = {c: _body_points(v, 4) for c, v in vols.items()}
    for p, (a, b) in enumerate(pairs):
        va, vb = vols[a], vols[b]
        q = _body_points(va, args.stride)
        q = q[np.random.default_rng([0, p]).choice(len(q), size=min(args.points, len(q)), replace=False)]
        true = data.cohort.correspondence(a, b, q)
        grid = NearestNeighbors(n_neighbors=1).fit(_grid_points(vb, args.stride))
        floor.append(np.linalg.norm(grid._fit_X[grid.kneighbors(true)[1][:, 0]] - true, axis=1))
        preds = {}
        t0 = time.perf_counter()
        preds["identity"] = q
        secs["identity"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        preds["moment"] = apply_affine_mm(moment_alignment(body[a], body[b]), q)
        secs["moment"].append(time.perf_counter() - t0)
        for name, reg in regs.items():
            preds[name] = reg.map_points(va, vb, q)
            secs[name].append(reg.seconds[(b, a)])
        if p < args.bspline:
            preds["affine+bspline"] = bspline.map_points(va, vb, q)
            secs["affine+bspline"].append(bspline.seconds[(b, a)])
        for name, pred in preds.items():
            err[name].append(np.linalg.norm(pred - true, axis=1))
            snap = grid._fit_X[grid.kneighbors(pred)[1][:, 0]]
            snapped[name].append(np.linalg.norm(snap - true, axis=1))
        print(f"pair {p + 1}/{len(pairs)} {a} -> {b}: " + ", ".join(
            f"{n} {np.median(err[n][-1]):.1f} mm" for n in preds), flush=True)

    n_sub = len(vols)
    print(f"\n{len(pairs)} ordered pairs of {n_sub} demo test subjects, {args.points} body points each; grid stride "
          f"{args.stride} vox ({3 * args.stride} mm): grid floor median {np.median(np.concatenate(floor)):.1f} mm")
    base_err = np.median(np.concatenate(err["moment"]))
    base_pp = [np.median(e) for e in err["moment"]]
    print(f"{'row':>16} {'pairs':>5} {'median mm':>10} {'snapped mm':>10} {'s/pair':>7} {'pairs/s':>8} "
          f"{'err / moment':>12} {'pairs worse than moment':>24}")
    for name in rows:
        e = np.median(np.concatenate(err[name]))
        s = np.median(np.concatenate(snapped[name]))
        sp = float(np.mean(secs[name]))
        per_pair = [np.median(x) for x in err[name]]
        worse = sum(x > y for x, y in zip(per_pair, base_pp))
        print(f"{name:>16} {len(err[name]):>5} {e:>10.1f} {s:>10.1f} {sp:>7.2f} {1 / max(sp, 1e-9):>8.1f} "
              f"{e / base_err:>12.2f} {worse:>17} / {len(per_pair)}")
    # per query subject (the evaluation's unit): mean of its pairs' median errors
    print("\nper query subject (mean of its pairs' median errors, mm):")
    for name in rows:
        by_q: dict[str, list[float]] = {}
        for (a, _), e in zip(pairs, err[name]):
            by_q.setdefault(a, []).append(float(np.median(e)))
        print(f"{name:>16} " + " ".join(f"{np.mean(v):6.1f}" for v in by_q.values()))


if __name__ == "__main__":
    main()
