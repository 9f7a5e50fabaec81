"""What IoU-interval crop pairs contain: the thesis's Figure 3.2 as a measurement.

The thesis (Konieczkowicz, AGH MSc thesis 2023, Fig. 3.2) motivates its intervals by the share of
pairs whose two crops show at least one common organ, "cases where both views contained background
only" excluded: [0, 0] gives few semantically related pairs. It estimated that on 2D slices.
:func:`iou_interval_pairs` draws pairs with the very sampler SimSiam trains on
(:class:`medssl.sampling.iou_pairs.IoUPairSampler`, same seed for every interval) from labelled
volumes and records, per pair, the realised IoU, whether it fell back, and which labels each crop
holds; :func:`shared_label_summary` turns that into the fraction per interval.

"Shares an organ" means: some label id (> 0, optionally restricted to ``labels``) has at least one
voxel inside both boxes. A pair where neither box holds any counted label is excluded (the thesis's
rule); a pair where only one does counts as not shared.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from medssl.data.volume import Volume
from medssl.sampling.iou_pairs import IoUPairSampler

__all__ = ["iou_interval_pairs", "shared_label_summary", "interval_name", "resolve_label_ids", "iou_methods_table",
           "study_intervals", "interval_headline"]


def interval_name(iou_min: float, iou_max: float) -> str:
    """``"[0.3, 0.6]"``: how an interval is written in tables and figures."""
    return f"[{iou_min:g}, {iou_max:g}]"


def resolve_label_ids(volume: Volume, labels: Sequence[int | str] | None) -> np.ndarray | None:
    """Label ids to count: ``None`` = every id > 0; names are looked up in ``volume.label_names``."""
    if labels is None or len(labels) == 0:
        return None
    names = {str(v).lower(): int(k) for k, v in (volume.label_names or {}).items()}
    ids = []
    for lab in labels:
        if isinstance(lab, (int, np.integer)):
            ids.append(int(lab))
        elif str(lab).lower() in names:
            ids.append(names[str(lab).lower()])
        else:
            raise KeyError(f"{volume.source or volume.case_id}: no label named {lab!r}; "
                           f"known: {sorted(names)[:20]}{' ...' if len(names) > 20 else ''}")
    return np.asarray(sorted(set(ids)), dtype=np.int64)


def _labels_in_boxes(label: np.ndarray, boxes: np.ndarray, counted: np.ndarray | None, n_ids: int) -> np.ndarray:
    """``(P, n_ids)`` bool: which label ids have a voxel inside each box ``(P, 6)``."""
    out = np.zeros((len(boxes), n_ids), dtype=bool)
    for k, (x0, y0, z0, x1, y1, z1) in enumerate(boxes):
        present = np.bincount(np.asarray(label[x0:x1, y0:y1, z0:z1]).ravel(), minlength=n_ids) > 0
        out[k] = present[:n_ids]
    out[:, 0] = False  # background
    if counted is not None:
        keep = np.zeros(n_ids, dtype=bool)
        keep[counted[counted < n_ids]] = True
        out &= keep
    return out


def iou_interval_pairs(
    volumes: Sequence[Volume],
    intervals: Mapping[str, tuple[float, float]] | Sequence[tuple[float, float]],
    *,
    crop_size_vox: int,
    pairs_per_volume: int = 100,
    crop2_size_vox: int | None = None,
    crop1_on_body: bool = True,
    crop2_draw: str = "analytic",
    spatial_dims: int = 3,
    labels: Sequence[int | str] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Draw pairs for every interval from every labelled volume and tabulate what they hold.

    Args:
        volumes: volumes with a label map (others are skipped; none at all raises).
        intervals: ``{name: (iou_min, iou_max)}`` (e.g. method name -> interval) or a list of intervals
            (named by :func:`interval_name`).
        crop_size_vox, crop2_size_vox, crop1_on_body, crop2_draw, spatial_dims: as the SimSiam config
            (:class:`medssl.sampling.iou_pairs.IoUPairSampler`).
        labels: label ids or names that count as organs (``None``: every label > 0).
        seed: every interval draws from ``np.random.default_rng(seed)``: the same crop-1 stream where
            the algorithm allows it.

    Returns:
        One row per pair: ``interval`` (name), ``iou_min``, ``iou_max``, ``case_id``, ``iou``, ``fallback``,
        ``n_labels_1``, ``n_labels_2`` (counted labels in each crop), ``shared`` (a label in both),
        ``both_background`` (no counted label in either crop).
    """
    named = dict(intervals) if isinstance(intervals, Mapping) else {interval_name(*iv): tuple(iv) for iv in intervals}
    labelled = [v for v in volumes if v.label is not None]
    if not labelled:
        raise ValueError("iou_interval_pairs needs volumes with label maps; none of the "
                         f"{len(volumes)} given has one")
    rows = []
    for name, (lo, hi) in named.items():
        sampler = IoUPairSampler(crop_size_vox, lo, hi, volumes_per_batch=1, pairs_per_volume=pairs_per_volume,
                                 crop2_size_vox=crop2_size_vox, crop1_on_body=crop1_on_body, crop2_draw=crop2_draw,
                                 spatial_dims=spatial_dims)
        rng = np.random.default_rng(seed)
        for vol in labelled:
            pairs = sampler.draw_pairs(vol, rng)
            label = np.asarray(vol.label)
            n_ids = int(label.max()) + 1
            counted = resolve_label_ids(vol, labels)
            in1 = _labels_in_boxes(label, pairs.box1, counted, n_ids)
            in2 = _labels_in_boxes(label, pairs.box2, counted, n_ids)
            rows.append(pd.DataFrame({
                "interval": name, "iou_min": lo, "iou_max": hi, "case_id": vol.case_id,
                "iou": pairs.iou, "fallback": pairs.fallback,
                "n_labels_1": in1.sum(1), "n_labels_2": in2.sum(1),
                "shared": (in1 & in2).any(1), "both_background": ~in1.any(1) & ~in2.any(1),
            }))
    return pd.concat(rows, ignore_index=True)


def shared_label_summary(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per interval: the fraction of pairs sharing a label (both-background pairs excluded), and context.

    Columns: ``interval``, ``iou_min``, ``iou_max``, ``n_pairs``, ``fallback_rate``, ``iou_mean``,
    ``both_background_rate``, ``shared_fraction`` (pooled over every counted pair), ``shared_fraction_std``
    (standard deviation over subjects of the per-subject fraction: pairs of one subject are not
    independent, so this is the spread to read), ``n_subjects``. Intervals in order of appearance.
    """
    out = []
    for name, g in pairs.groupby("interval", sort=False):
        kept = g[~g["both_background"]]
        per_subject = kept.groupby("case_id")["shared"].mean()
        out.append({
            "interval": name, "iou_min": g["iou_min"].iloc[0], "iou_max": g["iou_max"].iloc[0],
            "n_pairs": len(g), "fallback_rate": float(g["fallback"].mean()), "iou_mean": float(g["iou"].mean()),
            "both_background_rate": float(g["both_background"].mean()),
            "shared_fraction": float(kept["shared"].mean()) if len(kept) else float("nan"),
            "shared_fraction_std": float(per_subject.std(ddof=1)) if len(per_subject) > 1 else float("nan"),
            "n_subjects": int(g["case_id"].nunique()),
        })
    return pd.DataFrame(out)


def iou_methods_table(run, methods: Sequence[str] | None = None) -> pd.DataFrame:
    """The IoU-pair methods of a run (config with ``iou_min``/``iou_max``) and what their training logged.

    Args:
        run: a run name, path or :class:`medssl.rundir.RunDir`.
        methods: method names; empty/None = every trained method of the run (non-IoU methods are skipped).

    Returns:
        One row per method: ``method``, ``iou_min``, ``iou_max``, ``interval``, and from ``metrics.jsonl``:
        ``collapse_z_train``/``collapse_p_train`` (mean over the last quarter of the training records),
        ``collapse_z_val``/``collapse_p_val`` and ``effective_rank_val`` (the last evaluation on the fixed
        validation patches), ``fallback_rate`` and ``iou_mean`` (over all training records). Empty when
        the run has no IoU-pair method.
    """
    import json

    from medssl.rundir import RunDir
    from medssl.train.metrics import read_metrics

    rd = RunDir(run)
    rows = []
    for name in rd.resolve_methods(methods):
        files = rd.files(name)
        config_path = files.config
        if not config_path.is_file():
            continue
        cfg = json.loads(config_path.read_text(encoding="utf-8")).get("method_config", {})
        if "iou_min" not in cfg:
            continue
        row = {"method": name, "iou_min": cfg["iou_min"], "iou_max": cfg["iou_max"],
               "interval": interval_name(cfg["iou_min"], cfg["iou_max"])}
        metrics_path = files.metrics
        if metrics_path.is_file():
            row.update(_training_summary(read_metrics(metrics_path)))
        rows.append(row)
    return pd.DataFrame(rows)


def _training_summary(metrics: pd.DataFrame) -> dict[str, float]:
    split = metrics.get("split", pd.Series("train", index=metrics.index))
    train, val = metrics[split == "train"], metrics[split == "val"]
    last = train.tail(max(1, len(train) // 4))
    out: dict[str, float] = {}
    for col in ("collapse_z", "collapse_p"):
        if col in train:
            out[f"{col}_train"] = float(last[col].mean())
        if col in val and len(val):
            out[f"{col}_val"] = float(val[col].iloc[-1])
    if "effective_rank" in val and len(val):
        out["effective_rank_val"] = float(val["effective_rank"].iloc[-1])
    for col in ("fallback_rate", "iou_mean"):
        if col in train:
            out[col] = float(train[col].mean())
    return out


def study_intervals(methods_table: pd.DataFrame,
                    default: Sequence[Sequence[float]]) -> dict[str, tuple[float, float]]:
    """``{name: (iou_min, iou_max)}``: the trained methods' intervals (named by method), else ``default`` (by interval)."""
    if len(methods_table):
        return {r.method: (float(r.iou_min), float(r.iou_max)) for r in methods_table.itertuples()}
    return {interval_name(*iv): (float(iv[0]), float(iv[1])) for iv in default}


def interval_headline(summary: pd.DataFrame, methods_table: pd.DataFrame, split: str) -> pd.DataFrame:
    """Headline rows (:meth:`medssl.rundir.RunDir.write_headline`) of the interval study.

    Per interval (named by its method when trained): the shared-organ fraction of its pairs on ``split``
    (a property of the sampler, no network involved), the sampler's fallback rate; per trained method:
    the collapse coefficient of z and p and the effective rank at the last validation.
    """
    rows = []
    for r in summary.itertuples():
        note = f"IoU {interval_name(r.iou_min, r.iou_max)}; pairs of the sampler, no network; both-background pairs excluded"
        rows.append({"method": r.interval, "metric": "shared_organ_fraction", "value": r.shared_fraction,
                     "std": r.shared_fraction_std, "n": r.n_subjects, "split": split, "higher_is_better": True,
                     "note": note + "; std over subjects"})
        rows.append({"method": r.interval, "metric": "pair_fallback_rate", "value": r.fallback_rate,
                     "n": r.n_pairs, "split": split, "higher_is_better": False, "note": note})
    for r in methods_table.to_dict("records"):
        for metric, better in (("collapse_z_val", False), ("collapse_p_val", False), ("effective_rank_val", True)):
            if metric in r and pd.notna(r[metric]):
                rows.append({"method": r["method"], "metric": metric.removesuffix("_val"), "value": r[metric],
                             "split": "val", "higher_is_better": better,
                             "note": f"IoU {r['interval']}; last evaluation on the fixed validation patches"})
    return pd.DataFrame(rows)
