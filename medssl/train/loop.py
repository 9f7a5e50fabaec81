"""``fit``: the one training loop every method uses.

Read it top to bottom: set up (device, precision, optimiser, rng), resume if a
``last.pt`` exists, then for every step sample a batch on the CPU, run the method's
``training_step`` under autocast, guard against a non-finite loss, step the optimiser,
log; after every epoch decay the learning rate, evaluate on a fixed validation patch
set, and write an atomic checkpoint.

Run directory (``run_dir``)::

    config.json            method config + train config (asdict) + resolved settings
    metrics.jsonl          one JSON object per line: split="train" every log_every steps,
                           split="val" after evaluations
    checkpoints/last.pt    newest state (resume point)
    checkpoints/epoch-XXXX.pt
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from medssl._files import atomic_write_bytes
from medssl.evaluate.rank import dim_variance_fraction, effective_rank
from medssl.train.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    checkpoint_paths,
    config_to_json,
    load_checkpoint,
    numpy_rng_state,
    prune_epoch_checkpoints,
    restore_numpy_rng,
    save_checkpoint,
)
from medssl.train.config import TrainConfig
from medssl.train.distributed import is_distributed, rank, world_size
from medssl.train.schedule import make_lr_scheduler, make_optimizer

if TYPE_CHECKING:
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
) -> FitResult:
    """Train ``method`` on ``train_volumes``, writing logs and checkpoints to ``run_dir``.

    Args:
        method: a registered Method (moved to the training device in place).
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
            so ``fit(..., resume=True)`` continues exactly there).

    Raises:
        NonFiniteLossError: the loss became non-finite, or the gradient norm did on more than
            3 consecutive steps (a single non-finite gradient with a finite loss skips that
            update and is counted in ``skipped_nonfinite_grad_steps``); the previous checkpoint
            is left untouched.
    """
    run_dir = Path(run_dir)
    ckpt_dir, last_path = checkpoint_paths(run_dir)
    is_main = rank() == 0
    callbacks = list(callbacks or [])
    if len(train_volumes) == 0:
        raise ValueError("fit got no training volumes")
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    volumes_per_batch = int(getattr(method.config, "volumes_per_batch", 1))
    steps_per_epoch = config.steps_per_epoch or math.ceil(len(train_volumes) / (volumes_per_batch * world_size()))
    total_steps = config.epochs * steps_per_epoch

    # --- model, optimiser, schedule, rng --------------------------------------------------
    method.to(device)
    if is_distributed():
        _broadcast_state(method)  # every rank starts from rank 0's weights
    optimizer = make_optimizer(method.parameters(), config)
    scheduler = make_lr_scheduler(optimizer, config)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    rng = np.random.default_rng([config.seed, rank()])  # each DDP rank samples its own volumes
    torch.manual_seed(config.seed + rank())
    step, elapsed_before_s = 0, 0.0

    # --- resume ----------------------------------------------------------------------------
    if last_path.exists():
        if not resume:
            raise FileExistsError(
                f"{last_path} exists; pass resume=True to continue that run, or choose a new run_dir "
                "(nothing was overwritten)"
            )
        state = load_checkpoint(last_path, map_location=device)
        _check_resumable(state, method, config, last_path)
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, elapsed_before_s = int(state["step"]), float(state.get("elapsed_s", 0.0))
        # Only rank 0's rng is stored; other ranks get a fresh stream tied to the step.
        rng = restore_numpy_rng(state["numpy_rng"]) if is_main else np.random.default_rng([config.seed, rank(), step])
        torch.set_rng_state(state["torch_rng"].cpu())
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _keep_metrics_up_to(run_dir / "metrics.jsonl", step)  # drop records of steps lost in a crash
        _write_config_json(run_dir, method, config, steps_per_epoch=steps_per_epoch, device=device, precision=precision)
    log = _MetricsLog(run_dir / "metrics.jsonl", enabled=is_main, callbacks=callbacks)
    autocast = _autocast(device, precision)

    # Fixed validation patches: drawn once from a fixed seed, reused at every evaluation.
    val_set = _draw_val_set(method, val_volumes, config, device) if val_volumes else None
    t_start = time.perf_counter()

    def elapsed_s() -> float:
        return elapsed_before_s + time.perf_counter() - t_start

    def save(epoch_file: bool) -> None:
        if not is_main:
            return
        # the rng as it was after the last batch TRAINED on (a prefetched batch is drawn again on resume)
        state = _checkpoint_state(method, config, optimizer, scheduler, scaler, sampler.consumed_rng(), step,
                                  steps_per_epoch, elapsed_s())
        epochs_done = step // steps_per_epoch
        paths = [ckpt_dir / f"epoch-{epochs_done:04d}.pt"] if epoch_file else []
        save_checkpoint(state, *paths, last_path)
        prune_epoch_checkpoints(ckpt_dir, config.keep_last)

    stop = False
    if val_set is not None and step == 0:
        stop = log.write(_evaluate(method, val_set, autocast) | _when(step, steps_per_epoch, elapsed_s()))

    # --- train -----------------------------------------------------------------------------
    bar = tqdm(total=total_steps, initial=step, desc=f"{method.name} fit", disable=not (progress and is_main))
    window = _Window()
    last_loss: float | None = None
    bad_grad_streak, skipped_steps = 0, 0
    method.train()
    sampler = _BatchSource(method, train_volumes, rng, prefetch=config.prefetch and total_steps - step > 1)
    try:
        while step < total_steps and not stop:
            t0 = time.perf_counter()
            batch = sampler.next(more=step + 1 < total_steps).to(device, non_blocking=True)
            t_sampled = time.perf_counter()  # with prefetch: only the wait for the batch

            with autocast:
                out = method.training_step(batch)
            loss_value = float(out.loss.detach())
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(_non_finite_message("loss", loss_value, step, steps_per_epoch, config, out.logs, last_path))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(out.loss).backward()
            if is_distributed():
                _average_gradients(method)
            scaler.unscale_(optimizer)
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(method.parameters(), config.grad_clip_norm or float("inf"))
            )
            lr = optimizer.param_groups[0]["lr"]
            if math.isfinite(grad_norm) or precision == "fp16":  # fp16: GradScaler skips such steps itself
                scaler.step(optimizer)
                scaler.update()
                bad_grad_streak = 0
            else:
                # Finite loss but NaN/Inf gradients: seen sporadically from oneDNN's bf16 conv3d weight
                # gradient on tiny (2^3) feature maps on AVX512-BF16 CPUs; a rerun of the same batch is
                # finite. Skip the update like GradScaler would, and stop if it keeps happening.
                bad_grad_streak += 1
                skipped_steps += 1
                if bad_grad_streak > _MAX_NONFINITE_GRAD_STREAK:
                    raise NonFiniteLossError(
                        _non_finite_message("gradient norm", grad_norm, step, steps_per_epoch, config, out.logs, last_path)
                    )
            step += 1
            last_loss = loss_value

            window.add(loss_value, out.logs, len(batch), grad_norm, sample_s=t_sampled - t0, step_s=time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4g}", lr=f"{lr:.2g}", refresh=False)
            end_of_epoch = step % steps_per_epoch == 0
            if step % config.log_every == 0 or end_of_epoch:
                record = window.record(lr) | {"skipped_nonfinite_grad_steps": skipped_steps}
                stop = log.write(record | _when(step, steps_per_epoch, elapsed_s()))

            if end_of_epoch:
                scheduler.step()
                epochs_done = step // steps_per_epoch
                if val_set is not None and (epochs_done % config.eval_every_epochs == 0 or step == total_steps):
                    stop = log.write(_evaluate(method, val_set, autocast) | _when(step, steps_per_epoch, elapsed_s())) or stop
                save(epoch_file=epochs_done % config.checkpoint_every_epochs == 0 or step == total_steps)
            elif stop:
                save(epoch_file=False)  # a callback asked to stop mid-epoch: keep the exact state
    finally:
        sampler.close()
    bar.close()

    return FitResult(
        run_dir=run_dir,
        checkpoint_path=last_path,
        step=step,
        epoch=step // steps_per_epoch,
        final_loss=last_loss,
        stopped_early=step < total_steps,
    )


class _BatchSource:
    """Draws training batches in order from one numpy rng, optionally one batch ahead in a thread.

    Two-view methods spend ~20 % of a demo step making their views (metrics ``sample_share``).
    On a GPU machine, drawing the next batch on the CPU while the GPU trains hides that (torch
    and numpy release the GIL); on a 2-core CPU it gains nothing (TrainConfig.prefetch). Batches are drawn strictly in sequence from the same rng, so a run with prefetch
    sees exactly the batches of a run without. ``consumed_rng()`` is the rng state after the last
    batch handed out, which is what a checkpoint must store for an exact resume.
    """

    def __init__(self, method: "Method", volumes: Sequence[Any], rng: np.random.Generator, prefetch: bool) -> None:
        self._method, self._volumes, self._rng = method, volumes, rng
        self._consumed_state = numpy_rng_state(rng)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medssl-prefetch") if prefetch else None
        self._pending: Future | None = None

    def _draw(self) -> tuple["PatchBatch", str]:
        batch = self._method.sample(self._volumes, self._rng)
        return batch, numpy_rng_state(self._rng)

    def next(self, more: bool) -> "PatchBatch":
        """The next batch; ``more`` says whether another one will be asked for (to prefetch it)."""
        batch, self._consumed_state = self._pending.result() if self._pending is not None else self._draw()
        self._pending = self._pool.submit(self._draw) if (self._pool is not None and more) else None
        return batch

    def consumed_rng(self) -> np.random.Generator:
        return restore_numpy_rng(self._consumed_state)

    def close(self) -> None:
        if self._pool is not None:
            if self._pending is not None:
                self._pending.cancel()
            self._pool.shutdown(wait=True)


# ----------------------------------------------------------------------------------------
# Device and precision
# ----------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> this rank's CUDA device when CUDA is present, else CPU; otherwise ``torch.device(device)``."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bf16"`` / ``"fp16"`` / ``"fp32"`` for ``device`` (see TrainConfig.precision)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and _cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def _cpu_has_fast_bf16() -> bool:
    # bf16 autocast only pays off with native bf16 instructions (AMX tiles or AVX512-BF16);
    # on plain AVX2 it is emulated and slower than fp32.
    if not any(k in torch.backends.cpu.get_cpu_capability() for k in ("AVX512", "AMX")):
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(p()) for p in probes if callable(p))


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------
# Evaluation on the fixed validation patch set
# ----------------------------------------------------------------------------------------


def _draw_val_set(method: "Method", val_volumes, config: TrainConfig, device: torch.device) -> list["PatchBatch"]:
    val_rng = np.random.default_rng(config.val_seed)
    return [method.sample(val_volumes, val_rng).to(device) for _ in range(config.val_batches)]


def _evaluate(method: "Method", val_set: list["PatchBatch"], autocast) -> dict[str, Any]:
    """Val loss and embedding rank in eval mode without gradients; back to train mode after."""
    method.eval()
    try:
        with torch.no_grad(), autocast:
            outs = [method.training_step(b) for b in val_set]
            z = torch.cat(
                [method.embed(b.patches[i : i + _EMBED_CHUNK]).float() for b in val_set for i in range(0, len(b), _EMBED_CHUNK)]
            )  # (N_val, D)
    finally:
        method.train()
    logs = _mean_logs([o.logs for o in outs])
    return {
        **logs,
        "split": "val",
        "loss": float(np.mean([float(o.loss) for o in outs])),
        "effective_rank": effective_rank(z) if torch.isfinite(z).all() else float("nan"),
        "dim_variance_fraction": dim_variance_fraction(z) if torch.isfinite(z).all() else float("nan"),
        "n_patches": int(z.shape[0]),
    }


# ----------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------


def _when(step: int, steps_per_epoch: int, elapsed_s: float) -> dict[str, Any]:
    # epoch is fractional: epochs completed at this step (1.5 = half-way through the second epoch).
    return {"step": step, "epoch": step / steps_per_epoch, "time_s": round(elapsed_s, 3)}


def _mean_logs(logs: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for d in logs for k in d}
    return {k: float(np.mean([d[k] for d in logs if k in d])) for k in sorted(keys)}


class _Window:
    """Accumulates the steps between two training records."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.losses: list[float] = []
        self.logs: list[dict[str, float]] = []
        self.grad_norms: list[float] = []
        self.n_samples = 0
        self.sample_s = 0.0
        self.step_s = 0.0

    def add(self, loss: float, logs: dict[str, float], n: int, grad_norm: float, sample_s: float, step_s: float) -> None:
        self.losses.append(loss)
        self.logs.append({k: float(v) for k, v in logs.items()})
        self.grad_norms.append(grad_norm)
        self.n_samples += n
        self.sample_s += sample_s
        self.step_s += step_s

    def record(self, lr: float) -> dict[str, Any]:
        rec = {
            **_mean_logs(self.logs),  # the method's logs first: the trainer's fields below win on clashes
            "split": "train",
            "lr": lr,
            "loss": float(np.mean(self.losses)),
            "grad_norm": float(np.mean(finite)) if (finite := [g for g in self.grad_norms if math.isfinite(g)]) else float("nan"),
            "samples_per_s": self.n_samples / max(self.step_s, 1e-9),  # patches per second of step time
            "sample_share": self.sample_s / max(self.step_s, 1e-9),  # share of step time spent sampling
        }
        self._reset()
        return rec


class _MetricsLog:
    """Appends JSON lines (rank 0 only) and runs the callbacks on every record."""

    def __init__(self, path: Path, enabled: bool, callbacks: list[Callback]) -> None:
        self.path, self.enabled, self.callbacks = path, enabled, callbacks

    def write(self, record: dict[str, Any]) -> bool:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, allow_nan=True) + "\n")
        return any(bool(cb(record)) for cb in self.callbacks)


def _keep_metrics_up_to(path: Path, step: int) -> None:
    """Drop records past ``step`` (written after the checkpoint we resume from) and torn lines."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if (r := _parse(line)) and r.get("step", 0) <= step]
    if step == 0:
        kept = []  # no checkpoint: a fresh start, the old records belong to a run that left nothing
    atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


def _parse(line: str) -> dict | None:
    try:
        r = json.loads(line)
    except json.JSONDecodeError:
        return None
    return r if isinstance(r, dict) else None


def read_metrics(run_dir: str | os.PathLike) -> pd.DataFrame:
    """``metrics.jsonl`` of a run (or the file itself) as a DataFrame, one row per record.

    Columns include ``split`` ("train"/"val"), ``step``, ``epoch``, ``loss``, ``lr``,
    ``time_s``, ``samples_per_s``, ``effective_rank`` (val) and the method's own logs.
    A torn last line (crash mid-write) is skipped.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics yet (has fit run in this directory?)")
    records = [r for line in path.read_text(encoding="utf-8").splitlines() if (r := _parse(line))]
    return pd.DataFrame.from_records(records)


def _write_config_json(run_dir: Path, method: "Method", config: TrainConfig, **resolved: Any) -> None:
    content = {
        "method": method.name,
        "method_config": asdict(method.config),
        "train": asdict(config),
        "resolved": {k: str(v) if isinstance(v, torch.device) else v for k, v in resolved.items()},
        "world_size": world_size(),
        "torch_version": str(torch.__version__),
    }
    atomic_write_bytes(run_dir / "config.json", json.dumps(content, indent=2).encode())


# ----------------------------------------------------------------------------------------
# Checkpoint state and the non-finite guard
# ----------------------------------------------------------------------------------------


def _checkpoint_state(method, config, optimizer, scheduler, scaler, rng, step, steps_per_epoch, elapsed_s) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "method": method.name,
        "method_config": config_to_json(method.config),
        "train_config": config_to_json(config),
        "model": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        "step": step,
        "epoch": step // steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "elapsed_s": elapsed_s,
        "numpy_rng": numpy_rng_state(rng),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "torch_version": str(torch.__version__),
    }


def _check_resumable(state: dict, method: "Method", config: TrainConfig, path: Path) -> None:
    if state["method"] != method.name or state["method_config"] != config_to_json(method.config):
        raise CheckpointError(
            path,
            f"was trained by {state['method']!r} with config {state['method_config']}, which differs from the "
            f"method given ({method.name!r}, {config_to_json(method.config)}); use another run_dir to train it",
        )
    saved = json.loads(state.get("train_config", "{}"))
    changed = {k: (saved.get(k), v) for k, v in asdict(config).items() if k != "epochs" and saved.get(k) != v}
    if changed:
        warnings.warn(f"{path}: resuming with changed train settings (old, new): {changed}", stacklevel=3)


def _non_finite_message(what, value, step, steps_per_epoch, config, logs, last_path: Path) -> str:
    kept = f"the last good checkpoint {last_path} is unchanged" if last_path.exists() else "no checkpoint was written yet"
    return (
        f"non-finite {what} ({value}) at step {step + 1} (epoch {step // steps_per_epoch + 1} of {config.epochs}); "
        f"that step's logs: {dict(logs)}. Training stopped and {kept}. "
        f"Hints: lower lr (now {config.lr:g}) or grad_clip_norm, try precision='fp32', "
        "and check the input volumes for NaN or extreme intensities (are they scaled?)."
    )


# ----------------------------------------------------------------------------------------
# DDP helpers (no-ops unless torch.distributed is initialised with >1 process)
# ----------------------------------------------------------------------------------------


def _broadcast_state(module: torch.nn.Module) -> None:
    for t in module.state_dict().values():
        dist.broadcast(t, src=0)


def _average_gradients(module: torch.nn.Module) -> None:
    """All-reduce the mean gradient in one flat buffer.

    Done by hand rather than wrapping in DDP because the trainer calls
    ``method.training_step`` (not ``forward``), which DDP's reducer does not see.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n
