"""Segmentation fine-tuning from a pretrained encoder (the thesis, Konieczkowicz, AGH, Table 4.2).

The network is :func:`medssl.models.segmentation.segmentation_net`: a decoder over the method's own
backbone (a U-Net over a convolutional trunk, or MONAI ``SwinUNETR`` around a Swin transformer), its
encoder initialised with the checkpoint's weights. The crops come from
:class:`medssl.sampling.labelled.LabelledCropSampler`.

:func:`finetune` trains it on ``n`` labelled training subjects with the same seed, data order
and number of steps for every initialisation (the decoder's initial weights are drawn under
the seed too, so two initialisations differ only in the encoder), logs a learning curve to
``metrics.jsonl`` (the training loop's record format: :mod:`medssl.train.metrics`), and scores
held-out subjects once with foreground-only, per-volume 3D Dice and surface Dice
(:mod:`medssl.evaluate.segmetrics`), predicted by MONAI's sliding-window inference.

Recipe (thesis Table 4.1, scaled to a CPU): AdamW, linear warm-up then cosine decay to
``min_lr``, weight decay not applied to biases and norms, crops centred on an organ voxel with
probability 0.5 (else on the body), MONAI ``DiceCELoss``. The thesis's augmentations (flips,
rotations, blur, noise) are not applied: every initialisation sees identical crops.
``freeze_encoder=True`` trains the decoder only (the encoder stays in eval mode and
bit-identical).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from medssl.data.volume import Volume
from medssl.evaluate.segmetrics import OrganSet, segmentation_scores
from medssl.models.segmentation import SegmentationNet, UnsupportedBackboneError, segmentation_net

__all__ = [
    "FinetuneComparison",
    "FinetuneConfig",
    "FinetuneResult",
    "finetune",
    "finetune_comparison",
    "finetune_methods",
    "finetune_subjects",
    "predict_volume",
]


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings; the same for every initialisation of one comparison.

    Defaults are a CPU-sized version of the thesis's Table 4.1 (AdamW, warm-up + cosine decay).
    """

    steps: int = 300
    batch_size: int = 2
    crop_size_vox: int = 64  # a multiple of the encoder's total stride (16 SmallCNN, 32 DenseNet121/Swin)
    lr: float = 1e-3
    min_lr: float = 5e-5  # cosine decay ends here (thesis: 1e-3 -> 5e-5)
    warmup_steps: int = 10
    weight_decay: float = 1e-5  # not on biases and norms (thesis)
    organ_centred_fraction: float = 0.5  # crops centred on an organ voxel with this probability (thesis: 0.5)
    freeze_encoder: bool = False
    decoder_channels: int = 16
    precision: str = "auto"  # bf16 autocast where supported (as training), "fp32", "bf16"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # validation Dice every this many steps (0: only after the last step)
    sw_overlap: float = 0.25  # sliding-window overlap (thesis: 0.25)
    sw_batch_size: int = 4
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.crop_size_vox < 8:
            raise ValueError(f"need steps >= 1, batch_size >= 1, crop_size_vox >= 8; got {self}")
        if not 0.0 <= self.organ_centred_fraction <= 1.0:
            raise ValueError(f"organ_centred_fraction must lie in [0, 1], got {self.organ_centred_fraction}")


# ---------------------------------------------------------------------------- data



def finetune_subjects(pool: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """The first ``n`` of a seeded permutation of ``pool``: nested in ``n`` and identical for every method."""
    ids = [str(c) for c in pool]
    if not 1 <= n <= len(ids):
        raise ValueError(f"fine-tuning on n={n} subjects needs a pool of at least {n} labelled training subjects; "
                         f"it has {len(ids)}")
    order = np.random.default_rng([int(seed), 7]).permutation(len(ids))
    return [ids[i] for i in order[:n]]


# ---------------------------------------------------------------------------- training


@dataclass
class FinetuneResult:
    """One fine-tuning run: scores per held-out subject and organ, the network, timings."""

    name: str
    n_subjects: int
    subjects: list[str]
    scores: pd.DataFrame
    net: SegmentationNet
    seconds_train: float
    seconds_eval: float
    out_dir: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def _param_groups(net: SegmentationNet, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weights only, none on biases and norm parameters (thesis)."""
    decay, no_decay = [], []
    for module in net.modules():
        is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm3d))
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (no_decay if is_norm or pname.endswith("bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_lambda(config: FinetuneConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        t = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
        floor = config.min_lr / config.lr
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return f


def predict_volume(net: nn.Module, volume: Volume, config: FinetuneConfig, device: torch.device | None = None,
                   precision: str | None = None) -> np.ndarray:
    """``(X, Y, Z)`` uint8 organ codes: MONAI sliding-window inference (eval mode, no-grad), argmax."""
    from monai.inferers import sliding_window_inference

    from medssl.evaluate.embed import frozen
    from medssl.train.precision import autocast, resolve_device, resolve_precision

    device = device or resolve_device(config.device)
    precision = precision or resolve_precision(config.precision, device)
    x = torch.from_numpy(np.array(volume.data, dtype=np.float32))[None].to(device)
    with frozen(net), autocast(device, precision):
        logits = sliding_window_inference(x, (config.crop_size_vox,) * 3, config.sw_batch_size, net,
                                          overlap=config.sw_overlap, mode="gaussian")
    return logits[0].float().argmax(0).to(torch.uint8).cpu().numpy()


def score_volumes(net: nn.Module, volumes: Sequence[Volume], organs: OrganSet, config: FinetuneConfig,
                  surface_tolerance_mm: float | None = 3.0, split: str = "test") -> pd.DataFrame:
    """Per-organ scores of ``net`` on every volume (foreground-only per-volume Dice, surface Dice)."""
    import warnings

    frames = []
    for vol in volumes:
        pred = predict_volume(net, vol, config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            s = segmentation_scores(pred, organs.encode(np.asarray(vol.label)), organs.names, vol.spacing_mm,
                                    surface_tolerance_mm)
        frames.append(s.assign(query=str(vol.case_id), split=split))
    return pd.concat(frames, ignore_index=True)


def finetune(
    method: nn.Module,
    train_volumes: Sequence[Volume],
    organs: OrganSet,
    config: FinetuneConfig = FinetuneConfig(),
    out_dir: str | os.PathLike | None = None,
    val_volumes: Sequence[Volume] = (),
    test_volumes: Sequence[Volume] = (),
    name: str = "",
    surface_tolerance_mm: float | None = 3.0,
    step_callback: Callable[[int, SegmentationNet], None] | None = None,
) -> FinetuneResult:
    """Fine-tune a segmentation network initialised from ``method``'s backbone; score ``test_volumes`` once.

    Args:
        method: a loaded method (its backbone's weights initialise the encoder) or a
            random-init one (:func:`medssl.evaluate.runs.random_init_like`).
        train_volumes: the labelled training subjects (:func:`finetune_subjects` picks them).
        organs: the organs (codes) to segment.
        config: steps, crops, optimiser; identical across initialisations of one comparison.
        out_dir: where ``metrics.jsonl``, ``config.json`` and ``scores.csv`` go (None: nowhere).
        val_volumes: subjects for the validation-Dice learning curve (never used to choose anything
            inside this function).
        test_volumes: held-out subjects scored once after the last step.
        step_callback: called as ``f(step, net)`` before step 0 and after every step (tests).

    Returns:
        A :class:`FinetuneResult`.
    """
    from medssl.train.determinism import deterministic_algorithms
    from medssl.train.precision import resolve_device

    device = resolve_device(config.device)
    with deterministic_algorithms(device, enabled=True):
        return _finetune(method, train_volumes, organs, config, out_dir, val_volumes, test_volumes, name,
                         surface_tolerance_mm, step_callback, device)


def _finetune(method, train_volumes, organs, config, out_dir, val_volumes, test_volumes, name, surface_tolerance_mm,
              step_callback, device) -> FinetuneResult:
    """:func:`finetune`'s loop.

    Not :func:`medssl.train.fit`: ``fit`` trains a :class:`~medssl.methods.base.Method` (its ``training_step``
    on the :class:`~medssl.sampling.base.PatchBatch` es its own sampler draws, the per-epoch schedule, the
    pretext validation set, checkpoints, resume, early stopping and DDP), while this trains a segmentation
    network on labelled (crop, label) pairs with a per-step warm-up/cosine schedule, Dice-CE and
    whole-volume validation Dice, and keeps no checkpoint. Making ``fit`` take both would mean a second
    kind of model, batch and schedule inside it for a loop of a few lines; instead this reuses fit's pieces:
    the deterministic-kernel settings, the bf16 guard of thin 3D convolutions, the non-finite loss error,
    the step window that makes the training records (loss, grad_norm, samples_per_s), ``when``, autocast and
    :class:`~medssl.train.metrics.MetricsLog`.
    """
    from medssl.sampling.labelled import LabelledCropSampler
    from medssl.train.determinism import Bf16Conv3dGuard
    from medssl.train.loop import NonFiniteLossError
    from medssl.train.metrics import MetricsLog, StepWindow, when
    from medssl.train.precision import autocast, resolve_precision

    if not train_volumes:
        raise ValueError("fine-tuning needs at least one labelled training subject")
    from medssl.train.preprocessing import check_volume_preprocessing

    for v in (*train_volumes, *val_volumes, *test_volumes):  # prepared as the encoder's training data?
        check_volume_preprocessing(method, v)
    precision = resolve_precision(config.precision, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the decoder's initial weights: identical for every initialisation
        net = segmentation_net(method, organs.n_classes, config.decoder_channels, config.crop_size_vox)
    if config.freeze_encoder:
        net.freeze_encoder()
    net.to(device).train()
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(_param_groups(net, config.weight_decay), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    sampler = LabelledCropSampler(train_volumes, [organs.encode(np.asarray(v.label)) for v in train_volumes],
                                  config.crop_size_vox, config.batch_size, config.organ_centred_fraction, config.seed)
    out = Path(out_dir) if out_dir is not None else None
    log = None
    if out is not None:
        from medssl._files import atomic_write_text
        from medssl.rundir import method_files

        files = method_files(out)  # the same file names as a pretrained method's folder
        out.mkdir(parents=True, exist_ok=True)
        files.metrics.unlink(missing_ok=True)
        info = {"method": name, "subjects": [str(v.case_id) for v in train_volumes], "organs": list(organs.names),
                "adapter": getattr(net, "adapter", ""), "precision": precision, **asdict(config)}
        atomic_write_text(files.config, json.dumps(info, indent=1))
        log = MetricsLog(files.metrics, enabled=True, callbacks=[])
    history: list[dict[str, Any]] = []

    def _record(rec: dict[str, Any]) -> None:
        history.append(rec)
        if log is not None:
            log.write(rec)

    if step_callback is not None:
        step_callback(0, net)
    # oneDNN's bf16 weight gradient of thin 3D convolutions is wrong on AVX512-BF16 CPUs: as in fit, those run in fp32
    guard = Bf16Conv3dGuard(net) if device.type == "cpu" and precision == "bf16" else None
    t0 = time.perf_counter()
    try:
        window = StepWindow()
        for step in range(1, config.steps + 1):
            t_step = time.perf_counter()
            x, y = sampler()
            sample_s = time.perf_counter() - t_step
            with autocast(device, precision):
                logits = net(x.to(device))
            loss = loss_fn(logits.float(), y.to(device))
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(f"{name or 'fine-tuning'}: non-finite Dice-CE loss ({loss_value}) at step "
                                         f"{step} of {config.steps}; lower lr (now {config.lr:g}) or try "
                                         "precision='fp32'")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.get_total_norm([q.grad for q in net.parameters() if q.grad is not None]))
            optimizer.step()
            scheduler.step()
            window.add(loss_value, {}, len(x), grad_norm, sample_s, time.perf_counter() - t_step)
            if step_callback is not None:
                step_callback(step, net)
            if step % config.log_every == 0 or step == config.steps:
                _record({**window.record(optimizer.param_groups[0]["lr"]),
                         **when(step, config.steps, time.perf_counter() - t0)})
            if val_volumes and ((config.eval_every and step % config.eval_every == 0) or step == config.steps):
                val = score_volumes(net, val_volumes, organs, config, None, split="val")
                net.train()
                _record({"split": "val", "dice_mean": float(val.groupby("query")["dice"].mean().mean()),
                         **{f"dice_{o}": float(v) for o, v in val.groupby("organ", sort=False)["dice"].mean().items()},
                         **when(step, config.steps, time.perf_counter() - t0)})
    finally:
        if guard is not None:
            guard.remove()
    seconds_train = time.perf_counter() - t0
    t1 = time.perf_counter()
    scores = score_volumes(net, test_volumes, organs, config, surface_tolerance_mm) if test_volumes else pd.DataFrame()
    seconds_eval = time.perf_counter() - t1
    if not scores.empty:
        scores = scores.assign(method=name, n_subjects=len(train_volumes))
        if out is not None:
            scores.to_csv(out / "scores.csv", index=False)
    return FinetuneResult(name, len(train_volumes), [str(v.case_id) for v in train_volumes], scores, net.eval(),
                          seconds_train, seconds_eval, out, history)


# ---------------------------------------------------------------------------- the comparison


@dataclass
class FinetuneComparison:
    """Every initialisation fine-tuned on every n: ``scores`` (one row per method, n, test subject, organ)."""

    scores: pd.DataFrame
    results: dict[tuple[str, int], FinetuneResult]
    kinds: dict[str, str]
    skipped: dict[str, str]
    split: str = "test"

    def per_query(self, metric: str = "dice") -> pd.DataFrame:
        return self.scores.groupby(["method", "n_subjects", "query"], sort=False)[metric].mean().reset_index()

    def table(self, metric: str = "dice") -> pd.DataFrame:
        """``method x n`` mean score (organs, then test subjects)."""
        q = self.per_query(metric)
        return q.pivot_table(index="method", columns="n_subjects", values=metric, aggfunc="mean", sort=False)

    def curve(self, metric: str = "dice") -> pd.DataFrame:
        q = self.per_query(metric)
        g = q.groupby(["method", "n_subjects"], sort=False)[metric]
        out = pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n_queries": g.size()}).reset_index()
        out["kind"] = out["method"].map(self.kinds)
        return out

    def per_organ(self, n_subjects: int | None = None, metric: str = "dice") -> pd.DataFrame:
        n = int(self.scores["n_subjects"].max()) if n_subjects is None else int(n_subjects)
        s = self.scores[self.scores["n_subjects"] == n]
        t = s.pivot_table(index="method", columns="organ", values=metric, aggfunc="mean", sort=False)
        organs = list(dict.fromkeys(s["organ"]))
        t = t[organs]
        t["mean"] = self.per_query(metric).query("n_subjects == @n").groupby("method", sort=False)[metric].mean()
        return t

    def units(self, n_subjects: int | None = None, metric: str = "dice") -> dict[str, np.ndarray]:
        n = int(self.scores["n_subjects"].max()) if n_subjects is None else int(n_subjects)  # noqa: F841 (in query)
        q = self.per_query(metric).query("n_subjects == @n")
        wide = q.pivot_table(index="query", columns="method", values=metric, sort=False)
        return {m: wide[m].to_numpy() for m in dict.fromkeys(q["method"])}

    def verdicts(self, twins: Mapping[str, str] | None = None, n_subjects: int | None = None) -> pd.DataFrame:
        """Each fine-tuned method against its fine-tuned twin (and any shortcut or control row), Holm over those
        comparisons (:func:`medssl.evaluate.stats.compare_to_baselines`), at ``n_subjects`` (default the largest)."""
        from medssl.evaluate.stats import compare_to_baselines

        n = int(self.scores["n_subjects"].max()) if n_subjects is None else int(n_subjects)
        return compare_to_baselines(self.units(n), self.kinds, twins, metric="Dice", what=f"(fine-tuned, n = {n})")

    def false_positives(self) -> pd.DataFrame:
        """Per ``(method, n_subjects)``: mean over test subjects of the false-positive volume summed over organs
        (``fp_ml``) and of the volume predicted for organs absent from the truth (``absent_fp_ml``), mL."""
        s = self.scores.assign(absent_fp_ml=np.where(self.scores["true_voxels"] == 0, self.scores["fp_ml"], 0.0))
        per_query = s.groupby(["method", "n_subjects", "query"], sort=False)[["fp_ml", "absent_fp_ml"]].sum()
        g = per_query.groupby(["method", "n_subjects"], sort=False)
        out = g.mean().assign(n_queries=g.size()).reset_index()
        out["kind"] = out["method"].map(self.kinds)
        return out

    def headline(self) -> pd.DataFrame:
        rows = []
        metrics = ["dice"] + (["nsd"] if "nsd" in self.scores and self.scores["nsd"].notna().any() else [])
        for metric in metrics:
            for r in self.curve(metric).itertuples(index=False):
                rows.append({"method": r.method, "kind": r.kind, "metric": f"finetune_{metric}_n{r.n_subjects}",
                             "value": r.mean, "std": r.std, "n": r.n_queries, "split": self.split,
                             "higher_is_better": True,
                             "note": "fine-tuned segmentation network, mean over organs; n = test subjects"})
        if "fp_ml" in self.scores:
            fp = self.false_positives()
            for r in fp[fp["n_subjects"] == fp["n_subjects"].max()].itertuples(index=False):
                rows.append({"method": r.method, "kind": r.kind, "metric": f"finetune_fp_ml_n{r.n_subjects}",
                             "value": r.fp_ml, "std": np.nan, "n": r.n_queries, "split": self.split,
                             "higher_is_better": False,
                             "note": f"false-positive volume summed over organs, mL per test subject; of which "
                                     f"{r.absent_fp_ml:.3g} mL on organs absent from the truth"})
        return pd.DataFrame(rows)


def finetune_comparison(
    inits: Mapping[str, nn.Module],
    train_pool: Sequence[Volume],
    organs: OrganSet,
    n_values: Sequence[int] = (1, 2, 4, 8),
    config: FinetuneConfig = FinetuneConfig(),
    out_root: str | os.PathLike | None = None,
    val_volumes: Sequence[Volume] = (),
    test_volumes: Sequence[Volume] = (),
    surface_tolerance_mm: float | None = 3.0,
    log: Callable[[str], None] | None = None,
) -> FinetuneComparison:
    """:func:`finetune` for every initialisation and every n, on the same subjects, seed and steps.

    ``inits``: ``{name: method}`` (include each method's ``random-init[...]`` twin:
    :func:`medssl.evaluate.runs.matched_twins`); methods whose backbone has no
    segmentation network are skipped and listed in ``skipped``. The n training subjects are
    :func:`finetune_subjects` of ``train_pool`` (nested in n). Each run writes
    ``<out_root>/<name>/n<n>/metrics.jsonl``.
    """
    from medssl.evaluate.knn_seg import check_disjoint, row_kind

    check_disjoint(train_pool, [*val_volumes, *test_volumes])
    say = log or (lambda msg: None)
    by_id = {str(v.case_id): v for v in train_pool if v.label is not None}
    results: dict[tuple[str, int], FinetuneResult] = {}
    skipped: dict[str, str] = {}
    kinds = {}
    for name, method in inits.items():
        kinds[name] = row_kind(name, method)
        for n in n_values:
            subjects = [by_id[c] for c in finetune_subjects(list(by_id), int(n), config.seed)]
            out = Path(out_root) / name / f"n{int(n)}" if out_root is not None else None
            try:
                r = finetune(method, subjects, organs, config, out, val_volumes, test_volumes, name,
                             surface_tolerance_mm)
            except UnsupportedBackboneError as e:
                skipped[name] = str(e)
                say(f"{name}: skipped ({e})")
                break
            results[(name, int(n))] = r
            dice = r.scores.groupby("query")["dice"].mean().mean() if not r.scores.empty else float("nan")
            say(f"{name} n={n}: train {r.seconds_train:.0f} s, test {r.seconds_eval:.0f} s, mean Dice {dice:.3f}")
    frames = [r.scores for r in results.values() if not r.scores.empty]
    scores = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return FinetuneComparison(scores, results, kinds, skipped)


# ---------------------------------------------------------------------------- which methods


def finetune_methods(spec: str | Sequence[str], trained: Sequence[str]) -> list[str]:
    """The methods to fine-tune among the run's ``trained`` ones (random-init is always added by the caller).

    ``"all"``: every trained method; ``"demo"``: the demo methods whose class sets ``in_finetune_demo``
    (today ISImed and SimSiam at [0.3, 0.6] and [0, 1]); a list: those names (untrained ones are skipped by
    the caller).
    """
    from medssl.methods import list_methods, method_info

    if isinstance(spec, str):
        if spec == "all":
            return list(trained)
        if spec != "demo":
            raise ValueError(f"finetune_methods must be 'demo', 'all' or a list of names, got {spec!r}")
        keep = {m for m in list_methods(demo=True) if method_info(m)["in_finetune_demo"]}
        return [m for m in trained if m in keep]
    return [str(m) for m in spec]


def with_overrides(config: FinetuneConfig, **overrides: Any) -> FinetuneConfig:
    """``config`` with fields replaced (unknown names raise)."""
    return replace(config, **overrides)
