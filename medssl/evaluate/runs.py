"""Load the pretrained methods of a run (layout: :class:`medssl.rundir.RunDir`) for evaluation.

**Matched twins.** Every trained method is compared with *its own* untrained twin: the same
embedding network (backbone class, layer shapes, input cut) with untrained, seeded weights.
:func:`load_run_methods` adds one ``random-init[<backbone>]`` row per distinct architecture among
the trained methods, unless the run already holds an untrained method of that architecture (the
paper's ``xavier`` baseline *is* the untrained start of Reg2D and Heatmap: the same D2D-CNNs,
Xavier-initialised), and :func:`matched_twins` says which row is whose twin.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from typing import Any, Mapping, Sequence

import torch

from medssl.rundir import RunDir

__all__ = ["RANDOM_INIT", "architecture_key", "is_random_init", "load_run_methods", "matched_twins",
           "random_init_like", "twin_name"]

RANDOM_INIT = "random-init"


def is_random_init(name: str) -> bool:
    """True for the untrained-twin rows: ``random-init`` and ``random-init[...]``."""
    return name == RANDOM_INIT or name.startswith(RANDOM_INIT + "[")


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


def architecture_key(model: torch.nn.Module) -> str:
    """What a model's embedding depends on besides its weights, as a short hash.

    The embedding network (``model.backbone``, else the model): its module classes and the names
    and shapes of its parameters and buffers; and the shape of the input it is given at one point
    (``cut_inputs`` on a small blank volume: cubes, 2D squares or three planes). Two models with
    the same key differ only in weights.
    """
    import numpy as np

    net = getattr(model, "backbone", model)
    size = tuple(int(s) for s in getattr(model, "input_size_vox", ()) or ())
    cut_shape: tuple[int, ...] = size
    if size and hasattr(model, "cut_inputs"):
        channels = int(getattr(getattr(model, "config", None), "in_channels", 1) or 1)
        blank = np.zeros((channels, *(s + 2 for s in size)), dtype=np.float32)
        cut_shape = tuple(np.shape(model.cut_inputs(blank, np.array([[s // 2 + 1 for s in size]]))))
    spec = (
        tuple(type(m).__name__ for m in net.modules()),
        tuple((k, tuple(v.shape)) for k, v in net.state_dict().items()),
        cut_shape,
    )
    return hashlib.sha256(repr(spec).encode()).hexdigest()[:16]


def _untrained(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "random_init", False)) or getattr(model, "trains", True) is False


def matched_twins(models: Mapping[str, torch.nn.Module]) -> dict[str, str]:
    """``{trained method: its untrained twin's row}`` among ``models`` (same :func:`architecture_key`).

    Random-init rows are preferred over other untrained methods of the same architecture only
    when both exist; a trained method without a twin among ``models`` is left out.
    """
    untrained: dict[str, str] = {}
    for name, m in models.items():
        if _untrained(m):
            key = architecture_key(m)
            if key not in untrained or (is_random_init(name) and not is_random_init(untrained[key])):
                untrained[key] = name
    out = {}
    for name, m in models.items():
        if not _untrained(m) and (twin := untrained.get(architecture_key(m))) is not None:
            out[name] = twin
    return out


def twin_name(model: torch.nn.Module, taken: Sequence[str] = ()) -> str:
    """``random-init[<backbone>]`` (``[<backbone>,<input edge>]`` or a number when that is taken)."""
    backbone = str(getattr(getattr(model, "config", None), "backbone", "") or type(model).__name__.lower())
    edge = "x".join(str(int(s)) for s in dict.fromkeys(getattr(model, "input_size_vox", ()) or ()))
    for candidate in (f"{RANDOM_INIT}[{backbone}]", f"{RANDOM_INIT}[{backbone},{edge}]"):
        if candidate not in taken:
            return candidate
    k = 2
    while f"{RANDOM_INIT}[{backbone},{edge},{k}]" in taken:
        k += 1
    return f"{RANDOM_INIT}[{backbone},{edge},{k}]"


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
        include_random_init: add the matched twins: one ``random-init[<backbone>]`` per distinct
            architecture of the loaded *trained* methods (:func:`architecture_key`), the first such
            method's class and config, untrained, initialised with ``seed``; none for an
            architecture whose untrained twin is already loaded (``xavier`` for Reg2D/Heatmap).
        random_init_config: ``(method name, config overrides)``: build the random-init rows from
            this instead (one row, named like the others).
        verbose: print what was skipped (otherwise it is a ``UserWarning``).

    Returns:
        ``{name: method in eval mode}`` in the order of ``methods`` (random-init rows last).
        :func:`matched_twins` of it gives each trained method's twin.
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
    if not include_random_init:
        return loaded
    if random_init_config is not None:
        from medssl.methods import create_method

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = create_method(random_init_config[0], **random_init_config[1]).eval()
        fresh.random_init = True
        loaded[twin_name(fresh, list(loaded))] = fresh
        return loaded
    trained = [m for m in loaded.values() if getattr(m, "trains", True) and not _untrained(m)]
    if not trained:
        _report("random-init: no trained method to copy the configuration from; skipped", verbose)
        return loaded
    have = {architecture_key(m) for m in loaded.values() if _untrained(m)}
    for m in trained:
        key = architecture_key(m)
        if key in have:
            continue
        have.add(key)
        fresh = random_init_like(m, seed)
        loaded[twin_name(fresh, list(loaded))] = fresh
    return loaded


def _report(msg: str, verbose: bool) -> None:
    if verbose:
        print(msg)
    else:
        warnings.warn(msg)
