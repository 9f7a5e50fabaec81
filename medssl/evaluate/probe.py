"""Linear-probe patch classification on frozen features (ISImed Table 1; design/evaluation.md sec. 3).

**Protocol (default, ``linear_probe`` with splits):** the probe's regularisation ``C`` is
chosen by a grouped cross-validation over the **validation** subjects only; the probe is then
fit on all validation patches and scored once on the **test** subjects, per subject (the unit
of the paired tests) and pooled. Nothing about the test split is used for any choice.

**Fallback (``linear_probe_cv``, no validation split):** ``StratifiedGroupKFold`` over
subjects, ``C`` chosen by an inner grouped CV on the train side of each fold only; the folds
are the units and the paired tests use the corrected resampled t-test
(:mod:`medssl.evaluate.stats`).

Either way: subjects never straddle fitting and scoring; standardisation is fit on the
fitting side only; metrics are computed per unit from that unit's predictions alone into a
new dict (nothing accumulates across units or methods); features are frozen
(:func:`medssl.evaluate.embed.embed_patches`: eval mode, no-grad, BatchNorm untouched).

Shortcut baselines come with every probe: raw intensities (:func:`raw_intensity_features`)
and **position only** (:func:`position_features`, the patch centre in mm, linear and cubic).
A method that does not beat the position-only rows has not shown more than "where the patch is".

**Positive control** (:func:`supervised_control`, row ``supervised-cnn``, kind ``control``):
a small 3D CNN trained *with the labels* on patches of the training subjects (drawn by the
same rule), its epoch chosen by AUC on the probe's validation patches, scored once on the
same test patches and units as every probe. It shows whether the task can be passed at all:
a table whose control sits near chance measures nothing (:func:`control_verdict`).

:func:`auc_by_stratum` splits the pooled test AUC by a property of the positives, e.g. the
lesion's share of the patch (:func:`share_strata`).

Metrics at threshold 0.5 on the predicted probability: AUC, accuracy and F1 from
scikit-learn; sensitivity (recall of class 1) and specificity (recall of class 0) from the
confusion counts.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from tqdm.auto import tqdm

from medssl.evaluate.embed import embed_patches
from medssl.evaluate.latent import z_slab_groups
from medssl.evaluate.patchsets import PatchSet

__all__ = [
    "CONTROL",
    "METRICS",
    "ProbeResult",
    "ProbeComparison",
    "binary_metrics",
    "grouped_folds",
    "linear_probe",
    "linear_probe_cv",
    "probe_methods",
    "probe_frozen_backbone",
    "raw_intensity_features",
    "position_features",
    "supervised_control",
    "target_patches",
    "has_target",
    "control_verdict",
    "share_strata",
    "share_bin_names",
    "dominant_instance",
    "auc_by_stratum",
]

METRICS = ("auc", "accuracy", "f1", "sensitivity", "specificity")
DEFAULT_CS = np.logspace(-4, 2, 7)
THRESHOLD = 0.5
CONTROL = "supervised-cnn"  # the positive control's row name (kind "control")


def binary_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float = THRESHOLD) -> dict[str, float]:
    """AUC, accuracy, F1, sensitivity, specificity of probabilities ``prob (n,)`` for labels ``y_true (n,)`` in {0, 1}.

    Returns a new dict every call. AUC is NaN when ``y_true`` holds one class only;
    sensitivity (specificity) is NaN without positives (negatives).
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(prob, dtype=np.float64)
    pred = (p >= threshold).astype(int)
    tp = int(np.sum((pred == 1) & (y == 1)))
    tn = int(np.sum((pred == 0) & (y == 0)))
    n_pos, n_neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    return {
        "auc": float(roc_auc_score(y, p)) if n_pos and n_neg else float("nan"),
        "accuracy": float(accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, zero_division=0.0)),
        "sensitivity": tp / n_pos if n_pos else float("nan"),
        "specificity": tn / n_neg if n_neg else float("nan"),
    }


def grouped_folds(
    y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``StratifiedGroupKFold`` (shuffled with ``seed``) train/test index pairs; never splits a group.

    ``n_splits`` larger than the number of groups is reduced to it (leave-one-subject-out) with a warning.
    """
    y = np.asarray(y)
    g = np.asarray(groups).astype(str)
    n_groups = len(np.unique(g))
    if n_groups < 2:
        raise ValueError(f"grouped cross-validation needs >= 2 subjects, got {n_groups}")
    if n_splits < 2:
        raise ValueError(f"n_splits must be >= 2, got {n_splits}")
    if n_splits > n_groups:
        warnings.warn(_too_few_subjects(n_splits, n_groups))
        n_splits = n_groups
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in cv.split(np.zeros(len(y)), y, g)]


def _too_few_subjects(n_splits: int, n_groups: int) -> str:
    return f"{n_splits} folds requested but only {n_groups} subjects; using {n_groups} (leave-one-subject-out)"


@dataclass
class ProbeResult:
    """One feature set's probe.

    Attributes:
        per_unit: one row per scoring unit (a test subject, or a CV fold): ``unit``, the
            :data:`METRICS`, ``C`` (chosen without the unit), ``n_train``, ``n_test``,
            ``test_groups``.
        unit: ``"subject"`` (validation -> test protocol) or ``"fold"`` (cross-validation).
        predictions: one row per scored patch: ``index``, ``unit``, ``y``, ``prob``.
        pooled: the metrics over all scored patches at once (validation -> test protocol).
        folds: the ``(fit_idx, score_idx)`` index pairs (one for the split protocol).
        inner_folds: per fold, the inner ``(train_idx, val_idx)`` pairs that chose ``C``.
        info: what else the scorer records (the positive control: its training curve, chosen
            epoch, patch counts and seconds).
    """

    per_unit: pd.DataFrame
    predictions: pd.DataFrame
    folds: list[tuple[np.ndarray, np.ndarray]] = field(repr=False)
    inner_folds: list[list[tuple[np.ndarray, np.ndarray]]] = field(repr=False)
    unit: str = "fold"
    pooled: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """``metric, mean, std, n`` over units (std with ddof=1; NaN units are skipped)."""
        rows = []
        for m in METRICS:
            v = self.per_unit[m].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            rows.append({
                "metric": m,
                "mean": float(v.mean()) if len(v) else float("nan"),
                "std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
                "n": int(len(v)),
                "pooled": self.pooled.get(m, float("nan")),
            })
        return pd.DataFrame(rows)


def _fit_path(x: np.ndarray, y: np.ndarray, Cs: Sequence[float], seed: int) -> list:
    """Fitted ``StandardScaler + LogisticRegression`` pipelines, one per ``C`` (ascending), on ``x, y`` only.

    The scaler is fit once on these rows. Each fit warm-starts from the previous, more
    regularised solution (as scikit-learn's ``LogisticRegressionCV`` does along its path),
    which cuts the lbfgs iterations for weakly regularised C on many features several-fold.
    """
    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    clf = LogisticRegression(max_iter=2000, warm_start=True, random_state=seed)
    models = []
    for C in Cs:
        clf.set_params(C=float(C)).fit(z, y)
        models.append(make_pipeline(scaler, copy.deepcopy(clf)))
    return models


def _choose_C(
    x: np.ndarray,
    y: np.ndarray,
    g: np.ndarray,
    train_idx: np.ndarray,
    inner_splits: int,
    Cs: Sequence[float],
    seed: int,
) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
    """C with the best mean AUC over an inner grouped CV of the train side only."""
    n_inner = min(inner_splits, len(np.unique(g[train_idx])))
    if n_inner < 2:
        raise ValueError("the train side of a fold holds a single subject; cannot choose C without the test fold")
    cv = StratifiedGroupKFold(n_splits=n_inner, shuffle=True, random_state=seed)
    inner = [(train_idx[a], train_idx[b]) for a, b in cv.split(np.zeros(len(train_idx)), y[train_idx], g[train_idx])]
    if len(Cs) == 1:
        return float(Cs[0]), inner
    aucs = []  # (n_inner_used, len(Cs))
    for tr, va in inner:
        if len(np.unique(y[va])) < 2 or len(np.unique(y[tr])) < 2:
            continue
        aucs.append([roc_auc_score(y[va], m.predict_proba(x[va])[:, 1]) for m in _fit_path(x[tr], y[tr], Cs, seed)])
    scores = np.mean(aucs, axis=0) if aucs else np.zeros(len(Cs))
    return float(Cs[int(np.argmax(scores))]), inner  # ties -> the smaller C (stronger regularisation)


def linear_probe_cv(
    features: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    n_splits: int = 10,
    inner_splits: int = 3,
    Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
    progress: bool = False,
    centres_mm: np.ndarray | None = None,
) -> ProbeResult:
    """Logistic-regression probe with subject-grouped outer and inner cross-validation.

    Args:
        features: ``(N, F)`` frozen features.
        y: ``(N,)`` binary labels 0/1.
        groups: ``(N,)`` subject (patient) ids.
        n_splits: outer folds (reduced to the number of subjects if larger).
        inner_splits: inner folds on the train side to choose ``C``.
        Cs: candidate inverse regularisation strengths (ascending).
        seed: fold shuffling and solver seed.
        centres_mm: ``(N, 3)`` patch centres; with fewer than 3 subjects the folds become
            slabs along z within each subject (:func:`medssl.evaluate.latent.z_slab_groups`).

    Returns:
        :class:`ProbeResult`.
    """
    x, y, g = _check_probe_inputs(features, y, groups)
    Cs = np.sort(np.asarray(Cs, dtype=np.float64))
    if len(np.unique(g)) < 3:
        warnings.warn(f"linear_probe_cv: {len(np.unique(g))} subject(s): folds are held out by z-slabs within each "
                      "subject (units are slabs, not subjects)")
        g = z_slab_groups(centres_mm if centres_mm is not None else np.zeros((len(g), 3)), g)
    folds = grouped_folds(y, g, n_splits, seed)
    rows, preds, inner_all = [], [], []
    for fold, (tr, te) in enumerate(tqdm(folds, desc="probe folds", disable=not progress, leave=False)):
        C, inner = _choose_C(x, y, g, tr, inner_splits, Cs, seed)
        prob = _fit_path(x[tr], y[tr], [C], seed)[0].predict_proba(x[te])[:, 1]
        metrics = binary_metrics(y[te], prob)  # a fresh dict: this fold's predictions only
        if np.isnan(metrics["auc"]):
            warnings.warn(f"fold {fold}: the test subjects hold one class only; AUC undefined for this fold")
        rows.append({"unit": fold, **metrics, "C": C, "n_train": len(tr), "n_test": len(te),
                     "test_groups": ",".join(sorted(np.unique(g[te])))})
        preds.append(pd.DataFrame({"index": te, "unit": fold, "y": y[te], "prob": prob}))
        inner_all.append(inner)
    return ProbeResult(per_unit=pd.DataFrame(rows), predictions=pd.concat(preds, ignore_index=True), folds=folds,
                       inner_folds=inner_all, unit="fold")


def linear_probe(
    features: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    splits: np.ndarray | None = None,
    fit_split: str = "val",
    score_split: str = "test",
    n_splits: int = 10,
    inner_splits: int = 3,
    Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
    centres_mm: np.ndarray | None = None,
) -> ProbeResult:
    """The probe protocol: fit (and choose C) on ``fit_split``, score once on ``score_split``, per subject.

    Falls back to :func:`linear_probe_cv` over all patches (with a warning) when ``splits`` is
    None or one of the two splits is missing.

    Args:
        features: ``(N, F)`` frozen features; y: ``(N,)`` labels 0/1; groups: ``(N,)`` subject ids.
        splits: ``(N,)`` the split of each patch (``PatchSet.splits``).
        inner_splits: grouped folds over the fitting subjects that choose ``C``.
    """
    x, y, g = _check_probe_inputs(features, y, groups)
    sp = None if splits is None else np.asarray(splits).astype(str)
    if sp is None or fit_split == score_split or not (np.any(sp == fit_split) and np.any(sp == score_split)):
        warnings.warn(f"no {fit_split!r} and {score_split!r} splits to fit and score on: "
                      "falling back to subject-grouped cross-validation over all patches")
        return linear_probe_cv(x, y, g, n_splits=n_splits, inner_splits=inner_splits, Cs=Cs, seed=seed,
                               centres_mm=centres_mm)
    fit_idx, score_idx = np.flatnonzero(sp == fit_split), np.flatnonzero(sp == score_split)
    if set(g[fit_idx]) & set(g[score_idx]):
        raise ValueError(f"subjects {sorted(set(g[fit_idx]) & set(g[score_idx]))} are in both {fit_split} and {score_split}")
    Cs = np.sort(np.asarray(Cs, dtype=np.float64))
    C, inner = _choose_C(x, y, g, fit_idx, inner_splits, Cs, seed)
    prob = _fit_path(x[fit_idx], y[fit_idx], [C], seed)[0].predict_proba(x[score_idx])[:, 1]
    rows = []
    for subject in sorted(np.unique(g[score_idx])):
        sel = g[score_idx] == subject
        rows.append({"unit": subject, **binary_metrics(y[score_idx][sel], prob[sel]), "C": C, "n_train": len(fit_idx),
                     "n_test": int(sel.sum()), "test_groups": subject})
    preds = pd.DataFrame({"index": score_idx, "unit": g[score_idx], "y": y[score_idx], "prob": prob})
    return ProbeResult(per_unit=pd.DataFrame(rows), predictions=preds, folds=[(fit_idx, score_idx)],
                       inner_folds=[inner], unit="subject", pooled=binary_metrics(y[score_idx], prob))


def _check_probe_inputs(features, y, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(y).astype(int)
    g = np.asarray(groups).astype(str)
    if x.ndim != 2 or y.shape != (len(x),) or g.shape != (len(x),):
        raise ValueError(f"expected features (N, F), y (N,), groups (N,); got {x.shape}, {y.shape}, {g.shape}")
    if not set(np.unique(y)) <= {0, 1} or len(np.unique(y)) < 2:
        raise ValueError(f"y must hold both classes 0 and 1, got values {np.unique(y).tolist()}")
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain NaN or Inf")
    return x, y, g


@dataclass
class ProbeComparison:
    """Probes of several feature sets on the same units.

    Attributes:
        table: long table ``method, metric, mean, std, n, pooled``.
        per_unit: ``method, unit, <metrics>, C, ...``.
        results: ``{method: ProbeResult}``.
        unit: ``"subject"`` or ``"fold"``.
    """

    table: pd.DataFrame
    per_unit: pd.DataFrame
    results: dict[str, ProbeResult]
    unit: str = "fold"

    def per_unit_metric(self, metric: str = "auc") -> dict[str, np.ndarray]:
        """``{method: (n_units,) values}`` in unit order (for :func:`medssl.evaluate.stats.paired_tests`)."""
        return {m: r.per_unit[metric].to_numpy(dtype=float) for m, r in self.results.items()}

    def fold_sizes(self) -> tuple[float, float] | None:
        """``(mean n_train, mean n_test)`` of the folds when the units are CV folds (corrected t-test), else None."""
        if self.unit != "fold":
            return None
        r = next(iter(self.results.values())).per_unit
        return float(r["n_train"].mean()), float(r["n_test"].mean())

    def with_result(self, name: str, result: ProbeResult) -> "ProbeComparison":
        """A new comparison with ``result`` (scored on the same units, e.g. :func:`supervised_control`) added as ``name``."""
        if name in self.results:
            raise ValueError(f"the comparison already has a row {name!r}")
        results = {**self.results, name: result}
        _check_same_units(results)
        if result.unit != self.unit:
            raise ValueError(f"{name!r} is scored per {result.unit}, the comparison per {self.unit}")
        table = pd.concat([self.table, result.summary().assign(method=name)[list(self.table.columns)]],
                          ignore_index=True)
        per_unit = pd.concat([self.per_unit, result.per_unit.assign(method=name)], ignore_index=True)
        return ProbeComparison(table=table, per_unit=per_unit, results=results, unit=self.unit)

    def paired_tests(self, metric: str = "auc") -> pd.DataFrame:
        """Paired tests between every pair of feature sets on the per-unit ``metric``, Holm-adjusted."""
        from medssl.evaluate.stats import paired_tests

        return paired_tests(self.per_unit_metric(metric), fold_sizes=self.fold_sizes())

    def wide(self, digits: int = 3) -> pd.DataFrame:
        """Table-1 style: one row per method, one ``mean +- std`` column per metric."""
        fmt = f"{{:.{digits}f}}".format
        t = self.table.assign(cell=self.table["mean"].map(fmt) + " ± " + self.table["std"].map(fmt))
        wide = t.pivot(index="method", columns="metric", values="cell")[list(METRICS)]
        return wide.loc[list(dict.fromkeys(self.table["method"]))]


def probe_methods(
    features_by_method: Mapping[str, np.ndarray],
    y: np.ndarray,
    groups: np.ndarray,
    splits: np.ndarray | None = None,
    n_splits: int = 10,
    inner_splits: int = 3,
    Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
    progress: bool = True,
    centres_mm: np.ndarray | None = None,
) -> ProbeComparison:
    """:func:`linear_probe` for every feature set, on identical units.

    ``features_by_method`` maps a name to ``(N, F)`` features of the same patches: the
    pretrained methods plus the baselines the caller adds (``"random-init"``, ``"raw-intensity"``,
    ``"position-linear"``, ``"position-cubic"``).
    """
    n_groups = len(np.unique(np.asarray(groups).astype(str)))
    if splits is None and n_splits > n_groups >= 2:  # say it once here rather than once per method
        warnings.warn(_too_few_subjects(n_splits, n_groups))
        n_splits = n_groups
    results: dict[str, ProbeResult] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the fallback warning: once, below
        for name, feats in tqdm(features_by_method.items(), desc="probing", disable=not progress):
            results[name] = linear_probe(feats, y, groups, splits, n_splits=n_splits, inner_splits=inner_splits,
                                         Cs=Cs, seed=seed, centres_mm=centres_mm)
    unit = next(iter(results.values())).unit
    if splits is not None and unit == "fold":
        warnings.warn("no validation and test splits to fit and score on: the probe fell back to grouped CV")
    _check_same_units(results)
    table = pd.concat([r.summary().assign(method=m) for m, r in results.items()], ignore_index=True)
    table = table[["method", "metric", "mean", "std", "n", "pooled"]]
    per_unit = pd.concat([r.per_unit.assign(method=m) for m, r in results.items()], ignore_index=True)
    per_unit = per_unit[["method", *[c for c in per_unit.columns if c != "method"]]]
    return ProbeComparison(table=table, per_unit=per_unit, results=results, unit=unit)


def _check_same_units(results: Mapping[str, ProbeResult]) -> None:
    ref = None
    for name, r in results.items():
        key = [tuple(te.tolist()) for _, te in r.folds]
        if ref is None:
            ref = (name, key)
        elif key != ref[1]:
            raise RuntimeError(
                f"probe units of {name!r} differ from those of {ref[0]!r}; paired tests would be invalid"
            )


def position_features(centres_mm: np.ndarray | PatchSet, degree: int = 1) -> np.ndarray:
    """The position-only shortcut: patch centres in world mm ``(N, 3)``, or all their monomials up to ``degree``.

    ``degree=3`` (cubic, 19 features) lets a linear probe carve curved regions such as an organ.
    """
    from sklearn.preprocessing import PolynomialFeatures

    c = centres_mm.centres_mm if isinstance(centres_mm, PatchSet) else np.asarray(centres_mm, dtype=np.float64)
    if degree == 1:
        return np.asarray(c, dtype=np.float64)
    return PolynomialFeatures(degree, include_bias=False).fit_transform(c)


def raw_intensity_features(patches: np.ndarray | PatchSet, size_vox: int = 8) -> np.ndarray:
    """The raw-intensity baseline: each patch average-pooled to ``size_vox^3`` and flattened.

    ``(N, C, *S)`` -> ``(N, C * size_vox^3)`` float32. Pooling (torch ``adaptive_avg_pool3d``)
    keeps the probe at a few hundred features (32^3 = 32768 raw voxels would make the
    logistic regression slow and badly conditioned on a few hundred patches).
    """
    x = patches.patches if isinstance(patches, PatchSet) else patches
    t = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if t.ndim != 5:
        raise ValueError(f"raw_intensity_features expects (N, C, X, Y, Z) patches, got shape {tuple(t.shape)}")
    pooled = torch.nn.functional.adaptive_avg_pool3d(t, size_vox)
    return pooled.flatten(1).numpy()


def probe_frozen_backbone(
    model: nn.Module,
    patch_set: PatchSet,
    n_splits: int = 10,
    inner_splits: int = 3,
    Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
    batch_size: int = 256,
    **embed_kw: Any,
) -> ProbeResult:
    """Embed ``patch_set`` with the frozen ``model`` (eval mode, no-grad, BatchNorm untouched) and probe it.

    The model's parameters, BatchNorm buffers and train/eval flags are the same afterwards.
    """
    if patch_set.labels is None:
        raise ValueError("probe_frozen_backbone needs a labelled patch set (draw_labelled_patch_set)")
    feats = embed_patches(model, patch_set, batch_size=batch_size, **embed_kw)
    return linear_probe(feats, patch_set.labels, patch_set.groups, patch_set.splits, n_splits=n_splits,
                        inner_splits=inner_splits, Cs=Cs, seed=seed)


# --------------------------------------------------------------------------- positive control


class _ControlCNN(nn.Module):
    """A small fully convolutional 3D CNN: one logit per cell of 2^3 voxels; a patch's logit is the largest.

    3^3 convolutions with BatchNorm and ReLU: ``width`` channels at full resolution, then a
    stride-2 convolution to ``2 * width`` and two more at that resolution (receptive field about
    19 voxels), and a 1^3 convolution to one logit per cell. Scoring cells lets the target's mask
    supervise every cell (a segmentation), and the maximum over cells finds a small target
    anywhere in the patch. Written here rather than taken from MONAI: its networks are deeper
    than this control needs, and it must train in seconds on a CPU.
    """

    cell_vox = 2

    def __init__(self, in_channels: int, width: int = 6) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm3d(c_out),
                    nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(*block(in_channels, w), *block(w, 2 * w, 2), *block(2 * w, 2 * w),
                                      *block(2 * w, 2 * w))
        self.cells = nn.Conv3d(2 * w, 1, 1)

    def cell_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.cells(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_logit(self.cell_logits(x))

    @staticmethod
    def patch_logit(cells: torch.Tensor) -> torch.Tensor:
        """The largest mean over 2^3 neighbouring cells: one noisy cell does not make a patch positive."""
        return nn.functional.avg_pool3d(cells, 2, stride=1).amax(dim=(1, 2, 3, 4))


class _RobustScaling:
    """``x -> clip((x - median) / IQR, +-clip)`` per channel, fit on ``patches`` (N, C, ...) (every 7th value),
    then averaged down ``factor`` times per axis.

    Robust rather than mean/s.d.: in a body CT most of the spread is air against tissue, and a
    lesion's 20-60 HU would be a small fraction of one s.d.; median and IQR follow the soft tissue.
    """

    def __init__(self, patches: np.ndarray, factor: int = 1, clip: float = 5.0) -> None:
        q = [np.percentile(patches[:, c].ravel()[::7], [25, 50, 75]) for c in range(patches.shape[1])]
        self.med = torch.tensor([v[1] for v in q], dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.iqr = torch.tensor([max(v[2] - v[0], 1e-6) for v in q], dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.factor, self.clip = int(factor), float(clip)

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        t = ((torch.as_tensor(np.asarray(x, dtype=np.float32)) - self.med) / self.iqr).clamp_(-self.clip, self.clip)
        return nn.functional.avg_pool3d(t, self.factor, ceil_mode=True) if self.factor > 1 else t


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        out = [torch.sigmoid(model(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    return torch.cat(out).double().numpy()


def has_target(volume: Any, target: Any) -> bool:
    """Whether ``volume`` holds any voxel of ``target`` (:func:`medssl.sampling.sets.target_mask`); False where it
    cannot say (no such aux map or label name)."""
    from medssl.sampling.sets import target_mask

    try:
        return bool(np.any(target(volume) if callable(target) else target_mask(volume, target)))
    except ValueError:
        return False


def target_patches(patch_set: PatchSet, volumes: Sequence[Any], target: Any) -> np.ndarray:
    """``(N, 1, *S)`` uint8: the target's mask (:func:`medssl.sampling.sets.target_mask`) in each patch's box.

    What :func:`supervised_control` learns *where* from; ``volumes`` must hold every case of the set.
    """
    from medssl.sampling.patches import extract_patches
    from medssl.sampling.sets import target_mask

    by_id = {str(v.case_id): v for v in volumes}
    missing = sorted(set(patch_set.case_ids.tolist()) - set(by_id))
    if missing:
        raise ValueError(f"target_patches needs the volumes of cases {missing}")
    out = np.zeros((len(patch_set), 1, *patch_set.patch_size_vox), dtype=np.uint8)
    for case in dict.fromkeys(patch_set.case_ids.tolist()):
        rows = np.flatnonzero(patch_set.case_ids == case)
        mask = target(by_id[case]) if callable(target) else target_mask(by_id[case], target)
        cut = extract_patches(np.asarray(mask, np.float32)[None], patch_set.centres_vox[rows], patch_set.patch_size_vox)
        out[rows] = cut > 0.5
    return out


def supervised_control(
    train_set: PatchSet,
    patch_set: PatchSet,
    train_masks: np.ndarray | None = None,
    select_split: str = "val",
    score_split: str = "test",
    max_epochs: int = 8,
    steps_per_epoch: int = 40,
    patience: int = 3,
    batch_size: int = 16,
    crop_vox: int = 16,
    max_input_vox: int = 16,
    lr: float = 3e-3,
    width: int = 6,
    augment: bool = False,
    threads: int | None = 1,
    seed: int = 0,
    progress: bool = False,
) -> ProbeResult:
    """The probe's positive control: a small supervised 3D CNN, trained with the labels.

    Fit on ``train_set`` (labelled patches of the *training* subjects, drawn by the same rule as
    the probe's set). With ``train_masks`` (``(N, 1, *S)``, the target's voxels in each training
    patch, :func:`target_patches`) it is trained as a segmentation: on random ``crop_vox`` crops
    (half of them from positive patches, holding a target voxel), every 2^3 cell of its output is
    supervised by whether it holds target voxels, and the crop's label by the maximum over cells.
    A patch label alone says *that* a lesion is there, the mask says *where*, which a small network
    learns from a few hundred patches in seconds. Without masks it learns from the patch labels
    only (the maximum over the whole patch's cells). Patches larger than ``max_input_vox`` are
    averaged down by the smallest integer factor that fits (a 32^3 organ patch is seen at 16^3,
    its mask max-pooled), which keeps the control's cost the same for every task.

    An epoch is ``steps_per_epoch`` batches; after each, the AUC on the ``select_split`` patches of
    ``patch_set`` (whole patches, the maximum over cells) is measured, training stops after
    ``patience`` epochs without improvement, and the weights of the best epoch score the
    ``score_split`` patches **once**, per subject and pooled, on exactly the probe's units (so it
    joins :meth:`ProbeComparison.with_result` and the paired tests). Inputs are scaled robustly
    with the training patches' median and IQR and clipped (:class:`_RobustScaling`); training crops
    are flipped at random, and with ``augment`` also rotated and jittered in intensity
    (:class:`_BatchSampler`; off by default: on the demo's validation subjects it learned more
    slowly, AUC 0.898 against 0.953 after 6 epochs). Adam with a cosine
    decay of the learning rate over ``max_epochs``, binary cross-entropy; deterministic for a
    ``seed`` (torch's global random state and thread count are left as they were; ``threads``: torch
    threads while it trains, None keeps the current setting).

    Returns:
        :class:`ProbeResult` with ``unit="subject"``, ``folds=[(select_idx, score_idx)]`` (indices
        into ``patch_set``) and ``info``: ``history`` (epoch, train_loss, select_auc), ``best_epoch``,
        ``select_auc``, ``n_train``, ``n_select``, ``train_subjects``, ``supervision``, ``seconds``.
    """
    for name, ps in (("train_set", train_set), ("patch_set", patch_set)):
        if ps.labels is None:
            raise ValueError(f"supervised_control: {name} has no labels (draw it with draw_labelled_patch_set)")
    if patch_set.splits is None:
        raise ValueError("supervised_control: patch_set records no splits; it needs a selection and a scoring split")
    if train_set.patch_size_vox != patch_set.patch_size_vox or train_set.patches.shape[1] != patch_set.patches.shape[1]:
        raise ValueError(f"supervised_control: train patches {train_set.patches.shape[1:]} and probe patches "
                         f"{patch_set.patches.shape[1:]} differ in shape")
    if train_masks is not None and tuple(np.shape(train_masks)) != (len(train_set), 1, *train_set.patch_size_vox):
        raise ValueError(f"supervised_control: train_masks must be {(len(train_set), 1, *train_set.patch_size_vox)}, "
                         f"got {np.shape(train_masks)}")
    sp = patch_set.splits
    select_idx, score_idx = np.flatnonzero(sp == select_split), np.flatnonzero(sp == score_split)
    for split, idx in ((select_split, select_idx), (score_split, score_idx)):
        if idx.size == 0 or len(np.unique(patch_set.labels[idx])) < 2:
            raise ValueError(f"supervised_control: the {split!r} patches must hold both classes")
    y_train = np.asarray(train_set.labels).astype(int)
    if len(np.unique(y_train)) < 2:
        raise ValueError("supervised_control: the training patches must hold both classes")
    shared = set(train_set.groups) & set(patch_set.groups[np.r_[select_idx, score_idx]])
    if shared:
        raise ValueError(f"supervised_control: subjects {sorted(shared)} are both in the training patches and in the "
                         f"{select_split!r}/{score_split!r} patches")

    start = time.perf_counter()
    train_np = np.asarray(train_set.patches, dtype=np.float32)
    factor = max(1, int(np.ceil(max(train_set.patch_size_vox) / max_input_vox)))
    scale = _RobustScaling(train_np, factor)
    x_train = scale(train_np)
    x_sel = scale(patch_set.patches[select_idx])
    y_sel = patch_set.labels[select_idx]
    masks = None
    if train_masks is not None:  # a block holds the target if any of its voxels does
        masks = torch.as_tensor(np.asarray(train_masks, dtype=np.float32))
        masks = (nn.functional.max_pool3d(masks, factor, ceil_mode=True) if factor > 1 else masks) > 0
    crop = min(int(crop_vox), *x_train.shape[2:]) if masks is not None else None

    history, best = [], (-np.inf, 0, None)
    # One thread by default: its tensors are small, and on a shared, loaded CPU two OpenMP threads waiting
    # on each other made it 4x slower (5 s against 23 s for the same test); restored afterwards.
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            rng = np.random.default_rng(seed)
            model = _ControlCNN(x_train.shape[1], width)
            opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_epochs * steps_per_epoch)
            sampler = _BatchSampler(x_train, y_train, masks, crop, batch_size, model.cell_vox, rng, augment)
            for epoch in tqdm(range(1, max_epochs + 1), desc="supervised control", disable=not progress, leave=False):
                model.train()
                losses = []
                for _ in range(steps_per_epoch):
                    xb, yb, cb = sampler.batch()
                    logits = model.cell_logits(xb)
                    loss = nn.functional.binary_cross_entropy_with_logits(model.patch_logit(logits), yb)
                    if cb is not None:
                        loss = loss + nn.functional.binary_cross_entropy_with_logits(logits, cb)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
                    losses.append(float(loss.detach()))
                sel_auc = float(roc_auc_score(y_sel, _predict(model, x_sel, 4 * batch_size)))
                history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "select_auc": sel_auc})
                if sel_auc > best[0]:
                    best = (sel_auc, epoch, copy.deepcopy(model.state_dict()))
                elif epoch - best[1] >= patience:
                    break
            model.load_state_dict(best[2])
            prob = _predict(model, scale(patch_set.patches[score_idx]), 4 * batch_size)  # the test split, once
    finally:
        torch.set_num_threads(threads_before)

    g, y = patch_set.groups, patch_set.labels
    rows = []
    for subject in sorted(np.unique(g[score_idx])):
        sel = g[score_idx] == subject
        rows.append({"unit": subject, **binary_metrics(y[score_idx][sel], prob[sel]), "C": np.nan,
                     "n_train": len(x_train), "n_test": int(sel.sum()), "test_groups": subject})
    preds = pd.DataFrame({"index": score_idx, "unit": g[score_idx], "y": y[score_idx], "prob": prob})
    info = {"model": (f"fully convolutional 3D CNN, widths {width}/{2 * width}, a logit per 2^3 voxels, max over the patch"
                      + (f"; input averaged {factor}x per axis" if factor > 1 else "")),
            "supervision": (f"target masks on {crop}^3 crops and patch labels" if masks is not None
                            else "patch labels"),
            "history": pd.DataFrame(history), "best_epoch": int(best[1]), "select_auc": float(best[0]),
            "steps": int(len(history) * steps_per_epoch), "batch_size": int(batch_size),
            "n_train": int(len(x_train)), "n_select": int(select_idx.size),
            "train_subjects": int(len(np.unique(train_set.groups))), "fit_on": "train subjects",
            "chosen_on": select_split, "seconds": round(time.perf_counter() - start, 2)}
    return ProbeResult(per_unit=pd.DataFrame(rows), predictions=preds, folds=[(select_idx, score_idx)],
                       inner_folds=[[]], unit="subject", pooled=binary_metrics(y[score_idx], prob), info=info)


class _BatchSampler:
    """Training batches for :func:`supervised_control`: balanced classes, random flips, crops around the target.

    With masks: half of each batch from positive patches, each cropped to ``crop`` voxels around
    one of its target voxels (a random position of the crop that holds it), the other half from
    negative patches at a random position, flipped; with ``augment`` also with the axes in a
    random order (the 48 symmetries of a cube) and each crop's intensities scaled by 1 +- 0.1 and
    shifted by +- 0.2 (robust units). Returns the cells' targets (max-pooled mask). Without masks:
    whole patches, half of each class, flipped.
    """

    def __init__(self, x, y, masks, crop, batch_size, cell_vox, rng, augment: bool = False) -> None:
        self.x, self.y, self.masks, self.crop, self.bs, self.cell, self.rng = x, y, masks, crop, batch_size, cell_vox, rng
        self.augment = augment
        self.pos, self.neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
        self.size = np.asarray(x.shape[2:])
        if masks is not None:
            self.target_vox = {int(i): np.argwhere(masks[i, 0].numpy()) for i in self.pos}

    def batch(self):
        half = self.bs // 2
        rows = np.r_[self.rng.choice(self.pos, half), self.rng.choice(self.neg, self.bs - half)]
        flips = [d + 2 for d in range(3) if self.rng.random() < 0.5]
        if self.masks is None:
            xb = self.x[rows]
            yb = torch.as_tensor(self.y[rows], dtype=torch.float32)
            return (xb.flip(flips) if flips else xb), yb, None
        c = self.crop
        xs, ms = [], []
        for r in rows:
            if self.y[r] == 1:
                v = self.target_vox[int(r)][self.rng.integers(len(self.target_vox[int(r)]))]
                lo, hi = np.maximum(v - c + 1, 0), np.minimum(v, self.size - c)
            else:
                lo, hi = np.zeros(3, int), self.size - c
            o = lo + (self.rng.random(3) * (hi - lo + 1)).astype(int)
            box = tuple(slice(int(a), int(a) + c) for a in o)
            xs.append(self.x[(int(r), slice(None), *box)])
            ms.append(self.masks[(int(r), slice(None), *box)])
        xb, mb = torch.stack(xs), torch.stack(ms).float()
        if flips:
            xb, mb = xb.flip(flips), mb.flip(flips)
        if self.augment:
            perm = [int(a) + 2 for a in self.rng.permutation(3)]  # cubic crops: any order of the axes
            xb, mb = xb.permute(0, 1, *perm), mb.permute(0, 1, *perm)
            # each subject has its own intensity calibration: jitter scale and offset per crop
            gain = torch.as_tensor(1 + 0.1 * self.rng.uniform(-1, 1, (len(rows), 1, 1, 1, 1)), dtype=torch.float32)
            offset = torch.as_tensor(0.2 * self.rng.uniform(-1, 1, (len(rows), 1, 1, 1, 1)), dtype=torch.float32)
            xb = xb * gain + offset
        cells = nn.functional.max_pool3d(mb, self.cell)
        yb = (cells.amax(dim=(1, 2, 3, 4)) > 0).float()
        return xb, yb, cells


def control_verdict(table: pd.DataFrame, control: str = CONTROL,
                    position_rows: Sequence[str] = ("position-linear", "position-cubic")) -> str:
    """In words: can this task be passed (the control's AUC), and can position alone pass it?

    ``table``: :attr:`ProbeComparison.table` (``method, metric, mean, ...``). Thresholds: the
    control passes at AUC >= 0.9 and sits near chance below 0.7; position alone is harmless
    at <= 0.65.
    """
    auc = table[table["metric"] == "auc"].set_index("method")["mean"]
    if control not in auc.index or not np.isfinite(auc[control]):
        return ("No positive control was run: nothing shows that this task can be passed, so a method near "
                "chance cannot be told from a task nobody could pass.")
    c = float(auc[control])
    pos = [(m, float(auc[m])) for m in position_rows if m in auc.index and np.isfinite(auc[m])]
    pos_best = max(pos, key=lambda t: t[1]) if pos else None
    if c < 0.7:
        text = (f"The positive control ({control}, trained with the labels) sits near chance (AUC {c:.3f}): this task "
                "measures nothing at these settings, and no row of this table says anything about the methods.")
    elif c < 0.9:
        text = (f"The positive control ({control}) reaches AUC {c:.3f}, short of 0.9: the task is hard at these "
                "settings, and differences between methods are bounded by that.")
    else:
        text = (f"The task can be passed: the positive control ({control}, trained with the labels) reaches AUC "
                f"{c:.3f}. A method far below it lacks the information, or a linear read-out of it.")
    if pos_best is not None:
        m, v = pos_best
        text += (f" Position alone ({m}) reaches {v:.3f}" + (": the task is partly positional, so read the method rows "
                 "against it." if v > 0.65 else ", so position does not explain the task."))
    return text


def share_bin_names(edges_pct: Sequence[float] = (0.1, 0.3, 1.0)) -> list[str]:
    """The names of the share bins cut at ``edges_pct``, in order: ``"< 0.1 %"``, ``"0.1-0.3 %"``, ..., ``">= 1 %"``."""
    edges = [float(e) for e in edges_pct]
    if not edges or any(b <= a for a, b in zip(edges[:-1], edges[1:])):
        raise ValueError(f"edges_pct must be increasing and non-empty, got {list(edges_pct)}")
    return [f"< {edges[0]:g} %"] + [f"{a:g}-{b:g} %" for a, b in zip(edges[:-1], edges[1:])] + [f">= {edges[-1]:g} %"]


def share_strata(target_share: np.ndarray, labels: np.ndarray,
                 edges_pct: Sequence[float] = (0.1, 0.3, 1.0)) -> np.ndarray:
    """``(N,)`` str: each positive's bin of target share of its patch (in %, :func:`share_bin_names`), ``""`` for
    negatives."""
    share_pct = 100.0 * np.asarray(target_share, dtype=np.float64)
    y = np.asarray(labels).astype(int)
    names = share_bin_names(edges_pct)
    out = np.asarray(names, dtype=object)[np.searchsorted([float(e) for e in edges_pct], share_pct, side="right")]
    return np.where(y == 1, out, "").astype(str)


def dominant_instance(patch_set: PatchSet, volumes: Sequence[Any], aux: str = "lesion") -> np.ndarray:
    """``(N,)`` int64: the instance id (value of the ``aux`` map, e.g. a lesion id) with the most voxels in each
    patch's box; 0 where the box holds none. Lets the notebook stratify positives by what their lesion is."""
    by_id = {str(v.case_id): v for v in volumes}
    out = np.zeros(len(patch_set), np.int64)
    for i, (case, box) in enumerate(zip(patch_set.case_ids, patch_set.boxes_vox)):
        m = np.asarray(by_id[case].aux[aux])[box[0] : box[3], box[1] : box[4], box[2] : box[5]]
        ids, counts = np.unique(m[m > 0], return_counts=True)
        out[i] = int(ids[np.argmax(counts)]) if ids.size else 0
    return out


def auc_by_stratum(results: Mapping[str, ProbeResult] | ProbeComparison, strata: np.ndarray,
                   order: Sequence[str] | None = None) -> pd.DataFrame:
    """Pooled AUC of each stratum's positives against all negatives, per feature set, on the scored patches.

    Args:
        results: ``{name: ProbeResult}`` or a :class:`ProbeComparison` (its results).
        strata: ``(N,)`` a stratum name per patch of the probe's set (e.g. :func:`share_strata`);
            negatives' values are ignored.
        order: the strata in display order (default: sorted by first appearance).

    Returns:
        long table ``method, stratum, n_positives, n_negatives, auc`` (AUC NaN where a stratum
        has no scored positive).
    """
    res = results.results if isinstance(results, ProbeComparison) else results
    strata = np.asarray(strata).astype(str)
    rows = []
    for name, r in res.items():
        p = r.predictions
        idx, y, prob = p["index"].to_numpy(), p["y"].to_numpy().astype(int), p["prob"].to_numpy(dtype=float)
        neg = y == 0
        names = order if order is not None else list(dict.fromkeys(strata[idx][y == 1].tolist()))
        for s in names:
            pos = (y == 1) & (strata[idx] == s)
            auc = (float(roc_auc_score(np.r_[np.ones(pos.sum()), np.zeros(neg.sum())], np.r_[prob[pos], prob[neg]]))
                   if pos.any() and neg.any() else float("nan"))
            rows.append({"method": name, "stratum": s, "n_positives": int(pos.sum()), "n_negatives": int(neg.sum()),
                         "auc": auc})
    return pd.DataFrame(rows)
