"""Linear-probe patch classification on frozen features (ISImed Table 1; design/evaluation.md sec. 3).

Correct by construction where the authors' downstream code was not (design/methods.md):

- **Folds grouped by subject**: ``StratifiedGroupKFold`` on patient ids, so no patient is
  on both sides of a fold. Every method is scored on the *same* folds (they depend only
  on the labels, groups and seed).
- **No choice on the test fold**: the regularisation ``C`` is chosen by an inner grouped
  CV over the *train-side* subjects only (mean inner AUC), then refit on the whole train
  side and scored once on the test fold.
- **Standardisation fit on the train side only** (a ``StandardScaler`` in the pipeline;
  while choosing C, on each inner-train part only).
- **Fresh metrics per fold**: each fold's metrics are computed from that fold's
  predictions alone into a new dict; nothing accumulates across folds or methods.
- **Frozen features**: :func:`probe_frozen_backbone` extracts features with
  :func:`medssl.evaluate.embed.embed_patches` (eval mode, no-grad, BatchNorm untouched).

Metrics at threshold 0.5 on the predicted probability: AUC, accuracy and F1 from
scikit-learn; sensitivity (recall of class 1) and specificity (recall of class 0) from the
confusion counts.
"""

from __future__ import annotations

import copy
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
from medssl.evaluate.patchsets import PatchSet

__all__ = [
    "METRICS",
    "ProbeResult",
    "ProbeComparison",
    "binary_metrics",
    "grouped_folds",
    "linear_probe_cv",
    "probe_methods",
    "probe_frozen_backbone",
    "raw_intensity_features",
]

METRICS = ("auc", "accuracy", "f1", "sensitivity", "specificity")
DEFAULT_CS = np.logspace(-4, 2, 7)
THRESHOLD = 0.5


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
    """One method's probe.

    Attributes:
        per_fold: one row per fold: ``fold``, the :data:`METRICS`, ``C`` chosen on the
            train side, ``n_train``, ``n_test``, ``test_groups``.
        predictions: one row per patch: ``index``, ``fold``, ``y``, ``prob`` (out-of-fold).
        folds: the outer ``(train_idx, test_idx)`` pairs.
        inner_folds: per outer fold, the inner ``(train_idx, val_idx)`` pairs, as indices
            into the full feature matrix.
    """

    per_fold: pd.DataFrame
    predictions: pd.DataFrame
    folds: list[tuple[np.ndarray, np.ndarray]] = field(repr=False)
    inner_folds: list[list[tuple[np.ndarray, np.ndarray]]] = field(repr=False)

    def summary(self) -> pd.DataFrame:
        """``metric, mean, std, n_folds`` (std with ddof=1 over folds; NaN folds are skipped)."""
        rows = []
        for m in METRICS:
            v = self.per_fold[m].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            rows.append({
                "metric": m,
                "mean": float(v.mean()) if len(v) else float("nan"),
                "std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
                "n_folds": int(len(v)),
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

    Returns:
        :class:`ProbeResult`.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(y).astype(int)
    g = np.asarray(groups).astype(str)
    if x.ndim != 2 or y.shape != (len(x),) or g.shape != (len(x),):
        raise ValueError(f"expected features (N, F), y (N,), groups (N,); got {x.shape}, {y.shape}, {g.shape}")
    if not set(np.unique(y)) <= {0, 1} or len(np.unique(y)) < 2:
        raise ValueError(f"y must hold both classes 0 and 1, got values {np.unique(y).tolist()}")
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain NaN or Inf")
    Cs = np.sort(np.asarray(Cs, dtype=np.float64))
    folds = grouped_folds(y, g, n_splits, seed)
    rows, preds, inner_all = [], [], []
    for fold, (tr, te) in enumerate(tqdm(folds, desc="probe folds", disable=not progress, leave=False)):
        C, inner = _choose_C(x, y, g, tr, inner_splits, Cs, seed)
        prob = _fit_path(x[tr], y[tr], [C], seed)[0].predict_proba(x[te])[:, 1]
        metrics = binary_metrics(y[te], prob)  # a fresh dict: this fold's predictions only
        if np.isnan(metrics["auc"]):
            warnings.warn(f"fold {fold}: the test subjects hold one class only; AUC undefined for this fold")
        rows.append({"fold": fold, **metrics, "C": C, "n_train": len(tr), "n_test": len(te),
                     "test_groups": ",".join(sorted(np.unique(g[te])))})
        preds.append(pd.DataFrame({"index": te, "fold": fold, "y": y[te], "prob": prob}))
        inner_all.append(inner)
    return ProbeResult(
        per_fold=pd.DataFrame(rows), predictions=pd.concat(preds, ignore_index=True), folds=folds, inner_folds=inner_all
    )


@dataclass
class ProbeComparison:
    """Probes of several feature sets on the same folds.

    Attributes:
        table: long table ``method, metric, mean, std, n_folds``.
        per_fold: ``method, fold, <metrics>, C, ...``.
        results: ``{method: ProbeResult}``.
    """

    table: pd.DataFrame
    per_fold: pd.DataFrame
    results: dict[str, ProbeResult]

    def per_fold_metric(self, metric: str = "auc") -> dict[str, np.ndarray]:
        """``{method: (n_folds,) values}`` in fold order (for :func:`medssl.evaluate.stats.paired_tests`)."""
        return {m: r.per_fold[metric].to_numpy(dtype=float) for m, r in self.results.items()}

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
    n_splits: int = 10,
    inner_splits: int = 3,
    Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
    progress: bool = True,
) -> ProbeComparison:
    """:func:`linear_probe_cv` for every feature set, on identical folds.

    ``features_by_method`` maps a name to ``(N, F)`` features of the same patches: the
    pretrained methods plus the baselines the caller adds (``"random-init"``: the same
    backbone with untrained weights; ``"raw-intensity"``: :func:`raw_intensity_features`).
    """
    n_groups = len(np.unique(np.asarray(groups).astype(str)))
    if n_splits > n_groups >= 2:  # say it once here rather than once per method
        warnings.warn(_too_few_subjects(n_splits, n_groups))
        n_splits = n_groups
    results: dict[str, ProbeResult] = {}
    for name, feats in tqdm(features_by_method.items(), desc="probing", disable=not progress):
        results[name] = linear_probe_cv(feats, y, groups, n_splits, inner_splits, Cs, seed)
    _check_same_folds(results)
    table = pd.concat([r.summary().assign(method=m) for m, r in results.items()], ignore_index=True)
    table = table[["method", "metric", "mean", "std", "n_folds"]]
    per_fold = pd.concat([r.per_fold.assign(method=m) for m, r in results.items()], ignore_index=True)
    per_fold = per_fold[["method", *[c for c in per_fold.columns if c != "method"]]]
    return ProbeComparison(table=table, per_fold=per_fold, results=results)


def _check_same_folds(results: Mapping[str, ProbeResult]) -> None:
    ref = None
    for name, r in results.items():
        key = [tuple(te.tolist()) for _, te in r.folds]
        if ref is None:
            ref = (name, key)
        elif key != ref[1]:
            raise RuntimeError(
                f"probe folds of {name!r} differ from those of {ref[0]!r}; paired tests would be invalid"
            )


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
    return linear_probe_cv(feats, patch_set.labels, patch_set.groups, n_splits, inner_splits, Cs, seed)
