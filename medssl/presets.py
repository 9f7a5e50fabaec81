"""Named settings: ``paper`` (the published setup, for a GPU), ``demo`` (minutes on a laptop
CPU) and ``tiny`` (seconds, for smoke tests).

``preset(method, name) -> (method_overrides, TrainConfig)``::

    overrides, train_config = preset("isimed", "demo")
    method = create_method("isimed", **overrides)
    fit(method, volumes, train_config, RunDir(run).method_dir("isimed"))

Values are plain Python literals, so a papermill parameters cell can name a preset and
override single values on top.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from medssl._config import check_overrides
from medssl.train.config import TrainConfig

__all__ = ["PRESETS", "preset", "list_presets", "build_run"]

# Shared settings per preset. A shared method setting applies only to methods that keep the common default of that
# field (MethodConfig's): a method whose paper fixes another value (the context methods' 42^3 planes, batch 8) keeps
# it unless its own ``Method.presets`` entry says otherwise; so a method's defaults come from its class, and a
# method's preset lists only what differs from them. "tiny" (smoke tests) is the exception: its sizes apply to every
# method that has the field (``for_every_method``). A method adds its own settings on top through ``Method.presets``
# (e.g. ISImed's demo scale), so a new method needs no edit here.
PRESETS: dict[str, dict[str, Any]] = {
    # ISImed paper (sec. 2-3): DenseNet121, 32^3, 16 patches x 64 volumes, AdamW 1e-3, x0.9 per epoch, 50 epochs.
    "paper": {
        "method": {"backbone": "densenet121", "patch_size_vox": 32, "volumes_per_batch": 64, "patches_per_volume": 16},
        "train": {"epochs": 50, "lr": 1e-3, "lr_decay_per_epoch": 0.9, "device": "auto", "precision": "auto"},
    },
    # 2-core CPU: stride-2 SmallCNN, 32^3 patches centred on the body (foreground_only), 30 epochs x 7 steps =
    # 210 steps (cut from 600 so that `make demo` runs all 11 demo methods and every evaluation in under 30 minutes;
    # per-step times of each method: README, "Results on the demo cohort" and "Reference study");
    # 0.9/epoch leaves 4.7 % of the lr at the end.
    # Equal data budget: EVERY method sees 12 volumes x 16 = 192 distinct patches per step (two-view methods
    # embed two views of each, so their steps cost about twice as much compute; the report states it).
    "demo": {
        "method": {"backbone": "smallcnn", "patch_size_vox": 32, "volumes_per_batch": 12, "patches_per_volume": 16,
                   "foreground_only": True},
        "train": {
            "epochs": 30,
            "steps_per_epoch": 7,
            "lr": 1e-3,
            "lr_decay_per_epoch": 0.9,
            "log_every": 10,
            "eval_every_epochs": 5,
            "checkpoint_every_epochs": 10,
            "keep_last": 1,
        },
    },
    # Smoke tests: 16^3 patches, 2 volumes x 4 patches, 2 epochs x 2 steps; fp32 so runs are
    # deterministic (and because bf16 conv3d gradients on 2^3 feature maps are flaky on this CPU).
    "tiny": {
        "for_every_method": True,
        "method": {"backbone": "smallcnn", "patch_size_vox": 16, "volumes_per_batch": 2, "patches_per_volume": 4},
        "train": {
            "epochs": 2,
            "steps_per_epoch": 2,
            "lr": 1e-3,
            "precision": "fp32",
            "log_every": 1,
            "keep_last": 1,
        },
    },
}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def preset(method: str, name: str) -> tuple[dict[str, Any], TrainConfig]:
    """``(method_overrides, TrainConfig)`` of preset ``name`` for ``method`` (the argument order of :func:`build_run`).

    The shared preset, then the method class's own ``presets[name]``. A shared method setting is kept only
    where the method's Config has that field and keeps its common default (:class:`MethodConfig`'s): a
    method whose own default differs (its paper's) keeps that one, except in a preset marked
    ``for_every_method`` (``tiny``). Per-method settings are applied as given, so a typo there fails in
    ``create_method``.
    """
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(list_presets())}")
    spec = PRESETS[name]
    own = _method_preset(method, name)
    defaults = _config_defaults(method)
    common = {f.name: f.default for f in fields(_method_config())}
    every = bool(spec.get("for_every_method", False))
    overrides = {k: v for k, v in spec["method"].items()
                 if defaults is None or (k in defaults and (every or k not in common or defaults[k] == common[k]))}
    overrides.update(own.get("method", {}))
    train = replace(TrainConfig(), **{**spec["train"], **own.get("train", {})})
    return overrides, train


def _method_config() -> type:
    from medssl.methods.base import MethodConfig

    return MethodConfig


def _method_preset(method: str, name: str) -> dict[str, Any]:
    from medssl.methods.base import get_method_class

    try:
        return dict(get_method_class(method).presets.get(name, {}))
    except KeyError:
        return {}


def _config_defaults(method: str) -> dict[str, Any] | None:
    """The method's own defaults: its Config's, with a variant's overrides (None for an unknown method)."""
    from medssl.methods.base import make_config

    try:
        config = make_config(method)
    except KeyError:
        return None
    return {f.name: getattr(config, f.name) for f in fields(config)}


def build_run(
    method: str,
    preset_name: str = "demo",
    *,
    method_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> tuple[Any, TrainConfig]:
    """A seeded, freshly initialised method and its TrainConfig, from a preset plus overrides.

    The model is initialised under ``torch.manual_seed(seed)`` (``fit`` seeds only the
    sampling and training randomness), and ``seed`` also becomes ``TrainConfig.seed``, so
    one number reproduces a run. Unknown override keys raise.
    """
    import torch

    from medssl.methods.base import create_method

    overrides, train = preset(method, preset_name)
    overrides.update(method_overrides or {})
    check_overrides(TrainConfig, dict(train_overrides or {}), "TrainConfig")
    train = replace(train, **{"seed": seed, **(train_overrides or {})})
    torch.manual_seed(seed)
    return create_method(method, **overrides), train
