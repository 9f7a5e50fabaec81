"""How far apart two subjects of a demo cohort are: the plain cohort against ``variability="study"``.

For ordered pairs of test subjects (A, B) it measures, on the subjects' own files (every subject
lies on the template's grid, so labels compare voxel by voxel):

- **identity error** (mm): a body point of A against its true corresponding point in B
  (``DemoCohort.correspondence``, exact), i.e. what predicting "the same world coordinate" costs;
- **aligned-identity error** (mm): the same after matching the two bodies' moments
  (``geometry.moment_alignment``: translation and per-axis scale, the evaluations' shortcut row);
- **Dice between subjects' organs**: organ k of A against organ k of B on the same world grid
  (what the identity shortcut scores in kNN segmentation, roughly);
- **organ volumes**: coefficient of variation over the cohort's subjects (train, val and test).

Errors are medians over ``--points`` body points per pair, then mean and range over pairs. Run::

    .venv/bin/python benchmarks/cohort_distance.py               # 48 subjects, plain vs study
    .venv/bin/python benchmarks/cohort_distance.py --n-subjects 12 --pairs 6

The cohorts are built (and cached in ``$MEDSSL_DATA``) if missing: a few minutes each on 2 cores.
"""

from __future__ import annotations

import argparse
import time

import nibabel as nib
import numpy as np
import pandas as pd

from medssl.data.demo import build_demo_cohort
from medssl.geometry import apply_affine_mm, moment_alignment

ORGANS = ("liver", "spleen", "kidney_left", "kidney_right", "stomach", "gallbladder", "pancreas", "urinary_bladder")


def _load(cohort, case_id):
    row = cohort.manifest.set_index("case_id").loc[case_id]
    img = nib.load(str(row["image"]))
    return np.asarray(img.dataobj), np.asarray(nib.load(str(row["label"])).dataobj), img.affine


def _body_points(image, affine, n, rng):
    ijk = np.argwhere(image > -500)
    pick = ijk[rng.choice(len(ijk), size=min(n, len(ijk)), replace=False)]
    return pick @ affine[:3, :3].T + affine[:3, 3], ijk @ affine[:3, :3].T + affine[:3, 3]


def pair_distances(cohort, pairs, n_points, seed=0):
    rng = np.random.default_rng(seed)
    ids = {v: k for k, v in cohort.label_names.items()}
    rows = []
    for a, b in pairs:
        img_a, lab_a, aff_a = _load(cohort, a)
        img_b, lab_b, aff_b = _load(cohort, b)
        assert np.allclose(aff_a, aff_b), "demo subjects share the template grid"
        query, body_a = _body_points(img_a, aff_a, n_points, rng)
        _, body_b = _body_points(img_b, aff_b, 1, rng)
        truth = cohort.correspondence(a, b, query)
        aligned = apply_affine_mm(moment_alignment(body_a, body_b), query)
        dice = {}
        for organ in ORGANS:
            k = ids.get(organ)
            if k is None:
                continue
            ma, mb = lab_a == k, lab_b == k
            if ma.any() and mb.any():
                dice[organ] = 2 * np.logical_and(ma, mb).sum() / (ma.sum() + mb.sum())
        rows.append({"case_a": a, "case_b": b,
                     "identity_mm": float(np.median(np.linalg.norm(query - truth, axis=1))),
                     "aligned_identity_mm": float(np.median(np.linalg.norm(aligned - truth, axis=1))),
                     "organ_dice": float(np.mean(list(dice.values()))), **{f"dice_{k}": v for k, v in dice.items()}})
    return pd.DataFrame(rows)


def organ_volumes(cohort):
    ids = {v: k for k, v in cohort.label_names.items()}
    rows = []
    for case in cohort.case_ids("train") + cohort.case_ids("val") + cohort.case_ids("test"):
        _, lab, aff = _load(cohort, case)
        voxel_ml = abs(np.linalg.det(aff[:3, :3])) / 1000
        rows.append({"case_id": case, **{o: float((lab == ids[o]).sum() * voxel_ml) for o in ORGANS if o in ids}})
    return pd.DataFrame(rows).set_index("case_id")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-subjects", type=int, default=48)
    ap.add_argument("--pairs", type=int, default=8, help="ordered test-subject pairs (a ring over the test split)")
    ap.add_argument("--points", type=int, default=2000)
    args = ap.parse_args()
    out = {}
    for name in ("none", "study"):
        t0 = time.perf_counter()
        cohort = build_demo_cohort(n_subjects=args.n_subjects, variability=None if name == "none" else name,
                                   progress=False)
        built = time.perf_counter() - t0
        test = cohort.case_ids("test")
        pairs = [(test[i], test[(i + 1) % len(test)]) for i in range(min(args.pairs, len(test)))]
        d = pair_distances(cohort, pairs, args.points)
        vols = organ_volumes(cohort)
        cv = (vols.std() / vols.mean()).rename("cv")
        out[name] = (d, cv)
        print(f"\n== cohort variability={name}: {cohort.root} (ready in {built:.0f} s); {len(pairs)} test pairs, "
              f"{args.points} body points each; organ volumes over {len(vols)} subjects")
        summary = d[["identity_mm", "aligned_identity_mm", "organ_dice"]].agg(["mean", "min", "max"]).T
        print(summary.round(3).to_string())
        print("organ volume coefficient of variation:", ", ".join(f"{k} {v:.3f}" for k, v in cv.items()))
        print("mean Dice per organ (identity):",
              ", ".join(f"{c[5:]} {d[c].mean():.3f}" for c in d.columns if c.startswith("dice_")))
    (d0, cv0), (d1, cv1) = out["none"], out["study"]
    print("\nstudy / plain ratios (same subjects' positions in the split, same seed):")
    print(f"  identity error {d1.identity_mm.mean() / d0.identity_mm.mean():.2f}x, aligned-identity error "
          f"{d1.aligned_identity_mm.mean() / d0.aligned_identity_mm.mean():.2f}x, organ Dice "
          f"{d1.organ_dice.mean():.3f} vs {d0.organ_dice.mean():.3f}, organ volume CV (mean over organs) "
          f"{cv1.mean():.3f} vs {cv0.mean():.3f}")


if __name__ == "__main__":
    main()
