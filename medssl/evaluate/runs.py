"""Find and load the pretrained methods of a run directory for evaluation.

Layout (team convention): ``runs/<run>/<method>/checkpoints/last.pt`` per method,
``runs/<run>/eval/`` for shared evaluation artefacts, ``runs/<run>/<step>/`` per
evaluation notebook.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from medssl import paths

__all__ = ["RANDOM_INIT", "run_path", "method_checkpoint", "find_checkpoints", "load_run_methods", "random_init_like",
           "results_dir", "eval_dir"]

RANDOM_INIT = "random-init"


def run_path(run: str | os.PathLike) -> Path:
    """A run name (``"demo"`` -> ``runs_dir()/demo``) or a path to a run directory."""
    p = Path(run)
    return p if (p.is_absolute() or len(p.parts) > 1) else paths.runs_dir() / p


def method_checkpoint(run_dir: str | os.PathLike, method: str, which: str = "last.pt") -> Path:
    """``<run_dir>/<method>/checkpoints/<which>`` (it may not exist)."""
    return run_path(run_dir) / method / "checkpoints" / which


def find_checkpoints(run_dir: str | os.PathLike, methods: Sequence[str]) -> dict[str, Path | None]:
    """``{method: checkpoint path, or None when the method has not been trained in this run}``."""
    return {m: (p if (p := method_checkpoint(run_dir, m)).is_file() else None) for m in methods}


def results_dir(run: str | os.PathLike, step: str) -> Path:
    """``runs/<run>/<step>/`` (created), e.g. ``results_dir("demo", "30_linear_probe")``."""
    d = run_path(run) / step
    d.mkdir(parents=True, exist_ok=True)
    return d


def eval_dir(run: str | os.PathLike) -> Path:
    """``runs/<run>/eval/`` (created): shared patch sets and embedding caches."""
    return results_dir(run, "eval")


def random_init_like(method: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A fresh, untrained instance of ``method``'s class and config, initialised under ``seed``.

    The global torch RNG is left as it was.
    """
    from medssl.methods import create_method

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = create_method(method.name, config=method.config)
    return fresh.eval()


def load_run_methods(
    run_dir: str | os.PathLike,
    methods: Sequence[str],
    include_random_init: bool = True,
    seed: int = 0,
    random_init_config: tuple[str, dict[str, Any]] | None = None,
    verbose: bool = True,
) -> dict[str, torch.nn.Module]:
    """Load each method's ``last.pt`` checkpoint; skip (with a message) those not trained in this run.

    Args:
        run_dir: run name or directory.
        methods: method names (= sub-directories of the run).
        include_random_init: add ``"random-init"``: the first loaded method's class and
            config, untrained, initialised with ``seed`` (or ``random_init_config``).
        random_init_config: ``(method name, config overrides)`` for the random-init baseline
            instead of the first loaded method.
        verbose: print what was skipped (otherwise it is a ``UserWarning``).

    Returns:
        ``{name: method in eval mode}`` in the order of ``methods`` (random-init last).
    """
    from medssl.train.checkpoint import load_method

    loaded: dict[str, torch.nn.Module] = {}
    for name, ckpt in find_checkpoints(run_dir, methods).items():
        if ckpt is None:
            where = method_checkpoint(run_dir, name)
            _report(f"{name}: no checkpoint at {where}; skipped (train it with 10_pretrain.ipynb)", verbose)
            continue
        with torch.random.fork_rng(devices=[]):  # building the module draws init weights; keep the caller's RNG
            loaded[name] = load_method(ckpt).eval()
    if include_random_init:
        if random_init_config is not None:
            from medssl.methods import create_method

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                loaded[RANDOM_INIT] = create_method(random_init_config[0], **random_init_config[1]).eval()
        elif loaded:
            loaded[RANDOM_INIT] = random_init_like(next(iter(loaded.values())), seed)
        else:
            _report("random-init: no trained method to copy the configuration from; skipped", verbose)
    return loaded


def _report(msg: str, verbose: bool) -> None:
    if verbose:
        print(msg)
    else:
        warnings.warn(msg)
