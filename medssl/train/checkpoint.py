"""Atomic, pickle-free checkpoints and loading a trained method back.

A checkpoint is a plain dict of tensors, numbers and strings (configs, the numpy rng state
and the training volumes' preprocessing record, :mod:`medssl.train.preprocessing`, are JSON
strings), so ``torch.load(weights_only=True)`` reads it and never runs
arbitrary pickled code. Writes go to a temp file in the same folder, then ``os.replace``:
a crash mid-write leaves the previous file intact.

Layout inside a run directory: ``checkpoints/last.pt`` (always the newest state) and
``checkpoints/epoch-XXXX.pt`` (XXXX = epochs completed), of which ``keep_last`` are kept.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medssl._errors import PathProblemError
from medssl._files import atomic_write_bytes
from medssl.rundir import method_files

if TYPE_CHECKING:
    from medssl.methods.base import Method

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "CheckpointWriteError",
    "save_checkpoint",
    "load_checkpoint",
    "load_method",
    "checkpoint_paths",
    "training_state",
    "check_resumable",
]

CHECKPOINT_FORMAT = "medssl-checkpoint-v1"
_REQUIRED_KEYS = ("format", "method", "method_config", "model", "step", "epoch")
_JSON_KEYS = ("method_config", "train_config", "numpy_rng", "preprocessing")
_EPOCH_FILE = re.compile(r"^epoch-(\d+)\.pt$")


class CheckpointError(PathProblemError, ValueError):
    """A checkpoint cannot be used. ``path`` names the file, ``problem`` says why."""


def checkpoint_paths(method_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``(checkpoints dir, last.pt path)`` for a run directory."""
    files = method_files(method_dir)
    return files.checkpoints, files.last


class CheckpointWriteError(PathProblemError, OSError):
    """Writing a checkpoint failed (disk full, quota, file size limit). ``path`` names the file; the previous
    file of that name is untouched."""


def save_checkpoint(state: dict[str, Any], *paths: str | os.PathLike) -> None:
    """Serialise ``state`` once and write it atomically to each of ``paths``.

    Raises:
        CheckpointWriteError: a write failed (e.g. the disk is full); it names the file, and that
            file's previous version (if any) is still there and loads.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    for path in paths:
        path = Path(path)
        try:
            atomic_write_bytes(path, buffer.getbuffer(), fsync=True)
        except OSError as e:
            kept = "the previous checkpoint there is untouched" if path.exists() else "no earlier checkpoint there"
            hint = " (the disk is full: free space or move the run)" if e.errno == errno.ENOSPC else ""
            raise CheckpointWriteError(
                path, f"cannot write the checkpoint ({buffer.getbuffer().nbytes} bytes): "
                f"{e.strerror or str(e) or type(e).__name__}{hint}; {kept}",
            ) from e  # fmt: skip


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a medssl checkpoint with ``weights_only=True`` and check its format tag.

    Raises:
        CheckpointError: missing file, a file holding pickled objects other than tensors
            and plain containers, or not a medssl checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "is empty (0 bytes): not a checkpoint (a copy or download that did not finish?)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError for foreign objects, RuntimeError for corrupt zips, EOFError ...
        raise CheckpointError(path, _load_failure(path, e)) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(path, f"not a medssl checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})")
    missing = [k for k in _REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(path, f"checkpoint lacks {missing}")
    _check_json_fields(path, state)
    _check_field_types(path, state)
    return state


def _check_field_types(path: Path, state: dict[str, Any]) -> None:
    """The plain entries have the types medssl writes (a '5' step would fail later as "'>' between str and int")."""
    expected = {"method": str, "step": int, "epoch": int, "model": dict}
    for key, tp in expected.items():
        value = state[key]
        if not isinstance(value, tp) or isinstance(value, bool) or (tp is int and value < 0):
            what = "a non-negative int" if tp is int else tp.__name__
            raise CheckpointError(path, f"its {key!r} must be {what}, got {str(value)[:60]!r} "
                                        f"({type(value).__name__}); the checkpoint is damaged")  # fmt: skip


def _load_failure(path: Path, e: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in words: a refused object, a damaged archive, or no checkpoint."""
    text = str(e)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return (f"holds a pickled object ({refused.group(1)}) that is not a tensor, number or string; it is refused "
                "unread (weights_only=True), because loading it could run arbitrary code: medssl checkpoints "
                "hold only tensors, numbers and strings")  # fmt: skip
    reason = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    detail = f"{type(e).__name__}{': ' + reason[:160] if reason else ''}"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        head = b""
    if head.startswith(b"PK\x03\x04"):
        return (f"is a damaged PyTorch archive ({detail}): truncated or corrupted (a copy or download that did "
                "not finish?); it cannot be used")  # fmt: skip
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return f"is a truncated or damaged PyTorch file in the legacy format ({detail}); it cannot be used"
    return (f"is not a PyTorch checkpoint: neither a zip archive (PyTorch's format) nor a pickle (it starts with "
            f"{head!r}); a corrupt file or another kind of file named .pt")  # fmt: skip


def _check_json_fields(path: Path, state: dict[str, Any]) -> None:
    """The JSON-string entries (configs, rng state) must parse to JSON objects."""
    for key in _JSON_KEYS:
        if key not in state:
            continue
        text = state[key]
        try:
            value = json.loads(text) if isinstance(text, str) else None
        except ValueError as e:
            raise CheckpointError(path, f"its {key!r} is not valid JSON ({e}); the checkpoint is damaged") from None
        if not isinstance(value, dict):
            raise CheckpointError(path, f"its {key!r} must be a JSON object string, got {str(text)[:60]!r}")


def load_method(checkpoint_path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "Method":
    """Rebuild the trained method from a checkpoint (in eval mode, for evaluators).

    The method is rebuilt with ``create_method(name, config)`` from the JSON config stored in
    the checkpoint, then its weights are loaded strictly.
    """
    from medssl.methods.base import create_method, get_method_class

    state = load_checkpoint(checkpoint_path, map_location)
    try:
        cls = get_method_class(state["method"])
        config = config_from_json(cls.Config, state["method_config"])
        method = create_method(state["method"], config=config)
        method.load_state_dict(state["model"], strict=True)
    except TypeError as e:  # a stored config value of the wrong type, or an unknown field
        raise CheckpointError(checkpoint_path, f"cannot rebuild method {state['method']!r}: its stored config is "
                              f"damaged or from another version ({e})") from None  # fmt: skip
    except (KeyError, ValueError, RuntimeError) as e:  # unknown method, bad config values, shapes
        raise CheckpointError(checkpoint_path, f"cannot rebuild method {state['method']!r}: {e}") from None
    method.registry_name = str(state.get("registry_name", state["method"]))
    # the training volumes' preprocessing (None for older checkpoints): readers check new inputs against it
    method.preprocessing = _preprocessing_record(state)
    return method.to(map_location).eval()


def _preprocessing_record(state: dict[str, Any]) -> dict[str, Any] | None:
    from medssl.train.preprocessing import record_from_state

    return record_from_state(state)


def config_to_json(config: Any) -> str:
    """A dataclass config as a JSON string (tuples become lists)."""
    return json.dumps(asdict(config), sort_keys=True)


def config_from_json(config_cls: type, text: str) -> Any:
    """Inverse of :func:`config_to_json`; restores tuple fields and rejects unknown keys."""
    from medssl._config import check_overrides

    values = json.loads(text)
    known = {f.name: f for f in fields(config_cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise TypeError(f"{config_cls.__qualname__} has no fields {unknown}")
    defaults = config_cls()
    for name, value in values.items():
        if isinstance(value, list) and isinstance(getattr(defaults, name), tuple):
            values[name] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    # every value of the type its field declares, before the config's own checks compare them ('>' on a str ...)
    check_overrides(config_cls, values, config_cls.__qualname__)
    return config_cls(**values)


def numpy_rng_state(rng: np.random.Generator) -> str:
    """The generator's bit-generator state as JSON (its 128-bit ints survive; no pickling)."""
    return json.dumps(rng.bit_generator.state)


def restore_numpy_rng(text: str) -> np.random.Generator:
    state = json.loads(text)
    bit_generator = getattr(np.random, state["bit_generator"])()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


def prune_epoch_checkpoints(ckpt_dir: Path, keep_last: int | None) -> None:
    """Delete all but the newest ``keep_last`` ``epoch-XXXX.pt`` files (``None`` keeps all)."""
    if keep_last is None:
        return
    epoch_files = sorted(
        (int(m.group(1)), p) for p in ckpt_dir.glob("epoch-*.pt") if (m := _EPOCH_FILE.match(p.name))
    )
    for _, p in epoch_files[: max(len(epoch_files) - keep_last, 0)]:
        p.unlink(missing_ok=True)


def training_state(method: "Method", config: Any, optimizer: Any, scheduler: Any, scaler: Any, step: int,
                   steps_per_epoch: int, elapsed_s: float, numpy_rngs: list[str], torch_rngs: list[torch.Tensor],
                   cuda_rng: torch.Tensor | None, preprocessing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything an exact resume needs, as plain tensors, numbers and strings.

    ``numpy_rngs``/``torch_rngs``: one entry per DDP rank (rank order), so every rank resumes
    its own sampling stream; ``numpy_rng`` (rank 0's) is kept for readers of older files.
    ``preprocessing``: the training volumes' preprocessing record
    (:func:`medssl.train.preprocessing.record_from_volumes`), stored as a JSON object string.
    """
    extra = {} if preprocessing is None else {"preprocessing": json.dumps(preprocessing, sort_keys=True)}
    return {
        "format": CHECKPOINT_FORMAT,
        "method": method.name,
        "registry_name": getattr(method, "registry_name", method.name),
        "method_config": config_to_json(method.config),
        "train_config": config_to_json(config),
        "model": method.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
        "step": step,
        "epoch": step // steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "elapsed_s": elapsed_s,
        "numpy_rng": numpy_rngs[0],
        "numpy_rngs": list(numpy_rngs),
        "torch_rng": torch_rngs[0],
        "torch_rngs": list(torch_rngs),
        "cuda_rng": cuda_rng,
        "torch_version": str(torch.__version__),
        **extra,
    }


def check_resumable(state: dict, method: "Method", config: Any, path: Path) -> None:
    """Refuse a checkpoint of another method/config; warn about changed train settings."""
    import warnings

    if state["method"] != method.name or state["method_config"] != config_to_json(method.config):
        raise CheckpointError(
            path,
            f"was trained by {state['method']!r} with config {state['method_config']}, which differs from the "
            f"method given ({method.name!r}, {config_to_json(method.config)}); use another method_dir to train it",
        )
    saved = json.loads(state.get("train_config", "{}"))
    changed = {k: (saved.get(k), v) for k, v in asdict(config).items() if k != "epochs" and saved.get(k) != v}
    if changed:
        warnings.warn(f"{path}: resuming with changed train settings (old, new): {changed}", stacklevel=3)
