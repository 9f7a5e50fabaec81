"""The Method contract and the method registry.

A Method is backbone + heads + loss + the sampler/view recipe it needs. The
trainer only ever calls ``sample``, ``training_step`` and ``embed``, so a new
method is one file plus ``@register_method("name")``; the shared tests in
``tests/methods/test_shared_method_contract.py`` then cover it automatically.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from torch import nn

from medssl.data.volume import Volume
from medssl.sampling.base import PatchBatch


@dataclass(frozen=True)
class MethodConfig:
    """Fields every method's Config has (the trainer, presets and evaluators rely on them).

    Defaults are the ISImed paper's: DenseNet121, 32^3 patches, 16 patches from each of 64 volumes.
    """

    backbone: str = "densenet121"
    patch_size_vox: int = 32
    volumes_per_batch: int = 64
    patches_per_volume: int = 16
    in_channels: int = 1
    foreground_only: bool = False  # patch centres on the body (label > 0, else image above its minimum)
    embed_dim: int | None = None  # None = the backbone's default width (1024 for DenseNet121)


@dataclass
class StepOutput:
    """What ``training_step`` returns: the loss to minimise and scalar logs."""

    loss: torch.Tensor
    logs: dict[str, float]


class Method(nn.Module):
    """Base class for every SSL method.

    Subclasses set ``name`` (via the registry decorator) and ``Config`` (a frozen
    dataclass with the paper's defaults), build ``self.backbone`` and whatever
    heads/losses they need in ``__init__(config)``, and implement:

    - ``sample(volumes, rng) -> PatchBatch``: draw one training batch on the CPU,
      views included (so the trainer can prefetch it).
    - ``training_step(batch) -> StepOutput``: batch already on the model's device.
    - ``embed(x) -> (B, D)``: the representation used for transfer/evaluation.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type]

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    @property
    def embed_dim(self) -> int:
        return int(self.backbone.embed_dim)  # type: ignore[attr-defined]

    @property
    def patch_size_vox(self) -> tuple[int, int, int]:
        p = self.config.patch_size_vox
        return (p,) * 3 if isinstance(p, int) else tuple(p)

    def sample(self, volumes: Sequence[Volume], rng: np.random.Generator) -> PatchBatch:
        raise NotImplementedError

    def training_step(self, batch: PatchBatch) -> StepOutput:
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, C, *S)`` -> ``(B, D)``. Callers put the module in eval mode."""
        return self.backbone(x)  # type: ignore[attr-defined]

    def config_dict(self) -> dict[str, Any]:
        return {"method": self.name, **asdict(self.config)}


_REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: ``@register_method("isimed")``."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        if not is_dataclass(getattr(cls, "Config", None)):
            raise TypeError(f"{cls.__qualname__} needs a dataclass `Config`")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_methods() -> list[str]:
    _import_builtin_methods()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    _import_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


def make_config(name: str, **overrides: Any) -> Any:
    """The method's default Config with ``overrides`` applied (unknown keys raise)."""
    cls = get_method_class(name)
    cfg = cls.Config()
    known = {f.name for f in fields(cfg)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"{name}: unknown config keys {sorted(unknown)}; known: {sorted(known)}")
    return replace(cfg, **overrides)


def create_method(name: str, config: Any = None, **overrides: Any) -> Method:
    """Build a registered method from its default config, a config, or overrides."""
    cls = get_method_class(name)
    if config is None:
        config = make_config(name, **overrides)
    elif overrides:
        config = replace(config, **overrides)
    return cls(config)


def _import_builtin_methods() -> None:
    # Importing the package registers the built-in methods (each file decorates its class).
    import medssl.methods  # noqa: F401
