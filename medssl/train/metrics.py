"""The training log: ``metrics.jsonl`` records, the window between records, and reading it back.

Every record also goes to TensorBoard event files in the same folder (:class:`TensorBoardLog`), so a
long run can be watched while it trains (``make tensorboard RUN=<run>``: one TensorBoard run per method).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from medssl._files import atomic_write_bytes
from medssl.rundir import method_files

__all__ = ["MetricsLog", "StepWindow", "TensorBoardLog", "read_metrics", "keep_metrics_up_to", "when", "mean_logs"]

Callback = Callable[[dict[str, Any]], "bool | None"]


def when(step: int, steps_per_epoch: int, elapsed_s: float) -> dict[str, Any]:
    """Where a record sits: ``epoch`` is fractional (1.5 = half-way through the second epoch)."""
    return {"step": step, "epoch": step / steps_per_epoch, "time_s": round(elapsed_s, 3)}


def mean_logs(logs: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for d in logs for k in d}
    return {k: float(np.mean([d[k] for d in logs if k in d])) for k in sorted(keys)}


class StepWindow:
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
        finite = [g for g in self.grad_norms if math.isfinite(g)]
        rec = {
            **mean_logs(self.logs),  # the method's logs first: the trainer's fields below win on clashes
            "split": "train",
            "lr": lr,
            "loss": float(np.mean(self.losses)),
            "grad_norm": float(np.mean(finite)) if finite else float("nan"),
            "samples_per_s": self.n_samples / max(self.step_s, 1e-9),  # patches per second of step time
            "sample_share": self.sample_s / max(self.step_s, 1e-9),  # share of step time spent sampling
        }
        self._reset()
        return rec


class MetricsLog:
    """Appends JSON lines (rank 0 only) and runs the callbacks on every record; ``write`` returns "stop?".

    ``tensorboard``: a :class:`TensorBoardLog` that receives every record too (rank 0 only).
    """

    def __init__(self, path: Path, enabled: bool, callbacks: list[Callback],
                 tensorboard: "TensorBoardLog | None" = None) -> None:
        self.path, self.enabled, self.callbacks = path, enabled, callbacks
        self.tensorboard = tensorboard if enabled else None

    def write(self, record: dict[str, Any]) -> bool:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, allow_nan=True) + "\n")
            if self.tensorboard is not None:
                self.tensorboard.write(record)
        return any(bool(cb(record)) for cb in self.callbacks)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


# Record fields that say where a record sits, not what was measured.
_NOT_SCALARS = frozenset({"step", "epoch", "time_s", "split"})


class TensorBoardLog:
    """TensorBoard event files (``events.out.tfevents.*``) in ``log_dir``, beside ``metrics.jsonl``.

    Every finite number of a record becomes the scalar ``<split>/<field>`` at the record's
    ``step`` (``train/loss``, ``train/lr``, ``train/samples_per_s``, the method's loss terms and
    collapse coefficients, ``val/effective_rank`` ...), flushed at once so a running
    TensorBoard shows it. Written with ``torch.utils.tensorboard.SummaryWriter``; where the
    ``tensorboard`` package is missing, training goes on without event files and says so once.

    ``purge_step``: on resume, the first step after the checkpoint's; TensorBoard then hides the
    earlier events from that step on (steps trained after the checkpoint by a run that died), as
    ``keep_metrics_up_to`` drops their ``metrics.jsonl`` lines.
    """

    def __init__(self, log_dir: str | os.PathLike, purge_step: int | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            warnings.warn(f"{self.log_dir}: no TensorBoard event files ({e}); `pip install tensorboard` "
                          "(requirements.txt pins it) to watch training live. metrics.jsonl is written as usual.",
                          stacklevel=2)
            return
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step or None)

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step, split = int(record.get("step", 0)), str(record.get("split", "train"))
        for key, value in record.items():
            if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(f"{split}/{key}", float(value), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def keep_metrics_up_to(path: Path, step: int) -> None:
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


def read_metrics(method_dir: str | os.PathLike) -> pd.DataFrame:
    """``metrics.jsonl`` of a method's folder (or the file itself) as a DataFrame, one row per record.

    Columns include ``split`` ("train"/"val"), ``step``, ``epoch``, ``loss``, ``lr``,
    ``time_s``, ``samples_per_s``, ``effective_rank`` (val) and the method's own logs.
    A torn last line (crash mid-write) is skipped.
    """
    path = Path(method_dir)
    if path.is_dir():
        path = method_files(path).metrics
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics yet (has fit run in this directory?)")
    records = [r for line in path.read_text(encoding="utf-8").splitlines() if (r := _parse(line))]
    return pd.DataFrame.from_records(records)
