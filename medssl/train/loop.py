"""``fit``: the one training loop every method uses.

Read :func:`fit` top to bottom: set up, resume if a ``last.pt`` exists, then for every step
draw a batch on the CPU, take one optimiser step (the method's ``training_step`` under
autocast, the non-finite guard, backward, clipping), log; after every epoch step the
schedule, evaluate on a fixed validation patch set and write an atomic checkpoint. Each of
those is a named method of :class:`_Trainer`.

Run directory (``run_dir``)::

    config.json            method config + train config (asdict) + resolved settings
    provenance.json        commit (dirty?), package versions, machine, config sha256 per start/resume
    metrics.jsonl          one JSON object per line: split="train" every log_every steps,
                           split="val" after evaluations
    events.out.tfevents.*  the same records as TensorBoard scalars (live curves; medssl.train.metrics)
    checkpoints/last.pt    newest state (resume point)
    checkpoints/epoch-XXXX.pt
    checkpoints/best.pt    with ``TrainConfig.early_stopping``: the state at the best validation
    early_stopping.json    with ``TrainConfig.early_stopping``: measure, best value and step, the
                           validations without improvement and why training stopped

Under ``torchrun`` every rank samples its own volumes (rng ``[seed, rank]``); the training
step runs inside ``DistributedDataParallel`` (gradients all-reduced during backward); ranks
agree on every stop decision; the checkpoint carries every rank's rng state.

Every checkpoint also carries the training volumes' preprocessing record
(:mod:`medssl.train.preprocessing`), so whoever applies the encoder to new scans prepares
them the same way.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from medssl._files import atomic_write_bytes
from medssl.distributed import is_distributed, rank, world_size
from medssl.evaluate.rank import dim_variance_fraction, effective_rank
from medssl.provenance import record_fit_provenance
from medssl.rundir import method_files
from medssl.train.checkpoint import (
    check_resumable,
    checkpoint_paths,
    load_checkpoint,
    numpy_rng_state,
    prune_epoch_checkpoints,
    restore_numpy_rng,
    save_checkpoint,
    training_state,
)
from medssl.train.config import EarlyStopping, TrainConfig
from medssl.train.ddp import all_ranks_gather, any_rank, first_true_rank, wrap_for_training
from medssl.train.determinism import Bf16Conv3dGuard, deterministic_algorithms
from medssl.train.metrics import (
    MetricsLog,
    StepWindow,
    TensorBoardLog,
    keep_metrics_up_to,
    mean_logs,
    read_metrics,
    when,
)
from medssl.train.precision import autocast, resolve_device, resolve_precision

if TYPE_CHECKING:
    from medssl.data.preprocess import PreprocessConfig
    from medssl.data.volume import Volume
    from medssl.methods.base import Method
    from medssl.sampling.base import PatchBatch

__all__ = ["fit", "FitResult", "NonFiniteLossError", "read_metrics", "resolve_device", "resolve_precision"]

Callback = Callable[[dict[str, Any]], "bool | None"]
_EMBED_CHUNK = 256  # patches per forward pass when embedding the validation set
_MAX_NONFINITE_GRAD_STREAK = 3  # consecutive skipped updates before fit gives up


class NonFiniteLossError(FloatingPointError):
    """Training stopped because the loss (or the gradient norm) became NaN or Inf."""


@dataclass
class FitResult:
    """What ``fit`` returns. ``epoch`` is the number of completed epochs."""

    run_dir: Path
    checkpoint_path: Path
    step: int
    epoch: int
    final_loss: float | None
    stopped_early: bool
    stop_reason: str = ""  # why training ended: the cap, early stopping (measure, best, patience), a callback
    best_step: int | None = None  # early stopping: the step of the best validation (its state is best_checkpoint_path)
    best_checkpoint_path: Path | None = None

    def metrics(self) -> pd.DataFrame:
        return read_metrics(self.run_dir)


def fit(
    method: "Method",
    train_volumes: Sequence["Volume"],
    config: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    val_volumes: Sequence["Volume"] | None = None,
    resume: bool = True,
    progress: bool = True,
    callbacks: Sequence[Callback] | None = None,
    preprocessing: "PreprocessConfig | None" = None,
    tensorboard: bool = True,
) -> FitResult:
    """Train ``method`` on ``train_volumes``, writing logs and checkpoints to ``run_dir``.

    Args:
        method: a registered Method (moved to the training device in place). Its
            ``configure_optimizers`` gives the optimiser and the per-epoch schedule. A method
            with ``trains = False`` (an untrained baseline) is not optimised: its initial
            state is validated and written as ``last.pt`` so evaluations find it like any other.
        train_volumes: the pool ``method.sample`` draws each batch from.
        config: optimisation settings.
        run_dir: the method's run directory, e.g. ``runs/demo/isimed``.
        val_volumes: if given, a fixed seeded patch set is drawn from them once and, every
            ``eval_every_epochs`` (and before the first step), the val loss and the effective
            rank of its embeddings are logged with ``split="val"``.
        resume: continue from ``run_dir/checkpoints/last.pt`` when it exists. With
            ``resume=False`` an existing checkpoint is an error (nothing is overwritten).
        progress: show a tqdm progress bar.
        callbacks: called with every record written to ``metrics.jsonl``; a callback that
            returns True stops training after the current step (``last.pt`` is written first,
            so ``fit(..., resume=True)`` continues exactly there). A notebook's live figure
            is one (:class:`medssl.viz.live.LiveCurves`).

    With ``config.early_stopping`` (:class:`~medssl.train.config.EarlyStopping`) training stops
    once the validation measure (the method's ``val_measure`` unless the setting names one) has
    not improved for ``patience`` validations; ``epochs`` is the cap. The best state is kept as
    ``checkpoints/best.pt``, and the early-stopping state travels in every checkpoint, so a
    resumed run counts on where it stopped and a finished one stays finished.
        preprocessing: how the training volumes were preprocessed, for volumes that do not
            say so themselves (arrays prepared by hand). Default: read from the volumes
            (``meta["preprocess_config"]``, set by ``open_data`` and the cache); either way it is
            recorded in every checkpoint (:mod:`medssl.train.preprocessing`). A config that
            contradicts the volumes' own is a ValueError.
        tensorboard: also write the records as TensorBoard event files in ``run_dir``.

    Raises:
        NonFiniteLossError: the loss became non-finite on any rank, or the gradient norm did
            on more than 3 consecutive steps (a single non-finite gradient with a finite loss
            skips that update and is counted in ``skipped_nonfinite_grad_steps``); every rank
            stops, and the previous checkpoint is left untouched.
    """
    if config.early_stopping is not None and method.trains and not val_volumes:
        raise ValueError(f"{run_dir}: early_stopping watches a validation measure and needs val_volumes; none given")
    with deterministic_algorithms(resolve_device(config.device), config.deterministic):
        t = _Trainer(method, train_volumes, config, Path(run_dir), val_volumes, list(callbacks or []), progress)
        t.record_preprocessing(preprocessing)
        t.tensorboard = tensorboard
        try:
            t.restore(resume)
            t.start()
            while t.step < t.total_steps and not t.stop:
                batch, sample_s = t.next_batch()
                t.optimizer_step(batch, sample_s)
                if t.step % t.steps_per_epoch == 0:
                    t.end_of_epoch()
                elif t.stop:
                    t.save(epoch_file=False)  # a callback asked to stop mid-epoch: keep the exact state
        finally:
            t.close()
    return t.result()


class _Trainer:
    """The state of one ``fit`` call and its named steps."""

    def __init__(self, method, train_volumes, config: TrainConfig, run_dir: Path, val_volumes, callbacks, progress):
        if len(train_volumes) == 0:
            raise ValueError("fit got no training volumes")
        self.method, self.config, self.run_dir = method, config, run_dir
        self.train_volumes, self.val_volumes = train_volumes, val_volumes
        self.ckpt_dir, self.last_path = checkpoint_paths(run_dir)
        self.is_main = rank() == 0
        self.device = resolve_device(config.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # this rank's GPU is the current one (NCCL object collectives use it)
        self.precision = resolve_precision(config.precision, self.device)
        volumes_per_batch = int(getattr(method.config, "volumes_per_batch", 1))
        self.steps_per_epoch = config.steps_per_epoch or math.ceil(len(train_volumes) / (volumes_per_batch * world_size()))
        self.total_steps = config.epochs * self.steps_per_epoch if method.trains else 0
        method.to(self.device)
        self.module = wrap_for_training(method, self.device, config.sync_batchnorm) if method.trains else None
        self.optimizer, self.scheduler = method.configure_optimizers(config) if method.trains else (None, None)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.rng = np.random.default_rng([config.seed, rank()])  # each DDP rank samples its own volumes
        torch.manual_seed(config.seed + rank())
        self.step, self.elapsed_before_s, self.t_start = 0, 0.0, time.perf_counter()
        self.callbacks, self.progress = callbacks, progress
        self.stop, self.last_loss = False, None
        self.bad_grad_streak, self.skipped_steps = 0, 0
        self.window = StepWindow()
        self.autocast = autocast(self.device, self.precision)
        # oneDNN's bf16 weight gradient of thin 3D convolutions is wrong on AVX512-BF16 CPUs: those run in fp32
        self.conv_guard = Bf16Conv3dGuard(method) if self.device.type == "cpu" and self.precision == "bf16" else None
        self.early = _EarlyStopper(config.early_stopping, method) \
            if config.early_stopping is not None and method.trains else None
        self.stop_reason = ""

    # ------------------------------------------------------------------ set up

    def restore(self, resume: bool) -> None:
        """Continue from ``last.pt`` when it exists: weights, optimiser, schedule, step and every rank's rngs."""
        if not self.last_path.exists():
            return
        if not resume:
            raise FileExistsError(
                f"{self.last_path} exists; pass resume=True to continue that run, or choose a new run_dir "
                "(nothing was overwritten)"
            )
        state = load_checkpoint(self.last_path, map_location=self.device)
        check_resumable(state, self.method, self.config, self.last_path)
        self._warn_if_preprocessing_changed(state)
        self.method.load_state_dict(state["model"])
        if self.optimizer is not None and state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.elapsed_before_s = int(state["step"]), float(state.get("elapsed_s", 0.0))
        skipped = state.get("nonfinite_grad") or {}  # so a resumed run logs the counts of an uninterrupted one
        self.skipped_steps, self.bad_grad_streak = int(skipped.get("skipped", 0)), int(skipped.get("streak", 0))
        numpy_rngs = state.get("numpy_rngs") or [state["numpy_rng"]]
        torch_rngs = state.get("torch_rngs") or [state["torch_rng"]]
        if rank() < len(numpy_rngs):
            self.rng = restore_numpy_rng(numpy_rngs[rank()])
            torch.set_rng_state(torch_rngs[rank()].cpu())
        else:  # a checkpoint from fewer ranks: a fresh stream tied to the step
            self.rng = np.random.default_rng([self.config.seed, rank(), self.step])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        self.stop_reason = str(state.get("stop_reason", "") or "")
        if self.early is not None and self.step > 0 and state.get("early_stopping"):
            # (a checkpoint at step 0 carries no progress: its validation is made again below)
            self.early.load(json.loads(state["early_stopping"]), self.last_path)
            self.stop = self.early.stopped  # a run that stopped early stays stopped

    def start(self) -> None:
        """Write config.json, drop log records of lost steps, draw the fixed val set, log the first val record."""
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            keep_metrics_up_to(method_files(self.run_dir).metrics, self.step)
            self._write_config_json()
            record_fit_provenance(self.run_dir, self.step)  # commit, dirty tree, packages, config sha256
        # on resume, TensorBoard hides the events after the checkpoint's step, as keep_metrics_up_to drops their lines
        tb = TensorBoardLog(self.run_dir, purge_step=self.step + 1 if self.step else None) \
            if self.is_main and self.tensorboard else None
        self.log = MetricsLog(method_files(self.run_dir).metrics, enabled=self.is_main, callbacks=self.callbacks,
                              tensorboard=tb)
        self.val_set = self._draw_val_set() if self.val_volumes else None
        self.t_start = time.perf_counter()
        self.batches = _BatchSource(self.method, self.train_volumes, self.rng,
                                    prefetch=self.config.prefetch and self.total_steps - self.step > 1)
        self.bar = tqdm(total=self.total_steps, initial=self.step, desc=f"{self.method.registry_name} fit",
                        disable=not (self.progress and self.is_main))
        if self.val_set is not None and self.step == 0:
            record = self._evaluate() | self._when()
            asked, watched = self.log.write(record), self._watch(record)  # both: early stopping counts every validation
            self.stop = any_rank(asked or watched, self.device)
            if self.early is not None:  # the untrained state is the first "best": best.pt always exists
                self.save(epoch_file=False)
        if not self.method.trains:  # an untrained baseline: its initial state is the result
            self.save(epoch_file=False)
        self.method.train()

    # ------------------------------------------------------------------ one step

    def next_batch(self) -> tuple["PatchBatch", float]:
        t0 = time.perf_counter()
        batch = self.batches.next().to(self.device, non_blocking=True)
        return batch, time.perf_counter() - t0  # with prefetch: only the wait for the batch

    def optimizer_step(self, batch: "PatchBatch", sample_s: float) -> None:
        """Forward under autocast, the non-finite guard (agreed across ranks), backward, clipping, update, log."""
        t0 = time.perf_counter() - sample_s
        with self.autocast:
            loss, logs = self.module(batch)
        # the next batch is drawn now, after this step's forward (which advances a method's step counter, e.g.
        # the context curriculum) and overlapping its backward: it sees what an inline draw would (_BatchSource)
        self.batches.prefetch(more=self.step + 1 < self.total_steps)
        loss_value = float(loss.detach())
        bad_rank = first_true_rank(not math.isfinite(loss_value), self.device)
        if bad_rank is not None:
            where = f" on rank {bad_rank}" if is_distributed() else ""
            raise NonFiniteLossError(self._non_finite_message(f"loss{where}", loss_value, logs))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # DDP all-reduces the gradients during backward
        self.scaler.unscale_(self.optimizer)
        clip = self.config.grad_clip_norm or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.method.parameters(), clip))
        lr = self.optimizer.param_groups[0]["lr"]
        self._apply_update(grad_norm, logs)
        t_wait = time.perf_counter()
        self.batches.settle()  # the draw is done before logs, callbacks, evaluation or a checkpoint touch the method
        sample_s += time.perf_counter() - t_wait  # waiting for the next batch counts as sampling
        self.step += 1
        self.last_loss = loss_value
        self.window.add(loss_value, logs, len(batch), grad_norm, sample_s, time.perf_counter() - t0)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss_value:.4g}", lr=f"{lr:.2g}", refresh=False)
        if self.step % self.config.log_every == 0 or self.step % self.steps_per_epoch == 0:
            record = self.window.record(lr) | {"skipped_nonfinite_grad_steps": self.skipped_steps}
            self.stop = any_rank(self.log.write(record | self._when()) or self.stop, self.device)

    def _apply_update(self, grad_norm: float, logs: dict) -> None:
        # After DDP's all-reduce the gradients, and so grad_norm, are identical on every rank.
        if math.isfinite(grad_norm) or self.precision == "fp16":  # fp16: GradScaler skips such steps itself
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.bad_grad_streak = 0
            return
        # Finite loss but NaN/Inf gradients: seen from oneDNN's bf16 conv3d weight gradient on thin
        # (2^3) feature maps on AVX512-BF16 CPUs (now run in fp32: medssl.train.determinism), and
        # possible in any overflow. Skip the update like GradScaler would, and stop if it keeps happening.
        self.bad_grad_streak += 1
        self.skipped_steps += 1
        if self.bad_grad_streak > _MAX_NONFINITE_GRAD_STREAK:
            raise NonFiniteLossError(self._non_finite_message("gradient norm", grad_norm, logs, self.step))

    # ------------------------------------------------------------------ end of epoch

    def end_of_epoch(self) -> None:
        """Step the schedule, evaluate (every ``eval_every_epochs`` and at the end), checkpoint."""
        self.scheduler.step()
        epochs_done = self.step // self.steps_per_epoch
        last = self.step == self.total_steps
        if self.val_set is not None and (epochs_done % self.config.eval_every_epochs == 0 or last):
            record = self._evaluate() | self._when()
            asked, watched = self.log.write(record), self._watch(record)  # both: early stopping counts every validation
            self.stop = any_rank(asked or watched or self.stop, self.device)
        if last and not self.stop_reason:
            self.stop_reason = f"reached the cap of {self.total_steps} steps ({self.config.epochs} epochs)"
        self.save(epoch_file=epochs_done % self.config.checkpoint_every_epochs == 0 or last or self.stop)

    def save(self, epoch_file: bool) -> None:
        """Atomic ``last.pt`` (and ``epoch-XXXX.pt``) written by rank 0 with every rank's rng state."""
        # the rng as it was after the last batch TRAINED on (a prefetched batch is drawn again on resume)
        numpy_rngs = all_ranks_gather(numpy_rng_state(self.batches.consumed_rng()))
        torch_rngs = all_ranks_gather(torch.get_rng_state())
        if not self.is_main:
            return
        # this rank's GPU's generator (get_rng_state() without a device reads the current device's)
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" and torch.cuda.is_initialized() \
            else None
        state = training_state(self.method, self.config, self.optimizer, self.scheduler, self.scaler, self.step,
                               self.steps_per_epoch, self._elapsed_s(), numpy_rngs, torch_rngs, cuda_rng,
                               preprocessing=self.preprocessing)
        state["nonfinite_grad"] = {"skipped": self.skipped_steps, "streak": self.bad_grad_streak}  # logged counts
        state["stop_reason"] = self.stop_reason
        paths = [self.ckpt_dir / f"epoch-{self.step // self.steps_per_epoch:04d}.pt"] if epoch_file else []
        if self.early is not None:
            state["early_stopping"] = json.dumps(self.early.state())
            if self.early.best_step == self.step:  # this state is the best validation so far
                paths.append(self.ckpt_dir / BEST_CHECKPOINT)
        save_checkpoint(state, *paths, self.last_path)
        prune_epoch_checkpoints(self.ckpt_dir, self.config.keep_last)
        if self.early is not None:
            atomic_write_bytes(self.run_dir / EARLY_STOPPING_FILE,
                               json.dumps({**self.early.state(), "step": self.step, "cap_steps": self.total_steps,
                                           "stop_reason": self.stop_reason}, indent=1).encode())

    def close(self) -> None:
        if hasattr(self, "log"):
            self.log.close()
        if self.conv_guard is not None:
            self.conv_guard.remove()
        if hasattr(self, "batches"):
            self.batches.close()
        if hasattr(self, "bar"):
            self.bar.close()

    def result(self) -> FitResult:
        reason = self.stop_reason or ("a callback asked to stop" if self.step < self.total_steps else "")
        best = self.ckpt_dir / BEST_CHECKPOINT
        return FitResult(run_dir=self.run_dir, checkpoint_path=self.last_path, step=self.step,
                         epoch=self.step // self.steps_per_epoch, final_loss=self.last_loss,
                         stopped_early=self.step < self.total_steps, stop_reason=reason,
                         best_step=self.early.best_step if self.early is not None else None,
                         best_checkpoint_path=best if self.early is not None and best.is_file() else None)

    def _watch(self, record: dict[str, Any]) -> bool:
        """Early stopping's verdict on a validation record: True to stop (the reason is kept)."""
        if self.early is None:
            return False
        if self.early.update(record, self.step):
            self.stop_reason = self.early.reason
            return True
        return False

    # ------------------------------------------------------------------ preprocessing record

    tensorboard = True

    def record_preprocessing(self, declared: "PreprocessConfig | None") -> None:
        """The training volumes' preprocessing record (every checkpoint carries it); also set on the method."""
        from dataclasses import asdict as _asdict

        from medssl.train.preprocessing import record_from_volumes

        record = record_from_volumes(self.train_volumes, self.method.patch_size_vox, self.method.input_size_vox)
        if declared is not None:
            declared_json = json.loads(json.dumps(_asdict(declared)))
            if record["config"] is not None and record["config"] != declared_json:
                raise ValueError(f"fit: preprocessing={declared} contradicts the training volumes' own record "
                                 f"{record['config']}; leave preprocessing=None to record theirs")
            record["config"] = declared_json
        self.preprocessing = record
        self.method.preprocessing = record

    def _warn_if_preprocessing_changed(self, state: dict) -> None:
        import warnings

        from medssl.train.preprocessing import config_from_record, record_from_state

        before = config_from_record(record_from_state(state))
        now = config_from_record(self.preprocessing)
        if before is not None and now is not None and before != now:
            warnings.warn(f"{self.last_path}: resuming on volumes preprocessed otherwise than before ({before} -> "
                          f"{now}); the checkpoint will record the new preprocessing", stacklevel=3)

    # ------------------------------------------------------------------ helpers

    def _elapsed_s(self) -> float:
        return self.elapsed_before_s + time.perf_counter() - self.t_start

    def _when(self) -> dict[str, Any]:
        return when(self.step, self.steps_per_epoch, self._elapsed_s())

    def _draw_val_set(self) -> list["PatchBatch"]:
        # Drawn in eval mode, as it is evaluated: a method whose training draws follow its progress (the
        # context-prediction curriculum) then draws the same fixed val set at every start and resume.
        val_rng = np.random.default_rng(self.config.val_seed)
        was_training = self.method.training
        self.method.eval()
        try:
            return [self.method.sample(self.val_volumes, val_rng).to(self.device) for _ in range(self.config.val_batches)]
        finally:
            self.method.train(was_training)

    def _evaluate(self) -> dict[str, Any]:
        """Val loss and embedding rank in eval mode without gradients; back to train mode after."""
        method = self.method
        method.eval()
        try:
            with torch.no_grad(), self.autocast:
                outs = [method.training_step(b) for b in self.val_set]
                z = torch.cat([method.embed(b.patches[i : i + _EMBED_CHUNK]).float()
                               for b in self.val_set for i in range(0, len(b), _EMBED_CHUNK)])  # (N_val, D)
        finally:
            method.train()
        finite = bool(torch.isfinite(z).all())
        return {
            **mean_logs([o.logs for o in outs]),
            "split": "val",
            "loss": float(np.mean([float(o.loss) for o in outs])),
            "effective_rank": effective_rank(z) if finite else float("nan"),
            "dim_variance_fraction": dim_variance_fraction(z) if finite else float("nan"),
            "n_patches": int(z.shape[0]),
        }

    def _write_config_json(self) -> None:
        content = {
            "method": self.method.registry_name,
            "base_method": self.method.name,
            "method_config": asdict(self.method.config),
            "train": asdict(self.config),
            "resolved": {"steps_per_epoch": self.steps_per_epoch, "device": str(self.device),
                         "precision": self.precision, "patches_per_step": self.method.patches_per_step,
                         "views_per_patch": self.method.views_per_patch, "trains": self.method.trains},
            "world_size": world_size(),
            "torch_version": str(torch.__version__),
        }
        atomic_write_bytes(method_files(self.run_dir).config, json.dumps(content, indent=2).encode())

    def _non_finite_message(self, what: str, value: float, logs: dict, step: int | None = None) -> str:
        step = self.step if step is None else step
        cfg, last = self.config, self.last_path
        kept = f"the last good checkpoint {last} is unchanged" if last.exists() else "no checkpoint was written yet"
        return (
            f"non-finite {what} ({value}) at step {step + 1} (epoch {step // self.steps_per_epoch + 1} of "
            f"{cfg.epochs}); that step's logs: {dict(logs)}. Training stopped and {kept}. "
            f"Hints: lower lr (now {cfg.lr:g}) or grad_clip_norm, try precision='fp32', "
            "and check the input volumes for NaN or extreme intensities (are they scaled?)."
        )


class _BatchSource:
    """Draws training batches in order from one numpy rng, optionally one batch ahead in a thread.

    Two-view methods spend ~20 % of a demo step making their views (metrics ``sample_share``).
    On a GPU machine, drawing the next batch on the CPU while the GPU trains hides that (torch
    and numpy release the GIL); on a 2-core CPU it gains nothing (TrainConfig.prefetch).

    **Determinism.** A run with prefetch trains on exactly the batches of a run without, whatever
    the thread timing: batches are drawn strictly in sequence from the one rng (only one draw is
    ever in flight), the draw of batch ``k + 1`` starts after step ``k``'s forward pass
    (:meth:`prefetch`, called by the trainer; a method's forward may advance what its sampler reads,
    e.g. the context curriculum's step counter) and has finished before step ``k``'s logs,
    callbacks, evaluation or checkpoint (:meth:`settle`). So the draw overlaps only the backward
    pass and the optimiser update, and a sampler may read any state of the method except its
    weights. Samplers draw only from the ``rng`` they are given (never torch's or numpy's global
    generators, which the training thread uses at the same time; ``tests/train/test_determinism.py``).
    ``consumed_rng()`` is the rng state after the last batch handed out, which is what a checkpoint
    must store for an exact resume.
    """

    def __init__(self, method: "Method", volumes: Sequence[Any], rng: np.random.Generator, prefetch: bool) -> None:
        self._method, self._volumes, self._rng = method, volumes, rng
        self._consumed_state = numpy_rng_state(rng)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medssl-prefetch") if prefetch else None
        self._pending: Future | None = None

    def _draw(self) -> tuple["PatchBatch", str]:
        batch = self._method.sample(self._volumes, self._rng)
        return batch, numpy_rng_state(self._rng)

    def next(self) -> "PatchBatch":
        """The next batch: the prefetched one, or one drawn now."""
        batch, self._consumed_state = self._pending.result() if self._pending is not None else self._draw()
        self._pending = None
        return batch

    def prefetch(self, more: bool) -> None:
        """Start drawing the next batch in the helper thread (with prefetch on, and when ``more`` are wanted)."""
        if self._pool is not None and more and self._pending is None:
            self._pending = self._pool.submit(self._draw)

    def settle(self) -> None:
        """Wait until the draw in flight (if any) has finished; its batch is kept for :meth:`next`."""
        if self._pending is not None:
            self._pending.exception()  # waits; an error is raised by next(), where the batch is asked for

    def consumed_rng(self) -> np.random.Generator:
        return restore_numpy_rng(self._consumed_state)

    def close(self) -> None:
        if self._pool is not None:
            if self._pending is not None:
                self._pending.cancel()
            self._pool.shutdown(wait=True)


BEST_CHECKPOINT = "best.pt"
EARLY_STOPPING_FILE = "early_stopping.json"


class _EarlyStopper:
    """Patience on one validation measure (:class:`~medssl.train.config.EarlyStopping`); its state is JSON."""

    def __init__(self, settings: EarlyStopping, method: "Method") -> None:
        own_measure, own_mode = getattr(method, "val_measure", ("loss", "min"))
        if settings.measure is not None and settings.measure != own_measure and settings.mode is None:
            raise ValueError(f"early_stopping.measure={settings.measure!r} is not {method.registry_name}'s own "
                             f"val_measure ({own_measure!r}); say whether it is minimised or maximised (mode)")
        self.settings = settings
        self.measure = settings.measure or own_measure
        self.mode = settings.mode or own_mode
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad = 0
        self.stopped = False
        self.reason = ""
        self.history: list[tuple[int, float]] = []

    def update(self, record: dict[str, Any], step: int) -> bool:
        """Count one validation; True when training should stop now."""
        if self.measure not in record:
            known = sorted(k for k, v in record.items() if isinstance(v, (int, float)))
            raise KeyError(f"early stopping watches {self.measure!r}, which the validation record does not hold "
                           f"(it has {known}); set early_stopping.measure to one of them")
        value = float(record[self.measure])
        self.history.append((int(step), value))
        d = self.settings.min_delta
        improved = math.isfinite(value) and (
            self.best is None or (value < self.best - d if self.mode == "min" else value > self.best + d))
        if improved:
            self.best, self.best_step, self.bad = value, int(step), 0
        else:
            self.bad += 1
        if self.bad >= self.settings.patience and step >= self.settings.min_steps and not self.stopped:
            self.stopped = True
            self.reason = (f"early stopping at step {step}: validation {self.measure} ({self.mode}) did not improve by "
                           f"more than {d:g} for {self.bad} validations; best {self.best:.6g} at step {self.best_step}")
        return self.stopped

    def state(self) -> dict[str, Any]:
        return {"measure": self.measure, "mode": self.mode, "patience": self.settings.patience,
                "min_delta": self.settings.min_delta, "min_steps": self.settings.min_steps, "best": self.best,
                "best_step": self.best_step, "bad_validations": self.bad, "stopped": self.stopped,
                "reason": self.reason, "history": [list(h) for h in self.history]}

    def load(self, state: dict[str, Any], path: Path) -> None:
        if (state.get("measure"), state.get("mode")) != (self.measure, self.mode):
            raise ValueError(f"{path}: was early-stopped on {state.get('measure')!r} ({state.get('mode')}), this run "
                             f"watches {self.measure!r} ({self.mode}); use another run_dir")
        self.best = state.get("best")
        self.best_step = state.get("best_step")
        self.bad = int(state.get("bad_validations", 0))
        self.stopped = bool(state.get("stopped", False))
        self.reason = str(state.get("reason", ""))
        self.history = [(int(a), float(b)) for a, b in state.get("history", [])]
