"""Load the pretrained methods of a run (layout: :class:`medssl.rundir.RunDir`) for evaluation."""

from __future__ import annotations

import os
import warnings
from typing import Any, Sequence

import torch

from medssl.rundir import RunDir

__all__ = ["RANDOM_INIT", "load_run_methods", "random_init_like"]

RANDOM_INIT = "random-init"


def random_init_like(method: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A fresh, untrained instance of ``method``'s class and config, initialised under ``seed``.

    It is marked ``random_init = True``: evaluations treat it as a baseline, e.g. its latent is
    not read as metric (ISImed's mm-per-unit scale means nothing for untrained weights).
    The global torch RNG is left as it was.
    """
    from medssl.methods import create_method

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = create_method(method.name, config=method.config)
    fresh.random_init = True
    return fresh.eval()


def load_run_methods(
    run: "str | os.PathLike | RunDir",
    methods: Sequence[str] | None = None,
    include_random_init: bool = True,
    seed: int = 0,
    random_init_config: tuple[str, dict[str, Any]] | None = None,
    verbose: bool = True,
) -> dict[str, torch.nn.Module]:
    """Load each method's ``last.pt``; skip (with a message) those not trained in this run.

    Args:
        run: run name, :class:`~pathlib.Path` or :class:`~medssl.rundir.RunDir`.
        methods: method (or variant) names; empty or None means every trained method of the run.
        include_random_init: add ``"random-init"``: the first loaded *trained* method's class and
            config, untrained, initialised with ``seed`` (or ``random_init_config``).
        random_init_config: ``(method name, config overrides)`` for the random-init baseline
            instead of the first loaded method.
        verbose: print what was skipped (otherwise it is a ``UserWarning``).

    Returns:
        ``{name: method in eval mode}`` in the order of ``methods`` (random-init last).
    """
    from medssl.train.checkpoint import load_method

    rd = RunDir(run)
    loaded: dict[str, torch.nn.Module] = {}
    for name, ckpt in rd.checkpoints(methods).items():
        if ckpt is None:
            _report(f"{name}: no checkpoint at {rd.checkpoint(name)}; skipped (train it with 10_pretrain.ipynb)", verbose)
            continue
        with torch.random.fork_rng(devices=[]):  # building the module draws init weights; keep the caller's RNG
            loaded[name] = load_method(ckpt).eval()
    if include_random_init:
        if random_init_config is not None:
            from medssl.methods import create_method

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                loaded[RANDOM_INIT] = create_method(random_init_config[0], **random_init_config[1]).eval()
            loaded[RANDOM_INIT].random_init = True
        elif trained := [m for m in loaded.values() if m.trains]:
            loaded[RANDOM_INIT] = random_init_like(trained[0], seed)
        else:
            _report("random-init: no trained method to copy the configuration from; skipped", verbose)
    return loaded


def _report(msg: str, verbose: bool) -> None:
    if verbose:
        print(msg)
    else:
        warnings.warn(msg)
